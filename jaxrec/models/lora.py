"""LoRA and instance-wise MoE-LoRA (iLoRA) on dense projections.

One layer covers both. For input x, frozen kernel W [d_in, d_out], adapter A [d_in, r]
and B [r, d_out], and an optional per-example gate g [batch, E] over E experts of rank
r/E each (expert e owns columns e·r/E … (e+1)·r/E of A and the same rows of B):

    y = x W (+ b) + s · ((drop(x) A) ⊙ ĝ) B,    ĝ = repeat(g, r/E),    s = alpha / (r/E)

This is the gate-folding identity of the iLoRA spec (§6): the gate is constant over
tokens and layers and dropout is shared by all experts, so the mixture is one rank-r
matmul with the gate repeated r/E times. No per-example ΔW is ever formed. With E = 1
(no gate) it is plain LoRA with s = alpha / r.

The trainable/frozen split works on any parameter tree: adapter leaves (names starting
with `lora_`) plus leaves matched by explicit patterns are trainable; the rest is the
frozen base, which can stay bf16 and never gets optimizer state.
"""
from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxrec.models.layers import torch_uniform

ALL_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter shape. `rank` is the total rank r; with `num_experts` E > 1 each expert
    has rank r/E and the layer needs a gate [batch, E] per call. `targets` is a regular
    expression matched in full against projection names (`q_proj|v_proj`, `.*_proj`,
    or `ALL_PROJECTIONS`)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_experts: int = 1
    targets: str = "q_proj|v_proj"

    def __post_init__(self):
        if self.rank < 1 or self.num_experts < 1 or self.rank % self.num_experts:
            raise ValueError(f"LoRA rank={self.rank} must be a positive multiple of num_experts={self.num_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoRA targets={self.targets!r} is not a regular expression: {e}") from None

    @property
    def expert_rank(self) -> int:
        return self.rank // self.num_experts

    @property
    def scale(self) -> float:
        return self.alpha / self.expert_rank

    def applies_to(self, name: str) -> bool:
        return re.fullmatch(self.targets, name) is not None


