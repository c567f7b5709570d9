"""Item text levels: alignment to store item ids (spot checks and a full cross-check against the
independent TSV export), Beauty/ML-1M level composition, placeholders and one-line errors."""
from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxrec.data.item_text import (BEAUTY_LEVELS, HIERARCHY_LEVELS, UNKNOWN_BRAND, UNKNOWN_CATEGORY, UNKNOWN_TITLE,
                                   ItemTextLevels, beauty_text_levels, hierarchy_text_levels, item_text_levels,
                                   movielens_text_levels)
from jaxrec.data.readers import read_interactions
from jaxrec.data.store import InteractionStore
from jaxrec.data.synthetic import SyntheticConfig, make_synthetic
from jaxrec.data.synthetic_hierarchy import HierarchyConfig, make_synthetic_hierarchy
from jaxrec.data.text import DataFormatError


SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"benchmark data ../shared/data/{relative} is not present")
    return path


def _index_of(store: InteractionStore, token: str) -> int:
    hits = np.flatnonzero(store.item_vocab == token)
    assert hits.size == 1, f"token {token!r} not in the store"
    return int(hits[0])


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --- Amazon Beauty (real file) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def beauty():
    folder = _shared("amazon/Beauty/item_text.json").parent
    store = read_interactions(folder / "Beauty.txt")
    return folder, store, beauty_text_levels(store, folder / "item_text.json")


def test_beauty_levels_are_aligned_to_the_store_ids(beauty):
    folder, store, levels = beauty
    assert levels.names == BEAUTY_LEVELS and levels.texts.shape == (store.n_items + 1, 3) == (12102, 3)
    levels.check_aligned(store)
    assert (levels.texts[0] == "").all() and (levels.texts[1:] != "").all()
    # Known (Beauty.txt id, title) pairs, looked up through the store's own tokens.
    known = {"1": "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce",
             "2": "OPI Red Shatter Crackle Nail Polish E55 New",
             "3": "SKIN79 The Prestige Beblesh Balm BB Cream Diamond Collection",
             "100": "Macadamia Natural Oil No Tangle Brush"}
    for token, title in known.items():
        assert levels.level("title")[_index_of(store, token)] == title
    last = str(levels.level("title")[_index_of(store, "12101")])
    assert last.startswith("Best Anti Aging Facial Creme & Face Cream Moisturizer")   # &amp; unescaped
    i = _index_of(store, "1")
    assert list(levels.texts[i]) == ["Makeup > Nails > Nail Polish", "Brand: OPI; Nail Polish",
                                     known["1"]]


