"""Statistics of an item code table and TIGER's de-duplication column.

A code table is an integer array [n_items, levels]: row i is item i's semantic ID
(s^(1), ..., s^(L)). These are host-side numpy functions (the table is small and the
results are logged or written next to the table), pure and deterministic.

- utilisation[k]  = |{codes used at level k}| / n_k
- perplexity[k]   = exp(H(p_k)), p_k = empirical distribution of level-k codes
                    (1 when one code takes everything, n_k when usage is uniform)
- collision_rate  = fraction of items whose full tuple is shared with at least one other
                    item (a group of 3 identical tuples contributes 3)
- collision_rate_letter = (n_items - n_distinct_tuples) / n_items, the number LETTER code
                    prints as "Collision Rate" (the same group contributes 2)
- dedup_position  : TIGER appends a last column that numbers the items sharing a tuple
                    0, 1, 2, ... in increasing item id (row) order; items with a unique
                    tuple get 0. Afterwards no two items share an ID. Items identical in
                    every level (e.g. duplicate products with the same text) are
                    separated only by this column, lower item id first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _table(codes, name: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{name}: codes must be an integer table [n_items, levels], got "
                         f"{codes.dtype} of shape {codes.shape}")
    if codes.shape[0] == 0:
        raise ValueError(f"{name}: the code table is empty")
    return codes


def _tuple_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id per item [N], group sizes [G]) of identical rows."""
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return group.reshape(-1), sizes


def codebook_utilisation(codes, codebook_sizes: int | Sequence[int]) -> np.ndarray:
    """float [levels]: fraction of each level's codes used by at least one item."""
    codes = _table(codes, "codebook_utilisation")
    sizes = np.broadcast_to(np.asarray(codebook_sizes), (codes.shape[1],))
    if codes.min() < 0 or np.any(codes.max(axis=0) >= sizes):
        raise ValueError(f"codebook_utilisation: codes outside [0, size) for sizes {sizes.tolist()}")
    return np.asarray([len(np.unique(codes[:, k])) / sizes[k] for k in range(codes.shape[1])])


def codebook_perplexity(codes) -> np.ndarray:
    """float [levels]: exp of the entropy (nats) of each level's code usage."""
    codes = _table(codes, "codebook_perplexity")
    out = []
    for k in range(codes.shape[1]):
        _, counts = np.unique(codes[:, k], return_counts=True)
        p = counts / counts.sum()
        out.append(np.exp(-np.sum(p * np.log(p))))
    return np.asarray(out)


def collision_rate(codes) -> float:
    """Fraction of items whose full code tuple is shared with another item."""
    group, sizes = _tuple_groups(_table(codes, "collision_rate"))
    return float(np.mean(sizes[group] > 1))


def collision_rate_letter(codes) -> float:
    """(n_items - distinct tuples) / n_items: LETTER code's 'Collision Rate'."""
    codes = _table(codes, "collision_rate_letter")
    _, sizes = _tuple_groups(codes)
    return float((codes.shape[0] - len(sizes)) / codes.shape[0])


def dedup_position(codes) -> np.ndarray:
    """codes [N, L] -> [N, L + 1]: the extra column numbers items sharing a tuple 0, 1, ...
    in increasing item id; the last level's vocabulary must hold max(column) + 1 values."""
    codes = _table(codes, "dedup_position")
    group, _ = _tuple_groups(codes)
    order = np.argsort(group, kind="stable")           # by group, then by item id
    sorted_group = group[order]
    is_first = np.r_[True, sorted_group[1:] != sorted_group[:-1]]
    first_index = np.maximum.accumulate(np.where(is_first, np.arange(len(order)), 0))
    position = np.empty(len(order), codes.dtype)
    position[order] = np.arange(len(order)) - first_index
    out = np.concatenate([codes, position[:, None]], axis=1)
    assert len(np.unique(out, axis=0)) == len(out), "dedup_position left a shared ID"
    return out
