"""Next-item training losses over a tied item table.

Every loss is a pure function

    loss_fn(h [..., H], table [V, H], targets [...] int, weights [...] | None, rng) -> (loss, metrics)

with table row 0 the pad item (never a class), items 1..V-1, targets 0 meaning "no
target here" and `weights` defaulting to (targets > 0). `loss` is the weighted mean,
sum(w * l) / sum(w); `metrics` = {"loss": loss, "weight": sum(w)} so callers can
combine micro-batches exactly. `make_loss(name, **options)` picks one by config string.

- "ce": full softmax cross-entropy over items 1..V-1 (the pad column is not a class).
  A custom VJP computes the gradient during the forward pass (softmax minus the
  target, without a one-hot), so the [N, V] logits are never kept for the backward
  pass; `chunk` rows at a time bounds the transient [chunk, V] block too (and on CPU
  is also faster: the block stays in cache). `scripts/bench_step.py --setting ce`
  measures time and temporary memory against plain autodiff.
- `lm_cross_entropy` (not a next-item loss, so not in LOSSES): the same chunked rule for a
  causal LM, where every row of the output table is a class and a negative label means
  "no target"; a frozen table (LoRA) gets no [V, H] gradient at all.
- "sampled_softmax": n uniform negatives (with replacement) shared by the whole batch,
  logQ-corrected, accidental hits of the positive masked.
- "bce": SASRec's loss, one uniform negative per position, negative != positive. The
  user's history is NOT excluded (SASRec.pytorch and CaseQ exclude it in their data
  sampler); pass `negatives=` to supply your own.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]


def _flatten(h, targets, weights):
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"h {h.shape} and targets {targets.shape} disagree on the leading axes")
    if weights is None:
        weights = targets > 0
    elif weights.shape != targets.shape:
        raise ValueError(f"weights {weights.shape} must have the targets' shape {targets.shape}")
    return h.reshape(-1, h.shape[-1]), targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)


def _finish(total, weight):
    loss = total / jnp.maximum(weight, 1e-9)
    return loss, {"loss": loss, "weight": weight}


# ---------------------------------------------------------------------------------
# Full softmax cross-entropy
# ---------------------------------------------------------------------------------

def _ce_block(h, items, t, w, want_grad, item_grad=True):
    """Per-row CE (unweighted) of a block of rows, and optionally the gradient of
    sum(w * ce) w.r.t. h and (item_grad) items; items = table[1:], t 0-based target columns."""
    logits = jnp.dot(h, items.T, preferred_element_type=jnp.float32)
    top = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    # exp once, kept whole: left to fusion, XLA:CPU recomputes it inside the sum's reduction
    # (a library reduction that ran ~10x slower than the elementwise pass; docs/llm.md).
    unnormalised = lax.optimization_barrier(jnp.exp(logits - top))
    total = jnp.sum(unnormalised, axis=-1)
    ce = top[:, 0] + jnp.log(total) - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    if not want_grad:
        return ce, None, None
    # d/dlogits = w * (softmax - onehot(t)); the one-hot part is a gather/scatter.
    p = (unnormalised * (w / total)[:, None]).astype(h.dtype)
    d_h = jnp.dot(p, items, preferred_element_type=jnp.float32) - w[:, None] * items[t].astype(jnp.float32)
    if not item_grad:
        return ce, d_h, None
    w_h = (w[:, None] * h.astype(jnp.float32))
    d_items = jnp.dot(p.T, h, preferred_element_type=jnp.float32).at[t].add(-w_h)
    return ce, d_h, d_items


def _ce_rows(h, items, t, w, chunk, want_grad, item_grad=True):
    n, dim = h.shape
    if chunk is None or chunk >= n:
        return _ce_block(h, items, t, w, want_grad, item_grad)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    # Block c holds rows c, c + n_chunks, c + 2 n_chunks, ...: strided rather than
    # contiguous, so when rows are sharded over devices every block spans all of them
    # and each device works on its own rows in every scan step.
    blocks = lambda a: jnp.swapaxes(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(
        (chunk, n_chunks) + a.shape[1:]), 0, 1)
    unblock = lambda a: jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])[:n]
    hs, ts, ws = blocks(h), blocks(t), blocks(w)

    sums_items = want_grad and item_grad

    def body(d_items, block):
        h_c, t_c, w_c = block
        ce, d_h, d_i = _ce_block(h_c, items, t_c, w_c, want_grad, item_grad)
        return (d_items + d_i if sums_items else d_items), (ce, d_h)

    init = jnp.zeros(items.shape, jnp.float32) if sums_items else jnp.zeros(())
    d_items, (ce, d_h) = lax.scan(body, init, (hs, ts, ws))
    if not want_grad:
        return unblock(ce), None, None
    return unblock(ce), unblock(d_h), (d_items if sums_items else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_sum(h, items, t, w, chunk, item_grad=True):
    """sum_i w_i * CE_i. Its VJP is computed in the forward pass (see module doc); with
    item_grad=False the items get no gradient and their [V, H] gradient is never formed."""
    return jnp.sum(w * _ce_rows(h, items, t, w, chunk, want_grad=False)[0])


def _ce_sum_fwd(h, items, t, w, chunk, item_grad=True):
    ce, d_h, d_items = _ce_rows(h, items, t, w, chunk, want_grad=True, item_grad=item_grad)
    d_items = None if d_items is None else d_items.astype(items.dtype)
    return jnp.sum(w * ce), (d_h.astype(h.dtype), d_items, ce, t)


def _ce_sum_bwd(chunk, item_grad, res, g):
    d_h, d_items, ce, t = res
    return (g.astype(d_h.dtype) * d_h, None if d_items is None else g.astype(d_items.dtype) * d_items,
            jnp.zeros(t.shape, jax.dtypes.float0), g * ce)


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def softmax_cross_entropy(h, table, targets, weights=None, rng=None, *, chunk: int | None = None):
    """Full-catalogue softmax CE; `chunk` rows per block (None: all rows at once)."""
    del rng
    h, targets, weights = _flatten(h, targets, weights)
    items = table[1:].astype(h.dtype)
    t = jnp.clip(targets - 1, 0, items.shape[0] - 1)
    weights = jnp.where(targets > 0, weights, 0.0)
    total = _ce_sum(h, items, t, weights, chunk)
    return _finish(total, jnp.sum(weights))


def lm_cross_entropy(hidden, table, labels, weights=None, *, chunk: int | None = 512, table_grad: bool = False):
    """Causal-LM cross-entropy over a whole vocabulary from the final hidden states, without
    materialising the [tokens, vocab] logits: `chunk` rows at a time (None: all at once).

    hidden [..., d], table [vocab, d] (the output embedding: the tied input table, or the LM
    head's kernel transposed), labels [...] token ids, negative = no target (e.g. -100), so
    every id including 0 is a class. With table_grad=False (a frozen output layer, as in LoRA)
    the table is a constant: its gradient is neither formed nor returned.
    Returns (loss, {"loss", "weight"}) like the losses above.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {hidden.shape} and labels {labels.shape} disagree on the leading axes")
    if table.ndim != 2 or table.shape[1] != hidden.shape[-1]:
        raise ValueError(f"table must be [vocab, {hidden.shape[-1]}], got {tuple(table.shape)}")
    h, labels, weights = _flatten(hidden, labels, (labels >= 0) if weights is None else weights)
    weights = jnp.where(labels >= 0, weights, 0.0)
    t = jnp.clip(labels, 0, table.shape[0] - 1)
    table = table.astype(h.dtype) if table_grad else lax.stop_gradient(table.astype(h.dtype))
    total = _ce_sum(h, table, t, weights, chunk, table_grad)
    return _finish(total, jnp.sum(weights))


# ---------------------------------------------------------------------------------
# Sampled softmax
# ---------------------------------------------------------------------------------

def sampled_softmax(h, table, targets, weights=None, rng=None, *, n_negatives: int = 100):
    """Softmax over {target} + n shared uniform negatives, with the logQ correction.

    Each logit s_i is corrected to s_i - log Q(i), Q(i) = n / n_items the expected
    count of item i in the sample. Under the uniform proposal Q is the same for every
    item, so the correction shifts all logits equally and cancels in the softmax; it
    is written out so a non-uniform proposal only has to change Q. A negative equal to
    a row's target (an accidental hit) is removed from that row's softmax.
    """
    if rng is None:
        raise ValueError("sampled_softmax needs an rng to draw its negatives")
    h, targets, weights = _flatten(h, targets, weights)
    n_items = table.shape[0] - 1
    negatives = jax.random.randint(rng, (n_negatives,), 1, n_items + 1)
    table = table.astype(h.dtype)
    log_q = jnp.log(n_negatives / n_items)
    s_pos = jnp.einsum("nh,nh->n", h, table[targets], preferred_element_type=jnp.float32) - log_q
    s_neg = jnp.dot(h, table[negatives].T, preferred_element_type=jnp.float32) - log_q
    s_neg = jnp.where(negatives[None, :] == targets[:, None], -jnp.inf, s_neg)
    lse = jnp.logaddexp(s_pos, jax.nn.logsumexp(s_neg, axis=-1))
    weights = jnp.where(targets > 0, weights, 0.0)
    return _finish(jnp.sum(weights * (lse - s_pos)), jnp.sum(weights))


# ---------------------------------------------------------------------------------
# SASRec's binary cross-entropy
# ---------------------------------------------------------------------------------

def sasrec_bce(h, table, targets, weights=None, rng=None, *, negatives=None):
    """mean_valid[ -log sigmoid(s_pos) ] + mean_valid[ -log(1 - sigmoid(s_neg)) ].

    One negative per position, uniform over items != target (history not excluded),
    unless `negatives` [...] (targets' shape) is given.
    """
    shape = targets.shape
    h, targets, weights = _flatten(h, targets, weights)
    n_items = table.shape[0] - 1
    if negatives is None:
        if rng is None:
            raise ValueError("sasrec_bce needs an rng (or explicit negatives)")
        # Uniform over {1..n} minus the target: draw from n-1 values and skip it.
        r = jax.random.randint(rng, targets.shape, 1, n_items)
        negatives = r + (r >= targets).astype(r.dtype)
    elif negatives.shape != shape:
        raise ValueError(f"negatives {negatives.shape} must have the targets' shape {shape}")
    negatives = negatives.reshape(-1)
    table = table.astype(h.dtype)
    s_pos = jnp.einsum("nh,nh->n", h, table[targets], preferred_element_type=jnp.float32)
    s_neg = jnp.einsum("nh,nh->n", h, table[negatives], preferred_element_type=jnp.float32)
    rows = jax.nn.softplus(-s_pos) + jax.nn.softplus(s_neg)
    weights = jnp.where(targets > 0, weights, 0.0)
    return _finish(jnp.sum(weights * rows), jnp.sum(weights))


LOSSES: dict[str, LossFn] = {
    "ce": softmax_cross_entropy,
    "sampled_softmax": sampled_softmax,
    "bce": sasrec_bce,
}


def make_loss(name: str, **options: Any) -> LossFn:
    """The loss called `name` with its keyword options bound (unknown ones rejected)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    fn = LOSSES[name]
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    for key in options:
        if key not in allowed:
            raise ValueError(f"loss {name!r} has no option {key!r}; options: {allowed}")
    return functools.partial(fn, **options) if options else fn