def test_beauty_every_row_matches_the_independent_tsv_export(beauty):
    """item_text.tsv is a separate export of the same table: compare every item by its id."""
    folder, store, levels = beauty
    with open(folder / "item_text.tsv", encoding="utf-8", newline="") as f:
        rows = {r["item_id"]: r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    squash = lambda s: re.sub(r"\s+", " ", html.unescape(html.unescape(s))).strip()  # noqa: E731 (some twice-escaped)
    for i in range(1, store.n_items + 1):
        row = rows[store.item_vocab[i]]
        assert levels.level("title")[i] == squash(row["title"]), i
        first_path = row["categories"].split(" | ")[0].split(" > ")
        assert levels.level("category")[i] == " > ".join(squash(c) for c in first_path[1:]), i


def test_beauty_placeholders_paths_and_html(beauty):
    folder, store, levels = beauty
    table = json.loads((folder / "item_text.json").read_text(encoding="utf-8"))
    no_brand = next(k for k, v in table.items() if v["brand"] is None)
    literal_unknown = next(k for k, v in table.items() if v["brand"] == "Unknown")
    for token in (no_brand, literal_unknown):
        assert levels.level("brand_leaf")[_index_of(store, token)].startswith(f"Brand: {UNKNOWN_BRAND}; ")
    # Several category paths: the first one is used (item 1001 is also in "Clothing, Shoes & Jewelry").
    assert len(table["1001"]["categories"]) == 2
    assert levels.level("category")[_index_of(store, "1001")] == "Bath & Body > Bath"
    assert levels.level("brand_leaf")[_index_of(store, "1001")] == "Brand: humangear; Bath"
    assert levels.level("brand_leaf")[_index_of(store, "12026")].startswith("Brand: eForCity®")  # "&amp;reg;"
    flat = "\n".join(str(t) for t in levels.texts.ravel())
    assert "&amp;" not in flat and "&#39;" not in flat and "&quot;" not in flat


def test_beauty_items_identical_in_every_level(beauty):
    """27 items (13 groups, mostly pairs) repeat category path, brand, leaf and title exactly;
    with the leaf category alone (brand_leaf + title) it is 29 items in 14 groups."""
    _, _, levels = beauty
    assert levels.identical_items() == (27, 13)
    assert levels.select(["brand_leaf", "title"]).identical_items() == (29, 14)


def test_beauty_level_selection(beauty):
    folder, store, levels = beauty
    coarse = beauty_text_levels(store, folder, levels=["title", "category"])   # the directory works too
    assert coarse.names == ("title", "category")
    np.testing.assert_array_equal(coarse.texts[:, 0], levels.level("title"))
    with pytest.raises(ValueError, match="unknown text level 'description'; known levels: category, brand_leaf, "
                                         "title") as e:
        levels.select(["category", "description"])
    _one_line(e)


# --- ML-1M (real files) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def movielens():
    folder = _shared("ml-1m/movies.dat").parent
    store = read_interactions(folder / "ml-1m.txt")
    return folder, store, movielens_text_levels(store, folder / "movies.dat")


def test_movielens_levels_follow_the_item_map(movielens):
    folder, store, levels = movielens
    assert levels.names == ("genres", "title") and levels.texts.shape == (3707, 2)
    levels.check_aligned(store)
    assert list(levels.texts[_index_of(store, "1")]) == ["Animation, Children's, Comedy", "Toy Story (1995)"]
    # item 2375 of ml-1m.txt is MovieID 2571 ("Matrix, The (1999)": the article moves to the front)
    assert list(levels.texts[_index_of(store, "2375")]) == ["Action, Sci-Fi, Thriller", "The Matrix (1999)"]
    assert levels.texts[_index_of(store, "3706"), 1] != levels.texts[_index_of(store, "3706") - 1, 1]
    assert levels.identical_items() == (0, 0)


# --- hand-made files: placeholders and errors --------------------------------------------------
def _write_json(path, table):
    path.write_text(json.dumps(table), encoding="utf-8")
    return path


def test_missing_fields_get_placeholders(tmp_path):
    store = InteractionStore.from_sequences([[1, 2, 3, 4]])
    path = _write_json(tmp_path / "item_text.json", {
        "1": {"title": "A &amp;  B", "brand": "", "categories": [["Beauty", "Makeup"]]},
        "2": {"title": "", "brand": None, "categories": []},
        "3": {"brand": "Unknown", "categories": [["Beauty"]]},
        "4": {"title": "X", "brand": "Acme", "categories": [["Other", "Thing"], ["Beauty", "Skin"]]},
        "99": {"title": "not in the store"},
    })
    levels = beauty_text_levels(store, path)
    assert levels.rows()[1:] == [
        ("Makeup", f"Brand: {UNKNOWN_BRAND}; Makeup", "A & B"),
        (UNKNOWN_CATEGORY, f"Brand: {UNKNOWN_BRAND}; {UNKNOWN_CATEGORY}", UNKNOWN_TITLE),
        (UNKNOWN_CATEGORY, f"Brand: {UNKNOWN_BRAND}; {UNKNOWN_CATEGORY}", UNKNOWN_TITLE),
        ("Other > Thing", "Brand: Acme; Thing", "X"),
    ]
    assert levels.identical_items() == (2, 1)


def test_a_store_item_missing_from_the_file_is_a_one_line_error(tmp_path):
    store = InteractionStore.from_sequences([[1, 2, 3]])
    path = _write_json(tmp_path / "item_text.json", {"1": {"title": "a"}, "3": {"title": "c"}})
    with pytest.raises(DataFormatError, match=r"item_text.json: no entry for item id '2' \(store item 2") as e:
        beauty_text_levels(store, path)
    _one_line(e)


def test_alignment_is_by_token_not_position(tmp_path):
    """A store whose item tokens are not 1..n in order still gets each item's own text."""
    store = read_interactions(_lines(tmp_path / "seq.txt", ["u1 30 10", "u2 20 30"]), format="sequences")
    assert list(store.item_vocab) == ["<pad>", "10", "20", "30"]
    path = _write_json(tmp_path / "item_text.json", {k: {"title": f"title {k}"} for k in ("30", "20", "10", "40")})
    levels = beauty_text_levels(store, path)
    assert [str(t) for t in levels.level("title")] == ["", "title 10", "title 20", "title 30"]


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_non_utf8_and_bad_json_are_one_line_errors(tmp_path):
    store = InteractionStore.from_sequences([[1]])
    latin = tmp_path / "item_text.json"
    latin.write_bytes('{"1": {"title": "Crème"}}'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"item_text.json:1: not valid UTF-8") as e:
        beauty_text_levels(store, latin)
    _one_line(e)
    latin.write_text('{"1": {"title": "x"},\n}', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"item_text.json:2: invalid JSON") as e:
        beauty_text_levels(store, latin)
    _one_line(e)
    movies = tmp_path / "movies.dat"
    movies.write_bytes("1::Crème (1995)::Drama\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"movies.dat:1: not valid UTF-8") as e:
        movielens_text_levels(store, movies, item_map=None)
    _one_line(e)


def test_movielens_errors_name_the_file_and_id(tmp_path):
    store = InteractionStore.from_sequences([[1, 2]])
    movies = _lines(tmp_path / "movies.dat", ["10::Matrix, The (1999)::Action|Sci-Fi", "20::Heat (1995)::"])
    _lines(tmp_path / "item_map.tsv", ["item_id\tmovie_id", "1\t20", "2\t10"])
    levels = movielens_text_levels(store, movies)
    assert levels.rows()[1:] == [("unknown genre", "Heat (1995)"), ("Action, Sci-Fi", "The Matrix (1999)")]
    _lines(tmp_path / "item_map.tsv", ["item_id\tmovie_id", "1\t20", "2\t30"])
    with pytest.raises(DataFormatError, match=r"movies.dat: no entry for MovieID '30' \(store item 2") as e:
        movielens_text_levels(store, movies)
    _one_line(e)
    _lines(tmp_path / "item_map.tsv", ["item_id\tmovie_id", "1\t20"])
    with pytest.raises(DataFormatError, match=r"item_map.tsv: no entry for item id '2'"):
        movielens_text_levels(store, movies)
    with pytest.raises(DataFormatError, match=r"movies.dat: no entry for MovieID '1'"):
        movielens_text_levels(store, movies, item_map=None)   # store tokens taken as MovieIDs


def test_hierarchy_levels_come_from_the_store_columns():
    store = make_synthetic_hierarchy(HierarchyConfig.tiny())
    levels = item_text_levels(store)
    assert levels.names == HIERARCHY_LEVELS and levels.texts.shape == (store.n_items + 1, 3)
    np.testing.assert_array_equal(levels.level("title")[1:], store.item_columns["title"][1:])
    assert hierarchy_text_levels(store, ["subtopic"]).names == ("subtopic",)
    with pytest.raises(ValueError, match="no item column 'topic_name'"):
        hierarchy_text_levels(make_synthetic(SyntheticConfig.tiny()))
    with pytest.raises(ValueError, match="known levels: topic, subtopic, title"):
        hierarchy_text_levels(store, ["brand"])


def test_dispatch_and_alignment_check(tmp_path):
    store = InteractionStore.from_sequences([[1, 2]])
    path = _write_json(tmp_path / "item_text.json", {"1": {"title": "a"}, "2": {"title": "b"}})
    assert item_text_levels(store, tmp_path).names == BEAUTY_LEVELS
    assert item_text_levels(store, path, ["title"]).rows()[1:] == [("a",), ("b",)]
    with pytest.raises(ValueError, match="no text-level builder"):
        item_text_levels(store, _lines(tmp_path / "other.txt", ["x"]))
    other = InteractionStore.from_sequences([[1, 2, 3]])
    with pytest.raises(ValueError, match="not aligned"):
        item_text_levels(store, path).check_aligned(other)
    with pytest.raises(ValueError, match="row 0 is padding"):
        ItemTextLevels(("a",), np.array([["x"], ["y"]]), np.array(["<pad>", "1"]), "test")
