"""Readers: hand-made files (exact behaviour, malformed input) and the shared benchmark files."""
import numpy as np
import pytest

from jaxrec.data.llara import read_llara
from jaxrec.data.readers import DataFormatError, read_interactions
from jaxrec.data.text import clean_title


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def assert_format_error(read, error_file, line, reason):
    """`read()` raises DataFormatError naming `error_file`, `line` and `reason`."""
    with pytest.raises(DataFormatError) as e:
        read()
    assert str(e.value).startswith(f"{error_file}:{line}: ") and reason in str(e.value)
    assert (e.value.path, e.value.line) == (str(error_file), line)


def items_of(store, u):
    return [store.item_vocab[i] for i in store.sequence(u)]


# --- pairs and sequences ------------------------------------------------------------------
def test_pairs_group_users_stably_and_order_integers_numerically(tmp_path):
    path = write(tmp_path, "p.txt", "10 5\n2 7\n10 3\n\n2 5\n10 5\n")
    s = read_interactions(path, format="pairs")
    assert list(s.user_vocab) == ["2", "10"]            # numeric, not "10" < "2"
    assert list(s.item_vocab) == ["<pad>", "3", "5", "7"]
    assert items_of(s, 0) == ["7", "5"] and items_of(s, 1) == ["5", "3", "5"]  # file order within a user
    assert s.timestamps is None and s.source == "pairs:p.txt"


def test_string_ids_keep_first_appearance(tmp_path):
    s = read_interactions(write(tmp_path, "p.txt", "bob x9\nann a1\nbob 07\n"), format="pairs")
    assert list(s.user_vocab) == ["bob", "ann"]
    assert list(s.item_vocab) == ["<pad>", "x9", "a1", "07"]
    # "07" is not a canonical integer, so a file of 07/7 tokens keeps them apart, in file order
    s = read_interactions(write(tmp_path, "q.txt", "1 07\n1 7\n"), format="pairs")
    assert list(s.item_vocab) == ["<pad>", "07", "7"]


def test_pairs_with_timestamps_sort_within_user(tmp_path):
    s = read_interactions(write(tmp_path, "p.txt", "1 5 30\n1 6 10\n2 5 1.5\n1 7 10\n"), format="pairs")
    assert items_of(s, 0) == ["6", "7", "5"]            # by time, ties in file order
    np.testing.assert_array_equal(s.timestamps, [10, 10, 30, 1.5])
    assert s.timestamps.dtype == np.float64


def test_sequences(tmp_path):
    s = read_interactions(write(tmp_path, "s.txt", "u1 1 2 3\r\nu2 3\r\nu1 4\r\n"), format="sequences")
    assert list(s.user_vocab) == ["u1", "u2"]
    assert items_of(s, 0) == ["1", "2", "3", "4"] and items_of(s, 1) == ["3"]


def test_auto_detects_pairs_and_sequences(tmp_path):
    assert read_interactions(write(tmp_path, "a.txt", "1 2 3 4 5\n2 3 4\n")).source.startswith("sequences")
    assert read_interactions(write(tmp_path, "b.txt", "1 2 3\n1 3 4\n")).source.startswith("pairs")
    assert read_interactions(write(tmp_path, "c.txt", "1 2\n2 3\n")).source.startswith("pairs")
    # 3 fields on every line and no user repeated: pairs with timestamps or 2-item sequences
    with pytest.raises(DataFormatError, match=r"a.txt: ambiguous: every line has 3 fields .* pairs .* sequences"):
        read_interactions(write(tmp_path, "a.txt", "1 2 3\n2 3 4\n"))
    assert read_interactions(tmp_path / "a.txt", format="sequences").n_interactions == 4


