"""Train state, learning-rate schedule and restore targets."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import optax

from jaxrec.config import TrainConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # trainable variables
    opt_state: Any
    model_state: Any     # non-gradient variables the loss updates (e.g. BatchNorm statistics)


def schedule(train: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * end_lr_ratio` at `total_steps`."""
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else train.lr, peak_value=train.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=train.lr * train.end_lr_ratio)


def with_clipping(tx: optax.GradientTransformation, grad_clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx


def unboxed_abstract(boxed_abstract, shardings):
    """ShapeDtypeStructs with shardings attached: restore targets for Orbax."""
    plain = nn.unbox(boxed_abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), plain, shardings)

