"""Batches for the trainer: a Grain training stream and padded evaluation batches.

Each process reads only its own share of records; global arrays are assembled from
process-local rows. The training stream shuffles globally by index and shards by
process *after* the shuffle and the per-record random transform, so the set of
records in global batch `i` — and each record's randomness — does not depend on how
many processes share the work.

With `LengthBuckets` (a task's `train_buckets()`, `data.length_buckets` > 1) the stream is
a `jaxrec.data.buckets.TrainPlan` instead: each global batch holds records of one length
bucket and is cut to that bucket's width; the same process-count independence holds
(the plan is global, each process takes its rows of each batch, a record's randomness is
seeded by its position in the global stream).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np

from jaxrec.data.buckets import LengthBuckets, TrainPlan, eval_plan
from jaxrec.sharding import Layout


def train_stream(records: Any, global_batch: int, seed: int,
                 transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 num_threads: int = 2, prefetch: int = 8, buckets: LengthBuckets | None = None):
    """Endless, checkpointable iterator of this process's share of each global batch."""
    n_proc, proc = jax.process_count(), jax.process_index()
    if global_batch % n_proc:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n_proc} processes")
    if len(records) < global_batch:
        raise ValueError(f"only {len(records)} training records for train.batch_size={global_batch}; "
                         "lower the batch size")
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    if buckets is not None:
        if buckets.lengths.size != len(records):
            raise ValueError(f"length buckets describe {buckets.lengths.size} records, the source has {len(records)}")
        plan, local = TrainPlan(buckets, global_batch, seed), global_batch // n_proc

        def load(index: int, _) -> dict:
            width, rows = plan[index]
            rows = rows[proc * local:(proc + 1) * local]
            picked = [records[int(r)] for r in rows]
            if transform is not None:
                picked = [transform(rec, np.random.default_rng([seed & 0xFFFFFFFF, index, proc * local + j]))
                          for j, rec in enumerate(picked)]
            return buckets.cut({k: np.stack([r[k] for r in picked]) for k in picked[0]}, width)

        ds = grain.MapDataset.range(plan.per_epoch).repeat(None).map_with_index(load)
        return iter(ds.to_iter_dataset(options))
    ds = grain.MapDataset.source(records).seed(seed).shuffle().repeat(None)
    if transform is not None:
        ds = ds.random_map(transform)
    ds = ds[proc::n_proc].batch(global_batch // n_proc, drop_remainder=True)
    return iter(ds.to_iter_dataset(options))


def eval_batches(records: Any, global_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global evaluation batch, padded to full size.

    Every record appears once; padding rows repeat record 0 and carry `valid = 0`, so
    metrics average over real examples only. All processes yield the same number of
    batches (collectives would otherwise hang).
    """
    n_proc, proc = jax.process_count(), jax.process_index()
    local = max(1, global_batch // n_proc)
    global_batch = local * n_proc
    total = len(records)
    n_batches = max(1, -(-total // global_batch))
    for b in range(n_batches):
        start = b * global_batch + proc * local
        idx = np.arange(start, start + local)
        valid = idx < total
        rows = [records[int(i) if ok else 0] for i, ok in zip(idx, valid)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["valid"] = valid.astype(np.float32)
        yield batch


def bucketed_eval_batches(records: Any, global_batch: int, buckets: LengthBuckets):
    """(this process's rows, the record indices of the global batch's real rows) for every
    evaluation batch of `eval_plan`: records in bucket order, each batch cut to its width.
    Padding rows repeat the batch's first record (so they never widen it) with `valid = 0`;
    every process yields the same batches, in the same order."""
    n_proc, proc = jax.process_count(), jax.process_index()
    local = max(1, global_batch // n_proc)
    global_batch = local * n_proc
    if buckets.lengths.size != len(records):
        raise ValueError(f"length buckets describe {buckets.lengths.size} records, the source has {len(records)}")
    for width, rows in eval_plan(buckets, global_batch):
        mine = np.arange(proc * local, (proc + 1) * local)
        valid = mine < rows.size
        picked = [records[int(rows[i]) if ok else int(rows[0])] for i, ok in zip(mine, valid)]
        batch = buckets.cut({k: np.stack([r[k] for r in picked]) for k in picked[0]}, width)
        batch["valid"] = valid.astype(np.float32)
        yield batch, rows


def to_global(batch: dict[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
    """Process-local rows → global arrays sharded over the data-parallel axes."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(layout.batch(global_shape), value)
    return out
