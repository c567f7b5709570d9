"""Vectorised text parsing shared by the readers, with exact `file:line: reason` errors.

A file is read once as bytes and split with bytes/numpy operations; nothing walks it
line by line unless a check already failed and the exact offending line must be named.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # exactly what bytes.split() splits on
_FIELD_SEPARATOR = b"\x1f"                      # stands in for multi-byte separators such as "::"
_POWERS_OF_TEN = 10 ** np.arange(19, dtype=np.int64)


class DataFormatError(ValueError):
    """Malformed input; the message is `<file>:<line>: <reason>` (`<path>: <reason>` without a line)."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), None if line is None else int(line), reason
        super().__init__(f"{self.path}:{self.line}: {reason}" if line is not None else f"{self.path}: {reason}")


def read_text(path: str | os.PathLike) -> bytes:
    """The file's bytes, normalised to LF line endings; empty or non-UTF-8 files are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFormatError(path, line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                          f"{column}); re-encode the file as UTF-8") from None
    if not raw.strip():
        raise DataFormatError(path, 1, "empty file")
    if b"\x00" in raw:   # numpy byte strings drop trailing NULs: "7\x00" would silently become "7"
        at = raw.index(b"\x00")
        line_start = raw.rfind(b"\n", 0, at) + 1
        raise DataFormatError(path, raw.count(b"\n", 0, at) + 1,
                              f"NUL byte at column {at - line_start + 1}; a binary file, not text")
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    return raw


@dataclasses.dataclass(frozen=True)
class Rows:
    """The non-blank lines of a text file, split into fields.

    fields: bytes array (numpy "S") of every field in file order;
    start[r], count[r]: where row r's fields lie in `fields`; line[r]: its 1-based line number.
    """
    path: str
    fields: np.ndarray
    start: np.ndarray
    count: np.ndarray
    line: np.ndarray

    def __len__(self) -> int:
        return self.line.size

    def require_counts(self, allowed, what: str) -> None:
        """Raise at the first row whose number of fields is not in `allowed`."""
        self.require(np.isin(self.count, list(allowed)), what)

    def require(self, ok: np.ndarray, what: str) -> None:
        """Raise at the first row where `ok` (bool per row) is False."""
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            raise DataFormatError(self.path, self.line[r], f"expected {what}, found {self.count[r]} "
                                                           f"field{'s' if self.count[r] != 1 else ''}")

    def column(self, j: int) -> np.ndarray:
        """Field j of every row (all rows must have more than j fields)."""
        return self.fields[self.start + j]

    def line_of_field(self, k) -> np.ndarray:
        return self.line[np.searchsorted(self.start, k, side="right") - 1]

    def drop_first(self) -> "Rows":
        return dataclasses.replace(self, start=self.start[1:], count=self.count[1:], line=self.line[1:])


def split_rows(path, raw: bytes, separator: bytes | None = None) -> Rows:
    """Split text into rows of fields; `separator=None` splits on runs of whitespace.

    Blank (whitespace-only) lines are skipped. With an explicit separator, fields keep
    their inner spaces; whitespace around each field is stripped.
    """
    if separator is not None and len(separator) > 1:
        if _FIELD_SEPARATOR in raw:
            bad = raw.index(_FIELD_SEPARATOR)
            raise DataFormatError(path, raw.count(b"\n", 0, bad) + 1, "unexpected control byte 0x1f")
        raw = raw.replace(separator, _FIELD_SEPARATOR)
        separator = _FIELD_SEPARATOR
    buffer = np.frombuffer(raw, dtype=np.uint8)
    newlines = np.flatnonzero(buffer == 10)
    if separator is None:
        space = _WHITESPACE[buffer]
        is_start = ~space
        is_start[1:] &= space[:-1]
        count = np.bincount(np.searchsorted(newlines, np.flatnonzero(is_start)), minlength=newlines.size + 1)
        keep = np.flatnonzero(count)
        fields = np.array(raw.split())
        count = count[keep]
    else:
        visible = np.bincount(np.searchsorted(newlines, np.flatnonzero(~_WHITESPACE[buffer])),
                              minlength=newlines.size + 1)
        keep = np.flatnonzero(visible)
        seps = np.bincount(np.searchsorted(newlines, np.flatnonzero(buffer == separator[0])),
                           minlength=newlines.size + 1)
        count = seps[keep] + 1
        lines = raw.split(b"\n")
        fields = np.strings.strip(np.array(separator.join([lines[i] for i in keep]).split(separator)))
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return Rows(str(path), fields, start, count.astype(np.int64), keep.astype(np.int64) + 1)


# --- typed columns ---------------------------------------------------------------------
def parse_numbers(rows: Rows, fields_at: np.ndarray, dtype, what: str) -> np.ndarray:
    """Parse the fields at flat positions `fields_at` as numbers; name the first bad one."""
    tokens = rows.fields[fields_at]
    try:
        values = tokens.astype(dtype)
        if np.dtype(dtype).kind == "f" and not np.isfinite(values).all():
            raise ValueError
        return values
    except (ValueError, OverflowError):
        pass
    kind = "an integer" if np.dtype(dtype).kind in "iu" else "a finite number"
    for k, token in zip(fields_at, tokens):
        try:
            value = np.array([token]).astype(dtype)
            if np.dtype(dtype).kind == "f" and not np.isfinite(value).all():
                raise ValueError
        except (ValueError, OverflowError):
            raise DataFormatError(rows.path, rows.line_of_field(k),
                                  f"bad {what} {token.decode('utf-8', 'replace')!r} "
                                  f"(expected {kind})") from None
    raise AssertionError("unreachable: the vectorised parse failed but no token is bad")


def index_tokens(tokens: np.ndarray, ids: str = "auto", rows: Rows | None = None,
                 fields_at: np.ndarray | None = None, what: str = "id"):
    """Map tokens (numpy S or U array) to 0-based indices and return (index int64, vocab U array).

    Integer tokens (all of them, written canonically, e.g. "7" not "07") are ordered
    numerically; otherwise tokens are ordered by first appearance. `ids="int"` demands
    integers (a `Rows` context names the bad line), `ids="str"` always uses first appearance.
    """
    if ids not in ("auto", "int", "str"):
        raise ValueError(f"ids must be 'auto', 'int' or 'str', got {ids!r}")
    if ids != "str" and tokens.size:
        values = as_integers(tokens)
        if values is not None:
            unique, index = np.unique(values, return_inverse=True)
            return index.astype(np.int64), unique.astype(str)
        if ids == "int":
            if rows is None:
                raise ValueError(f"{what}s are not all integers")
            for k, token in zip(fields_at, tokens):
                if as_integers(np.array([token])) is None:
                    raise DataFormatError(rows.path, rows.line_of_field(k),
                                          f"bad {what} {_decode(token)!r} (expected an integer)")
    unique, first, index = np.unique(tokens, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    vocab = unique[order]
    if vocab.dtype.kind == "S":
        vocab = np.strings.decode(vocab, "utf-8")
    return rank[index].astype(np.int64), vocab.astype(str)


def as_integers(tokens: np.ndarray) -> np.ndarray | None:
    """int64 values if every token is an integer written canonically, else None."""
    try:
        values = tokens.astype(np.int64)
    except (ValueError, OverflowError):
        return None
    # "07", "+7" or "-0" parse, but would not survive the round trip through str(int):
    # compare each token's length with the length of the integer written canonically.
    digits = np.maximum(np.searchsorted(_POWERS_OF_TEN, np.abs(values), side="right"), 1)
    canonical = digits + (values < 0) == np.strings.str_len(tokens)
    return values if canonical.all() else None


def _decode(token) -> str:
    return token.decode("utf-8", "replace") if isinstance(token, bytes) else str(token)


def decode(tokens: np.ndarray) -> np.ndarray:
    """numpy S (UTF-8 bytes) array → unicode array."""
    return np.strings.decode(tokens, "utf-8").astype(str) if tokens.dtype.kind == "S" else tokens


# --- titles ----------------------------------------------------------------------------
_ARTICLES = ("The", "A", "An", "Les", "La", "Le", "L'", "Il", "Das", "Die", "Der", "El", "Los", "Las",
             "Lo", "Gli", "Une", "Un")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+?), (?P<article>%s)(?P<tail>(?: \([^()]*\))*)$"
                               % "|".join(re.escape(a) for a in _ARTICLES))
_SPACES = re.compile(r"\s+")


def clean_title(title: str) -> str:
    """Normalise whitespace and move a trailing article to the front.

    "Matrix, The (1999)" -> "The Matrix (1999)"; "Postino, Il (The Postman) (1994)" ->
    "Il Postino (The Postman) (1994)"; "Enfer, L' (1994)" -> "L'Enfer (1994)". The article
    must end the title or precede only parenthesised parts, so "Tyler, The Creator" stays.
    """
    title = _SPACES.sub(" ", title).strip()
    match = _TRAILING_ARTICLE.match(title)
    if match is None:
        return title
    article = match["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{match['body']}{match['tail']}"
