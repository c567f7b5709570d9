"""Which format a file is, decided from its name and lines — or a one-line error, never a guess.

`format="auto"` (docs/data.md, "Formats", states the same rules):

1. By name: a directory holding `train.tsv` is `llara`; `*.inter` is `recbole`; `*.dat` is
   `movielens`.
2. By the first non-blank line: exactly `seq<TAB>next` is `llara` (whatever the file's
   name); the words `seq next` separated any other way are an error (LLaRA's header is
   tab-separated). A line whose tab-separated fields are all typed `name:type` (`:token`,
   `:float`, ...) is a RecBole header: `recbole`.
3. Anything else is a whitespace-separated table: `pairs`, `ratings` or `sequences`.
   a. Header. A first line whose every word is a column name (`user`, `user_id`, `userid`,
      `item`, `item_id`, `itemid`, `rating`, `timestamp`, `time`; any case) is a header and
      decides the format: `user item` or `user item timestamp` → pairs, `user item rating
      timestamp` → ratings. Other column-name lines, and a header with no data lines, are
      errors. A first line holding a word that is not a number above lines that are all
      numbers is an unrecognised header: an error, never a user and an item.
   b. A tab-separated field with a space inside (`1 2 3<TAB>4`: a TSV such as LLaRA's
      with a wrong header) is an error: the file is not a whitespace table.
   c. Otherwise the shapes the lines fit:
        pairs      every line has 2 or 3 fields (`user item [timestamp]`)
        ratings    every line has 4 fields (`user item rating timestamp`, ML-100K `u.data`)
        sequences  every line has >= 2 fields and no user is on two lines
      Exactly one fits: that format, whose reader then checks every line (a pairs file
      with one missing timestamp stops at that line). Pairs and sequences both fit when
      every line is `user item` and no user repeats: pairs (the store is the same). Any
      other double fit (3 or 4 fields on every line, or 2 and 3 mixed, with no user
      repeated) is ambiguous and an error naming the choices; no fit is an error naming
      the first line that breaks the shape.

Rules 3a (header) applies to an explicit `pairs`, `ratings` or `sequences` as well: the
header must name that format's layout (sequences files have none), and an unrecognised
header is an error unless `ids="str"` says words are ids.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxrec.data.text import DataFormatError, Rows

TABLE = "table"   # what detect_format returns for rule 3: the rows decide (table_format)
CHOOSE = "choose the format with --format or data.format"

COLUMN_NAMES = {"user": "user", "user_id": "user", "userid": "user", "item": "item", "item_id": "item",
                "itemid": "item", "rating": "rating", "timestamp": "timestamp", "time": "timestamp"}
HEADER_LAYOUTS = {("user", "item"): "pairs", ("user", "item", "timestamp"): "pairs",
                  ("user", "item", "rating", "timestamp"): "ratings"}
_RECBOLE_TYPED = re.compile(rb"^[^:\s]+:(token|token_seq|float|float_seq)$")
# A line with a tab somewhere and a space run between two visible characters.
_SPACE_INSIDE_TAB_FIELD = re.compile(rb"(?m)^(?=[^\n]*\t)[^\n]*?\S[ \x0b\x0c\r]+\S")


def detect_format(path: Path) -> str:
    """Rules 1 and 2: a format name, or TABLE when the rows must decide."""
    if path.is_dir():
        if (path / "train.tsv").is_file():
            return "llara"
        raise DataFormatError(path, None, "cannot tell the format of this directory (only LLaRA "
                                          "directories with train.tsv are read whole); give a file")
    if path.suffix == ".inter":
        return "recbole"
    if path.suffix == ".dat":
        return "movielens"
    line_number, first = _first_line(path)
    if first.strip().split(b"\t") == [b"seq", b"next"]:
        return "llara"
    if first.split() == [b"seq", b"next"]:
        raise DataFormatError(path, line_number, "a LLaRA header written without its tab; it must be "
                                                 "exactly 'seq<TAB>next', with a tab between history and next item")
    fields = first.strip().split(b"\t")
    if fields != [b""] and all(_RECBOLE_TYPED.match(f.strip()) for f in fields):
        return "recbole"
    return TABLE


def _first_line(path: Path) -> tuple[int, bytes]:
    """(1-based number, bytes) of the first non-blank line; (1, b"") for an empty file."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                return n, line
            if n > 10_000:   # a file of blank lines: read_text reports it
                break
    return 1, b""


