"""The length-bucketed training stream and evaluation batches (`jaxrec.train.pipeline`)."""
import numpy as np
import pytest

from jaxrec.data.buckets import LengthBuckets, TrainPlan
from jaxrec.train import pipeline

WIDTH, UNIT = 6, 2


class Records:
    """Record i: `tokens` left-padded [WIDTH * UNIT] holding i + 1 in its last lengths[i] slots."""

    def __init__(self, n=90, seed=0):
        self.lengths = np.random.default_rng(seed).integers(1, WIDTH + 1, n)

    def __len__(self):
        return self.lengths.size

    def __getitem__(self, i):
        tokens = np.zeros(WIDTH * UNIT, np.int32)
        tokens[WIDTH * UNIT - self.lengths[i] * UNIT:] = i + 1
        return {"tokens": tokens, "id": np.int64(i)}


def _buckets(records):
    return LengthBuckets(records.lengths, (2, 4, 6), {"tokens": UNIT})


def _with_processes(monkeypatch, count, index):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: count)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: index)


def test_batches_follow_the_plan_cut_to_their_width_and_lose_no_real_token(monkeypatch):
    _with_processes(monkeypatch, 1, 0)
    records = Records()
    buckets = _buckets(records)
    plan = TrainPlan(buckets, 16, seed=3)
    stream = pipeline.train_stream(records, 16, 3, buckets=buckets, num_threads=1, prefetch=2)
    for i in range(2 * plan.per_epoch):
        batch = next(stream)
        width, rows = plan[i]
        assert np.array_equal(batch["id"], rows)
        assert batch["tokens"].shape == (16, width * UNIT)
        full = np.stack([records[r]["tokens"] for r in rows])
        assert np.array_equal(batch["tokens"], full[:, -width * UNIT:]) and full[:, :-width * UNIT].sum() == 0


def test_processes_split_each_global_batch_and_the_transform_is_seeded_by_position(monkeypatch):
    records = Records()
    buckets = _buckets(records)

    def transform(record, rng):
        return {**record, "noise": rng.integers(0, 1 << 30, ())}

    def first_batches(count, index, n=5):
        _with_processes(monkeypatch, count, index)
        stream = pipeline.train_stream(records, 16, 1, transform, num_threads=1, prefetch=1, buckets=buckets)
        return [next(stream) for _ in range(n)]

    whole = first_batches(1, 0)
    halves = [first_batches(2, p) for p in (0, 1)]
    for i, batch in enumerate(whole):
        for key in ("id", "tokens", "noise"):
            assert np.array_equal(batch[key], np.concatenate([halves[0][i][key], halves[1][i][key]]))


def test_a_restored_iterator_continues_the_same_stream(monkeypatch):
    _with_processes(monkeypatch, 1, 0)
    records = Records()
    stream = pipeline.train_stream(records, 16, 5, buckets=_buckets(records), num_threads=1, prefetch=1)
    for _ in range(4):
        next(stream)
    state = stream.get_state()
    want = [next(stream)["id"] for _ in range(6)]
    again = pipeline.train_stream(records, 16, 5, buckets=_buckets(records), num_threads=1, prefetch=1)
    again.set_state(state)
    assert all(np.array_equal(next(again)["id"], w) for w in want)


def test_eval_batches_cover_every_record_once_with_padding_rows_that_do_not_widen(monkeypatch):
    records = Records(n=37)
    buckets = _buckets(records)
    seen = {}
    for index in (0, 1):
        _with_processes(monkeypatch, 2, index)
        for b, (batch, rows) in enumerate(pipeline.bucketed_eval_batches(records, 8, buckets)):
            width = batch["tokens"].shape[1] // UNIT
            assert buckets.lengths[rows].max() <= width
            real = batch["valid"] == 1
            seen.setdefault(b, []).extend(batch["id"][real].tolist())
            assert set(batch["id"][~real].tolist()) <= {int(rows[0])}
            assert sorted(seen[b]) == sorted(rows.tolist()) or index == 0
    assert sorted(i for ids in seen.values() for i in ids) == list(range(37))


def test_a_plan_for_other_records_is_refused(monkeypatch):
    _with_processes(monkeypatch, 1, 0)
    with pytest.raises(ValueError, match="describe 3 records"):
        pipeline.train_stream(Records(), 16, 0, buckets=LengthBuckets(np.ones(3, int), (2,), {}))
