"""A prefix trie over semantic-ID tuples, stored as dense per-level transition tables.

Generative retrieval names item i by its code path `codes[i] = (c_0, ..., c_{L-1})`,
coarse to fine. Decoding one level per step only needs, at step k, "which codes extend
this prefix, and to which longer prefix". So the trie is L dense int32 tables:

    transitions[k][p, c] = id of the length-(k+1) prefix (prefix p of length k) + (c,)
                           -1 when no item starts with that prefix
    transitions[L-1][p, c] = the item id (row of `codes`), -1 when no such item

Rules:
- Prefix ids of length k number the distinct length-k prefixes in lexicographic order
  of their codes; length 0 has the single root, id 0. Items keep their row index as id
  (0..n_items-1); mapping to the caller's ids is the caller's job.
- Every table has the same width V = max_k n_codes[k], so a [.., V] log-prob vector
  from the generator indexes any level; codes c >= n_codes[k] are never valid.
- `build_trie` is host-side numpy, run once. `Trie` and `TrieTables` are pytrees whose
  arrays are leaves, so jitted decoders receive them as *traced arguments*: a new code
  table of the same shape reuses the compiled program instead of baking in constants.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import struct


class TrieTables(struct.PyTreeNode):
    """What constrained beam search needs: `transitions[k]` [P_k, V] int32 per level."""

    transitions: tuple[jax.Array | np.ndarray, ...]

    @property
    def n_levels(self) -> int:
        return len(self.transitions)

    @property
    def width(self) -> int:
        return int(self.transitions[0].shape[1])


class Trie(struct.PyTreeNode):
    """The transition tables plus what exact (teacher-forced) scoring and reports need.

    - `transitions[k]` [P_k, V] int32: see the module docstring.
    - `prefixes[k]` [P_k, k] int32: the codes of each distinct length-k prefix, by id.
    - `item_prefix_ids` [n_items, L] int32: column k is the id of `codes[i, :k]`.
    - `codes` [n_items, L] int32: the table the trie was built from.
    - `n_codes` (static): the code count of every level.
    """

    transitions: tuple[jax.Array | np.ndarray, ...]
    prefixes: tuple[jax.Array | np.ndarray, ...]
    item_prefix_ids: jax.Array | np.ndarray
    codes: jax.Array | np.ndarray
    n_codes: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def tables(self) -> TrieTables:
        return TrieTables(transitions=self.transitions)

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0])

    n_levels = TrieTables.n_levels       # the same derivations from `transitions`
    width = TrieTables.width


def _check_codes(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array [n_items, levels], got {codes.dtype} "
                         f"of shape {codes.shape}")
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must have at least one item and one level, got shape {codes.shape}")
    if codes.min() < 0:
        item, level = np.argwhere(codes < 0)[0]
        raise ValueError(f"codes must be non-negative: item {item} has code {codes[item, level]} "
                         f"at level {level}")
    if codes.max() >= np.iinfo(np.int32).max:
        raise ValueError(f"codes must fit in int32, got a maximum of {codes.max()}")
    _, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    first_of_row = first[inverse.reshape(-1)]
    duplicates = np.flatnonzero(first_of_row != np.arange(len(codes)))
    if duplicates.size:
        j = duplicates[0]
        raise ValueError(f"codes must be distinct per item: items {first_of_row[j]} and {j} share the "
                         f"code path {codes[j].tolist()}")
    return codes.astype(np.int32)


def _check_n_codes(codes: np.ndarray, n_codes: Sequence[int] | None) -> tuple[int, ...]:
    used = tuple(int(m) + 1 for m in codes.max(axis=0))
    if n_codes is None:
        return used
    n_codes = tuple(int(n) for n in n_codes)
    if len(n_codes) != codes.shape[1]:
        raise ValueError(f"n_codes needs one size per level ({codes.shape[1]}), got {n_codes}")
    too_small = [k for k in range(len(n_codes)) if n_codes[k] < used[k]]
    if too_small:
        k = too_small[0]
        raise ValueError(f"n_codes[{k}] = {n_codes[k]} but level {k} uses code {used[k] - 1}")
    return n_codes


def build_trie(codes, n_codes: Sequence[int] | None = None) -> Trie:
    """The trie of `codes` [n_items, L] (item i = row i); host-side numpy.

    `n_codes` gives the code count of each level (the generator's vocabulary, which sets
    the table width V); by default it is each level's largest used code + 1.
    """
    codes = _check_codes(codes)
    n_codes = _check_n_codes(codes, n_codes)
    n_items, n_levels = codes.shape
    width = max(n_codes)

    # ids[k][i] = id of codes[i, :k]; lexicographic because np.unique sorts rows.
    ids = [np.zeros(n_items, np.int32)]
    prefixes = [np.zeros((1, 0), np.int32)]
    for k in range(1, n_levels):
        distinct, inverse = np.unique(codes[:, :k], axis=0, return_inverse=True)
        prefixes.append(distinct.astype(np.int32))
        ids.append(inverse.reshape(-1).astype(np.int32))
    ids.append(np.arange(n_items, dtype=np.int32))       # "length L prefix" = the item

    transitions = []
    for k in range(n_levels):
        table = np.full((len(prefixes[k]), width), -1, np.int32)
        # Items sharing (parent, code) share the child, so the repeated writes agree.
        table[ids[k], codes[:, k]] = ids[k + 1]
        transitions.append(table)

    return Trie(transitions=tuple(transitions), prefixes=tuple(prefixes),
                item_prefix_ids=np.stack(ids[:n_levels], axis=1), codes=codes, n_codes=n_codes)
