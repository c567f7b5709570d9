"""The one in-memory form of interaction data: CSR arrays plus item metadata columns.

Every reader produces an `InteractionStore`; splits, windows and statistics are index
arithmetic on its arrays. Item index 0 is reserved for padding, so real items are
1..n_items and `item_vocab[i]` is the original token of item i. Users are rows
0..n_users-1 and `user_vocab[u]` is the original token of user u.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import numpy as np

PAD_TOKEN = "<pad>"
_FORMAT_VERSION = 1
_COLUMN_PREFIX = "item_column."
_ALLOWED_COLUMN_KINDS = "biufU"  # no object arrays: they would need pickles


@dataclasses.dataclass(frozen=True, eq=False)
class InteractionStore:
    user_offsets: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray | None
    item_vocab: np.ndarray
    user_vocab: np.ndarray
    item_columns: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        offsets = _as_int(self.user_offsets, np.int64, "user_offsets")
        items = _as_int(self.item_ids, np.int32, "item_ids")
        set_("user_offsets", offsets)
        set_("item_ids", items)
        set_("item_vocab", _as_str(self.item_vocab, "item_vocab"))
        set_("user_vocab", _as_str(self.user_vocab, "user_vocab"))
        set_("source", str(self.source))

        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
            raise ValueError("InteractionStore: user_offsets must be a 1-D array starting at 0")
        if offsets[-1] != items.size or items.ndim != 1:
            raise ValueError(f"InteractionStore: user_offsets ends at {offsets[-1]} but item_ids "
                             f"holds {items.size} interactions (1-D expected)")
        if np.any(np.diff(offsets) < 0):
            u = int(np.flatnonzero(np.diff(offsets) < 0)[0])
            raise ValueError(f"InteractionStore: user_offsets decreases at user {u}")
        n_users, n_items = offsets.size - 1, self.item_vocab.size - 1
        if self.user_vocab.shape != (n_users,):
            raise ValueError(f"InteractionStore: user_vocab has shape {self.user_vocab.shape}, "
                             f"expected ({n_users},) (one token per user)")
        if n_items < 0 or self.item_vocab[0] != PAD_TOKEN:
            raise ValueError(f"InteractionStore: item_vocab[0] must be {PAD_TOKEN!r} (index 0 is padding)")
        bad = (items < 1) | (items > n_items)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"InteractionStore: item_ids must lie in 1..{n_items} (0 is padding); "
                             f"found {items[k]} at interaction {k}")
        set_("timestamps", self._checked_timestamps())

        columns = {}
        for name, column in dict(self.item_columns).items():
            column = np.ascontiguousarray(column)
            if column.dtype.kind not in _ALLOWED_COLUMN_KINDS:
                raise ValueError(f"InteractionStore: item column {name!r} has dtype {column.dtype}; "
                                 "use numeric or unicode (str) arrays, not objects")
            if column.shape[:1] != (n_items + 1,):
                raise ValueError(f"InteractionStore: item column {name!r} has length {len(column)}, "
                                 f"expected n_items+1 = {n_items + 1} (row 0 = padding)")
            columns[str(name)] = column
        set_("item_columns", columns)

    def _checked_timestamps(self) -> np.ndarray | None:
        ts = self.timestamps
        if ts is None:
            return None
        ts = np.ascontiguousarray(ts)
        if ts.dtype.kind in "iu":
            ts = ts.astype(np.int64, copy=False)
        elif ts.dtype.kind == "f":
            ts = ts.astype(np.float64, copy=False)
            if not np.isfinite(ts).all():
                raise ValueError("InteractionStore: timestamps must be finite")
        else:
            raise ValueError(f"InteractionStore: timestamps must be int64 or float64, got {ts.dtype}")
        if ts.shape != self.item_ids.shape:
            raise ValueError(f"InteractionStore: timestamps has shape {ts.shape}, "
                             f"expected {self.item_ids.shape} (one per interaction)")
        # Decreases are allowed only where a new user starts.
        falls = np.flatnonzero(np.diff(ts) < 0) + 1
        starts_user = np.isin(falls, self.user_offsets)
        if not starts_user.all():
            k = int(falls[~starts_user][0])
            u = int(np.searchsorted(self.user_offsets, k, side="right") - 1)
            raise ValueError(f"InteractionStore: timestamps of user {u} ('{self.user_vocab[u]}') "
                             f"decrease at interaction {k}; each user's events must be in time order")
        return ts

    @classmethod
    def from_sequences(cls, sequences, timestamps=None, n_items: int | None = None,
                       source: str = "in-memory") -> "InteractionStore":
        """A store from per-user lists of item ids (already 1..n_items); handy in tests."""
        lengths = [len(s) for s in sequences]
        items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0)
        n_items = int(items.max(initial=0)) if n_items is None else n_items
        ts = None if timestamps is None else np.concatenate([np.asarray(t) for t in timestamps])
        return cls(user_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   item_ids=items.astype(np.int64), timestamps=ts,
                   item_vocab=make_item_vocab(np.arange(1, n_items + 1).astype(str)),
                   user_vocab=np.arange(len(sequences)).astype(str), source=source)

    # --- sizes and views -------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return self.user_offsets.size - 1

    @property
    def n_items(self) -> int:
        return self.item_vocab.size - 1

    @property
    def n_interactions(self) -> int:
        return self.item_ids.size

    def lengths(self) -> np.ndarray:
        """int64 [n_users]: number of interactions of each user."""
        return np.diff(self.user_offsets)

    def user_of_interaction(self) -> np.ndarray:
        """int64 [n_interactions]: the user row each interaction belongs to."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths())

    def sequence(self, u: int) -> np.ndarray:
        """The item ids of user row `u`, in order (a view, not a copy)."""
        return self.item_ids[self.user_offsets[u]:self.user_offsets[u + 1]]

    def select_users(self, rows: np.ndarray) -> "InteractionStore":
        """A store holding only the given user rows (in the given order), same item vocabulary."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths()[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        take = np.repeat(self.user_offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return dataclasses.replace(
            self, user_offsets=offsets, item_ids=self.item_ids[take],
            timestamps=None if self.timestamps is None else self.timestamps[take],
            user_vocab=self.user_vocab[rows])

    # --- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz of plain arrays (no pickled objects); returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {"format_version": np.array(_FORMAT_VERSION), "source": np.array(self.source),
                  "user_offsets": self.user_offsets, "item_ids": self.item_ids,
                  "item_vocab": self.item_vocab, "user_vocab": self.user_vocab}
        if self.timestamps is not None:
            arrays["timestamps"] = self.timestamps
        for name, column in self.item_columns.items():
            arrays[_COLUMN_PREFIX + name] = column
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InteractionStore":
        with np.load(path, allow_pickle=False) as npz:
            version = int(npz["format_version"]) if "format_version" in npz.files else None
            if version != _FORMAT_VERSION:
                raise ValueError(f"{path}: not an InteractionStore file of format version "
                                 f"{_FORMAT_VERSION} (found {version})")
            return cls(user_offsets=npz["user_offsets"], item_ids=npz["item_ids"],
                       timestamps=npz["timestamps"] if "timestamps" in npz.files else None,
                       item_vocab=npz["item_vocab"], user_vocab=npz["user_vocab"],
                       item_columns={k[len(_COLUMN_PREFIX):]: npz[k] for k in npz.files
                                     if k.startswith(_COLUMN_PREFIX)},
                       source=str(npz["source"]))

    def __repr__(self) -> str:
        ts = "" if self.timestamps is None else ", timestamps"
        cols = f", columns={sorted(self.item_columns)}" if self.item_columns else ""
        return (f"InteractionStore({self.source!r}: {self.n_users} users, {self.n_items} items, "
                f"{self.n_interactions} interactions{ts}{cols})")


def _as_int(values, dtype, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"InteractionStore: {name} must be an integer array, got {array.dtype}")
    if array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"InteractionStore: {name} does not fit in {np.dtype(dtype).name}")
    return np.ascontiguousarray(array, dtype=dtype)


def _as_str(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind != "U":
        if array.dtype.kind == "O" and all(isinstance(v, str) for v in array.ravel()):
            array = array.astype(str)
        else:
            raise ValueError(f"InteractionStore: {name} must be a unicode string array, got {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"InteractionStore: {name} must be 1-D")
    return array


def make_item_vocab(tokens) -> np.ndarray:
    """[<pad>, *tokens] as a unicode array: the vocabulary of items 1..len(tokens)."""
    return np.concatenate([np.array([PAD_TOKEN]), np.asarray(tokens, dtype=str)])
