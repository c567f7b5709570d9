"""Averaging a task's per-example evaluation values over a whole split, on the mesh."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.sharding import Layout
from jaxrec.train import pipeline
from jaxrec.train.task import EvalSet, Task


class Evaluator:
    """Runs `task.eval_step` over padded global batches and returns weighted means.

    The jitted function reduces each batch to sums on device (padding rows have weight 0),
    so only a handful of scalars cross to the host per batch, whatever the process count.
    Tasks with their own evaluation loop use `batches` for the same padded, sharded batches
    under the active layout.
    """

    def __init__(self, task: Task, layout: Layout, batch_size: int):
        self.task, self.layout = task, layout
        self.batch_size = layout.round_batch(batch_size)

        def batch_sums(params, frozen, model_state, batch):
            values = task.eval_step(params, frozen, model_state, batch)
            weight = batch["valid"]
            sums = {k: jnp.tensordot(weight, v.astype(jnp.float32), axes=1) for k, v in values.items()}
            sums["_count"] = weight.sum()
            return sums

        self._batch_sums = jax.jit(batch_sums, out_shardings=layout.replicated())

    def batches(self, records: Any):
        """(global batch, number of real rows) for every evaluation batch; call inside `layout.activate()`."""
        total = len(records)
        for b, batch in enumerate(pipeline.eval_batches(records, self.batch_size)):
            yield pipeline.to_global(batch, self.layout), min(self.batch_size, total - b * self.batch_size)

    def bucketed_batches(self, records: Any, buckets):
        """(global batch, record indices of its real rows) in length-bucket order, each batch cut
        to its bucket's width (`jaxrec.data.buckets`); call inside `layout.activate()`."""
        for batch, rows in pipeline.bucketed_eval_batches(records, self.batch_size, buckets):
            yield pipeline.to_global(batch, self.layout), rows

    def run(self, eval_set: EvalSet, params: Any, frozen: Any, model_state: Any) -> dict[str, Any]:
        totals: dict[str, np.ndarray] = {}
        with self.layout.activate():
            for batch, _ in self.batches(eval_set.records):
                sums = self._batch_sums(params, frozen, model_state, batch)
                for key, value in jax.device_get(sums).items():
                    totals[key] = totals.get(key, 0.0) + np.asarray(value, dtype=np.float64)
        count = float(totals.pop("_count", 0.0))
        if count == 0:
            return {"examples": 0}
        out: dict[str, Any] = {}
        for key, total in totals.items():
            mean = total / count
            out[key] = float(mean) if np.ndim(mean) == 0 else mean.tolist()
        out["examples"] = int(round(count))
        return out
