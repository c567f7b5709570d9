"""Batches for the trainer: a Grain training stream and padded evaluation batches.

Each process reads only its own share of records; global arrays are assembled from
process-local rows. The training stream shuffles globally by index and shards by
process *after* the shuffle and the per-record random transform, so the set of
records in global batch `i` — and each record's randomness — does not depend on how
many processes share the work.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np

from jaxrec.sharding import Layout


def train_stream(records: Any, global_batch: int, seed: int,
                 transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 num_threads: int = 2, prefetch: int = 8):
    """Endless, checkpointable iterator of this process's share of each global batch."""
    n_proc, proc = jax.process_count(), jax.process_index()
    if global_batch % n_proc:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n_proc} processes")
    if len(records) < global_batch:
        raise ValueError(f"only {len(records)} training records for train.batch_size={global_batch}; "
                         "lower the batch size")
    ds = grain.MapDataset.source(records).seed(seed).shuffle().repeat(None)
    if transform is not None:
        ds = ds.random_map(transform)
    ds = ds[proc::n_proc].batch(global_batch // n_proc, drop_remainder=True)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
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


def to_global(batch: dict[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
    """Process-local rows → global arrays sharded over the data-parallel axes."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(layout.batch(global_shape), value)
    return out
