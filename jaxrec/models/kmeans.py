"""Codebook fitting and balanced assignment: k-means, Sinkhorn-Knopp, dead-code restarts.

All functions are pure jnp (jittable, seeded by an explicit key) except the input checks
of `kmeans`, which look at concrete data on the host.

Distances
---------
    d[b, j] = ||x_b||^2 - 2 <x_b, c_j> + ||c_j||^2

computed with the matmul at HIGHEST precision: an assignment must not depend on a
backend's default f32 matmul precision (bf16 passes on TPU/GPU would reorder near
neighbours). The codebooks are small, so this costs little.

k-means (initialisation of a codebook from encoder outputs)
----------------------------------------------------------
Seeds: k-means++ (D^2 sampling, default) or k rows sampled uniformly without replacement. Then a
fixed number of Lloyd iterations (default 100, LETTER's `kmeans_iters`): assign every
point to its nearest centroid, move each centroid to the mean of its points. A centroid
that loses all its points keeps its position (our choice: deterministic, and the
dead-code restart exists for the codes that end up unused). A fixed iteration count
(no tolerance test) keeps the loop a static `fori_loop`.

Provenance. LETTER code: `RQVAE.vq_initialization` runs once over the whole item
table, level by level on the residuals, and `VectorQuantizer.init_emb` actually calls a
*size-constrained* k-means (`k_means_constrained.KMeansConstrained`, 10 iterations,
n_init 10, min/max cluster sizes); the plain sklearn `kmeans(..., kmeans_iters)` is
commented out, so `kmeans_iters=100` is passed but unused there. We run plain Lloyd's
with 100 iterations (the TIGER / RQ-VAE convention) and leave balance to Sinkhorn and
dead-code restarts.

Sinkhorn-Knopp balanced assignment (LETTER code: `sinkhorn_algorithm`, `sk_epsilons`)
-------------------------------------------------------------------------------------
LETTER rescales the [B, n] distance matrix to [-1, 1] with its global min and max
(`center_distance_for_constraint`), forms Q = exp(-d / eps), and alternately scales
rows to sum 1/B and columns to sum 1/n for `sk_iters` rounds (50 in its main.py); the
code of row b is argmax_j Q[b, j]. LETTER computes in float64 because exp(1/0.003)
overflows float32. We run the identical iteration in the log domain (log-sum-exp
normalisations), which is exact in float32 and stable for any eps. Padded (invalid)
codes get log Q = -inf and are excluded from the column marginal (n = number of valid
codes), so they are never chosen.

Dead-code restart (our choice; the usual cure for codebook collapse, e.g.
RQ-VAE-Recommender #28/#47)
--------------------------------------------------------------------------------
Given usage counts over a recent window, every valid code used fewer than `min_count`
times is replaced by a random encoder output from the current batch (distinct rows
while the batch has enough of them). LETTER has no restart.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """||x_b - c_j||^2 for x [..., e] and codebook [n, e] -> [..., n] (float32 or wider)."""
    cross = jnp.einsum("...e,ne->...n", x, codebook, precision=HIGHEST)
    x_sq = jnp.sum(x * x, axis=-1, keepdims=True)
    c_sq = jnp.sum(codebook * codebook, axis=-1)
    # Clamp: the expanded form can dip a few ulps below zero for a point on a centroid.
    return jnp.maximum(x_sq - 2.0 * cross + c_sq, 0.0)


def masked_argmin(distances: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Index of the smallest distance along the last axis, skipping codes with valid=False."""
    if valid is not None:
        distances = jnp.where(valid, distances, jnp.inf)
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ k-means

class KMeansResult(NamedTuple):
    centroids: jax.Array   # [k, e]
    assignment: jax.Array  # int32 [N]: nearest final centroid of each point


