"""Ordered item text levels, coarse → fine, aligned to a store's item indices.

CoFiRec (and the TIGER/LETTER tokenizers) embed every item once per *semantic level*;
`ItemTextLevels` holds those texts as a [n_items+1, L] string array whose row i belongs
to store item i (row 0 = padding, all ""). Alignment is by the store's original item
tokens (`store.item_vocab[i]`), never by position in the text file, and every store item
must be found in the file: a misplaced index silently corrupted LETTER's item embeddings
(LETTER#14), so a missing id is a `DataFormatError` naming the file and the id.

Builders (level names in coarse → fine order; pick a subset or reorder with `levels=`):

  Amazon Beauty (`item_text.json`, keys = Beauty.txt item ids; no descriptions exist)
    category    the first category path below the top "Beauty" level, joined " > "
                ("Makeup > Nails > Nail Polish"); a path that does not start with
                "Beauty" is kept whole; an item with no path gets UNKNOWN_CATEGORY.
    brand_leaf  "Brand: <brand>; <leaf category>" ("Brand: OPI; Nail Polish"). A missing
                brand, an empty one and the literal meta value "Unknown" (20 items) all
                become UNKNOWN_BRAND. Pseudonymous brands such as "brand_8052" (2,038
                items, from the source brand map) are kept: they still tell brands apart.
    title       the product title (UNKNOWN_TITLE when empty).
  MovieLens-1M (`movies.dat` `MovieID::Title::Genres`, plus `item_map.tsv` mapping the
  store's item ids to MovieIDs when the store is `ml-1m.txt`)
    genres      the genres joined ", " ("Animation, Children's, Comedy"; UNKNOWN_GENRE if none)
    title       the title, cleaned as the MovieLens reader does ("The Matrix (1999)")
  The planted-hierarchy synthetic set (`jaxrec.data.synthetic_hierarchy`)
    topic, subtopic, title    from the store's item columns.

Every field is `html.unescape`d (repeatedly: 6 Beauty fields are escaped twice) and its
whitespace collapsed before use (1,053 Beauty titles carry entities such as "&amp;").
Files must be UTF-8; anything else is a one-line `DataFormatError` naming the file.

Beauty: 27 items (13 groups) are identical in all three levels; `identical_items()` counts them.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxrec.data.store import InteractionStore
from jaxrec.data.text import DataFormatError, clean_title, decode, read_text, split_rows

__all__ = ["ItemTextLevels", "BEAUTY_LEVELS", "MOVIELENS_LEVELS", "HIERARCHY_LEVELS", "UNKNOWN_BRAND",
           "UNKNOWN_CATEGORY", "UNKNOWN_TITLE", "UNKNOWN_GENRE", "beauty_text_levels",
           "movielens_text_levels", "hierarchy_text_levels", "item_text_levels"]

BEAUTY_LEVELS = ("category", "brand_leaf", "title")
MOVIELENS_LEVELS = ("genres", "title")
HIERARCHY_LEVELS = ("topic", "subtopic", "title")

# Placeholders for empty or missing fields: plain words, so an LLM embeds them as "unknown"
# rather than as an empty string (which has no tokens to pool).
UNKNOWN_BRAND = "unknown brand"
UNKNOWN_CATEGORY = "uncategorized"
UNKNOWN_TITLE = "untitled item"
UNKNOWN_GENRE = "unknown genre"

_TOP_CATEGORY = "Beauty"
_SPACES = re.compile(r"\s+")
# The item columns the planted-hierarchy generator writes, per level.
_HIERARCHY_COLUMNS = {"topic": "topic_name", "subtopic": "subtopic_name", "title": "title"}


@dataclasses.dataclass(frozen=True, eq=False)
class ItemTextLevels:
    """Text of every item at every level: texts[i, k] is item i's text at level names[k].

    texts: numpy StringDType array [n_items+1, L]; row 0 (padding) is all "".
    item_vocab: the store's item tokens the rows were aligned to (item_vocab[i] ↔ row i).
    source: where the text came from (file name or generator).
    """
    names: tuple[str, ...]
    texts: np.ndarray
    item_vocab: np.ndarray
    source: str

    def __post_init__(self):
        names = tuple(str(n) for n in self.names)
        texts = np.asarray(self.texts, dtype=np.dtypes.StringDType())
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "texts", texts)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"ItemTextLevels: level names must be distinct and non-empty, got {names}")
        if texts.ndim != 2 or texts.shape[1] != len(names):
            raise ValueError(f"ItemTextLevels: texts must be [n_items+1, {len(names)}], got {texts.shape}")
        if texts.shape[0] != len(self.item_vocab):
            raise ValueError(f"ItemTextLevels: {texts.shape[0]} text rows for {len(self.item_vocab)} "
                             "item tokens (row 0 = padding)")
        if texts.shape[0] and (texts[0] != "").any():
            raise ValueError("ItemTextLevels: row 0 is padding and must be empty")

    @property
    def n_items(self) -> int:
        return self.texts.shape[0] - 1

    @property
    def n_levels(self) -> int:
        return len(self.names)

    def level(self, name: str) -> np.ndarray:
        """Texts of one level, [n_items+1] (row 0 = "")."""
        return self.texts[:, self.names.index(_check_names(self.names, [name])[0])]

    def select(self, levels: Sequence[str]) -> "ItemTextLevels":
        """The given levels, in the given order (coarse → fine is the caller's responsibility)."""
        levels = _check_names(self.names, levels)
        return dataclasses.replace(self, names=tuple(levels),
                                   texts=self.texts[:, [self.names.index(n) for n in levels]])

    def rows(self) -> list[tuple[str, ...]]:
        """Per item (row 0 included), its texts as a tuple of plain str."""
        return [tuple(str(t) for t in row) for row in self.texts]

    def identical_items(self) -> tuple[int, int]:
        """(items, groups): how many items share every level's text with at least one other
        item, and in how many groups of identical items they fall."""
        joined = ["\x1f".join(row) for row in self.rows()[1:]]
        _, counts = np.unique(np.array(joined, dtype=np.dtypes.StringDType()), return_counts=True)
        shared = counts[counts > 1]
        return int(shared.sum()), int(shared.size)

    def check_aligned(self, store: InteractionStore) -> None:
        """Raise unless these rows were built for exactly this store's item vocabulary."""
        if len(self.item_vocab) != len(store.item_vocab) or not np.array_equal(self.item_vocab, store.item_vocab):
            raise ValueError(f"ItemTextLevels from {self.source} ({self.n_items} items) are not aligned to "
                             f"{store.source} ({store.n_items} items): item tokens differ")


def _check_names(known: Sequence[str], levels: Sequence[str] | None) -> list[str]:
    if levels is None:
        return list(known)
    if isinstance(levels, str):
        levels = [levels]
    levels = list(levels)
    unknown = [n for n in levels if n not in known]
    if unknown:
        raise ValueError(f"unknown text level {unknown[0]!r}; known levels: {', '.join(known)}")
    if len(set(levels)) != len(levels) or not levels:
        raise ValueError(f"text levels must be distinct and non-empty, got {levels}")
    return levels


def _clean(value) -> str:
    """HTML-unescaped, whitespace-collapsed text ("" for None). Unescaping repeats until
    nothing changes: a few Beauty fields are escaped twice ("Kirk&amp;#39;s", "&amp;reg;")."""
    if value is None:
        return ""
    text = str(value)
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return _SPACES.sub(" ", text).strip()


def _aligned_rows(tokens: np.ndarray, keys: dict[str, int], path: Path, what: str, store_name: str) -> np.ndarray:
    """int64 [n_items+1]: for each store item (its token in `tokens`, row 0 = padding), its
    row in the file (row 0 → -1). Every item must be found, else a one-line error."""
    rows = np.array([keys.get(str(token), -1) for token in tokens], dtype=np.int64)
    rows[0] = -1
    missing = np.flatnonzero(rows[1:] < 0) + 1
    if missing.size:
        i = int(missing[0])
        raise DataFormatError(path, None, f"no entry for {what} {str(tokens[i])!r} (store item {i} of "
                                          f"{store_name}; {missing.size} of {len(tokens) - 1} store items missing)")
    return rows


def _build(store: InteractionStore, names: Sequence[str], columns: dict[str, list[str]], rows: np.ndarray,
           levels: Sequence[str] | None, source: str) -> ItemTextLevels:
    chosen = _check_names(names, levels)
    texts = np.full((store.n_items + 1, len(chosen)), "", dtype=np.dtypes.StringDType())
    for k, name in enumerate(chosen):
        column = np.asarray(columns[name], dtype=np.dtypes.StringDType())
        texts[1:, k] = column[rows[1:]]
    return ItemTextLevels(tuple(chosen), texts, store.item_vocab.copy(), source)


# --- Amazon Beauty ---------------------------------------------------------------------------
def beauty_text_levels(store: InteractionStore, path: str | os.PathLike,
                       levels: Sequence[str] | None = None) -> ItemTextLevels:
    """Beauty's levels (see module doc) for a store read from Beauty.txt.

    path: `item_text.json`, or the directory holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "item_text.json"
    raw = read_text(path)
    try:
        table = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"invalid JSON ({e.msg})") from None
    if not isinstance(table, dict):
        raise DataFormatError(path, None, "expected a JSON object {item_id: {title, brand, categories}}")
    keys = {}
    columns = {name: [] for name in BEAUTY_LEVELS}
    for key, entry in table.items():
        if not isinstance(entry, dict):
            raise DataFormatError(path, None, f"entry {key!r} is not an object")
        keys[str(key)] = len(keys)
        category, leaf = _beauty_category(entry.get("categories"), path, key)
        brand = _clean(entry.get("brand"))
        if not brand or brand.lower() == "unknown":
            brand = UNKNOWN_BRAND
        columns["category"].append(category)
        columns["brand_leaf"].append(f"Brand: {brand}; {leaf}")
        columns["title"].append(_clean(entry.get("title")) or UNKNOWN_TITLE)
    rows = _aligned_rows(store.item_vocab, keys, path, "item id", store.source)
    return _build(store, BEAUTY_LEVELS, columns, rows, levels, f"amazon-item-text:{path.name}")


def _beauty_category(paths, file: Path, key: str) -> tuple[str, str]:
    """(category path below the top level joined " > ", leaf category) of the first path."""
    if paths is None or (isinstance(paths, list) and not paths):
        return UNKNOWN_CATEGORY, UNKNOWN_CATEGORY
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise DataFormatError(file, None, f"entry {key!r}: categories must be a list of category paths")
    parts = [c for c in (_clean(part) for part in paths[0]) if c]
    if parts and parts[0] == _TOP_CATEGORY:
        parts = parts[1:]
    if not parts:
        return UNKNOWN_CATEGORY, UNKNOWN_CATEGORY
    return " > ".join(parts), parts[-1]


# --- MovieLens -------------------------------------------------------------------------------
def movielens_text_levels(store: InteractionStore, movies: str | os.PathLike,
                          item_map: str | os.PathLike | None = "auto",
                          levels: Sequence[str] | None = None) -> ItemTextLevels:
    """ML-1M's levels (genres → title).

    movies: `movies.dat`. item_map: `item_id<TAB>movie_id` file mapping the store's item
    tokens to MovieIDs ("auto": `item_map.tsv` beside movies.dat when it exists; None: the
    store's item tokens are MovieIDs already, as for a store read from ratings.dat).
    """
    movies = Path(movies)
    rows = split_rows(movies, read_text(movies), b"::")
    rows.require_counts((3,), "3 fields (MovieID::Title::Genres)")
    movie_ids = decode(rows.column(0))
    movie_row = {}
    for r, movie in enumerate(movie_ids):
        if str(movie) in movie_row:
            raise DataFormatError(movies, rows.line[r], f"duplicate MovieID {str(movie)!r}")
        movie_row[str(movie)] = r
    columns = {
        "genres": [", ".join(_clean(g) for g in str(gs).split("|") if _clean(g)) or UNKNOWN_GENRE
                   for gs in decode(rows.column(2))],
        "title": [clean_title(_clean(t)) or UNKNOWN_TITLE for t in decode(rows.column(1))],
    }
    if item_map == "auto":
        item_map = movies.with_name("item_map.tsv") if movies.with_name("item_map.tsv").is_file() else None
    if item_map is None:
        store_rows = _aligned_rows(store.item_vocab, movie_row, movies, "MovieID", store.source)
        source = f"movielens-text:{movies.name}"
    else:
        item_map = Path(item_map)
        to_movie = _read_item_map(item_map)
        _aligned_rows(store.item_vocab, {k: 0 for k in to_movie}, item_map, "item id", store.source)
        store_movies = np.array([""] + [to_movie[str(t)] for t in store.item_vocab[1:]])
        store_rows = _aligned_rows(store_movies, movie_row, movies, "MovieID", f"{store.source} via {item_map.name}")
        source = f"movielens-text:{movies.name}+{item_map.name}"
    return _build(store, MOVIELENS_LEVELS, columns, store_rows, levels, source)


def _read_item_map(path: Path) -> dict[str, str]:
    """`item_id<TAB>movie_id` rows (an optional header naming the columns) → {item_id: movie_id}."""
    rows = split_rows(path, read_text(path), b"\t")
    if decode(rows.column(0))[0] == "item_id":
        rows = rows.drop_first()
    rows.require_counts((2,), "2 tab-separated fields (item_id, movie_id)")
    mapping = {}
    for r, (item, movie) in enumerate(zip(decode(rows.column(0)), decode(rows.column(1)))):
        if str(item) in mapping:
            raise DataFormatError(path, rows.line[r], f"duplicate item id {str(item)!r}")
        mapping[str(item)] = str(movie)
    return mapping


# --- the planted-hierarchy synthetic set -----------------------------------------------------
def hierarchy_text_levels(store: InteractionStore, levels: Sequence[str] | None = None) -> ItemTextLevels:
    """topic → subtopic → title from a `jaxrec.data.synthetic_hierarchy` store's item columns."""
    absent = [c for c in _HIERARCHY_COLUMNS.values() if c not in store.item_columns]
    if absent:
        raise ValueError(f"{store.source}: no item column {absent[0]!r}; hierarchy text levels need a store "
                         "made by jaxrec.data.synthetic_hierarchy")
    chosen = _check_names(HIERARCHY_LEVELS, levels)
    texts = np.stack([store.item_columns[_HIERARCHY_COLUMNS[n]] for n in chosen], axis=1)
    texts = texts.astype(np.dtypes.StringDType())
    texts[0] = ""
    return ItemTextLevels(tuple(chosen), texts, store.item_vocab.copy(), f"hierarchy-text:{store.source}")


# --- one entry point -------------------------------------------------------------------------
def item_text_levels(store: InteractionStore, path: str | os.PathLike | None = None,
                     levels: Sequence[str] | None = None) -> ItemTextLevels:
    """Text levels for `store`, the builder chosen by the file: `item_text.json` (or a
    directory holding it) → Beauty, `movies.dat` → MovieLens; no path → the synthetic
    hierarchy's own columns."""
    if path is None:
        return hierarchy_text_levels(store, levels)
    path = Path(path)
    if path.name == "item_text.json" or (path.is_dir() and (path / "item_text.json").is_file()):
        return beauty_text_levels(store, path, levels)
    if path.name == "movies.dat":
        return movielens_text_levels(store, path, levels=levels)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    raise ValueError(f"{path}: no text-level builder for this file (expected item_text.json or movies.dat)")
