"""Fixed-shape records for Grain (`grain.MapDataset.source(...)`): training windows and eval rows.

Each record source computes int64 start/end arrays once; `__getitem__` only slices the
store's item array and left-pads, so a record costs O(max_len) whatever the data size.
"""
from __future__ import annotations

import numpy as np

from jaxrec.data.splits import EvalExamples, train_mask
from jaxrec.data.store import InteractionStore

TRAIN_MODES = ("last", "chunks", "prefix")


def _left_pad(values: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int32)
    if values.size:
        out[length - values.size:] = values
    return out


def _check_index(i, n: int) -> int:
    i = int(i)
    if not 0 <= i < n:
        raise IndexError(f"record {i} out of range [0, {n})")
    return i


class TrainWindows:
    """Next-item training records from each user's training events.

    mode "last":   one record per user with >= 2 training events: the last max_len+1
                   events w; inputs = w[:-1], targets = w[1:].
    mode "chunks": the training sequence cut from its end into windows of max_len+1
                   events overlapping by one, so every training event but the first is a
                   target exactly once; the last chunk equals the "last" record.
    mode "prefix": one record per training event t >= 1 (RecBole style): inputs = the
                   max_len events before t, targets = 0 except the last position = event t.
    Records: {"inputs": int32[max_len], "targets": int32[max_len], "user": int64 []},
    left-padded with 0 (the padding item).
    """

    def __init__(self, store: InteractionStore, train_end: np.ndarray, max_len: int, mode: str = "last"):
        if mode not in TRAIN_MODES:
            raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        train_end = np.asarray(train_end, dtype=np.int64)
        first = store.user_offsets[:-1]
        if train_end.shape != first.shape or np.any(train_end < first) or np.any(train_end > store.user_offsets[1:]):
            raise ValueError("train_end must hold one end per user, inside that user's events")
        self.store, self.max_len, self.mode = store, max_len, mode
        n_train = train_end - first
        users = np.flatnonzero(n_train >= 2)
        if mode == "last":
            self.users, self.ends = users, train_end[users]
        elif mode == "chunks":
            n_chunks = -(-(n_train[users] - 1) // max_len)
            self.users = np.repeat(users, n_chunks)
            # Chunks in time order; the k-th from the end ends max_len*k events before train_end.
            k = np.repeat(np.cumsum(n_chunks) - 1, n_chunks) - np.arange(self.users.size)
            self.ends = train_end[self.users] - max_len * k
        else:
            n_targets = np.maximum(n_train - 1, 0)
            self.users = np.repeat(np.arange(store.n_users), n_targets)
            k = np.arange(self.users.size) - np.repeat(np.cumsum(n_targets) - n_targets, n_targets)
            self.ends = first[self.users] + 2 + k  # the window ends just after its target
        self.starts = np.maximum(first[self.users], self.ends - (max_len + 1))

    def __len__(self) -> int:
        return self.users.size

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        i = _check_index(i, len(self))
        window = self.store.item_ids[self.starts[i]:self.ends[i]]
        inputs = _left_pad(window[:-1], self.max_len)
        if self.mode == "prefix":
            targets = np.zeros(self.max_len, dtype=np.int32)
            targets[-1] = window[-1]
        else:
            targets = _left_pad(window[1:], self.max_len)
        return {"inputs": inputs, "targets": targets, "user": np.int64(self.users[i])}


class EvalRecords:
    """One record per evaluation example.

    {"inputs": int32[max_len] (last max_len history items, left-padded),
     "target": int32 [], "example": int64 [] (row in `examples`), "user": int64 [],
     "history": int32[history_len] (the history, right-padded with 0; for excluding seen
     items or drawing negatives)}. `history_len` defaults to the longest history; a shorter
    one keeps the most recent history_len items.
    """

    def __init__(self, store: InteractionStore, examples: EvalExamples, max_len: int,
                 history_len: int | None = None):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.store, self.examples, self.max_len = store, examples, max_len
        self.history_start = store.user_offsets[examples.users]
        lengths = examples.history_end - self.history_start
        self.history_len = int(lengths.max(initial=1)) if history_len is None else int(history_len)
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        i = _check_index(i, len(self))
        end = self.examples.history_end[i]
        items = self.store.item_ids
        recent = items[max(self.history_start[i], end - self.max_len):end]
        history = items[max(self.history_start[i], end - self.history_len):end]
        padded_history = np.zeros(self.history_len, dtype=np.int32)
        padded_history[:history.size] = history
        return {"inputs": _left_pad(recent, self.max_len), "target": np.int32(self.examples.targets[i]),
                "example": np.int64(i), "user": np.int64(self.examples.users[i]), "history": padded_history}


def popularity_counts(store: InteractionStore, train_end: np.ndarray) -> np.ndarray:
    """int64 [n_items+1]: how often each item occurs among training events (index 0 stays 0)."""
    return np.bincount(store.item_ids[train_mask(store, train_end)], minlength=store.n_items + 1).astype(np.int64)
