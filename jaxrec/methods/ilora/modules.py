"""The trainable pieces around the frozen LLM: the item projector and the expert gates.

Projector (LLaRA/iLoRA): P(e) = Linear(d_s → d) → GELU (exact) → Linear(d → d), applied
to the frozen SASRec item embeddings; its outputs replace the placeholder tokens' input
embeddings.

Gates map the frozen SASRec sequence representation h [B, d_s] to expert weights
g = softmax(.) [B, E], computed once per sequence and shared by every token, layer and
adapted projection (the substrate's MoE-LoRA takes them as `lora_gates`):
- "resnet" — the official router: h as a 1-channel signal of length d_s through
  Conv1d(1→16, k3) + BN + ReLU, three stages of three residual blocks (16/32/64 channels,
  strides 1/2/2, shortcuts that subsample by 2 and zero-pad channels), global average
  pooling, Linear(64 → E), softmax. BatchNorm uses batch statistics in training and
  running averages in evaluation (torch momentum 0.1 = flax momentum 0.9, eps 1e-5;
  flax tracks the biased batch variance where torch tracks the unbiased one).
- "linear" — Linear(d_s → E) + softmax, a lighter option.
- "mlp" — Linear(d_s → hidden) + ReLU + Linear(hidden → E) + softmax.

Initialisation follows torch's defaults (kaiming-uniform a=√5 kernels, U(±1/√fan_in)
biases), as in the official code.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.layers import torch_uniform

GATES = ("resnet", "linear", "mlp")


def _dense(features: int, fan_in: int, axes: tuple, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, name=name,
                    kernel_init=nn.with_logical_partitioning(torch_uniform(fan_in), axes),
                    bias_init=nn.with_logical_partitioning(torch_uniform(fan_in), axes[1:]))


class Projector(nn.Module):
    """Item embedding [..., d_s] → LLM input embedding [..., d] (float32 parameters)."""
    d_model: int

    @nn.compact
    def __call__(self, e: jax.Array) -> jax.Array:
        d_s = e.shape[-1]
        x = _dense(self.d_model, d_s, (None, "mlp"), "fc1")(e.astype(jnp.float32))
        x = nn.gelu(x, approximate=False)
        return _dense(self.d_model, self.d_model, ("mlp", "embed"), "fc2")(x)


def _conv(features: int, stride: int, in_channels: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3,), strides=(stride,), padding=((1, 1),), use_bias=False, name=name,
                   kernel_init=torch_uniform(3 * in_channels))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ResidualBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        c_in = x.shape[-1]
        out = nn.relu(_batch_norm(train, "bn1")(_conv(self.features, self.stride, c_in, "conv1")(x)))
        out = _batch_norm(train, "bn2")(_conv(self.features, 1, self.features, "conv2")(out))
        shortcut = x
        if self.stride != 1 or c_in != self.features:
            diff = self.features - c_in
            shortcut = jnp.pad(x[:, ::2, :], ((0, 0), (0, 0), (diff // 2, (diff + 1) // 2)))
        return nn.relu(out + shortcut)


class ResNetRouter(nn.Module):
    """The official router (channels-last: h [B, d_s] is read as [B, length d_s, 1 channel])."""
    num_experts: int
    blocks: tuple[int, ...] = (3, 3, 3)
    channels: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        x = h.astype(jnp.float32)[:, :, None]
        x = nn.relu(_batch_norm(train, "bn1")(_conv(self.channels[0], 1, 1, "conv1")(x)))
        for stage, (n, c) in enumerate(zip(self.blocks, self.channels)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                x = ResidualBlock(c, stride, name=f"stage{stage}_block{b}")(x, train)
        pooled = x.mean(axis=1)
        return jax.nn.softmax(_dense(self.num_experts, pooled.shape[-1], (None, "expert"), "gate")(pooled), axis=-1)


class LinearGate(nn.Module):
    num_experts: int

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        h = h.astype(jnp.float32)
        return jax.nn.softmax(_dense(self.num_experts, h.shape[-1], (None, "expert"), "gate")(h), axis=-1)


class MLPGate(nn.Module):
    num_experts: int
    hidden: int = 64

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        h = h.astype(jnp.float32)
        x = nn.relu(_dense(self.hidden, h.shape[-1], (None, None), "fc1")(h))
        return jax.nn.softmax(_dense(self.num_experts, self.hidden, (None, "expert"), "gate")(x), axis=-1)


def build_gate(kind: str, num_experts: int) -> nn.Module:
    if kind == "resnet":
        return ResNetRouter(num_experts)
    if kind == "linear":
        return LinearGate(num_experts)
    if kind == "mlp":
        return MLPGate(num_experts)
    raise ValueError(f"unknown gate {kind!r}; choose one of {', '.join(GATES)}")


def apply_gate(gate: nn.Module, params: Any, stats: Any, h: jax.Array, train: bool):
    """(g [B, E], new BatchNorm statistics) — statistics pass through untouched in evaluation
    and for gates without BatchNorm."""
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    if train and stats:
        g, updated = gate.apply(variables, h, train=True, mutable=["batch_stats"])
        return g, updated["batch_stats"]
    return gate.apply(variables, h, train=False), stats


def splice_items(embeds: jax.Array, slots: jax.Array, vectors: jax.Array) -> jax.Array:
    """Hybrid prompt embeddings: position t takes vectors[slots[t]] where slots[t] >= 0.

    embeds [B, T, d] (token embeddings), slots int [B, T] (-1 = keep the token),
    vectors [B, S, d] (one per item slot) → [B, T, d].
    """
    picked = jnp.take_along_axis(vectors, jnp.maximum(slots, 0)[..., None], axis=1)
    return jnp.where((slots >= 0)[..., None], picked.astype(embeds.dtype), embeds)
