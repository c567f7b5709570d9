"""Averaging a task's per-example evaluation values over a whole split, on the mesh."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrec.train import mesh as mesh_lib
from jaxrec.train import pipeline
from jaxrec.train.task import EvalSet, Task


class Evaluator:
    """Runs `task.eval_step` over padded global batches and returns weighted means.

    The jitted function reduces each batch to sums on device (padding rows have weight 0),
    so only a handful of scalars cross to the host per batch, whatever the process count.
    """

    def __init__(self, task: Task, mesh: Mesh, batch_size: int, rules=mesh_lib.DEFAULT_RULES):
        self.task, self.mesh, self.rules = task, mesh, rules
        dp = mesh_lib.data_parallel_size(mesh, rules)
        self.batch_size = max(dp, -(-batch_size // dp) * dp)

        def batch_sums(params, frozen, model_state, batch):
            values = task.eval_step(params, frozen, model_state, batch)
            weight = batch["valid"]
            sums = {k: jnp.tensordot(weight, v.astype(jnp.float32), axes=1) for k, v in values.items()}
            sums["_count"] = weight.sum()
            return sums

        self._batch_sums = jax.jit(batch_sums, out_shardings=mesh_lib.replicated(mesh))

    def run(self, eval_set: EvalSet, params: Any, frozen: Any, model_state: Any) -> dict[str, Any]:
        totals: dict[str, np.ndarray] = {}
        with jax.set_mesh(self.mesh):
            for batch in pipeline.eval_batches(eval_set.records, self.batch_size):
                sums = self._batch_sums(params, frozen, model_state, pipeline.to_global(batch, self.mesh, self.rules))
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
