"""A task bound to a layout: its frozen inputs, sharded state layout and pure train step.

Shared by training, `jaxrec evaluate` and `jaxrec export`, so all three lay out the
state the same way whatever mesh the checkpoint came from. Upstream runs are opened by
the caller (`jaxrec.train.runs.start_session`) and handed in, so a session never opens
another session.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec import registry
from jaxrec.config import Config, ConfigError
from jaxrec.sharding import Layout, MeshError
from jaxrec.train.run_identity import data_fingerprints
from jaxrec.train.state import TrainState
from jaxrec.train.task import Clock, Task

log = logging.getLogger("jaxrec")


def build_layout(config: Config) -> Layout:
    m = config.mesh
    try:
        return Layout.build((m.data, m.fsdp, m.tensor), m.rules)
    except MeshError as e:
        raise ConfigError(f"{config.source}: mesh: {e}") from None


def total_steps(config: Config, n_records: int) -> int:
    if config.train.steps > 0:
        return config.train.steps
    per_epoch = max(1, n_records // config.train.batch_size)
    return max(1, math.ceil(config.train.epochs * per_epoch))


class Session:
    """`upstream`: the opened runs the task declared (`Task.upstream`), by name."""

    def __init__(self, config: Config, upstream: Mapping[str, Any] | None = None, load_frozen: bool = True):
        self.config = config
        self.layout = build_layout(config)
        self.upstream = dict(upstream or {})
        self.task: Task = registry.task_class(config.task)(config, self.upstream)
        self.frozen = self.task.load_frozen(self.layout) if load_frozen else {}

    def fingerprints(self) -> dict[str, str]:
        """Every frozen input's identity: the data, upstream runs' parameter hashes, the task's own."""
        runs = {f"upstream.{name}": run.sha256 for name, run in sorted(self.upstream.items())}
        return {**data_fingerprints(self.task.store), **runs, **self.task.fingerprints()}

    def check_fingerprints(self, saved: Mapping[str, str] | None, where: str, other_data: bool = False) -> None:
        """Refuse a checkpoint whose frozen inputs differ from the ones loaded now.

        `other_data`: accept other interactions (evaluating a model on another file) as long
        as the item vocabulary is the same; a different vocabulary is always refused.
        """
        now = self.fingerprints()
        source = self.config.data.source
        for key, then in (saved or {}).items():
            if key not in now or now[key] == then:
                continue
            if key == "data.items":
                raise ConfigError(f"{where}: the checkpoint's item vocabulary (sha256 {then[:16]}…) differs from "
                                  f"the one read from data.source={source} ({self.task.store.n_items:,} items, "
                                  f"sha256 {now[key][:16]}…); the model's item ids would not mean the same items")
            if key == "data":
                if other_data:
                    log.warning("%s: evaluating on other data than the run was trained on (data.source=%s, "
                                "sha256 %s…, trained on %s…)", where, source, now[key][:16], then[:16])
                    continue
                raise ConfigError(f"{where}: the checkpoint was trained on data with sha256 {then[:16]}…, but "
                                  f"data.source={source} holds other interactions (sha256 {now[key][:16]}…); point "
                                  f"data.source at the original file, or pass --other-data to evaluate on it anyway")
            raise ConfigError(f"{where}: the checkpoint was made with {key} sha256 {then[:16]}…, but the input "
                              f"loaded now has sha256 {now[key][:16]}…; point the config at the original files")

    def state_layout(self, tx: optax.GradientTransformation):
        """(make_state, its boxed abstract value, the NamedShardings its logical axes imply)."""
        def make_state():
            variables = self.task.init(jax.random.key(self.config.run.seed))
            params = variables.trainable
            return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                              model_state=variables.state)

        boxed = jax.eval_shape(make_state)
        return make_state, boxed, self.layout.shardings(boxed)

    def init_state(self, make_state, shardings) -> TrainState:
        with self.layout.activate():
            return jax.jit(lambda: nn.unbox(make_state()), out_shardings=shardings)()


def make_train_step(task: Task, tx: optax.GradientTransformation, sched: optax.Schedule, total: int,
                    microbatches: int = 1):
    """The pure update `(state, frozen, batch, key) -> (state, metrics)`.

    The step's randomness is `fold_in(key, state.step)`: a resumed run draws exactly
    what the uninterrupted run would have drawn. With `microbatches > 1` the batch is
    cut into strided slices (each slice spans every data shard) whose gradients are
    summed in a scan: the same update as one big batch, with activations small enough
    to stay in cache on CPUs and to fit in memory on accelerators. Slices are combined
    by the loss's `weight` metric when the task reports one (e.g. its target count), so
    the result is the mean over the whole batch, not a mean of means.
    """
    def grads_of(params, model_state, batch, rng, frozen, clock):
        def loss_fn(p):
            return task.loss(p, frozen, model_state, batch, rng, clock)
        (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, metrics, new_state, grads

    def accumulate(params, model_state, batch, rng, frozen, step):
        slices = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches,
                                                               *x.shape[1:]), 0, 1), batch)

        def body(carry, xs):
            grad_sum, loss_sum, weight_sum, model_state = carry
            index, piece = xs
            clock = Clock(step, index, total, microbatches)
            loss, metrics, model_state, grads = grads_of(params, model_state, piece, jax.random.fold_in(rng, index),
                                                         frozen, clock)
            w = jnp.asarray(metrics.get("weight", 1.0), jnp.float32)
            grad_sum = jax.tree.map(lambda a, g: a + w * g, grad_sum, grads)
            return (grad_sum, loss_sum + w * loss, weight_sum + w, model_state), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, loss_sum, weight_sum, model_state), per_slice = jax.lax.scan(
            body, (zeros, jnp.zeros(()), jnp.zeros(()), model_state), (jnp.arange(microbatches), slices))
        scale = 1.0 / jnp.maximum(weight_sum, 1e-9)
        metrics = {k: (v.sum(0) if k == "weight" else v.mean(0)) for k, v in per_slice.items()}
        return loss_sum * scale, metrics, model_state, jax.tree.map(lambda g: g * scale, grad_sum)

    def train_step(state: TrainState, frozen: Any, batch: dict, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        if microbatches == 1:
            clock = Clock(state.step, jnp.zeros((), jnp.int32), total, 1)
            loss, metrics, model_state, grads = grads_of(state.params, state.model_state, batch, rng, frozen, clock)
        else:
            loss, metrics, model_state, grads = accumulate(state.params, state.model_state, batch, rng, frozen,
                                                           state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state, model_state=model_state)
        return new_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": sched(state.step)}

    return train_step
