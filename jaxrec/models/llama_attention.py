"""Attention pieces of the Llama decoder: the KV cache, rotary embeddings, masks, softmax attention.

Kept apart from the module definitions so the masking rules (real keys, causal by cache
slot, sliding window by position) and the shared-prefix attention can be read in one place.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.models.layers import query_blocks
from jaxrec.models.llama_config import LlamaConfig

_NEG = float(np.finfo(np.float32).min)


class KVCache(struct.PyTreeNode):
    """Keys/values of all layers for `batch` rows and `max_length` slots.

    k, v: [layers, batch, max_length, kv_heads, head_dim]; valid: [batch, max_length]
    (slot holds a real token); positions: [batch, max_length] (its rotary position);
    index: the next free slot (same for every row; padding is handled by `valid`).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_length: int) -> "KVCache":
        shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, config.dtype), v=jnp.zeros(shape, config.dtype),
                   valid=jnp.zeros((batch, max_length), bool), positions=jnp.zeros((batch, max_length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    def lengths(self) -> jax.Array:
        """Real tokens per row [batch] (= the next rotary position)."""
        return self.valid.sum(-1).astype(jnp.int32)

    def take(self, rows: jax.Array) -> "KVCache":
        """Rows in a new order/multiplicity (beam reordering, broadcasting to continuations)."""
        return self.replace(k=jnp.take(self.k, rows, axis=1), v=jnp.take(self.v, rows, axis=1),
                            valid=jnp.take(self.valid, rows, axis=0), positions=jnp.take(self.positions, rows, axis=0))

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times consecutively: row b → rows b·n … b·n+n-1."""
        return self.take(jnp.repeat(jnp.arange(self.batch_size), n))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, factor: float) -> jax.Array:
    """Rotary embedding, half-split ("rotate_half") convention. x [B,T,H,hd], positions [B,T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)        # [B,T,hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = (jnp.cos(angles) * factor).astype(x.dtype), (jnp.sin(angles) * factor).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def allowed_keys(q_pos, q_slot, k_valid, k_pos, k_slot, window):
    """[B,T,S] attention mask: real key, causal by slot, inside the sliding window (if > 0)."""
    ok = k_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
    in_window = (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return ok & ((window <= 0) | in_window)


def attend(q, k, v, mask, prefix=None, causal_block: int = 0):
    """Softmax attention with grouped KV heads; q [B,T,H,hd] pre-scaled, k/v [B,S,Hkv,hd].

    `prefix` = (pk, pv, pmask) with pk/pv [Bp,P,Hkv,hd], pmask [B,T,P], B = Bp·R: query
    rows b·R … b·R+R-1 share prefix row b, which is read in place, never copied R times.

    `causal_block` > 0 promises that key slot j is masked for query slot i whenever j > i
    (no cache, no prefix: queries and keys are the same T tokens). Queries then run in
    blocks of that many rows, each against the keys up to its last row only, which skips
    most of the masked half of the score matrix (`causal_attention`). A query that sees
    no key at all (a padding row) gets some finite average of values either way.
    """
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    if prefix is None:
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if 0 < causal_block < T and T == k.shape[1]:
            rows_q = q.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 1, 3, 4)      # [B,Hkv,T,G,hd]
            out = causal_attention(rows_q, kt, vt, mask, causal_block)
            return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H, hd)
        grouped_q = q.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)
        out = grouped_attention(grouped_q, kt, vt, mask)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)
    q = q.reshape(B, T, Hkv, H // Hkv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None], s, _NEG)
    pk, pv, pmask = prefix
    Bp, P = pk.shape[:2]
    qp = q.reshape(Bp, B // Bp, T, Hkv, H // Hkv, hd)
    ps = jnp.einsum("brtkgd,bpkd->brkgtp", qp, pk, preferred_element_type=jnp.float32).reshape(B, Hkv, -1, T, P)
    ps = jnp.where(pmask[:, None, None], ps, _NEG)
    p = jax.nn.softmax(jnp.concatenate([ps, s], axis=-1), axis=-1).astype(v.dtype)
    p_prefix, p_own = p[..., :P], p[..., P:]
    out = jnp.einsum("bkgts,bskd->btkgd", p_own, v)
    out_prefix = jnp.einsum("brkgtp,bpkd->brtkgd", p_prefix.reshape(Bp, B // Bp, *p_prefix.shape[1:]), pv)
    return (out + out_prefix.reshape(out.shape)).reshape(B, T, H, hd)


# ---------------------------------------------------------------------------------------
# Attention with a hand-written gradient
# ---------------------------------------------------------------------------------------
# Autodiff of the einsums above writes the key and value gradients as dots that contract the
# score matrix over (group, query) — its major axes — and XLA:CPU then copies the whole
# [B, Hkv, G, T, S] score gradient into a transposed layout before each one. The rule below
# computes those two gradients transposed, [.., hd, S] = (small operand)ᵀ · (scores), so only
# head-sized tensors are ever transposed (docs/llm.md, "Profile").
@jax.custom_vjp
def grouped_attention(q, k, v, mask):
    """Softmax attention on grouped heads: q [B,Hkv,G,T,hd] pre-scaled, k/v [B,Hkv,S,hd],
    mask [B,T,S] → [B,Hkv,G,T,hd]."""
    return _grouped_attention_forward(q, k, v, mask)[0]


def _grouped_attention_forward(q, k, v, mask):
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, _NEG), axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", p, v), p


def _grouped_attention_fwd(q, k, v, mask):
    out, p = _grouped_attention_forward(q, k, v, mask)
    return out, (q, k, v, mask, p)


def _grouped_attention_bwd(residuals, d_out):
    q, k, v, mask, p = residuals
    # Each dot returns its inputs' dtype, as autodiff's would: XLA:CPU has no bf16 x bf16 -> f32
    # dot for these shapes. The softmax step runs in float32.
    d_p = jnp.einsum("bkgtd,bksd->bkgts", d_out, v).astype(jnp.float32)
    p32 = p.astype(jnp.float32)
    d_s = p32 * (d_p - jnp.sum(d_p * p32, axis=-1, keepdims=True))
    d_s = jnp.where(mask[:, None, None], d_s, 0.0).astype(q.dtype)
    d_q = jnp.einsum("bkgts,bksd->bkgtd", d_s, k)
    d_k = jnp.einsum("bkgtd,bkgts->bkds", q, d_s)
    d_v = jnp.einsum("bkgtd,bkgts->bkds", d_out, p)
    return (d_q.astype(q.dtype), jnp.swapaxes(d_k, -1, -2).astype(k.dtype),
            jnp.swapaxes(d_v, -1, -2).astype(v.dtype), None)


grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


# ---------------------------------------------------------------------------------------
# Causal attention in query blocks
# ---------------------------------------------------------------------------------------
# Query block i (rows i·b … i·b+b-1) can only see keys 0 … i·b+b-1, so it is scored against
# that prefix alone: with blocks of T/4 the score work is 5/8 of the full square. The
# gradient uses the flash-attention identity Σ_s p·dp = Σ_d out·dout, so the softmax
# backward needs no reduction over a score-sized tensor, and each block adds its key and
# value gradients into the prefix it saw (in place; nothing score-sized is padded).
@partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q, k, v, mask, block):
    """Softmax attention for queries and keys that are the same T slots under a causal mask:
    q [B,Hkv,T,G,hd] pre-scaled (query-major, so a block of queries is one contiguous run of
    T·G rows), k/v [B,Hkv,T,hd], mask [B,T,T] → [B,Hkv,T,G,hd]."""
    return _causal_forward(q, k, v, mask, block)[0]


def _rows(x, start, end):
    """Queries start … end-1 of [B,Hkv,T,G,d] as [B,Hkv,(end-start)·G,d] rows."""
    B, Hkv, _, G, d = x.shape
    return x[:, :, start:end].reshape(B, Hkv, (end - start) * G, d)


def _row_mask(mask, start, end, group):
    """mask[:, start:end, :end] repeated for each of the `group` query heads: [B,1,rows,end]."""
    m = mask[:, start:end, :end]
    return jnp.repeat(m, group, axis=1)[:, None]


def _causal_forward(q, k, v, mask, block):
    B, Hkv, T, G, hd = q.shape
    outs, probs = [], []
    for start, end in query_blocks(T, block):
        s = jnp.einsum("bkrd,bksd->bkrs", _rows(q, start, end), k[:, :, :end], preferred_element_type=jnp.float32)
        p = jax.nn.softmax(jnp.where(_row_mask(mask, start, end, G), s, _NEG), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkrs,bksd->bkrd", p, v[:, :, :end]).reshape(B, Hkv, end - start, G, hd))
        probs.append(p)
    return jnp.concatenate(outs, axis=2), tuple(probs)


def _causal_fwd(q, k, v, mask, block):
    # Keeping each block's probabilities measured faster than keeping only the row
    # log-normalisers and scoring the blocks again in the backward (docs/llm.md).
    out, probs = _causal_forward(q, k, v, mask, block)
    return out, (q, k, v, mask, out, probs)


def _causal_bwd(block, residuals, d_out):
    q, k, v, mask, out, probs = residuals
    B, Hkv, T, G, hd = q.shape
    # Σ_s p·dp per query row, from head-sized tensors (float32, as the softmax runs).
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_q_blocks = []
    # Transposed, as in grouped_attention; float32, as each key's gradient sums over blocks.
    d_kt = jnp.zeros((B, Hkv, hd, T), jnp.float32)
    d_vt = jnp.zeros((B, Hkv, hd, T), jnp.float32)
    for (start, end), p in zip(query_blocks(T, block), probs):
        d_out_i = _rows(d_out, start, end)
        d_p = jnp.einsum("bkrd,bksd->bkrs", d_out_i, v[:, :, :end]).astype(jnp.float32)
        d_s = p.astype(jnp.float32) * (d_p - _rows(row_dot, start, end))
        d_s = jnp.where(_row_mask(mask, start, end, G), d_s, 0.0).astype(q.dtype)
        d_q_blocks.append(jnp.einsum("bkrs,bksd->bkrd", d_s, k[:, :, :end]).reshape(B, Hkv, end - start, G, hd))
        d_kt = d_kt.at[..., :end].add(jnp.einsum("bkrd,bkrs->bkds", _rows(q, start, end), d_s).astype(jnp.float32))
        d_vt = d_vt.at[..., :end].add(jnp.einsum("bkrd,bkrs->bkds", d_out_i, p).astype(jnp.float32))
    d_q = jnp.concatenate(d_q_blocks, axis=2)
    return (d_q.astype(q.dtype), jnp.swapaxes(d_kt, -1, -2).astype(k.dtype),
            jnp.swapaxes(d_vt, -1, -2).astype(v.dtype), None)


causal_attention.defvjp(_causal_fwd, _causal_bwd)
