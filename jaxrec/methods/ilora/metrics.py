"""LLaRA's generation metrics and the likelihood-ranking metrics over K candidates.

Generation (official): lower-case and strip the output (cut at its first newline) and
the candidate titles; the candidates whose title is a *substring* of the output are its
matches; an output is valid iff it matches exactly one candidate.
    valid_ratio = #valid / #all
    hr@1_valid  = #(valid and match = target) / #valid      (the official "HR@1")
    hr@1        = #(valid and match = target) / #all         (= HR@1 × ValidRatio, the
                                                              official checkpoint-selection metric)
Likelihood ranking: each candidate scored by the model; rank = 1 + #candidates scoring at
least as high as the target (ties count against it); rank_hr@K, rank_ndcg@K.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def matched_candidates(output: str, candidates: Sequence[str]) -> list[int]:
    """Indices of the candidates whose lower-cased, stripped title occurs in the output."""
    out = output.strip().lower()
    return [k for k, title in enumerate(candidates) if title.strip().lower() in out]


def generation_outcomes(outputs: Sequence[str], candidates: Sequence[Sequence[str]],
                        target_index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(valid bool [N], correct bool [N]) per example.

    Correct means the single match has the target's title (titles, not slots, are
    compared, as the official code does: a duplicate title of the target counts)."""
    valid, correct = [], []
    for output, titles, t in zip(outputs, candidates, target_index):
        matches = matched_candidates(first_line(output), titles)
        ok = len(matches) == 1
        valid.append(ok)
        correct.append(ok and titles[matches[0]].strip().lower() == titles[t].strip().lower())
    return np.asarray(valid, bool), np.asarray(correct, bool)


def generation_metrics(valid: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    n, n_valid = valid.size, int(valid.sum())
    if n == 0:
        return {}
    return {"valid_ratio": n_valid / n, "hr@1_valid": int(correct.sum()) / n_valid if n_valid else 0.0,
            "hr@1": int(correct.sum()) / n}


def candidate_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """1-based pessimistic rank of the target among each row's candidates. scores [N, K]."""
    scores = np.asarray(scores, np.float64)
    target = scores[np.arange(scores.shape[0]), target_index][:, None]
    return (scores >= target).sum(axis=1)      # counts the target itself, so ties rank it last