def kmeans_plusplus_seeds(points: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: the first seed uniform, each next one drawn with probability
    proportional to its squared distance to the nearest seed so far. [N, e] -> [k, e]."""
    n = points.shape[0]
    key, first_key = jax.random.split(key)
    first = points[jax.random.randint(first_key, (), 0, n)]
    seeds = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
    nearest_sq = squared_distances(points, first[None])[:, 0]

    def add_seed(i, carry):
        seeds, nearest_sq, key = carry
        key, draw_key = jax.random.split(key)
        # log(0) = -inf: points already chosen (or duplicates of them) are never drawn again.
        logits = jnp.where(nearest_sq > 0, jnp.log(jnp.maximum(nearest_sq, 1e-30)), -jnp.inf)
        # If every point coincides with a seed (fewer distinct points than k, only reachable
        # inside jit where `kmeans` cannot check), fall back to uniform rather than NaN.
        logits = jnp.where(jnp.any(nearest_sq > 0), logits, 0.0)
        seed = points[jax.random.categorical(draw_key, logits)]
        nearest_sq = jnp.minimum(nearest_sq, squared_distances(points, seed[None])[:, 0])
        return seeds.at[i].set(seed), nearest_sq, key

    seeds, _, _ = jax.lax.fori_loop(1, k, add_seed, (seeds, nearest_sq, key))
    return seeds


def random_sample_seeds(points: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k rows of `points` drawn uniformly without replacement. [N, e] -> [k, e]."""
    return points[jax.random.choice(key, points.shape[0], (k,), replace=False)]


def lloyd_step(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """One Lloyd iteration; an empty cluster keeps its centroid."""
    k = centroids.shape[0]
    assignment = masked_argmin(squared_distances(points, centroids))
    sums = jax.ops.segment_sum(points, assignment, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones(points.shape[0], points.dtype), assignment, num_segments=k)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where((counts > 0)[:, None], means, centroids)


def lloyd(points: jax.Array, centroids: jax.Array, iters: int) -> KMeansResult:
    """`iters` Lloyd iterations from `centroids`, then the final assignment."""
    centroids = jax.lax.fori_loop(0, iters, lambda _, c: lloyd_step(points, c), centroids)
    return KMeansResult(centroids, masked_argmin(squared_distances(points, centroids)))


def _kmeans(points: jax.Array, key: jax.Array, k: int, iters: int, init: str) -> KMeansResult:
    seeds = kmeans_plusplus_seeds(points, k, key) if init == "kmeans++" else random_sample_seeds(points, k, key)
    return lloyd(points, seeds, iters)


_kmeans_jit = jax.jit(_kmeans, static_argnames=("k", "iters", "init"))


def kmeans(points: jax.Array, k: int, key: jax.Array, iters: int = 100, init: str = "kmeans++") -> KMeansResult:
    """k-means of `points` [N, e]: `init` seeds ("kmeans++" | "random"), then `iters` Lloyd steps.

    Raises ValueError for a non-2-D input, an unknown init, or k larger than the number of
    distinct points (a codebook of k codes cannot then have k distinct centroids). The
    distinct-point check needs concrete data; traced inside jit it is skipped.
    """
    if init not in ("kmeans++", "random"):
        raise ValueError(f"kmeans: init must be 'kmeans++' or 'random', got {init!r}")
    if getattr(points, "ndim", None) != 2:
        raise ValueError(f"kmeans: points must be 2-D [n_points, dim], got shape {getattr(points, 'shape', None)}")
    if k < 1 or iters < 0:
        raise ValueError(f"kmeans: need k >= 1 and iters >= 0, got k={k}, iters={iters}")
    if not isinstance(points, jax.core.Tracer):
        n_distinct = len(np.unique(np.asarray(points), axis=0))
        if k > n_distinct:
            raise ValueError(f"kmeans: k={k} clusters requested but the data has only {n_distinct} distinct "
                             f"points ({points.shape[0]} rows)")
    return _kmeans_jit(jnp.asarray(points), key, k=k, iters=iters, init=init)


# ------------------------------------------------------------------------------ Sinkhorn

def sinkhorn_log_plan(distances: jax.Array, epsilon: float, iters: int = 50,
                      valid: jax.Array | None = None) -> jax.Array:
    """log of LETTER's Sinkhorn plan Q [B, n] for a distance matrix [B, n].

    Distances are first rescaled to [-1, 1] by their global min/max (LETTER code), so
    `epsilon` is a temperature on that scale. Each round scales rows to sum 1/B, then
    columns to sum 1/n_valid; the result is multiplied by B (rows ~ 1, columns B/n_valid).
    """
    if distances.ndim != 2:
        raise ValueError(f"sinkhorn: distances must be [batch, codes], got shape {distances.shape}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    b, n = distances.shape
    valid = jnp.ones((n,), bool) if valid is None else valid
    n_valid = jnp.sum(valid).astype(distances.dtype)
    lo = jnp.min(jnp.where(valid, distances, jnp.inf))
    hi = jnp.max(jnp.where(valid, distances, -jnp.inf))
    middle = (hi + lo) / 2
    amplitude = hi - middle + 1e-5
    log_q = jnp.where(valid, -(distances - middle) / amplitude / epsilon, -jnp.inf)

    def normalise(_, log_q):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - math.log(b)
        column_mass = jax.nn.logsumexp(log_q, axis=0, keepdims=True)
        # where(): an invalid column is all -inf and -inf - (-inf) would be NaN.
        return jnp.where(valid, log_q - column_mass - jnp.log(n_valid), -jnp.inf)

    return jax.lax.fori_loop(0, iters, normalise, log_q) + math.log(b)


def sinkhorn_codes(distances: jax.Array, epsilon: float, iters: int = 50,
                   valid: jax.Array | None = None) -> jax.Array:
    """Balanced codes int32 [B]: argmax over codes of the Sinkhorn plan (LETTER code)."""
    return jnp.argmax(sinkhorn_log_plan(distances, epsilon, iters, valid), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ dead codes

def code_usage(codes: jax.Array, codebook_size: int) -> jax.Array:
    """How often each code occurs: codes int [...] -> int32 [codebook_size]."""
    return jnp.zeros((codebook_size,), jnp.int32).at[codes.reshape(-1)].add(1)


def restart_dead_codes(codebook: jax.Array, usage: jax.Array, candidates: jax.Array, key: jax.Array,
                       valid: jax.Array | None = None, min_count: int = 1) -> jax.Array:
    """Re-initialise the codes used fewer than `min_count` times to random encoder outputs.

    codebook [n, e]; usage [n] (counts over the recent window); candidates [M, e] (encoder
    outputs of a batch); valid [n] (False for padding rows, which are never touched).
    Dead codes take distinct candidate rows (a random permutation, in code order) as
    long as M >= number of dead codes, cycling through it otherwise. Returns [n, e].
    """
    if codebook.ndim != 2 or candidates.ndim != 2 or usage.shape != codebook.shape[:1] or not candidates.shape[0]:
        raise ValueError(f"restart_dead_codes: need codebook [n, e], usage [n], candidates [M >= 1, e]; got "
                         f"{codebook.shape}, {usage.shape}, {candidates.shape}")
    dead = usage < min_count
    if valid is not None:
        dead = dead & valid
    order = jax.random.permutation(key, candidates.shape[0])
    rank = jnp.cumsum(dead) - 1          # 0, 1, 2, ... over the dead codes
    replacement = candidates[order[jnp.maximum(rank, 0) % candidates.shape[0]]]
    return jnp.where(dead[:, None], replacement.astype(codebook.dtype), codebook)


def restart_dead_level_codes(codebooks: jax.Array, usage: jax.Array, candidates: jax.Array, key: jax.Array,
                             valid: jax.Array | None = None, min_count: int = 1) -> jax.Array:
    """`restart_dead_codes` for every level of stacked codebooks [K, n, e].

    usage [K, n]; candidates [M, K, e] (level k's codes restart from level k's inputs,
    e.g. LevelQuantizer inputs or ResidualQuantizer residuals); valid [K, n] or None.
    """
    n_levels = codebooks.shape[0]
    valid = jnp.ones(codebooks.shape[:2], bool) if valid is None else valid
    keys = jax.random.split(key, n_levels)
    return jax.vmap(lambda c, u, x, k, v: restart_dead_codes(c, u, x, k, v, min_count),
                    in_axes=(0, 0, 1, 0, 0))(codebooks, usage, candidates, keys, valid)
