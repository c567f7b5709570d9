"""A task bound to a mesh: its sharded state layout and its pure train step.

Shared by training, `jaxrec evaluate` and `jaxrec export`, so all three lay out the
state the same way whatever mesh the checkpoint came from.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.config import Config, ConfigError
from jaxrec.train import mesh as mesh_lib
from jaxrec.train.state import TrainState
from jaxrec.train.task import Task, task_class


def build_mesh(config: Config):
    m = config.mesh
    try:
        return mesh_lib.make_mesh((m.data, m.fsdp, m.tensor))
    except mesh_lib.MeshError as e:
        raise ConfigError(f"{config.source}: mesh: {e}") from None


def rules_of(config: Config):
    return tuple(tuple(r) for r in config.mesh.rules) or mesh_lib.DEFAULT_RULES


def total_steps(config: Config, n_records: int) -> int:
    if config.train.steps > 0:
        return config.train.steps
    per_epoch = max(1, n_records // config.train.batch_size)
    return max(1, math.ceil(config.train.epochs * per_epoch))


class Session:
    def __init__(self, config: Config, task: Task | None = None):
        self.config = config
        self.task = task or task_class(config.task)(config)
        self.mesh = build_mesh(config)
        self.rules = rules_of(config)
        self.frozen = self.task.load_frozen(self.mesh, self.rules)

    def state_layout(self, tx: optax.GradientTransformation):
        """(make_state, its boxed abstract value, the NamedShardings its logical axes imply)."""
        def make_state():
            variables = self.task.init(jax.random.key(self.config.run.seed))
            params = variables.trainable
            return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                              model_state=variables.state)

        boxed = jax.eval_shape(make_state)
        return make_state, boxed, mesh_lib.logical_shardings(boxed, self.mesh, self.rules)

    def init_state(self, make_state, shardings) -> TrainState:
        with jax.set_mesh(self.mesh):
            return jax.jit(lambda: nn.unbox(make_state()), out_shardings=shardings)()


def make_train_step(task: Task, tx: optax.GradientTransformation, sched: optax.Schedule, microbatches: int = 1):
    """The pure update `(state, frozen, batch, key) -> (state, metrics)`.

    The step's randomness is `fold_in(key, state.step)`: a resumed run draws exactly
    what the uninterrupted run would have drawn. With `microbatches > 1` the batch is
    cut into strided slices (each slice spans every data shard) whose gradients are
    summed in a scan: the same update as one big batch, with activations small enough
    to stay in cache on CPUs and to fit in memory on accelerators. Slices are combined
    by the loss's `weight` metric when the task reports one (e.g. its target count), so
    the result is the mean over the whole batch, not a mean of means.
    """
    def grads_of(params, model_state, batch, rng, frozen):
        def loss_fn(p):
            return task.loss(p, frozen, model_state, batch, rng)
        (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, metrics, new_state, grads

    def accumulate(params, model_state, batch, rng, frozen):
        slices = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches,
                                                               *x.shape[1:]), 0, 1), batch)

        def body(carry, xs):
            grad_sum, loss_sum, weight_sum, model_state = carry
            index, piece = xs
            loss, metrics, model_state, grads = grads_of(params, model_state, piece, jax.random.fold_in(rng, index),
                                                         frozen)
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
        compute = grads_of if microbatches == 1 else accumulate
        loss, metrics, model_state, grads = compute(state.params, state.model_state, batch, rng, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state, model_state=model_state)
        return new_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": sched(state.step)}

    return train_step
