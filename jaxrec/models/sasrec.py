"""The SASRec self-attention block, as defined by SASRec.pytorch (and reused by CaseQ).

One block, on a left-padded sequence x [B, L, H] (pad rows already zero):

    Q = LN_attn(x)
    x = Q + MHA(Q, x, x)         causal; attention dropout on the probabilities;
                                 residual from the *normalised* Q, keys/values from the
                                 un-normalised x (the reference's definition, kept)
    x = LN_ffn(x)
    x = x + FFN(x)               FFN = Dense -> dropout -> ReLU -> Dense -> dropout
    x = x * valid                pads zeroed

Padding keys. The reference masks only the future (`attn_mask=~tril`), so valid
queries also attend to left-pad keys (whose value is the projection bias). jaxrec
masks pad keys by default (`mask_pad_keys=True`, as RecBole does): then a valid
position's output does not depend on how much left padding precedes it. Set it to
False for bit-level fidelity with SASRec.pytorch / CaseQ.

Initialisation (torch, see layers.py): q/k/v kernels std sqrt(1/(2H)) (torch packs
them into one [3H, H] in_proj), out kernel std sqrt(1/H), all attention biases 0;
FFN kernels xavier of [inner, H] and [H, inner], biases U(+-1/sqrt(fan_in)) (Conv1d
defaults); LayerNorm 1/0 with eps 1e-8 (the reference's value).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.layers import Dropout, Linear, layer_norm, torch_uniform_bias, torch_xavier_normal, zero_pads

# Finite so fully masked rows (pad queries) give a uniform softmax instead of NaN;
# those rows are zeroed afterwards.
_MASKED = -1e30


class SASRecBlock(nn.Module):
    """One SASRec block; call as `(x [B,L,H], valid [B,L], deterministic, last_only)`.

    With `last_only=True` only the query at the last position is computed (keys and
    values still use every position) and the result is [B, 1, H], equal to the full
    output's last row.
    """
    hidden: int
    n_heads: int = 1
    inner: int | None = None
    dropout: float = 0.2
    attn_dropout: float | None = None
    ln_eps: float = 1e-8
    mask_pad_keys: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True,
                 last_only: bool = False) -> jax.Array:
        H, n_heads = self.hidden, self.n_heads
        if H % n_heads:
            raise ValueError(f"hidden={H} is not divisible by n_heads={n_heads}")
        head_dim, inner = H // n_heads, self.inner or H
        attn_rate = self.dropout if self.attn_dropout is None else self.attn_dropout
        B, L, _ = x.shape
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_init = torch_xavier_normal(H, 3 * H)  # torch's packed in_proj [3H, H]

        x = x.astype(self.dtype)
        q_in = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "attn_norm")(x[:, -1:] if last_only else x)
        q = Linear((n_heads, head_dim), ("embed", "heads", "kv"), qkv_init, name="query", **dense)(q_in)
        kv = Linear((2, n_heads, head_dim), ("embed", None, "heads", "kv"), qkv_init, name="key_value", **dense)(x)
        k, v = kv[:, :, 0], kv[:, :, 1]

        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head_dim)
        q_pos = jnp.arange(L - q.shape[1], L)[:, None]
        allowed = (q_pos >= jnp.arange(L)[None, :])[None, None]          # [1, 1, Lq, L]
        if self.mask_pad_keys:
            allowed = allowed & valid[:, None, None, :]
        probs = jax.nn.softmax(jnp.where(allowed, scores, _MASKED), axis=-1).astype(self.dtype)
        probs = Dropout(attn_rate)(probs, deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        attn = Linear((H,), ("heads", "kv", "embed"), torch_xavier_normal(H, H), n_in=2, name="out",
                      **dense)(ctx)

        x = q_in + attn
        x = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ffn_norm")(x)
        y = Linear((inner,), ("embed", "mlp"), bias_init=torch_uniform_bias(H), name="ffn_in", **dense)(x)
        y = nn.relu(Dropout(self.dropout)(y, deterministic))
        y = Linear((H,), ("mlp", "embed"), bias_init=torch_uniform_bias(inner), name="ffn_out", **dense)(y)
        x = x + Dropout(self.dropout)(y, deterministic)
        return zero_pads(x, valid[:, -x.shape[1]:])
