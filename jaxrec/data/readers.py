"""Readers: each on-disk format → one `InteractionStore`.

Formats (see docs/data.md for the exact rules):
  pairs       `user item [timestamp]` per line (SASRec / CaseQ)
  ratings     `user item rating timestamp` per line, whitespace-separated (ML-100K `u.data`)
  sequences   `user item1 item2 ...` per line (S3-Rec / P5)
  movielens   `ratings.dat` (`UserID::MovieID::Rating::Timestamp`) + `movies.dat` beside it
  recbole     RecBole atomic `.inter` (typed TSV header) + optional `.item` beside it
  llara       LLaRA `seq<TAB>next` TSV + `id2name.txt` beside it (see `jaxrec.data.llara`)

`format="auto"` reads a file as the one format it clearly is and otherwise stops with a
one-line `DataFormatError` naming the ambiguity; it never guesses. The rules, in short
(`jaxrec.data.detect` states them in full): the name decides `.inter`, `.dat` and LLaRA
directories; a first line `seq<TAB>next` means LLaRA and a typed RecBole header RecBole;
a header line of column names (`user item [timestamp]`, `user item rating timestamp`)
decides pairs or ratings; otherwise the formats the lines fit are pairs (2 or 3 fields
on every line), ratings (4 fields on every line) and sequences (>= 2 fields, no user on
two lines) — exactly one must fit, except that 2-field lines are pairs either way.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxrec.data import detect
from jaxrec.data.store import InteractionStore, make_item_vocab
from jaxrec.data.text import (DataFormatError, Rows, clean_title, decode, index_tokens, parse_numbers,
                              read_text, split_rows)

__all__ = ["DataFormatError", "FORMATS", "read_interactions", "read_pairs", "read_ratings", "read_sequences",
           "read_movielens", "read_recbole", "assemble", "join_item_columns"]

FORMATS = ("auto", "pairs", "sequences", "ratings", "movielens", "recbole", "llara")
_TABLES = ("pairs", "sequences", "ratings")   # whitespace-separated tables, read by _read_table


def read_interactions(path: str | os.PathLike, format: str = "auto", **options) -> InteractionStore:
    """Read any supported format; `format="auto"` decides from the name and content (or refuses)."""
    path = Path(path)
    if format not in FORMATS:
        raise DataFormatError(path, None, f"unknown data format {format!r} (--format / data.format); "
                                          f"choose one of {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if format == "auto":
        format = detect.detect_format(path)
    if format == "llara":
        from jaxrec.data.llara import read_llara_file
        return read_llara_file(path, **options)
    if path.is_dir():
        raise DataFormatError(path, None, f"is a directory; give the {format} file itself")
    if format in (*_TABLES, detect.TABLE):
        return _read_table(path, format, **options)
    reader = {"movielens": read_movielens, "recbole": read_recbole}[format]
    return reader(path, **options)


# --- whitespace tables: pairs, ratings, sequences -----------------------------------------
def read_pairs(path, ids: str = "auto") -> InteractionStore:
    """`user item` or `user item timestamp` per line (all lines alike)."""
    return _read_table(path, "pairs", ids)


def read_ratings(path, ids: str = "auto", min_rating: float | None = None) -> InteractionStore:
    """`user item rating timestamp` per line (ML-100K `u.data`), each user's events by time."""
    return _read_table(path, "ratings", ids, min_rating)


def read_sequences(path, ids: str = "auto") -> InteractionStore:
    """`user item1 item2 ...` per line."""
    return _read_table(path, "sequences", ids)