@pytest.mark.parametrize("name, content, fmt, line, reason", [
    ("empty.txt", "", "pairs", 1, "empty file"),
    ("blank.txt", "\n  \n", "sequences", 1, "empty file"),
    ("cols.txt", "1 2\n1 3\n1 4 5 6\n", "pairs", 3, "expected 2 fields like line 1, found 4"),
    ("mixed.txt", "1 2 5\n\n1 3\n", "pairs", 3, "expected 3 fields like line 1, found 2"),
    ("one.txt", "1 2\n1\n", "pairs", 2, "found 1 field"),
    ("time.txt", "1 2 5\n1 3 6\n1 4 x7\n", "pairs", 3, "bad timestamp 'x7'"),
    ("nan.txt", "1 2 5\n1 3 nan\n", "pairs", 2, "bad timestamp 'nan'"),
    ("user.txt", "1 2 3\n2\n", "sequences", 2, "a user and at least one item"),
])
def test_malformed_whitespace_files(tmp_path, name, content, fmt, line, reason):
    path = write(tmp_path, name, content)
    assert_format_error(lambda: read_interactions(path, format=fmt), path, line, reason)


def test_non_utf8_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.txt", b"1 2\n1 3\n1 \xff4\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:3: not valid UTF-8 \(byte 0xff at column 3\)"):
        read_interactions(path, format="pairs")


def test_integer_ids_demanded(tmp_path):
    path = write(tmp_path, "p.txt", "1 2\n1 3\n1 a4\n")
    with pytest.raises(DataFormatError, match=r"p.txt:3: bad item id 'a4' \(expected an integer\)"):
        read_interactions(path, format="pairs", ids="int")


