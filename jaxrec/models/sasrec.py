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

from jaxrec.models.layers import (Dropout, Linear, LinearWeights, hash_dropout, layer_norm, matmul_rows,
                                  query_blocks, torch_uniform, torch_xavier_normal, zero_pads)

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
    query_block: int = 64      # causal attention in query blocks of this size (0: one block); same result
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True,
                 last_only: bool = False) -> jax.Array:
        H, n_heads = self.hidden, self.n_heads
        if H % n_heads:
            raise ValueError(f"hidden={H} is not divisible by n_heads={n_heads}")
        inner = self.inner or H
        attn_rate = self.dropout if self.attn_dropout is None else self.attn_dropout
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        q_in = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "attn_norm")(x[:, -1:] if last_only else x)
        attn = self._attention(q_in, x, valid, deterministic, attn_rate)
        x = q_in + attn
        x = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ffn_norm")(x)
        y = Linear((inner,), ("embed", "mlp"), bias_init=torch_uniform(H), name="ffn_in", **dense)(x)
        y = nn.relu(Dropout(self.dropout)(y, deterministic))
        y = Linear((H,), ("mlp", "embed"), bias_init=torch_uniform(inner), name="ffn_out", **dense)(y)
        x = x + Dropout(self.dropout)(y, deterministic)
        return zero_pads(x, valid[:, -x.shape[1]:])

    def _attention(self, q_in, x, valid, deterministic, rate):
        """Multi-head attention, one head at a time.

        Each head's q/k/v come from their own column block of the kernels as plain 2-D
        matmuls, so the per-head arrays are born contiguous ([B, L, head_dim]) and the
        batched score/context products have only the batch axis: splitting heads out of
        [B, L, heads, head_dim] instead costs XLA:CPU transposes larger than the math.
        Queries run in blocks of `query_block` against only the keys they may see
        (`query_blocks`); each block's dropout mask is its window of the unblocked mask.
        """
        H, n_heads = self.hidden, self.n_heads
        d, L, Lq = H // n_heads, x.shape[1], q_in.shape[1]
        weights = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_init = torch_xavier_normal(H, 3 * H)  # torch packs q, k, v into one [3H, H] in_proj
        w_q, b_q = LinearWeights((H,), (n_heads, d), ("embed", "heads", "kv"), qkv_init, name="query", **weights)()
        w_kv, b_kv = LinearWeights((H,), (2, n_heads, d), ("embed", None, "heads", "kv"), qkv_init,
                                   name="key_value", **weights)()
        w_o, b_o = LinearWeights((n_heads, d), (H,), ("heads", "kv", "embed"), torch_xavier_normal(H, H),
                                 name="out", **weights)()
        allowed = (jnp.arange(L - Lq, L)[:, None] >= jnp.arange(L)[None, :])[None]        # [1, Lq, L] causal
        if self.mask_pad_keys:
            allowed = allowed & valid[:, None, :]
        dropout = Dropout(rate, name="attn_dropout")
        use_dropout = not deterministic and rate > 0.0
        scale = jnp.asarray(1.0 / math.sqrt(d), self.dtype)
        out = None
        for i in range(n_heads):
            q = matmul_rows(q_in, w_q[:, i], b_q[i]) * scale                               # [B, Lq, d]
            k = matmul_rows(x, w_kv[:, 0, i], b_kv[0, i])                                  # [B, L, d]
            v = matmul_rows(x, w_kv[:, 1, i], b_kv[1, i])
            seed = dropout.seed() if use_dropout else None
            ctx = []
            for q0, q1 in query_blocks(Lq, self.query_block):
                keys = L - Lq + q1          # the block's last query sees keys [0, keys); the rest are future
                scores = jnp.einsum("bqd,bkd->bqk", q[:, q0:q1], k[:, :keys], preferred_element_type=jnp.float32)
                probs = jax.nn.softmax(jnp.where(allowed[:, q0:q1, :keys], scores, _MASKED),
                                       axis=-1).astype(self.dtype)
                if use_dropout:    # the mask the unblocked [B, Lq, L] probabilities would draw
                    probs = hash_dropout(probs, rate, seed, within=(q.shape[0], Lq, L), start=(0, q0, 0))
                ctx.append(jnp.einsum("bqk,bkd->bqd", probs, v[:, :keys]))
            ctx = ctx[0] if len(ctx) == 1 else jnp.concatenate(ctx, axis=1)
            head = matmul_rows(ctx, w_o[i], b_o if i == 0 else None)                      # [B, Lq, H]
            out = head if out is None else out + head
        return out
