"""Trie-constrained beam search and exact item scores for generative retrieval.

A generator scores the next code of an item's semantic ID given a user's context and
the codes chosen so far:

    logprob_fn(context, prefix_codes [B, W, k]) -> logp [B, W, V]     (k = 0..L-1)

`context` is any pytree with leading batch dim B (an encoder output, a user vector). It
is passed through untouched, once per user: the W beams or prefixes of a user share it,
and broadcasting it against them is the generator's business (nothing here tiles it).

Incremental generators (a decoder with a KV cache) also keep a per-beam `state`, a pytree
whose leaves are [B, W, ...]; the beam search then calls

    logprob_fn(context, prefix_codes [B, W, k], state) -> (logp [B, W, V], new state)

and after every step carries each surviving beam's state from its parent beam, so the
generator only computes the newest code's position instead of the whole prefix.

Beam search (`constrained_beam_search`) runs L static steps, one level per step, as one
jittable program. An item's score is the sum of its codes' log-probs along the path.
Rules:
- Step k may only extend a beam with a code c whose trie transition from the beam's
  prefix is >= 0, so every finished beam is an existing item. Search starts from one
  live beam (the root) and the others dead, and distinct beams always hold distinct
  prefixes, so no item is returned twice.
- Dead beams: when fewer than W valid continuations exist, the rest are dead, with
  item -1 and score -inf, sorted after every live beam. A live item whose path has
  probability 0 also scores -inf; it is still live (item >= 0) and ranks before the
  dead ones. Masked entries never enter arithmetic, so no NaN arises from -inf - -inf
  or from a generator that returns -inf/NaN for codes the trie forbids.
- Ties in score keep the earlier beam, then the smaller code (a stable sort). A NaN
  log-prob on an allowed code (a generator bug) ranks like -inf and its NaN score is
  returned, so the bug stays visible.
- Sharding: the beam state is constrained to ("batch", ...) each step, so under
  `Layout.activate()` users are split over the data axes; outside it this is a no-op.

`exact_item_scores` is the teacher-forced reference: every item's path log-prob for
every user, computed level by level over the trie's distinct prefixes (each prefix is
scored once per user), `chunk` prefixes at a time so memory is O(B * chunk * V) plus
the [B, n_items] result. `topk_disagreement` compares the two (its docstring says how
exact-score ties are handled). It ranks by the exact scores alone: the generator runs on
other shapes there, so an item's beam and exact scores may differ in the last bits.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.eval.trie import Trie, TrieTables
from jaxrec.sharding import constrain

LogprobFn = Callable[[Any, jax.Array], jax.Array]

DEAD_ITEM = -1
# Sort key of a live candidate whose score is -inf: below every finite score, above the
# dead candidates (key -inf), so impossible-but-existing items still outrank dead beams.
_LIVE_FLOOR = float(jnp.finfo(jnp.float32).min)


def _batch_size(context: Any) -> int:
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(context) if getattr(leaf, "ndim", 0) > 0}
    if len(sizes) != 1:
        raise ValueError(f"context must be a pytree of arrays sharing a leading batch dim, got "
                         f"leading sizes {sorted(sizes)}")
    return sizes.pop()


def _logprobs(logprob_fn: Callable, context: Any, prefix_codes: jax.Array, width: int, *state):
    """logp [B, W, V] float32 (and the new state when a state is given), shape-checked."""
    out = logprob_fn(context, prefix_codes, *state)
    logp, new_state = out if state else (out, None)
    expected = prefix_codes.shape[:2] + (width,)
    if logp.shape != expected:
        raise ValueError(f"logprob_fn returned shape {logp.shape} at level {prefix_codes.shape[2]}, "
                         f"expected {expected} (batch, beams or prefixes, trie width)")
    logp = constrain(logp.astype(jnp.float32), ("batch", None, None))
    return (logp, new_state) if state else logp


def _best(key: jax.Array, k: int) -> jax.Array:
    """Indices [B, k] of the k largest keys per row, ties to the smaller index.

    A stable sort rather than lax.top_k: XLA's TopK is not partitioned along the batch
    (under a data mesh it all-gathers every user's candidates onto every device), while
    a sort along the last axis keeps each device on its own users.
    """
    index = lax.broadcasted_iota(jnp.int32, key.shape, 1)
    _, order = lax.sort((-key, index), dimension=1, num_keys=1, is_stable=True)
    return order[:, :k]


def _from_parents(state: Any, parent: jax.Array) -> Any:
    """Every leaf [B, W, ...] re-indexed so beam j holds its parent beam's entry."""
    return jax.tree.map(lambda x: jax.vmap(lambda rows, p: rows[p])(x, parent), state)


def constrained_beam_search(logprob_fn: Callable, context: Any, trie_tables: TrieTables | Trie,
                            beam: int, state: Any = None) -> tuple[jax.Array, jax.Array]:
    """The `beam` best items per user: (items [B, W] int32, scores [B, W] float32), best first.

    Dead beams have item -1 and score -inf and come last (see the module rules). With a
    `state` (leaves [B, W, ...]) the generator is incremental (see the module docstring).
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    transitions = trie_tables.transitions
    width = int(transitions[0].shape[1])
    n_batch = _batch_size(context)

    prefix_ids = jnp.full((n_batch, beam), -1, jnp.int32).at[:, 0].set(0)    # -1 = dead
    scores = jnp.full((n_batch, beam), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    prefix_codes = jnp.zeros((n_batch, beam, 0), jnp.int32)

    for table in transitions:
        if state is None:
            logp = _logprobs(logprob_fn, context, prefix_codes, width)
        else:
            logp, state = _logprobs(logprob_fn, context, prefix_codes, width, state)
        child = jnp.asarray(table)[jnp.maximum(prefix_ids, 0)]               # [B, W, V]
        allowed = (child >= 0) & (prefix_ids >= 0)[..., None]
        total = jnp.where(allowed, scores[..., None] + logp, -jnp.inf)
        # `total >= floor` is False for -inf and NaN, which both take the floor.
        key = jnp.where(allowed, jnp.where(total >= _LIVE_FLOOR, total, _LIVE_FLOOR), -jnp.inf)
        pick = _best(key.reshape(n_batch, beam * width), beam)              # [B, W]
        parent, code = pick // width, pick % width

        def chosen(x):
            return jnp.take_along_axis(x.reshape(n_batch, beam * width), pick, axis=1)

        alive = chosen(allowed)
        scores = jnp.where(alive, chosen(total), -jnp.inf)
        prefix_ids = jnp.where(alive, chosen(child), DEAD_ITEM)
        # Dead beams carry code 0, so the generator never sees a code outside its level.
        new_code = jnp.where(alive, code, 0)
        prefix_codes = jnp.concatenate(
            [jnp.take_along_axis(prefix_codes, parent[..., None], axis=1), new_code[..., None]], axis=2)
        if state is not None:
            state = _from_parents(state, parent)

        scores = constrain(scores, ("batch", None))
        prefix_ids = constrain(prefix_ids, ("batch", None))
        prefix_codes = constrain(prefix_codes, ("batch", None, None))

    return prefix_ids, scores


def exact_item_scores(logprob_fn: LogprobFn, context: Any, trie: Trie, chunk: int = 256) -> jax.Array:
    """Teacher-forced log-likelihood [B, n_items] float32 of every item for every user.

    Level k scores the trie's P_k distinct length-k prefixes in chunks of `chunk`, and
    scatters parent score + log-prob onto each child prefix (the last level's children
    are the items); unused (prefix, code) pairs are dropped, so every child is written
    exactly once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n_batch, width = _batch_size(context), trie.width
    n_levels = trie.n_levels
    parent_scores = jnp.zeros((n_batch, 1), jnp.float32)

    for level in range(n_levels):
        table = jnp.asarray(trie.transitions[level])
        prefixes = jnp.asarray(trie.prefixes[level])
        n_parents = table.shape[0]
        n_children = trie.n_items if level == n_levels - 1 else trie.prefixes[level + 1].shape[0]
        size = min(chunk, n_parents)
        n_chunks = -(-n_parents // size)
        pad = n_chunks * size - n_parents
        # Padded parents have no children (-1 rows), so their scores are all dropped.
        children = jnp.pad(table, ((0, pad), (0, 0)), constant_values=-1).reshape(n_chunks, size, width)
        codes = jnp.pad(prefixes, ((0, pad), (0, 0))).reshape(n_chunks, size, level)
        before = jnp.pad(parent_scores, ((0, 0), (0, pad))).reshape(n_batch, n_chunks, size)

        def body(child_scores, xs, level=level, size=size, n_children=n_children):
            kids, prefix_codes, scores_in = xs
            prefix_codes = jnp.broadcast_to(prefix_codes, (n_batch, size, level))
            logp = _logprobs(logprob_fn, context, prefix_codes, width)
            total = scores_in[:, :, None] + logp                              # [B, size, V]
            target = jnp.where(kids >= 0, kids, n_children).reshape(-1)       # n_children: dropped
            child_scores = child_scores.at[:, target].set(total.reshape(n_batch, -1), mode="drop")
            return constrain(child_scores, ("batch", None)), None

        init = constrain(jnp.full((n_batch, n_children), -jnp.inf, jnp.float32), ("batch", None))
        parent_scores, _ = lax.scan(body, init, (children, codes, jnp.moveaxis(before, 1, 0)))

    return parent_scores


def topk_differs(beam_items: jax.Array, exact_scores: jax.Array, k: int) -> jax.Array:
    """[B] bool: whether the beam's first k items are not a top-k set of the exact scores.

    Ties: when exact scores tie across the k-th place the exact top-k set is not unique,
    and the beam agrees if its items are *some* top-k set: k distinct live items such
    that every item scoring strictly above the lowest of them is among them (float32
    comparison, so "tie" means bitwise-equal scores). With fewer than k items in the
    catalogue, k = n_items. A dead beam (-1) in the first k, or a NaN exact score of a
    beam item, counts as a difference; NaN scores of other items never outrank.
    """
    if not 1 <= k <= beam_items.shape[1]:
        raise ValueError(f"k must be in 1..beam width ({beam_items.shape[1]}), got {k}")
    k = min(k, exact_scores.shape[1])
    top = beam_items[:, :k]
    live = jnp.all(top >= 0, axis=1)
    got = jnp.take_along_axis(exact_scores, jnp.maximum(top, 0), axis=1)       # [B, k]
    lowest = jnp.min(got, axis=1, keepdims=True)
    # A row reduction instead of a top-k over the catalogue: it shards with the batch.
    above = jnp.sum(exact_scores > lowest, axis=1)
    above_in_beam = jnp.sum(got > lowest, axis=1)
    ids = jnp.sort(top, axis=1)
    distinct = jnp.all(ids[:, 1:] != ids[:, :-1], axis=1)
    same = live & distinct & ~jnp.any(jnp.isnan(got), axis=1) & (above == above_in_beam)
    return ~same


def topk_overlap(beam_items: jax.Array, exact_scores: jax.Array, k: int) -> jax.Array:
    """[B] float32: the share of the exact top-k items (by a stable sort of the exact scores,
    NaN last) that are among the beam's first k live items. 1 where `topk_differs` is False
    and no exact scores tie across the k-th place; how far off the beam is where it differs."""
    if not 1 <= k <= beam_items.shape[1]:
        raise ValueError(f"k must be in 1..beam width ({beam_items.shape[1]}), got {k}")
    k = min(k, exact_scores.shape[1])
    keyed = jnp.where(jnp.isnan(exact_scores), -jnp.inf, exact_scores)
    index = lax.broadcasted_iota(jnp.int32, keyed.shape, 1)
    _, order = lax.sort((-keyed, index), dimension=1, num_keys=1, is_stable=True)
    top = beam_items[:, :k]
    found = (order[:, :k, None] == top[:, None, :]) & (top[:, None, :] >= 0)
    return jnp.any(found, axis=2).sum(1).astype(jnp.float32) / k


def topk_disagreement(beam_items: jax.Array, exact_scores: jax.Array, k: int) -> jax.Array:
    """Fraction (float32 scalar) of users whose beam top-k set differs from the exact one."""
    return jnp.mean(topk_differs(beam_items, exact_scores, k).astype(jnp.float32))