def _read_table(path, format: str, ids: str = "auto", min_rating: float | None = None) -> InteractionStore:
    """A whitespace-separated table; `format=detect.TABLE` lets the rows decide (detect, rule 3)."""
    path = Path(path)
    raw = read_text(path)
    rows = split_rows(path, raw)
    header = detect.header_layout(rows)
    header_width = None
    if header is not None:
        if format not in (detect.TABLE, header):
            raise DataFormatError(path, rows.line[0], f"the header names a {header} layout, but the format "
                                                      f"is {format}" + (" (sequences files have no header)"
                                                                        if format == "sequences" else ""))
        header_width = int(rows.count[0])
        rows = rows.drop_first()
    elif ids != "str":
        detect.reject_unrecognised_header(rows)
    if format == detect.TABLE and header is None:
        format = detect.table_format(rows)
        detect.reject_tab_fields_with_spaces(path, raw)   # even when a shape fits: `0 1<TAB>2` is LLaRA's
    elif format == detect.TABLE:
        format = header
    if min_rating is not None and format != "ratings":
        raise DataFormatError(path, None, f"min_rating needs a rating column; this file is read as {format}")
    if format == "sequences":
        return _sequences(path, rows, ids)

    width = header_width or int(rows.count[0])
    if format == "ratings":
        rows.require_counts((4,), "4 fields (user item rating timestamp)")
    elif width not in (2, 3):
        rows.require_counts((2, 3), "2 fields (user item) or 3 (user item timestamp)")
    rows.require_counts((width,), f"{width} fields like " + ("the header" if header_width else f"line {rows.line[0]}"))
    user_idx, user_vocab = index_tokens(rows.column(0), ids, rows, rows.start, "user id")
    item_idx, item_vocab = index_tokens(rows.column(1), ids, rows, rows.start + 1, "item id")
    timestamps = _timestamps(rows, rows.start + width - 1) if width >= 3 else None
    source = f"{format}:{path.name}"
    if format == "ratings":
        rating = parse_numbers(rows, rows.start + 2, np.float64, "rating")   # checked even when not filtered
        if min_rating is not None:
            user_idx, user_vocab, item_idx, item_vocab, timestamps = _keep_events(
                rating >= min_rating, user_idx, user_vocab, item_idx, item_vocab, timestamps)
            source += f",min_rating={min_rating:g}"
    return assemble(user_idx, user_vocab, item_idx, item_vocab, timestamps, source)


def _sequences(path: Path, rows: Rows, ids: str) -> InteractionStore:
    rows.require(rows.count >= 2, "a user and at least one item")
    is_user = np.zeros(rows.fields.size, dtype=bool)
    is_user[rows.start] = True
    item_at = np.flatnonzero(~is_user)
    user_idx, user_vocab = index_tokens(rows.column(0), ids, rows, rows.start, "user id")
    item_idx, item_vocab = index_tokens(rows.fields[item_at], ids, rows, item_at, "item id")
    return assemble(np.repeat(user_idx, rows.count - 1), user_vocab, item_idx, item_vocab,
                    None, f"sequences:{path.name}")


def _keep_events(keep, user_idx, user_vocab, item_idx, item_vocab, timestamps):
    """The events where `keep` holds; users and items left without events disappear."""
    user_idx, user_vocab = _drop_unused(user_idx[keep], user_vocab)
    item_idx, item_vocab = _drop_unused(item_idx[keep], item_vocab)
    return user_idx, user_vocab, item_idx, item_vocab, None if timestamps is None else timestamps[keep]


def _timestamps(rows: Rows, fields_at: np.ndarray) -> np.ndarray:
    try:
        return rows.fields[fields_at].astype(np.int64)
    except (ValueError, OverflowError):
        return parse_numbers(rows, fields_at, np.float64, "timestamp")


def assemble(user_idx, user_vocab, item_idx, item_vocab, timestamps, source,
             item_columns=None) -> InteractionStore:
    """Group events by user (stable: file order within a user, or time order if timestamps)."""
    if timestamps is None:
        order = np.argsort(user_idx, kind="stable")
    else:
        order = np.lexsort((timestamps, user_idx))
    lengths = np.bincount(user_idx, minlength=len(user_vocab))
    return InteractionStore(
        user_offsets=np.concatenate([[0], np.cumsum(lengths)]), item_ids=item_idx[order] + 1,
        timestamps=None if timestamps is None else timestamps[order],
        item_vocab=make_item_vocab(item_vocab), user_vocab=np.asarray(user_vocab, dtype=str),
        item_columns=item_columns or {}, source=source)


