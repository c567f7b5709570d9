"""CaseQ's backdoor-adjusted variational objective: the KL term and its prior.

    log P(Y | do(S)) >= E_q(c|S)[log P(Y | S, c)] - KL(q(c|S) || P(c))

The prior P(c) over the C^K contexts is estimated each step as the mixture of the
model's own posteriors on N pseudo sequences of uniformly random items (redrawn every
step, not learned), read at their last position:

    p_hat = (1/N) sum_n q(. | S_n)[last]                    [C^K]

and the KL is averaged over the valid positions of the batch (torch's
KLDivLoss(batchmean) on the valid rows, as in the official code):

    L_KL = (1/n_valid) sum_{valid (b,t)} sum_c q (log q - log p_hat)

Gradients flow through q and through p_hat (the prior is not detached). p_hat is a
mixture of products, not a product, so the KL does not factorise over levels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _x_log_y(x: jax.Array, y: jax.Array) -> jax.Array:
    """x * log(y) with 0 * log 0 = 0 and a finite gradient everywhere.

    `jax.scipy.special.xlogy` has the right value but its gradient at y = 0 is
    -inf/NaN, and NaN * 0 is still NaN after masking; clamping y at the smallest
    normal float keeps the value (x = 0 there) and makes the gradient finite.
    """
    tiny = jnp.finfo(jnp.result_type(y)).tiny
    return x * jnp.log(jnp.maximum(y, tiny))


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy in nats of distributions along `axis` (0 log 0 = 0)."""
    return -jnp.sum(_x_log_y(p, p), axis=axis)


def context_kl(q: jax.Array, prior: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over valid positions of KL(q_bt || prior): q [B, L, P], prior [P], valid [B, L]."""
    if q.shape[-1] != prior.shape[-1] or q.shape[:-1] != valid.shape:
        raise ValueError(f"context_kl: q {q.shape}, prior {prior.shape} and valid {valid.shape} disagree")
    q = q.astype(jnp.float32)
    prior = prior.astype(jnp.float32)
    rows = jnp.sum(_x_log_y(q, q) - _x_log_y(q, prior), axis=-1)
    valid = valid.astype(jnp.float32)
    return jnp.sum(rows * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def pseudo_sequences(rng: jax.Array, n: int, length: int, n_items: int) -> jax.Array:
    """int32 [n, length] items drawn uniformly from 1..n_items, no padding."""
    return jax.random.randint(rng, (n, length), 1, n_items + 1, dtype=jnp.int32)


def mixture_prior(q_pseudo: jax.Array) -> jax.Array:
    """p_hat [P]: the mean over pseudo sequences of q at their last position ([N, L, P] in)."""
    return jnp.mean(q_pseudo[:, -1].astype(jnp.float32), axis=0)
