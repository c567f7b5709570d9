"""The popularity baseline under the same protocol as the model it is printed beside."""
from __future__ import annotations

import numpy as np

from jaxrec.eval.metrics import ranking_metrics


def popularity_ranks(counts: np.ndarray, records, exclude_history: bool) -> np.ndarray:
    """1-based rank of each record's target when items are scored by training counts.

    Ties count against the target (as in `jaxrec.eval.ranking`): a model that scores
    many items alike gets no credit for the tie.
    """
    counts = np.asarray(counts, np.float64)
    catalogue = np.sort(counts[1:])
    ranks = np.empty(len(records), np.int64)
    for i in range(len(records)):
        record = records[i]
        target = int(record["target"])
        c_t = counts[target]
        if "candidates" in record:
            negatives = record["candidates"]
            negatives = negatives[(negatives > 0) & (negatives != target)]
            ranks[i] = 1 + int(np.sum(counts[negatives] >= c_t))
            continue
        rank = catalogue.size - np.searchsorted(catalogue, c_t, side="left")   # includes the target itself
        if exclude_history:
            seen = np.unique(record["history"])
            seen = seen[(seen > 0) & (seen != target)]
            rank -= int(np.sum(counts[seen] >= c_t))
        ranks[i] = rank
    return ranks


def popularity_metrics(counts, records, ks, exclude_history: bool) -> dict[str, float]:
    ranks = popularity_ranks(counts, records, exclude_history)
    return {k: float(np.mean(v)) for k, v in ranking_metrics(ranks, ks).items()} | {"examples": len(ranks)}