def kaiming_uniform_sqrt5(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default init for a kernel [fan_in, fan_out] (peft's LoRA A)."""
    return torch_uniform(shape[0])(key, shape, dtype)


def expand_gates(gates: jax.Array, lora: LoraConfig) -> jax.Array:
    """[batch, E] expert weights → [batch, r], each repeated r/E times (gate folding)."""
    if gates.ndim != 2 or gates.shape[-1] != lora.num_experts:
        raise ValueError(f"lora_gates must have shape [batch, {lora.num_experts}], got {tuple(gates.shape)}")
    return jnp.repeat(gates, lora.expert_rank, axis=-1)


class LoRADense(nn.Module):
    """A dense projection [.., d_in] → [.., features] with an optional (MoE-)LoRA adapter.

    `axes` are the logical names of the kernel (input axis, output axis); the adapter's
    A and B reuse them with `lora_rank` in between, so they shard like the kernel.
    Call with `gates` [batch, E] when the adapter has E > 1 experts; x is [batch, ..., d_in]
    or, flattened, [batch·tokens, d_in] with each example's rows together.
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, gates: jax.Array | None = None) -> jax.Array:
        d_in, lead = x.shape[-1], x.shape[:-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                            (d_in, self.features), self.param_dtype)
        # Every dot runs on [tokens, features]: with the batch axes kept, autodiff writes the
        # adapter's weight gradients as dots contracting several major axes, and XLA:CPU copies the
        # [tokens, features] cotangent into a transposed layout for each (docs/llm.md, "Profile").
        x = x.astype(self.dtype).reshape(-1, d_in)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is None:
            return y.reshape(*lead, self.features)
        lora = self.lora
        a = self.param("lora_a", nn.with_logical_partitioning(kaiming_uniform_sqrt5, (self.axes[0], "lora_rank")),
                       (d_in, lora.rank), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                       (lora.rank, self.features), jnp.float32)
        h = nn.Dropout(lora.dropout)(x, deterministic=self.deterministic) if lora.dropout > 0 else x
        z = jnp.dot(h, a.astype(self.dtype))
        if lora.num_experts > 1:
            if gates is None:
                raise ValueError(f"this MoE-LoRA adapter has {lora.num_experts} experts: pass lora_gates [batch, E]")
            g = expand_gates(gates, lora).astype(self.dtype)
            # One gate per example; x's rows are example-major ([batch, ...] or [batch·T]).
            z = (z.reshape(g.shape[0], -1, lora.rank) * g[:, None, :]).reshape(-1, lora.rank)
        y = y + jnp.dot(z, b.astype(self.dtype)) * jnp.asarray(lora.scale, self.dtype)
        return y.reshape(*lead, self.features)


# ---------------------------------------------------------------------------------------
# Trainable / frozen trees
# ---------------------------------------------------------------------------------------
def is_adapter_path(path: tuple[str, ...]) -> bool:
    return path[-1].startswith("lora_")


def split_trainable(params: Any, extra: Iterable[str] = ()) -> tuple[dict, dict]:
    """Split a parameter tree into (trainable, frozen) sparse nested dicts.

    Trainable: adapter leaves (`lora_a`, `lora_b`) and any leaf whose '/'-joined path
    matches one of the `extra` regular expressions (re.search), e.g. `("lm_head",)`.
    Both halves keep the original nesting, so `merge_trainable` puts them back together
    and an optimizer built on the trainable half never sees the base weights.
    """
    patterns = [re.compile(p) for p in extra]
    flat = traverse_util.flatten_dict(_as_dict(params))
    trainable, frozen = {}, {}
    for path, leaf in flat.items():
        hit = is_adapter_path(path) or any(p.search("/".join(path)) for p in patterns)
        (trainable if hit else frozen)[path] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_trainable(trainable: Any, frozen: Any) -> dict:
    """Inverse of `split_trainable`: one tree holding the leaves of both halves."""
    flat = traverse_util.flatten_dict(_as_dict(frozen))
    for path, leaf in traverse_util.flatten_dict(_as_dict(trainable)).items():
        if path in flat:
            raise ValueError(f"parameter {'/'.join(path)} is in both the trainable and the frozen tree")
        flat[path] = leaf
    return traverse_util.unflatten_dict(flat)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


@partial(jax.jit, static_argnames=("lora",))
def merge_lora(params: Any, lora: LoraConfig, gate: Any | None = None) -> dict:
    """Fold every adapter into its kernel and drop the adapter leaves (for export).

    W' = W + s · A diag(ĝ) B. Plain LoRA needs no gate; an MoE-LoRA delta depends on
    the gate, so merging one needs a fixed gate vector [E] (e.g. one user's gate).
    Works on stacked (scanned) layers: any leading axes of A, B, W are batch axes.
    """
    if lora.num_experts > 1:
        if gate is None:
            raise ValueError("merging an MoE-LoRA adapter needs a fixed gate vector [num_experts]")
        g = expand_gates(jnp.asarray(gate, jnp.float32)[None], lora)[0]
    else:
        g = jnp.ones((lora.rank,), jnp.float32)
    flat = traverse_util.flatten_dict(_as_dict(params))
    out = {}
    for path, leaf in flat.items():
        if is_adapter_path(path):
            continue
        parent = path[:-1]
        if path[-1] == "kernel" and parent + ("lora_a",) in flat:
            a = jnp.asarray(flat[parent + ("lora_a",)], jnp.float32)
            b = jnp.asarray(flat[parent + ("lora_b",)], jnp.float32)
            delta = jnp.einsum("...ir,r,...ro->...io", a, g, b) * lora.scale
            leaf = (jnp.asarray(leaf, jnp.float32) + delta).astype(leaf.dtype)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def _as_dict(tree: Any) -> dict:
    # flax.core.FrozenDict and plain dicts both flatten; anything else is a caller error.
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if not isinstance(tree, dict):
        raise TypeError(f"expected a nested dict of parameters, got {type(tree).__name__}")
    return tree
