"""Ranking metrics from target ranks, their host-side accumulation, and the protocol label.

Every metric is per example and depends only on the 1-based rank r of the single
held-out target:

    hr@K     = [r <= K]
    ndcg@K   = [r <= K] / log2(r + 1)       (the ideal DCG of one relevant item is 1)
    mrr@K    = [r <= K] / r
    recall@K = hr@K                         (one relevant item: recall and hit rate coincide)

`ranking_metrics` is pure jnp (usable inside jit); `MetricAccumulator` sums weighted
per-example values in float64 on the host, so padding examples (weight 0) and uneven
last batches do not bias the mean.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config.schema import candidate_count

METRIC_NAMES = ("hr", "ndcg", "mrr", "recall")


def ranking_metrics(ranks: jax.Array, ks: Sequence[int]) -> dict[str, jax.Array]:
    """{"hr@K", "ndcg@K", "mrr@K", "recall@K"} -> float32 [B] for every K in ks."""
    ranks = jnp.asarray(ranks)
    r = ranks.astype(jnp.float32)
    out = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"metric cut-offs must be >= 1, got {k}")
        hit = ranks <= k
        out[f"hr@{k}"] = hit.astype(jnp.float32)
        out[f"ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(r + 1.0), 0.0)
        out[f"mrr@{k}"] = jnp.where(hit, 1.0 / r, 0.0)
        out[f"recall@{k}"] = out[f"hr@{k}"]
    return out


def mean_ranking_metrics(ranks, ks: Sequence[int], names: Sequence[str] = ("hr", "ndcg"),
                         prefix: str = "") -> dict[str, float]:
    """Means over examples of `ranking_metrics`, as floats named `<prefix><name>@K`."""
    per_example = ranking_metrics(np.asarray(ranks), ks)
    return {f"{prefix}{key}": float(np.mean(np.asarray(v, np.float64)))
            for key, v in per_example.items() if key.split("@")[0] in names}


class MetricAccumulator:
    """Weighted means of per-example metrics, accumulated in float64 on the host."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weight = 0.0

    def add(self, per_example: Mapping[str, object], weights=None) -> None:
        weights_np = None if weights is None else np.asarray(weights, np.float64).reshape(-1)
        n = None
        for name, values in per_example.items():
            v = np.asarray(values, np.float64).reshape(-1)
            if n is None:
                n = v.size
                if weights_np is None:
                    weights_np = np.ones(n)
                if weights_np.size != n:
                    raise ValueError(f"weights have {weights_np.size} entries, metric {name!r} has {n}")
            elif v.size != n:
                raise ValueError(f"metric {name!r} has {v.size} examples, expected {n}")
            self._sums[name] = self._sums.get(name, 0.0) + float(np.dot(weights_np, v))
        if n is not None:
            self._weight += float(weights_np.sum())

    @property
    def weight(self) -> float:
        return self._weight

    def result(self) -> dict[str, float]:
        if self._weight <= 0:
            raise ValueError("no examples with positive weight were accumulated")
        return {name: total / self._weight for name, total in sorted(self._sums.items())}


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How a metric table was computed; `label()` is printed beside every table.

    candidates: "full" (rank against the whole catalogue) or "sampled:N" (the target
    plus N negatives fixed by `seed`, uniform without replacement, excluding the
    target and the user's history).
    """
    split: str = "test"
    candidates: str = "full"
    ks: tuple[int, ...] = (10, 20)
    # No default here: the one default is the config's `eval.exclude_history`.
    exclude_history: bool = dataclasses.field(kw_only=True)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"eval protocol ks must be positive integers, got {self.ks}")
        self.n_negatives  # validates `candidates`

    @property
    def n_negatives(self) -> int | None:
        """None for full ranking, N for "sampled:N"."""
        return candidate_count(self.candidates)

    def label(self, n_items: int | None = None) -> str:
        n = self.n_negatives
        history = "history excluded" if self.exclude_history else "history included"
        if n is None:
            pool = f"full ranking over all {n_items:,} items" if n_items else "full ranking over all items"
        else:
            avoid = "target and history" if self.exclude_history else "target"
            pool = f"target + {n} negatives (uniform w/o replacement, avoiding the {avoid}, seed {self.seed})"
            history = ""
        parts = [self.split, pool, history, f"K={','.join(map(str, self.ks))}", "ties count against the target"]
        return " | ".join(p for p in parts if p)
