"""Ranking metrics against their closed forms; accumulation; protocol labels."""
import math

import jax
import numpy as np
import pytest

from jaxrec.eval.metrics import EvalProtocol, MetricAccumulator, ranking_metrics
from jaxrec.eval.ranking import NO_RANK


def test_metrics_closed_form():
    ranks = np.array([1, 2, 10, 11, NO_RANK])
    m = jax.jit(lambda r: ranking_metrics(r, (1, 10)))(ranks)
    np.testing.assert_array_equal(m["hr@10"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(m["hr@1"], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(m["ndcg@10"], [1, 1 / math.log2(3), 1 / math.log2(11), 0, 0], rtol=1e-6)
    np.testing.assert_allclose(m["mrr@10"], [1, 0.5, 0.1, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(m["recall@10"], m["hr@10"])
    with pytest.raises(ValueError, match="cut-offs"):
        ranking_metrics(ranks, (0,))


def test_accumulator_weighted_float64_mean():
    acc = MetricAccumulator()
    acc.add({"hr@10": np.array([1.0, 0.0, 1.0], np.float32)}, weights=np.array([1, 1, 0]))
    acc.add({"hr@10": np.array([1.0])})
    assert acc.result() == {"hr@10": pytest.approx(2 / 3)} and acc.weight == 3
    with pytest.raises(ValueError, match="weights have 2 entries"):
        acc.add({"hr@10": np.ones(3)}, weights=np.ones(2))
    with pytest.raises(ValueError, match="no examples"):
        MetricAccumulator().result()
    # float64 sums: a million 1e-4 values do not drift.
    big = MetricAccumulator()
    for _ in range(10):
        big.add({"x": np.full(100_000, 1e-4, np.float32)})
    assert big.result()["x"] == pytest.approx(1e-4, rel=1e-7)


def test_protocol_label_and_validation():
    full = EvalProtocol(split="test", candidates="full", ks=[10, 20], exclude_history=True)
    assert full.n_negatives is None and full.ks == (10, 20)
    assert full.label(n_items=3706) == ("test | full ranking over all 3,706 items | history excluded | K=10,20"
                                        " | ties count against the target")
    sampled = EvalProtocol(split="valid", candidates="sampled:100", ks=(10,), seed=3, exclude_history=True)
    assert sampled.n_negatives == 100
    assert "target + 100 negatives" in sampled.label() and "seed 3" in sampled.label()
    for bad in ("sampled", "sampled:0", "popular:100", "Full"):
        with pytest.raises(ValueError, match="'full' or 'sampled:N'"):
            EvalProtocol(candidates=bad, exclude_history=False)
    with pytest.raises(ValueError, match="ks"):
        EvalProtocol(ks=(), exclude_history=False)
