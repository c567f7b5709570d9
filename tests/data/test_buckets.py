"""Length buckets: index arithmetic checked against brute-force set bookkeeping."""
import numpy as np
import pytest

from jaxrec.data.buckets import LengthBuckets, TrainPlan, bucket_widths, eval_plan


def test_bucket_widths_are_even_steps_ending_at_the_full_width():
    assert bucket_widths(20, 5) == (4, 8, 12, 16, 20)
    assert bucket_widths(21, 3) == (7, 14, 21)
    assert bucket_widths(7, 3) == (3, 5, 7)
    assert bucket_widths(3, 10) == (1, 2, 3)         # never more widths than units
    assert bucket_widths(9, 1) == (9,)
    with pytest.raises(ValueError):
        bucket_widths(0, 2)


def _buckets(n=1000, seed=0, widths=(4, 8, 12, 16, 20)):
    lengths = np.random.default_rng(seed).integers(1, widths[-1] + 1, n)
    return LengthBuckets(lengths, widths, {"tokens": 3})


def test_each_epoch_has_the_plain_batch_count_and_uses_every_record_but_one_batch_at_most_once():
    buckets, B = _buckets(), 64
    plan = TrainPlan(buckets, B, seed=7)
    assert plan.per_epoch == 1000 // B
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert len(batches) == plan.per_epoch
        used = np.concatenate([rows for _, rows in batches])
        assert used.size == plan.per_epoch * B and np.unique(used).size == used.size     # no record twice
        assert 1000 - used.size < B                                                       # fewer than a batch left
        for width, rows in batches:
            assert rows.size == B and width in buckets.widths
            assert buckets.lengths[rows].max() <= width      # every row fits its batch's width
    # Epochs differ; the same seed gives the same stream; random access = the epoch's list.
    first, second = plan.epoch(0), plan.epoch(1)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, second))
    again = TrainPlan(buckets, B, seed=7)
    assert all(np.array_equal(again[i][1], first[i][1]) for i in range(plan.per_epoch))
    assert np.array_equal(plan[plan.per_epoch + 2][1], second[2][1])


def test_most_batches_are_narrow_when_most_records_are_short():
    lengths = np.r_[np.full(900, 2), np.full(100, 20)]
    plan = TrainPlan(LengthBuckets(lengths, (4, 8, 12, 16, 20), {}), 50, seed=0)
    widths = [w for w, _ in plan.epoch(0)]
    assert widths.count(4) == 18 and widths.count(20) == 2


def test_eval_plan_covers_every_record_once_and_cut_keeps_the_last_columns():
    buckets = _buckets(n=203)
    plan = eval_plan(buckets, 32)
    rows = np.concatenate([r for _, r in plan])
    assert np.array_equal(np.sort(rows), np.arange(203))
    assert all(buckets.lengths[r].max() <= w for w, r in plan)
    assert [w for w, _ in plan] == sorted(w for w, _ in plan)          # narrow batches first
    batch = {"tokens": np.arange(2 * 60).reshape(2, 60), "other": np.ones((2, 5))}
    cut = buckets.cut(batch, 4)
    assert np.array_equal(cut["tokens"], batch["tokens"][:, -12:]) and cut["other"].shape == (2, 5)
    assert 0.5 < buckets.padded_tokens() < 0.7                   # uniform lengths 1..20 in steps of 4


def test_bad_buckets_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        LengthBuckets(np.array([1]), (8, 4), {})
    with pytest.raises(ValueError, match="lengths must lie"):
        LengthBuckets(np.array([9]), (4, 8), {})
    with pytest.raises(ValueError, match="only 3 training records"):
        TrainPlan(LengthBuckets(np.array([1, 2, 3]), (4,), {}), 4, 0)
