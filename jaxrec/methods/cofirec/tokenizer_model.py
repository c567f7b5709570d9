"""The tokenizer's networks and pure losses, for both modes (see docs/cofirec.md, "Tokenizer").

levels (CoFiRec)   x_sem [B, K_sem, d]  --f_Sem (shared MLP)-->  h [B, K_sem, e]
                   x_cf  [B, d_cf]      --f_CF (own MLP)------>  h [B, 1, e]     (optional)
                   h [B, K, e] --LevelQuantizer (one independent codebook per level)--> q
                   q[:, :K_sem] --g_Sem--> x_sem_hat,   q[:, K_sem] --g_CF--> x_cf_hat
residual (TIGER)   x [B, d] (the fused levels) --MLP--> h [B, e] --ResidualQuantizer--> q --MLP--> x_hat

    loss = ||x_hat - x||^2 (summed over dims and levels, mean over the batch)
         + sum_levels ( ||sg(h) - C[s]||^2 + beta ||h - sg(C[s])||^2 )

Codebooks are trainable parameters C [K, n_max, e] (logical axes levels, codebook, embed).
Dead-code restart moves codes without touching the parameters: the model state holds a
shift S of the same shape and the quantizer always sees C + S. A restart sets, for every
code used by no item of the batches since the last restart, S := x - C with x a random
encoder output of the current batch (residual mode: the residual that level sees), so the
effective code becomes x; gradients still reach C through the sum. (The loss cannot write
parameters; the trainer owns the optimizer. Adam's moments of a restarted code stay as
they were.)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models.kmeans import code_usage, restart_dead_level_codes
from jaxrec.models.quantizers import (MLP, LevelQuantizer, QuantizerOutput, ResidualQuantizer,
                                      kmeans_level_codebooks, kmeans_residual_codebooks,
                                      valid_code_mask)
from jaxrec.sharding import constrain

sg = jax.lax.stop_gradient
CODEBOOK_AXES = ("levels", "codebook", "embed")


@dataclasses.dataclass(frozen=True)
class TokenizerNet:
    """Static description of the networks; every method is pure in (params, inputs)."""
    mode: str                          # "levels" | "residual"
    d_in: int                          # levels: per-level text dim d; residual: fused dim
    n_sem: int                         # levels: semantic levels K_sem; residual: 1 (one fused vector)
    d_cf: int                          # CF input dim; 0 = no CF level (always 0 in residual mode)
    codebook_sizes: tuple[int, ...]    # per code level (levels: K_sem [+ 1]; residual: L)
    latent: int = 32
    hidden: tuple[int, ...] = (256, 128)
    cf_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0
    beta: float = 0.25
    sinkhorn_epsilon: float = 0.0      # on the last level only (LETTER)
    sinkhorn_iters: int = 50
    stop_residual_gradient: bool = True

    # ------------------------------------------------------------------ modules
    @property
    def n_levels(self) -> int:
        return len(self.codebook_sizes)

    def _mlps(self) -> dict:
        e, mlps = self.latent, {}
        mlps["encoder"] = MLP((*self.hidden, e), self.dropout)
        mlps["decoder"] = MLP((*self.hidden[::-1], self.d_in), self.dropout)
        if self.d_cf:
            mlps["cf_encoder"] = MLP((*self.cf_hidden, e), self.dropout)
            mlps["cf_decoder"] = MLP((*self.cf_hidden[::-1], self.d_cf), self.dropout)
        return mlps

    def quantizer(self):
        eps = (0.0,) * (self.n_levels - 1) + (self.sinkhorn_epsilon,)
        if self.mode == "residual":
            return ResidualQuantizer(self.codebook_sizes, self.latent, self.beta, self.stop_residual_gradient,
                                     eps, self.sinkhorn_iters)
        return LevelQuantizer(self.codebook_sizes, self.latent, self.beta, eps, self.sinkhorn_iters)

    # ------------------------------------------------------------------ init
    def init(self, rng: jax.Array, x_sem: jax.Array, x_cf: jax.Array | None, kmeans_iters: int = 100
             ) -> dict:
        """Boxed params. Codebooks: k-means of the initial encoder outputs of all items
        (`kmeans_iters` > 0; LETTER's init), else uniform(-1/n, 1/n)."""
        keys = dict(zip(("encoder", "decoder", "cf_encoder", "cf_decoder", "quantizer", "kmeans"),
                        jax.random.split(rng, 6)))
        latent_shape = (1, self.latent)
        params = {}
        for name, mlp in self._mlps().items():
            width = {"encoder": self.d_in, "cf_encoder": self.d_cf}.get(name, self.latent)
            params[name] = mlp.init(keys[name], jnp.zeros((1, width)))["params"]
        h0 = jnp.zeros((1, self.n_levels, self.latent) if self.mode == "levels" else latent_shape)
        params["quantizer"] = self.quantizer().init(keys["quantizer"], h0)["params"]
        if kmeans_iters > 0:
            h = self.encode(nn.unbox(params), x_sem, x_cf)
            if self.mode == "levels":
                books = kmeans_level_codebooks(h, self.codebook_sizes, keys["kmeans"], kmeans_iters)
            else:
                books = kmeans_residual_codebooks(h, self.codebook_sizes, keys["kmeans"], kmeans_iters)
            params["quantizer"]["codebooks"] = params["quantizer"]["codebooks"].replace_boxed(books)
        return params

    def init_state(self) -> dict:
        shape = (self.n_levels, max(self.codebook_sizes))
        return {"usage": jnp.zeros(shape, jnp.int32),
                "shift": nn.LogicallyPartitioned(jnp.zeros((*shape, self.latent)), CODEBOOK_AXES)}

    # ------------------------------------------------------------------ forward
    def encode(self, params: dict, x_sem: jax.Array, x_cf: jax.Array | None, rng: jax.Array | None = None
               ) -> jax.Array:
        """h: levels [B, K, e]; residual [B, e]."""
        mlps = self._mlps()
        rngs = _rngs(rng, 0)
        h = mlps["encoder"].apply({"params": params["encoder"]}, x_sem, deterministic=rng is None, rngs=rngs)
        if self.mode == "residual":
            return constrain(h, ("batch", "embed"))
        if self.d_cf:
            h_cf = mlps["cf_encoder"].apply({"params": params["cf_encoder"]}, x_cf, deterministic=rng is None,
                                            rngs=_rngs(rng, 1))
            h = jnp.concatenate([h, h_cf[:, None]], axis=1)
        return constrain(h, ("batch", "levels", "embed"))

    def decode(self, params: dict, q: jax.Array, rng: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
        mlps = self._mlps()
        sem = q if self.mode == "residual" else q[:, :self.n_sem]
        x_sem = mlps["decoder"].apply({"params": params["decoder"]}, sem, deterministic=rng is None,
                                      rngs=_rngs(rng, 2))
        x_cf = None
        if self.d_cf:
            x_cf = mlps["cf_decoder"].apply({"params": params["cf_decoder"]}, q[:, self.n_sem],
                                            deterministic=rng is None, rngs=_rngs(rng, 3))
        return x_sem, x_cf

    def quantize(self, params: dict, shift: jax.Array, h: jax.Array, use_sinkhorn: bool) -> QuantizerOutput:
        codebooks = params["quantizer"]["codebooks"] + sg(shift)
        return self.quantizer().apply({"params": {"codebooks": codebooks}}, h, use_sinkhorn=use_sinkhorn)

    def forward(self, params: dict, state: dict, x_sem, x_cf, rng=None, use_sinkhorn: bool = False):
        """(quantizer output, encoder output h, reconstruction loss [B])."""
        h = self.encode(params, x_sem, x_cf, rng)
        out = self.quantize(params, state["shift"], h, use_sinkhorn)
        rec_sem, rec_cf = self.decode(params, out.quantized, rng)
        per_item = _sum_sq(rec_sem - x_sem)
        if self.d_cf:
            per_item = per_item + _sum_sq(rec_cf - x_cf)
        return out, h, per_item

    def loss(self, params, state, x_sem, x_cf, rng, step, restart_every: int, restart_last_step: int,
             last_micro: jax.Array):
        """(loss, (metrics, new state)); a restart happens after micro-batch `last_micro` of every
        `restart_every`-th step while step < restart_last_step."""
        dropout_rng, restart_rng = jax.random.split(rng)
        out, h, per_item = self.forward(params, state, x_sem, x_cf, dropout_rng if self.dropout else None,
                                        use_sinkhorn=self.sinkhorn_epsilon > 0)
        recon = jnp.mean(per_item)
        loss = recon + out.loss
        n_max = max(self.codebook_sizes)
        usage = state["usage"] + jax.vmap(lambda c: code_usage(c, n_max), in_axes=1)(out.codes)
        shift = state["shift"]
        if restart_every > 0:
            codebooks = params["quantizer"]["codebooks"] + shift
            candidates = sg(self.level_inputs(codebooks, h, out.codes))
            restarted = restart_dead_level_codes(sg(codebooks), usage, candidates, restart_rng,
                                                 jnp.asarray(valid_code_mask(self.codebook_sizes)))
            due = ((step + 1) % restart_every == 0) & (step + 1 < restart_last_step) & last_micro
            shift = jnp.where(due, shift + (restarted - sg(codebooks)), shift)
            usage = jnp.where(due, jnp.zeros_like(usage), usage)
        metrics = {"recon": recon, "codebook": jnp.sum(out.codebook_loss), "commitment": jnp.sum(out.commitment_loss)}
        return loss, (metrics, {"usage": usage, "shift": shift})

    def level_inputs(self, codebooks: jax.Array, h: jax.Array, codes: jax.Array) -> jax.Array:
        """[B, L, e]: what each level's codebook quantizes (levels: h; residual: the residuals)."""
        if self.mode == "levels":
            return h
        residual, out = h, []
        for level in range(self.n_levels):
            out.append(residual)
            residual = residual - codebooks[level][codes[:, level]]
        return jnp.stack(out, axis=1)


def _sum_sq(error: jax.Array) -> jax.Array:
    """Per-row squared error summed over every non-batch axis: [B]."""
    return jnp.sum(jnp.square(error).reshape(error.shape[0], -1), axis=1)


def _rngs(rng: jax.Array | None, index: int) -> dict:
    return {} if rng is None else {"dropout": jax.random.fold_in(rng, index)}


def standardize(array: np.ndarray) -> np.ndarray:
    """Per level and dimension z-scores over the items (row 0, the padding item, excluded and
    kept zero), then scaled by 1/sqrt(d) so an item's level vector has mean squared norm 1.

    array: [n_items + 1, L, d] or [n_items + 1, d]. Constant dimensions become 0. LLM text
    embeddings crowd in a narrow cone (SmolLM2: cosine >= 0.91 between unrelated items) with
    a few huge-magnitude dimensions; centring and per-dimension scaling spread them out.
    """
    x = np.asarray(array, np.float64)
    body = x[1:]
    mean, std = body.mean(axis=0), body.std(axis=0)
    z = (body - mean) / np.where(std > 1e-8 * np.maximum(np.abs(mean), 1.0), std, np.inf)
    out = np.zeros_like(x)
    out[1:] = z / np.sqrt(x.shape[-1])
    return out.astype(np.float32)


def distinct_rows(x: np.ndarray) -> int:
    return len(np.unique(np.ascontiguousarray(x).reshape(x.shape[0], -1), axis=0))


def check_sizes(sizes: Sequence[int]) -> None:
    if not sizes or min(sizes) < 1:
        raise ValueError(f"codebook sizes must be positive, got {list(sizes)}")