def test_directory_that_is_no_data_set(tmp_path):
    with pytest.raises(DataFormatError, match=f"^{tmp_path}: cannot tell the format"):
        read_interactions(tmp_path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_interactions(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        read_interactions(write(tmp_path, "p.txt", "1 2\n"), format="csv")


# --- MovieLens ------------------------------------------------------------------------------
RATINGS = "1::20::5::978300760\n1::10::3::978300700\n2::10::4::978300000\n1::30::1::978300760\n"


def test_movielens_sorts_by_time_and_joins_titles(tmp_path):
    write(tmp_path, "movies.dat", "10::Matrix, The (1999)::Action|Sci-Fi\n20::Toy  Story (1995)::Animation\n"
                                  "99::Unused (2000)::Drama\n", encoding="latin-1")
    s = read_interactions(write(tmp_path, "ratings.dat", RATINGS))
    assert s.source == "movielens:ratings.dat"
    assert list(s.item_vocab) == ["<pad>", "10", "20", "30"] and list(s.user_vocab) == ["1", "2"]
    assert items_of(s, 0) == ["10", "20", "30"]          # by timestamp; 20 and 30 tie → file order
    np.testing.assert_array_equal(s.timestamps, [978300700, 978300760, 978300760, 978300000])
    assert list(s.item_columns["title"]) == ["", "The Matrix (1999)", "Toy Story (1995)", ""]
    assert list(s.item_columns["genres"]) == ["", "Action|Sci-Fi", "Animation", ""]


def test_movielens_latin1_titles_and_min_rating(tmp_path):
    write(tmp_path, "movies.dat", "10::Misérables, Les (1995)::Drama\n", encoding="latin-1")
    s = read_interactions(write(tmp_path, "ratings.dat", RATINGS), min_rating=4)
    assert s.source == "movielens:ratings.dat,min_rating=4"
    assert list(s.item_vocab) == ["<pad>", "10", "20"] and s.n_interactions == 2
    assert s.item_columns["title"][1] == "Les Misérables (1995)"


@pytest.mark.parametrize("content, line, reason", [
    ("1::2::5::100\n1::3::5\n", 2, "expected 4 fields"),
    ("1::2::5::100\n1::3::five::100\n", 2, "bad Rating 'five'"),
    ("1::2::5::100\n1::3::5::1e9x\n", 2, "bad Timestamp '1e9x'"),
    ("1::2::5::100\nx::3::5::100\n", 2, "bad UserID 'x'"),
])
def test_malformed_movielens(tmp_path, content, line, reason):
    path = write(tmp_path, "ratings.dat", content)
    assert_format_error(lambda: read_interactions(path), path, line, reason)


# --- RecBole --------------------------------------------------------------------------------
def test_recbole_inter_and_item(tmp_path):
    write(tmp_path, "d.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                               "7\ti2\t3\t200\n7\ti1\t5\t100\n8\ti2\t4\t50.5\n")
    write(tmp_path, "d.item", "item_id:token\tmovie_title:token_seq\tyear:float\n"
                              "i1\tUsual Suspects, The\t1995\ni2\tHeat\t\ni3\tOther\t2000\n")
    s = read_interactions(tmp_path / "d.inter")
    assert s.source == "recbole:d.inter"
    assert list(s.item_vocab) == ["<pad>", "i2", "i1"]   # not integers → first appearance
    assert items_of(s, 0) == ["i1", "i2"] and s.timestamps.dtype == np.float64
    assert list(s.item_columns["title"]) == ["", "Heat", "The Usual Suspects"]
    np.testing.assert_array_equal(s.item_columns["year"], [np.nan, np.nan, 1995.0])
    high = read_interactions(tmp_path / "d.inter", min_rating=4, item_file=None)
    assert high.n_interactions == 2 and high.item_columns == {}


@pytest.mark.parametrize("content, line, reason", [
    ("user_id\titem_id:token\n1\t2\n", 1, "needs a type suffix"),
    ("user_id:token\titem:token\n1\t2\n", 1, "header has no 'item_id' field"),
    ("\nuser_id:token\titem:token\n\n1\t2\n", 2, "header has no 'item_id' field"),
    ("user_id:token\titem_id:token\n1\t2\n1\t2\t3\n", 3, "expected 2 tab-separated fields"),
    ("user_id:token\titem_id:token\n1\t2\n\t2\n", 3, "empty user_id"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t2\tlater\n", 3, "bad timestamp 'later'"),
    ("user_id:token\titem_id:token\n", 2, "no data rows"),
])
def test_malformed_recbole(tmp_path, content, line, reason):
    path = write(tmp_path, "bad.inter", content)
    assert_format_error(lambda: read_interactions(path), path, line, reason)


# --- LLaRA ----------------------------------------------------------------------------------
def _llara_dir(tmp_path, train="seq\tnext\n3\t0\n0 1\t2\n0 1 2\t1\n", names="0::Matrix, The\n1::B\n2::C\n"):
    write(tmp_path, "train.tsv", train)
    write(tmp_path, "val.tsv", "seq\tnext\n2 0\t1\n")
    write(tmp_path, "test.tsv", "seq\tnext\n1 0 2\t0\n")
    if names is not None:
        write(tmp_path, "id2name.txt", names)
    return tmp_path


def test_llara_rows_become_pseudo_users(tmp_path):
    splits = read_llara(_llara_dir(tmp_path))
    train = splits["train"]
    assert list(train.item_vocab) == ["<pad>", "0", "1", "2"] and list(train.user_vocab) == ["0", "1", "2"]
    assert items_of(train, 0) == ["0"]                   # history "3" is LLaRA padding (max id + 1)
    assert items_of(train, 1) == ["0", "1", "2"] and items_of(train, 2) == ["0", "1", "2", "1"]
    assert items_of(splits["test"], 0) == ["1", "0", "2", "0"]
    assert list(train.item_columns["title"]) == ["", "The Matrix", "B", "C"]
    assert splits["valid"].item_vocab is not None and list(splits["valid"].item_vocab) == list(train.item_vocab)
    kept = read_llara(tmp_path, min_history=2)["train"]
    assert list(kept.user_vocab) == ["1", "2"]           # original row numbers survive the filter
    assert read_interactions(tmp_path / "test.tsv").n_users == 1
    assert read_interactions(tmp_path).source == "llara:" + tmp_path.name + "/train.tsv"


def test_llara_without_names_uses_ids_seen(tmp_path):
    s = read_llara(_llara_dir(tmp_path, train="seq\tnext\n7 5\t9\n", names=None))
    assert list(s["train"].item_vocab) == ["<pad>", "0", "1", "2", "5", "7", "9"]
    assert "title" not in s["train"].item_columns


@pytest.mark.parametrize("train, line, reason", [
    ("seq\tlabel\n1\t2\n", 1, "expected the header 'seq<TAB>next'"),
    ("seq\tnext\n0 1\t2\n0\t1\t2\n", 3, "expected 2 tab-separated fields"),
    ("seq\tnext\n0 1\t2\n\n0 8\t2\n", 4, "unknown item id '8'"),
    ("seq\tnext\n0 1\t3\n", 2, "next item is the padding id 3"),
])
def test_malformed_llara(tmp_path, train, line, reason):
    _llara_dir(tmp_path, train=train)
    assert_format_error(lambda: read_llara(tmp_path), tmp_path / "train.tsv", line, reason)


@pytest.mark.parametrize("raw, clean", [
    ("Matrix, The (1999)", "The Matrix (1999)"),
    ("Postino, Il (The Postman) (1994)", "Il Postino (The Postman) (1994)"),
    ("Enfer, L' (1994)", "L'Enfer (1994)"),
    ("Tyler, The Creator", "Tyler, The Creator"),
    ("  Café   Del Mar ", "Café Del Mar"),
    ("Walk in the Clouds, A (1995)", "A Walk in the Clouds (1995)"),
])
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


# --- the shared benchmark files (counts from their README) --------------------------------
@pytest.mark.parametrize("relative, users, items, interactions", [
    ("ml-100k/ml-100k.txt", 943, 1349, 99287),
    ("amazon/Beauty/Beauty.txt", 22363, 12101, 198502),
    ("amazon/Sports_and_Outdoors/Sports_and_Outdoors.txt", 35598, 18357, 296337),
    ("amazon/Toys_and_Games/Toys_and_Games.txt", 19412, 11924, 167597),
    ("lastfm-s3rec/LastFM.txt", 1090, 3646, 52551),
    ("amazon/Beauty/user_sequence_asin.txt", 22363, 12101, 198502),
])
def test_shared_files_counts(shared_data, relative, users, items, interactions):
    s = read_interactions(shared_data / relative)
    assert (s.n_users, s.n_items, s.n_interactions) == (users, items, interactions)


def test_shared_ml1m_keeps_its_ids(shared_data):
    s = read_interactions(shared_data / "ml-1m" / "ml-1m.txt")
    assert s.source == "pairs:ml-1m.txt"
    assert (s.n_users, s.n_items, s.n_interactions) == (6040, 3706, 1000209)
    np.testing.assert_array_equal(s.item_vocab[1:].astype(int), np.arange(1, 3707))  # item i stays i
    np.testing.assert_array_equal(s.user_vocab.astype(int), np.arange(1, 6041))
    assert (s.lengths().min(), s.lengths().max()) == (20, 2314)
    with open(shared_data / "ml-1m" / "ml-1m.txt") as f:       # file order within the first user
        first = [int(line.split()[1]) for line, _ in zip(f, range(5))]
    np.testing.assert_array_equal(s.sequence(0)[:5], first)


def test_shared_ml100k_recbole(shared_data):
    s = read_interactions(shared_data / "ml-100k" / "ml-100k.inter")
    assert (s.n_users, s.n_items, s.n_interactions) == (943, 1682, 100000)
    assert s.timestamps.dtype == np.int64 and np.all(np.diff(s.timestamps[:s.lengths()[0]]) >= 0)
    assert s.item_columns["title"][1] == "Toy Story"
    titles = list(s.item_columns["title"])
    assert "The Usual Suspects" in titles and not any(t.endswith(", The") for t in titles)


def test_shared_lastfm_llara(shared_data):
    splits = read_llara(shared_data / "lastfm-llara")
    assert {k: v.n_users for k, v in splits.items()} == {"train": 50800, "valid": 122, "test": 122}
    assert all(v.n_items == 4606 for v in splits.values())
    train = splits["train"]
    assert train.item_columns["title"][1] == "Morcheeba" and train.item_vocab[1] == "0"
    assert train.lengths().min() == 1 and train.lengths().max() == 11
    filtered = read_llara(shared_data / "lastfm-llara", min_history=3)
    assert {k: v.n_users for k, v in filtered.items()} == {"train": 47872, "valid": 122, "test": 122}


def test_shared_movies_dat_with_fixture_ratings(shared_data, tmp_path):
    (tmp_path / "movies.dat").write_bytes((shared_data / "ml-1m" / "movies.dat").read_bytes())
    ratings = write(tmp_path, "ratings.dat", "1::2571::5::978300760\n1::1::4::978300000\n2::11::3::978300001\n")
    s = read_interactions(ratings)
    assert list(s.item_columns["title"]) == ["", "Toy Story (1995)", "The American President (1995)",
                                             "Matrix, The (1999)".replace("Matrix, The", "The Matrix")]
    assert items_of(s, 0) == ["1", "2571"]