def header_layout(rows: Rows) -> str | None:
    """Rule 3a: the format a header line names, or None when the first line is no header."""
    words = [w.decode("utf-8", "replace").lower() for w in rows.fields[rows.start[0]:rows.start[0] + rows.count[0]]]
    if not all(w in COLUMN_NAMES for w in words):
        return None
    layout = HEADER_LAYOUTS.get(tuple(COLUMN_NAMES[w] for w in words))
    header = " ".join(words)
    if layout is None:
        raise DataFormatError(rows.path, rows.line[0], f"header '{header}' is not a layout jaxrec reads "
                                                       "('user item', 'user item timestamp' or "
                                                       "'user item rating timestamp')")
    if len(rows) == 1:
        raise DataFormatError(rows.path, rows.line[0], f"only a header ('{header}'), no data lines")
    return layout


def reject_unrecognised_header(rows: Rows) -> None:
    """Rule 3a, second half: words on line 1 above numbers only are a header, not ids."""
    if len(rows) < 2:
        return
    first = rows.fields[rows.start[0]:rows.start[0] + rows.count[0]]
    words = [w for w in first if not _all_numbers(np.array([w]))]
    if words and _all_numbers(rows.fields[rows.start[1]:]):
        text = b" ".join(first).decode("utf-8", "replace")
        raise DataFormatError(rows.path, rows.line[0], f"looks like a header ('{text}': words above lines of "
                                                       "numbers); jaxrec reads the headers 'user item', "
                                                       "'user item timestamp', 'user item rating timestamp': "
                                                       "rename or remove it")


def _all_numbers(tokens: np.ndarray) -> bool:
    try:
        tokens.astype(np.float64)
    except (ValueError, OverflowError):
        return False
    return True


def reject_tab_fields_with_spaces(path, raw: bytes) -> None:
    """Rule 3b: `a b<TAB>c` is a TSV with multi-word fields, not a whitespace table."""
    if b"\t" not in raw:
        return
    match = _SPACE_INSIDE_TAB_FIELD.search(raw)
    if match:
        line = raw.count(b"\n", 0, match.start()) + 1
        raise DataFormatError(path, line, "a tab-separated field holds spaces, so this is a TSV, not a "
                                          "whitespace-separated table (a LLaRA file needs the header "
                                          f"'seq<TAB>next'); {CHOOSE}")


def table_format(rows: Rows) -> str:
    """Rule 3c: the one shape the rows fit (pairs, ratings or sequences), else an error."""
    counts = rows.count
    if (counts == 2).all():   # pairs, or sequences of one item each: the same store
        return "pairs"
    users = rows.column(0)
    unique_users, per_user = np.unique(users, return_counts=True)
    fits = []
    if np.isin(counts, (2, 3)).all():
        fits.append("pairs")
    if (counts == 4).all():
        fits.append("ratings")
    if (counts >= 2).all() and unique_users.size == users.size:
        fits.append("sequences")
    if len(fits) == 1:
        return fits[0]
    if fits:
        shape = (f"every line has {counts[0]} fields" if (counts == counts[0]).all()
                 else "lines have 2 or 3 fields")
        kinds = {"pairs": "pairs (user item timestamp)" if (counts == 3).all() else
                          "pairs (user item [timestamp]) with timestamps missing",
                 "ratings": "ratings (user item rating timestamp, like ML-100K u.data)",
                 "sequences": "sequences (a user, then items)"}
        raise DataFormatError(rows.path, None, f"ambiguous: {shape} and no user is on two lines, which fits "
                                               f"{' and '.join(kinds[f] for f in fits)}; {CHOOSE}")
    short = np.flatnonzero(counts < 2)
    if short.size:
        r = int(short[0])
        raise DataFormatError(rows.path, rows.line[r], "expected a user and at least one item, found 1 field")
    repeated = int(np.flatnonzero(per_user > 1)[0])
    user = unique_users[repeated].decode("utf-8", "replace")
    lines = rows.line[np.flatnonzero(users == unique_users[repeated])[:2]]
    repeat = f"users repeat across lines (user {user!r} on lines {lines[0]} and {lines[1]})"
    differs = np.flatnonzero(counts != counts[0])
    if differs.size:
        r = int(differs[0])
        raise DataFormatError(rows.path, rows.line[r], f"{counts[r]} fields where line {rows.line[0]} has "
                                                       f"{counts[0]}, and {repeat}: neither pairs/ratings (one "
                                                       "layout on every line) nor sequences (one line per user); "
                                                       f"fix the file or {CHOOSE}")
    raise DataFormatError(rows.path, None, f"every line has {counts[0]} fields, too many for pairs (2-3) or "
                                           f"ratings (4), and {repeat}, which sequences files do not do; "
                                           f"{CHOOSE} (sequences, if lines continue a user's sequence)")
