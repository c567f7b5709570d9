"""Full-ranking evaluation kernels: the target's rank and the top-k over the catalogue.

The item table is scanned in chunks of `chunk` items, so the [B, V] score matrix never
exists in full: memory is O(B * chunk). All kernels are jittable and shard under GSPMD:
the query [batch, embed] by its batch axis, the table by 'items' (each chunk is
constrained to [items, -], so every device scores its slice of every chunk).

Rules shared by every kernel:
- table row 0 is the pad item and is never ranked; candidates are items 1..V-1.
- `exclude` [B, M] lists item ids to remove from a row's ranking (the user's history
  when the protocol says so); 0 entries are padding, repeats are harmless. The target
  itself is always ranked, even if it appears in `exclude`.
- Ties count *against* the target (pessimistic): rank = 1 + #{candidates c != target
  with not (score_c < score_target)}. So a model that scores everything equally gets
  the worst rank, never the best, and NaN scores (target or other) also count against
  the target. Scores are compared as computed: "tie" means bitwise-equal float32.
- Targets outside 1..V-1 (padding examples) get rank INT32_MAX, i.e. zero metrics;
  give them weight 0 when averaging.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.sharding import constrain

NO_RANK = jnp.iinfo(jnp.int32).max


def _chunked_items(table: jax.Array, chunk: int):
    """table[1:] zero-padded to n_chunks * chunk rows, as [n_chunks, chunk, H]."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n_cand = table.shape[0] - 1
    if n_cand < 1:
        raise ValueError("the item table has no items besides the pad row")
    chunk = min(chunk, n_cand)
    n_chunks = -(-n_cand // chunk)
    items = jnp.pad(table[1:], ((0, n_chunks * chunk - n_cand), (0, 0)))
    items = items.reshape(n_chunks, chunk, table.shape[1])
    return constrain(items, (None, "items", None)), chunk


def _excluded(exclude: jax.Array, start, chunk: int) -> jax.Array:
    """[B, chunk] bool: which of items start..start+chunk-1 each row excludes."""
    offset = exclude - start
    inside = (exclude > 0) & (offset >= 0) & (offset < chunk)
    # Out-of-chunk entries land in a spare column that is sliced off.
    col = jnp.where(inside, offset, chunk)
    rows = jnp.broadcast_to(jnp.arange(exclude.shape[0])[:, None], exclude.shape)
    return jnp.zeros((exclude.shape[0], chunk + 1), bool).at[rows, col].set(True)[:, :chunk]


def _scores(query, block):
    return jnp.dot(query, block.T.astype(query.dtype), preferred_element_type=jnp.float32)


def target_ranks(query: jax.Array, table: jax.Array, targets: jax.Array,
                 exclude: jax.Array | None = None, chunk: int = 4096) -> jax.Array:
    """1-based rank [B] int32 of each target among items 1..V-1 (see module rules)."""
    query = constrain(query, ("batch", None))
    V = table.shape[0]
    items, chunk = _chunked_items(table, chunk)
    valid_target = (targets > 0) & (targets < V)
    t = jnp.where(valid_target, targets, 1)
    s_t = jnp.einsum("bh,bh->b", query, table[t].astype(query.dtype), preferred_element_type=jnp.float32)

    def body(count, xs):
        k, block = xs
        start = 1 + k * chunk
        ids = start + jnp.arange(chunk)
        s = _scores(query, block)
        counted = ~(s < s_t[:, None]) & (ids < V)[None, :] & (ids[None, :] != t[:, None])
        if exclude is not None:
            counted &= ~_excluded(exclude, start, chunk)
        return count + jnp.sum(counted, axis=1, dtype=jnp.int32), None

    count0 = jnp.zeros(query.shape[0], jnp.int32)
    count, _ = lax.scan(body, count0, (jnp.arange(items.shape[0]), items))
    return jnp.where(valid_target, 1 + count, NO_RANK)


def top_k(query: jax.Array, table: jax.Array, k: int, exclude: jax.Array | None = None,
          chunk: int = 4096) -> tuple[jax.Array, jax.Array]:
    """The k best items per row: (scores [B, k] float32, items [B, k] int32), best first.

    Ties go to the smaller item id. Rows with fewer than k rankable items are filled
    with score -inf and item 0.
    """
    query = constrain(query, ("batch", None))
    V, B = table.shape[0], query.shape[0]
    items, chunk = _chunked_items(table, chunk)

    def body(carry, xs):
        best_s, best_i = carry
        c, block = xs
        start = 1 + c * chunk
        ids = start + jnp.arange(chunk, dtype=jnp.int32)
        s = _scores(query, block)
        drop = ~(ids < V)[None, :]
        if exclude is not None:
            drop = drop | _excluded(exclude, start, chunk)
        s = jnp.where(drop, -jnp.inf, s)
        # Carried (smaller) ids come first, and top_k is stable, so ties keep them.
        all_s = jnp.concatenate([best_s, s], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, (B, chunk))], axis=1)
        best_s, pos = lax.top_k(all_s, k)
        return (best_s, jnp.take_along_axis(all_i, pos, axis=1)), None

    init = (jnp.full((B, k), -jnp.inf, jnp.float32), jnp.zeros((B, k), jnp.int32))
    (best_s, best_i), _ = lax.scan(body, init, (jnp.arange(items.shape[0]), items))
    return best_s, jnp.where(best_s == -jnp.inf, 0, best_i)


def sampled_ranks(query: jax.Array, table: jax.Array, targets: jax.Array, candidates: jax.Array) -> jax.Array:
    """1-based rank [B] of the target among itself + `candidates` [B, N] (sampled protocols).

    Candidate entries equal to 0 or to the target are ignored; same tie rule.
    """
    ids = jnp.concatenate([targets[:, None], candidates], axis=1)
    # One einsum for target and candidates, so their scores are computed alike.
    s = jnp.einsum("bh,bnh->bn", query, table[ids].astype(query.dtype), preferred_element_type=jnp.float32)
    counted = ~(s[:, 1:] < s[:, :1]) & (candidates > 0) & (candidates != targets[:, None])
    valid_target = (targets > 0) & (targets < table.shape[0])
    return jnp.where(valid_target, 1 + jnp.sum(counted, axis=1, dtype=jnp.int32), NO_RANK)
