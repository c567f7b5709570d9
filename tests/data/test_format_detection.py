"""`format="auto"` reads a file as the one format it clearly is, or stops with one line (issue 15, point 2).

Each case below was read silently as something else before detection refused to guess.
"""
import typing

import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.config import ConfigError, DataConfig, load_config
from jaxrec.data.readers import FORMATS, DataFormatError, read_interactions


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(path, match, **options):
    """The one-line DataFormatError that reading `path` raises (its message must match)."""
    with pytest.raises(DataFormatError, match=match) as e:
        read_interactions(path, **options)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))
    return e.value


def counts(store):
    return store.n_users, store.n_items, store.n_interactions


# --- 4 columns: ML-100K u.data ------------------------------------------------------------
def test_udata_layout_is_read_as_ratings_not_sequences(tmp_path):
    # Was: 1 user with items 2, 5, 100, 3, 4, 101 (ratings and timestamps counted as items).
    s = read_interactions(write(tmp_path, "u.txt", "1 2 5 100\n1 3 4 101\n"))
    assert s.source == "ratings:u.txt" and counts(s) == (1, 2, 2)
    np.testing.assert_array_equal(s.timestamps, [100, 101])


def test_udata_tab_separated_sorts_each_user_by_time_and_filters_ratings(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n")
    s = read_interactions(path)
    assert counts(s) == (2, 3, 3) and list(s.user_vocab) == ["186", "196"]
    assert [s.item_vocab[i] for i in s.sequence(1)] == ["377", "242"]      # by timestamp
    kept = read_interactions(path, min_rating=3)
    assert kept.source == "ratings:u.data,min_rating=3" and counts(kept) == (2, 2, 2)


def test_four_columns_without_a_repeated_user_are_ambiguous(tmp_path):
    path = write(tmp_path, "s.txt", "1 2 5 100\n2 3 4 101\n")
    refused(path, r"ambiguous: every line has 4 fields .* ratings .* and sequences .*--format or data.format")
    assert counts(read_interactions(path, format="sequences")) == (2, 6, 6)
    assert counts(read_interactions(path, format="ratings")) == (2, 2, 2)


def test_bad_rating_is_a_bad_line(tmp_path):
    refused(write(tmp_path, "u.txt", "1 2 5 100\n1 3 x 101\n"), r"u.txt:2: bad rating 'x'")


# --- pairs with timestamps ----------------------------------------------------------------
def test_pairs_with_one_missing_timestamp_stop_at_that_line(tmp_path):
    # Was: read as sequences, the timestamps becoming items.
    path = write(tmp_path, "p.txt", "1 2 100\n1 3 101\n2 4\n2 5 103\n")
    refused(path, r"p.txt:3: expected 3 fields like line 1, found 2")


def test_lines_of_several_shapes_with_repeated_users_name_the_first_odd_line(tmp_path):
    path = write(tmp_path, "m.txt", "1 2 3 4\n1 3 4 5\n2 4 5\n")
    refused(path, r"m.txt:3: 3 fields where line 1 has 4, and users repeat across lines \(user '1' on lines 1 and 2\)")
    refused(write(tmp_path, "w.txt", "1 2 3 4 5\n1 3 4 5 6\n"), r"w.txt: every line has 5 fields.* users repeat")


def test_two_or_three_fields_without_repeated_users_are_ambiguous(tmp_path):
    refused(write(tmp_path, "a.txt", "1 2 100\n2 3\n"), r"ambiguous: lines have 2 or 3 fields .* timestamps missing")


# --- headers ------------------------------------------------------------------------------
def test_user_item_header_is_recognised_not_read_as_a_user(tmp_path):
    # Was: the header became user "user" with item "item".
    s = read_interactions(write(tmp_path, "p.txt", "user item\n1 2\n1 3\n"))
    assert s.source == "pairs:p.txt" and counts(s) == (1, 2, 2) and list(s.user_vocab) == ["1"]
    s = read_interactions(write(tmp_path, "t.txt", "User_ID\tItem_ID\tTimestamp\n1\t2\t9\n1\t3\t8\n"), format="pairs")
    assert counts(s) == (1, 2, 2) and list(s.timestamps) == [8, 9]
    s = read_interactions(write(tmp_path, "r.txt", "user item rating timestamp\n1 2 5 9\n2 2 4 8\n"))
    assert s.source == "ratings:r.txt" and counts(s) == (2, 1, 2)


def test_header_only_pairs_file_is_an_error(tmp_path):
    # Was: 1 user, 1 item.
    refused(write(tmp_path, "h.txt", "user item\n\n"), r"h.txt:1: only a header \('user item'\), no data lines")


@pytest.mark.parametrize("text, fmt, match", [
    ("uid iid\n1 2\n1 3\n", "auto", r":1: looks like a header \('uid iid'"),
    ("item_id movie_id\n1 1\n2 2\n", "pairs", r":1: looks like a header"),
    ("user rating\n1 2\n", "auto", r":1: header 'user rating' is not a layout jaxrec reads"),
    ("user item\n1 2 3\n", "auto", r":2: expected 2 fields like the header, found 3"),
    ("user item\n1 2\n", "sequences", r":1: the header names a pairs layout, but the format is sequences"),
    ("user item rating timestamp\n1 2 3 4\n", "pairs", r":1: the header names a ratings layout"),
])
def test_headers_that_do_not_fit(tmp_path, text, fmt, match):
    refused(write(tmp_path, "h.txt", text), match, format=fmt)


def test_string_ids_may_start_with_a_word(tmp_path):
    s = read_interactions(write(tmp_path, "p.txt", "bob x\n1 2\n"), format="pairs", ids="str")
    assert list(s.user_vocab) == ["bob", "1"]


# --- LLaRA TSVs that are not quite LLaRA ---------------------------------------------------
@pytest.mark.parametrize("header, match", [
    ("seq\tlabel\n", r"train.tsv:1: looks like a header \('seq label'"),
    ("history\tnext\n", r"train.tsv:1: looks like a header"),
    ("", r"train.tsv:1: a tab-separated field holds spaces, so this is a TSV"),
])
def test_llara_tsv_with_a_wrong_header_is_not_read_as_sequences(tmp_path, header, match):
    # Was: read as sequences whose user is the first history item.
    refused(write(tmp_path, "train.tsv", header + "0 1 2\t3\n1 2\t4\n5 6 7 8\t9\n"), match)


def test_llara_tsv_with_spaces_for_tabs_is_an_error(tmp_path):
    refused(write(tmp_path, "train.tsv", "seq next\n0 1 2 3\n1 2 4\n"), r"train.tsv:1: a LLaRA header written "
                                                                         r"without its tab")


def test_llara_header_decides_whatever_the_file_name(tmp_path):
    s = read_interactions(write(tmp_path, "train.txt", "seq\tnext\n0 1\t2\n"))
    assert s.source.startswith("llara:") and counts(s) == (1, 3, 3)


# --- RecBole atomic files by their header ---------------------------------------------------
def test_recbole_header_decides_and_metadata_files_are_refused(tmp_path):
    s = read_interactions(write(tmp_path, "ml.txt", "user_id:token\titem_id:token\n1\t2\n1\t3\n"))
    assert s.source == "recbole:ml.txt" and counts(s) == (1, 2, 2)
    refused(write(tmp_path, "ml.item", "item_id:token\tmovie_title:token_seq\n1\tToy Story\n"),
            r"ml.item:1: header has no 'user_id' field")


# --- data.format / --format -----------------------------------------------------------------
def test_config_format_choices_are_the_readers_formats():
    assert typing.get_args(typing.get_type_hints(DataConfig)["format"]) == FORMATS


def test_bogus_data_format_in_a_config_names_the_key_and_choices(tmp_path):
    config = write(tmp_path, "c.yaml", "data: {source: x.txt, format: bogus}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value) == (f"{config}: data.format: 'bogus' is not one of auto, pairs, sequences, ratings, "
                            "movielens, recbole, llara")
    with pytest.raises(ConfigError, match=r"data.format: 'bogus' is not one of auto, pairs"):
        load_config(None, ["data.format=bogus"])


def test_data_stats_with_a_bogus_format_is_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, "u.txt", "1 2\n1 3\n")
    assert main(["data", "stats", str(path), "--format", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format" in err and "'bogus'" in err
    assert "auto, pairs, sequences, ratings, movielens, recbole, llara" in err


def test_data_stats_on_an_ambiguous_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "stats", str(write(tmp_path, "s.txt", "1 2 3\n2 3 4\n"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ambiguous" in err and "--format" in err
    assert main(["data", "stats", str(tmp_path / "s.txt"), "--format", "sequences"]) == 0
