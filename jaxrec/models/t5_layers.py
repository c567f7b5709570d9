"""Building blocks of the T5 encoder–decoder (see `jaxrec.models.t5` for the model).

Each block reproduces the arithmetic of transformers' PyTorch T5 (`modeling_t5.py`):

- `T5LayerNorm`: RMS norm without mean subtraction or bias, statistics in float32.
- `T5Attention`: multi-head attention with *no* 1/sqrt(d_kv) scaling of the logits
  (T5 folds it into the initial scale of `q`), an additive relative position bias, and
  dropout on the attention probabilities. Cross-attention accepts queries for W beams
  per encoder row (`[B*W, S]` queries against `[B, T]` keys) without tiling the keys.
- `T5FeedForward`: `wo(act(wi(x)))` or, for "gated-*", `wo(act(wi_0(x)) * wi_1(x))`,
  with dropout before `wo`.
- `T5Block`: pre-norm residual sub-layers (self-attention, cross-attention in the
  decoder, feed-forward), each output dropped out before the residual add.
- `relative_position_buckets`: Mesh-TensorFlow's bucketing of key−query distances,
  computed in numpy from the (static) sequence lengths so it is a constant of the trace.

Kernels are stored head-major, `[d_model, heads, d_kv]` for q/k/v and `[heads, d_kv,
d_model]` for o, so the tensor axis splits whole heads. Initial scales follow
transformers' `T5PreTrainedModel._init_weights` with `initializer_factor` 1:
q ~ N(0, (d_model·d_kv)^-1/2), k, v ~ N(0, d_model^-1/2), o ~ N(0, (heads·d_kv)^-1/2),
wi ~ N(0, d_model^-1/2), wo ~ N(0, d_ff^-1/2), norms = 1.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.sharding import constrain

# transformers' ACT2FN names; "gated-gelu" means the tanh approximation ("gelu_new"),
# a backwards-compatibility rule of transformers' T5Config that checkpoints rely on.
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
}


def activation_name(feed_forward_proj: str) -> tuple[str, bool]:
    """(ACT2FN name, gated?) for a transformers `feed_forward_proj` string."""
    parts = feed_forward_proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {feed_forward_proj!r}")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    if act not in ACTIVATIONS:
        raise ValueError(f"feed_forward_proj {feed_forward_proj!r}: activation {act!r} is not one of "
                         f"{sorted(ACTIVATIONS)}")
    return act, gated


def _bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """transformers' `T5Attention._relative_position_bucket`, in numpy.

    The logarithmic part is evaluated in float32 exactly as torch does (float32 log, then
    float32 divide and multiply, truncation toward zero): a distance whose real-valued
    bucket is an integer could otherwise land one bucket off.
    """
    buckets = np.zeros(relative_position.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(., 1) only keeps log(0) out of the unused branch (is_small covers distance 0).
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


def relative_position_buckets(query_length: int, key_length: int, bidirectional: bool,
                              num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Bucket of every (query i, key j) pair, from the distance j − i: int32 [Tq, Tk]."""
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    return _bucket(rel, bidirectional, num_buckets, max_distance).astype(np.int32)


