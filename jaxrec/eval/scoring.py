"""The space in which a query is scored against an item table.

Shared by every task that ranks items against an embedding table (SASRec/GRU4Rec,
CaseQ, iLoRA's guide) and by the exported recommender, so training, evaluation and
serving score identically.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def score_space(h: jax.Array, table: jax.Array, similarity: str, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(query, table) such that `query @ table.T` are the model's scores.

    "dot": unchanged. "cosine": both sides unit-normalised, the query divided by the
    temperature (so the temperature scales the logits, not the table)."""
    if similarity == "dot":
        return h, table
    if similarity != "cosine":
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")

    def unit(x):
        norm2 = jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
        return x * jax.lax.rsqrt(jnp.maximum(norm2, 1e-12)).astype(x.dtype)

    return unit(h) / temperature, unit(table)
