"""LLaRA-style examples: a history of up to n items, the next item, and K candidates.

Each row of a LLaRA split (a pseudo-user whose sequence is history + [next]) is one
example. Candidates are the target plus K-1 negatives drawn uniformly from the items
that are neither in the (shown) history nor the target — LLaRA's sampler. Validation
and test candidates (and the prompt template of each example) are drawn once, keyed by
(seed, split, example), and stored; the official code redraws them on every load.
Training candidates are redrawn for every visit of a record from the record's own RNG.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data.store import InteractionStore
from jaxrec.eval.negatives import sample_negatives


@dataclasses.dataclass(frozen=True)
class Examples:
    history: np.ndarray   # int32 [N, H] item ids, oldest first, right-padded with 0
    lengths: np.ndarray   # int32 [N] real history items
    targets: np.ndarray   # int32 [N]
    rows: np.ndarray      # [N] the row token in the source split (traceability)

    def __len__(self) -> int:
        return self.targets.size

    @property
    def max_history(self) -> int:
        return self.history.shape[1]

    def take(self, index) -> "Examples":
        return Examples(self.history[index], self.lengths[index], self.targets[index], self.rows[index])

    def left_padded(self) -> np.ndarray:
        """int32 [N, H]: the histories left-padded (the sequence encoders' convention)."""
        H = self.max_history
        out = np.zeros_like(self.history)
        cols = np.arange(H)[None, :] - (H - self.lengths)[:, None]
        np.copyto(out, np.take_along_axis(self.history, np.maximum(cols, 0), axis=1), where=cols >= 0)
        return out


def examples_from_store(store: InteractionStore, max_history: int = 10, min_history: int = 1) -> Examples:
    """One example per row: the row's last item is the target, the up-to-`max_history`
    items before it the history. Rows with fewer than `min_history` history items are dropped."""
    if max_history < 1 or min_history < 1:
        raise ValueError(f"max_history and min_history must be >= 1, got {max_history}, {min_history}")
    n_history = store.lengths() - 1
    rows = np.flatnonzero(n_history >= min_history)
    lengths = np.minimum(n_history[rows], max_history)
    ends = store.user_offsets[rows + 1] - 1                      # index of each target
    cols = np.arange(max_history)[None, :]
    index = (ends - lengths)[:, None] + cols
    history = np.where(cols < lengths[:, None], store.item_ids[np.minimum(index, store.n_interactions - 1)], 0)
    return Examples(history=history.astype(np.int32), lengths=lengths.astype(np.int32),
                    targets=store.item_ids[ends].astype(np.int32), rows=store.user_vocab[rows])


def split_salt(name: str) -> int:
    return sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 1_000_003


@dataclasses.dataclass(frozen=True)
class FixedDraws:
    candidates: np.ndarray    # int32 [N, K], the target at `target_index`
    target_index: np.ndarray  # int32 [N]
    templates: np.ndarray     # int32 [N] prompt template of each example


def fixed_draws(examples: Examples, n_items: int, n_candidates: int, n_templates: int, seed: int,
                split: str) -> FixedDraws:
    """Candidates, the target's position among them and a template, drawn once per example.

    Negatives come from `sample_negatives` (a pure function of (seed, split, example)); the
    target's slot and the template from a generator seeded by (seed, split, example), so an
    example keeps its candidates whatever else is evaluated with it.
    """
    if n_candidates < 2:
        raise ValueError(f"need at least 2 candidates (the target and a negative), got {n_candidates}")
    salt = split_salt(split)
    negatives = sample_negatives(n_items, examples.targets, examples.history, n_candidates - 1, seed=seed + salt)
    target_index = np.zeros(len(examples), np.int32)
    templates = np.zeros(len(examples), np.int32)
    for i in range(len(examples)):     # one generator per example: a subset keeps its draws
        rng = np.random.default_rng([seed, salt, i])
        target_index[i], templates[i] = rng.integers(0, n_candidates), rng.integers(0, n_templates)
    slot = np.arange(n_candidates)[None, :]
    source = np.clip(slot - (slot > target_index[:, None]), 0, n_candidates - 2)   # skip the target's slot
    candidates = np.take_along_axis(negatives, source, axis=1).astype(np.int32)
    candidates[np.arange(len(examples)), target_index] = examples.targets
    return FixedDraws(candidates, target_index, templates)


def draw_candidates(rng: np.random.Generator, history: np.ndarray, target: int, n_items: int,
                    n_candidates: int) -> tuple[np.ndarray, int]:
    """Training draw: (candidates int32 [K], target slot) with K-1 uniform negatives outside
    the history (0 = padding is ignored) and the target, in a uniformly random order."""
    excluded = set(int(i) for i in history if i > 0) | {int(target)}
    free = n_items - len(excluded)
    if free < n_candidates - 1:
        raise ValueError(f"only {free} items outside the history and target; {n_candidates - 1} negatives needed")
    chosen: list[int] = []
    seen = set(excluded)
    while len(chosen) < n_candidates - 1:
        for item in rng.integers(1, n_items + 1, 2 * n_candidates).tolist():
            if item not in seen:
                seen.add(item)
                chosen.append(item)
                if len(chosen) == n_candidates - 1:
                    break
    slot = int(rng.integers(0, n_candidates))
    chosen.insert(slot, int(target))
    return np.asarray(chosen, np.int32), slot