def _normal(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class T5LayerNorm(nn.Module):
    """x / rms(x) * scale: no mean subtraction, no bias (T5's "layer norm")."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * y).astype(self.dtype)


class HeadProjection(nn.Module):
    """x [..., d] -> [..., H, dk] (or, with `into_heads=False`, [..., H, dk] -> [..., d]).

    The kernel is created at its true rank, [d, H, dk] or [H, dk, d], so its logical axis
    names apply as written; `nn.DenseGeneral` initialises a flattened 2-D kernel, which a
    three-name partitioning cannot describe once the rules are active."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, equation: str):
        kernel = self.param("kernel", _normal(self.std, self.names), self.shape, jnp.float32)
        return jnp.einsum(equation, x, kernel.astype(self.dtype))


class T5Attention(nn.Module):
    """Attention of `x` [Bq, Tq, d] over `source` [Bk, Tk, d], with Bq = Bk·W.

    `bias` [1, H, Tq, Tk] is added to the logits (None for cross-attention), `mask` is a
    boolean broadcastable to [Bk, 1, W·Tq, Tk] (True = may attend). When W > 1 the query
    row b·W+j attends to source row b: the queries are regrouped as [Bk, W·Tq] so keys and
    values are projected once per source row and never tiled.

    `past` (incremental decoding, self-attention only): the keys and values [Bq, t, H, dk]
    of the t positions decoded before `x`; the new positions' keys and values are appended
    and the call returns (output, (keys, values) [Bq, t + Tq, H, dk]).
    """

    config: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, source, bias, mask, past=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        H, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model

        def proj(name, std, inputs):
            layer = HeadProjection((d, H, dk), ("embed", "heads", "kv"), std, dtype, name=name)
            return layer(inputs.astype(dtype), "btd,dhk->bthk")

        qkv_axes = ("batch", "seq", "heads", "kv")
        q = constrain(proj("q", (d * dk) ** -0.5, x), qkv_axes)
        k = constrain(proj("k", d ** -0.5, source), qkv_axes)
        v = constrain(proj("v", d ** -0.5, source), qkv_axes)
        if past is not None:
            k = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        Bq, Tq = x.shape[:2]
        Bk = source.shape[0]
        if Bq % Bk:
            raise ValueError(f"query batch {Bq} is not a multiple of the key/value batch {Bk}")
        q = q.reshape(Bk, (Bq // Bk) * Tq, H, dk)          # row b·W+j → group b (no-op when W = 1)

        # T5 does not scale q·k by d_kv^-1/2 (transformers sets scaling = 1.0).
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if bias is not None:
            logits = logits + bias.astype(logits.dtype)
        # Masked logits get the dtype's minimum (like transformers' additive mask), not
        # -inf, so a row without any valid key yields a uniform row rather than NaN.
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
        probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=self.deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(Bq, Tq, H, dk)
        out = constrain(out, qkv_axes)
        out = HeadProjection((H, dk, d), ("heads", "kv", "embed"), (H * dk) ** -0.5, dtype, name="o")(
            out, "bthk,hkd->btd")
        return out if past is None else (out, (k, v))


class T5FeedForward(nn.Module):
    config: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        act_name, gated = activation_name(cfg.feed_forward_proj)
        act = ACTIVATIONS[act_name]

        def dense(features, std, axes, name):
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                            kernel_init=_normal(std, axes), name=name)

        up = ("embed", "mlp")
        if gated:
            h = act(dense(cfg.d_ff, cfg.d_model ** -0.5, up, "wi_0")(x)) * dense(cfg.d_ff, cfg.d_model ** -0.5, up,
                                                                                   "wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, cfg.d_model ** -0.5, up, "wi")(x))
        h = constrain(h, ("batch", "seq", "mlp"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return dense(cfg.d_model, cfg.d_ff ** -0.5, ("mlp", "embed"), "wo")(h)


class T5Block(nn.Module):
    """One encoder or decoder layer; scanned over the stack's depth (carry = hidden states).

    bias [1, H, T, T] and the masks are computed once per stack and broadcast to every
    layer, which is transformers' "first layer computes the position bias, the others
    reuse it".
    """

    config: Any
    decoder: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, bias, self_mask, encoder_hidden, cross_mask, past=None):
        """(new h, None), or with `past` (this layer's cached self-attention keys and values)
        (new h, the keys and values extended by h's positions)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)

        def norm(name):
            return T5LayerNorm(cfg.layer_norm_epsilon, dtype, name=name)

        def drop(y):
            return nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)

        x = norm("self_attn_norm")(h)
        attended = T5Attention(cfg, self.deterministic, name="self_attn")(x, x, bias, self_mask, past)
        present = None
        if past is not None:
            attended, present = attended
        h = h + drop(attended)
        if self.decoder:
            x = norm("cross_attn_norm")(h)
            h = h + drop(T5Attention(cfg, self.deterministic, name="cross_attn")(
                x, encoder_hidden, None, cross_mask))
        h = h + drop(T5FeedForward(cfg, self.deterministic, name="mlp")(norm("mlp_norm")(h)))
        return constrain(h, ("batch", "seq", "embed")), present


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal, with cross-attention) stack.

    Parameters: `relative_attention_bias` [num_buckets, H] (transformers keeps it in
    block 0), `layers/...` stacked over depth, `final_layer_norm/scale`.
    """

    config: Any
    decoder: bool = False

    @nn.compact
    def __call__(self, h, mask=None, encoder_hidden=None, encoder_mask=None, *, past=None,
                 deterministic: bool = True):
        """h [B, T, d] embeddings; mask [B, T] (encoder key padding; ignored by the decoder,
        whose self-attention is causal only); encoder_hidden [Bk, Tk, d] and encoder_mask
        [Bk, Tk] for the decoder, with B a multiple of Bk. Returns [B, T, d].

        `past` (decoder only): (keys, values) [layers, B, t, H, dk] of the t positions decoded
        before h, which continues them at positions t .. t+T-1; returns (h, the cache extended
        to t + T positions). Same arithmetic as decoding all t + T positions at once."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        B, T = h.shape[:2]
        done = 0 if past is None else past[0].shape[2]
        if past is not None and not self.decoder:
            raise ValueError("only the decoder stack decodes incrementally")
        table = self.param("relative_attention_bias", _normal(cfg.d_model ** -0.5, (None, "heads")),
                           (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
        buckets = relative_position_buckets(done + T, done + T, not self.decoder, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)[done:]
        bias = jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None].astype(dtype)

        cross_mask = None
        if self.decoder:
            if encoder_hidden is None:
                raise ValueError("the decoder stack needs encoder_hidden")
            self_mask = jnp.asarray(np.tril(np.ones((done + T, done + T), bool))[done:])[None, None]
            Bk, Tk = encoder_hidden.shape[:2]
            enc_mask = jnp.ones((Bk, Tk), bool) if encoder_mask is None else encoder_mask.astype(bool)
            cross_mask = enc_mask[:, None, None, :]
        else:
            self_mask = (jnp.ones((B, T), bool) if mask is None else mask.astype(bool))[:, None, None, :]

        h = nn.Dropout(cfg.dropout_rate)(h.astype(dtype), deterministic=deterministic)
        h = constrain(h, ("batch", "seq", "embed"))
        depth = cfg.num_decoder_layers if self.decoder else cfg.num_layers
        scanned = (nn.broadcast,) * 4 + (() if past is None else (0,))
        layers = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                         in_axes=scanned, length=depth, metadata_params={nn.PARTITION_NAME: "layers"})
        extra = () if past is None else (past,)
        h, present = layers(cfg, self.decoder, deterministic, name="layers")(h, bias, self_mask, encoder_hidden,
                                                                              cross_mask, *extra)
        h = T5LayerNorm(cfg.layer_norm_epsilon, dtype, name="final_layer_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return h if past is None else (h, present)
