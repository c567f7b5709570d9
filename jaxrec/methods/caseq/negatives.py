"""The official sampler's training negatives, produced in the data pipeline.

SASRec.pytorch and CaseQ pair every target position with one negative drawn uniformly
from the items the user has *not* interacted with in training. The loss layer's own
`bce` draws from all items but the target (it cannot see histories), so the task adds
the negatives to each record as a Grain `random_map`: seeded by the record's global
index, hence deterministic and exactly resumable with the iterator state.
"""
from __future__ import annotations

import numpy as np

from jaxrec.data.store import InteractionStore


def draw_excluding(rng: np.random.Generator, n_items: int, excluded: np.ndarray, size: int) -> np.ndarray:
    """`size` i.i.d. uniform draws from {1..n_items} minus `excluded` (sorted, unique).

    Draw the rank r of the item among the allowed ones, then shift it past the excluded
    items at or below it: item = r + #{i : excluded_i - i <= r} (0-based i).
    """
    n_allowed = n_items - excluded.size
    if n_allowed < 1:
        return rng.integers(1, n_items + 1, size)   # nothing left to avoid: plain uniform
    r = rng.integers(1, n_allowed + 1, size)
    return r + np.searchsorted(excluded - np.arange(excluded.size), r, side="right")


class HistoryExcludingNegatives:
    """(record, rng) -> record + "negatives" int32 [max_len]: 0 where the target is 0,
    elsewhere uniform over items absent from the user's training events."""

    def __init__(self, store: InteractionStore, train_end: np.ndarray):
        self.items, self.n_items = store.item_ids, store.n_items
        self.starts, self.train_end = store.user_offsets[:-1], np.asarray(train_end, np.int64)

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        user = int(record["user"])
        seen = np.unique(self.items[self.starts[user]:self.train_end[user]])
        targets = record["targets"]
        negatives = draw_excluding(rng, self.n_items, seen, targets.size).astype(np.int32)
        return {**record, "negatives": np.where(targets > 0, negatives, 0).astype(np.int32)}