def join_item_columns(item_vocab: np.ndarray, keys, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Align metadata rows keyed by original item tokens to a store's item indices.

    Items without a metadata row get "" (text) or NaN (numbers); so does row 0 (padding).
    """
    row_of_key = {str(key): r for r, key in enumerate(keys)}
    rows = np.array([row_of_key.get(token, -1) for token in item_vocab], dtype=np.int64)
    rows[0] = -1
    found = rows >= 0
    out = {}
    for name, values in columns.items():
        values = np.asarray(values)
        numeric = values.dtype.kind == "f"
        column = np.full(item_vocab.size, np.nan if numeric else "", dtype=np.float64 if numeric else values.dtype)
        column[found] = values[rows[found]]
        out[name] = column
    return out


# --- MovieLens -----------------------------------------------------------------------------
def read_movielens(path, movies: str | os.PathLike | None = "auto",
                   min_rating: float | None = None) -> InteractionStore:
    """`ratings.dat`, each user's ratings sorted by timestamp (stable), + titles/genres."""
    path = Path(path)
    rows = split_rows(path, read_text(path), b"::")
    rows.require_counts((4,), "4 fields (UserID::MovieID::Rating::Timestamp)")
    user_idx, user_vocab = index_tokens(rows.column(0), "int", rows, rows.start, "UserID")
    item_idx, item_vocab = index_tokens(rows.column(1), "int", rows, rows.start + 1, "MovieID")
    rating = parse_numbers(rows, rows.start + 2, np.float64, "Rating")
    timestamps = parse_numbers(rows, rows.start + 3, np.int64, "Timestamp")
    if min_rating is not None:
        user_idx, user_vocab, item_idx, item_vocab, timestamps = _keep_events(
            rating >= min_rating, user_idx, user_vocab, item_idx, item_vocab, timestamps)
    if movies == "auto":
        movies = path.with_name("movies.dat") if path.with_name("movies.dat").is_file() else None
    columns = _movielens_movies(Path(movies), make_item_vocab(item_vocab)) if movies else {}
    suffix = f",min_rating={min_rating:g}" if min_rating is not None else ""
    return assemble(user_idx, user_vocab, item_idx, item_vocab, timestamps,
                    f"movielens:{path.name}{suffix}", columns)


def _movielens_movies(path: Path, item_vocab: np.ndarray) -> dict[str, np.ndarray]:
    """movies.dat → title (cleaned) and genres columns. UTF-8, else Latin-1 (GroupLens' own)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raw = raw.decode("latin-1").encode("utf-8")
    if not raw.strip():
        raise DataFormatError(path, 1, "empty file")
    rows = split_rows(path, raw.replace(b"\r\n", b"\n"), b"::")
    rows.require_counts((3,), "3 fields (MovieID::Title::Genres)")
    _check_unique(rows, rows.start, "MovieID")
    titles = np.array([clean_title(t) for t in decode(rows.column(1))])
    return join_item_columns(item_vocab, decode(rows.column(0)),
                             {"title": titles, "genres": decode(rows.column(2))})


def _check_unique(rows: Rows, fields_at: np.ndarray, what: str) -> None:
    keys = rows.fields[fields_at]
    _, first = np.unique(keys, return_index=True)
    if first.size < keys.size:
        dup = np.setdiff1d(np.arange(keys.size), first)[0]
        raise DataFormatError(rows.path, rows.line_of_field(fields_at[dup]),
                              f"duplicate {what} {keys[dup].decode('utf-8', 'replace')!r}")


def _drop_unused(idx: np.ndarray, vocab: np.ndarray):
    used, idx = np.unique(idx, return_inverse=True)
    return idx.astype(np.int64), vocab[used]


# --- RecBole atomic files ----------------------------------------------------------------
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_TITLE_FIELDS = ("title", "movie_title", "item_title", "name")


def read_recbole(path, item_file: str | os.PathLike | None = "auto", user_field: str = "user_id",
                 item_field: str = "item_id", time_field: str = "timestamp",
                 rating_field: str = "rating", min_rating: float | None = None) -> InteractionStore:
    """A RecBole `.inter` file (events sorted by time within each user, stable)."""
    path = Path(path)
    rows, fields, _, header_line = _recbole_table(path)
    for name in (user_field, item_field):
        if name not in fields:
            raise DataFormatError(path, header_line, f"header has no {name!r} field "
                                                     f"(fields: {', '.join(fields)})")
    user_at = rows.start + fields.index(user_field)
    item_at = rows.start + fields.index(item_field)
    _require_nonempty(rows, user_at, user_field)
    _require_nonempty(rows, item_at, item_field)
    timestamps = None
    if time_field in fields:
        timestamps = parse_numbers(rows, rows.start + fields.index(time_field), np.float64, time_field)
        if np.all(timestamps == np.round(timestamps)) and np.abs(timestamps).max() < 2 ** 53:
            timestamps = timestamps.astype(np.int64)
    user_tokens, item_tokens = rows.fields[user_at], rows.fields[item_at]
    source = f"recbole:{path.name}"
    if min_rating is not None:
        if rating_field not in fields:
            raise DataFormatError(path, header_line, f"min_rating needs a {rating_field!r} field")
        keep = parse_numbers(rows, rows.start + fields.index(rating_field), np.float64, rating_field) >= min_rating
        user_tokens, item_tokens = user_tokens[keep], item_tokens[keep]
        timestamps = None if timestamps is None else timestamps[keep]
        source += f",min_rating={min_rating:g}"
    user_idx, user_vocab = index_tokens(user_tokens)
    item_idx, item_vocab = index_tokens(item_tokens)
    if item_file == "auto":
        item_file = path.with_suffix(".item") if path.with_suffix(".item").is_file() else None
    columns = _recbole_items(Path(item_file), make_item_vocab(item_vocab), item_field) if item_file else {}
    return assemble(user_idx, user_vocab, item_idx, item_vocab, timestamps, source, columns)


def _recbole_table(path: Path) -> tuple[Rows, list[str], list[str], int]:
    """Data rows, field names, field types and the header's line number of a RecBole atomic file."""
    rows = split_rows(path, read_text(path), b"\t")
    header = [decode(f) for f in rows.fields[rows.start[0]:rows.start[0] + rows.count[0]]]
    names, kinds = [], []
    for field in header:
        name, _, kind = str(field).partition(":")
        if kind not in _RECBOLE_TYPES:
            raise DataFormatError(path, rows.line[0], f"header field {str(field)!r} needs a type "
                                                      f"suffix :{'/:'.join(_RECBOLE_TYPES)}")
        names.append(name)
        kinds.append(kind)
    data = rows.drop_first()
    if len(data) == 0:
        raise DataFormatError(path, rows.line[0] + 1, "no data rows after the header")
    data.require_counts((len(names),), f"{len(names)} tab-separated fields like the header")
    return data, names, kinds, int(rows.line[0])


def _require_nonempty(rows: Rows, fields_at: np.ndarray, what: str) -> None:
    empty = np.strings.str_len(rows.fields[fields_at]) == 0
    if empty.any():
        raise DataFormatError(rows.path, rows.line_of_field(fields_at[np.flatnonzero(empty)[0]]),
                              f"empty {what}")


def _recbole_items(path: Path, item_vocab: np.ndarray, item_field: str) -> dict[str, np.ndarray]:
    """`.item` columns: floats as float64 (NaN when empty), everything else as text."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows, fields, kinds, header_line = _recbole_table(path)
    if item_field not in fields:
        raise DataFormatError(path, header_line, f"header has no {item_field!r} field")
    key_at = rows.start + fields.index(item_field)
    _check_unique(rows, key_at, item_field)
    columns = {}
    for j, (name, kind) in enumerate(zip(fields, kinds)):
        if name == item_field:
            continue
        at = rows.start + j
        if kind == "float":
            empty = np.strings.str_len(rows.fields[at]) == 0
            values = np.full(at.size, np.nan)
            values[~empty] = parse_numbers(rows, at[~empty], np.float64, name)
        else:
            values = decode(rows.fields[at])
        if name in _TITLE_FIELDS and "title" not in columns:
            name, values = "title", np.array([clean_title(t) for t in values])
        columns[name] = values
    return join_item_columns(item_vocab, decode(rows.fields[key_at]), columns)
