"""CaseQ's hierarchical branching: any stacked backbone becomes levels of context branches.

Level k of the encoder (see `jaxrec.models.encoder`, the level hook) holds C copies of
the backbone unit and a per-position gate; with h the level input [B, L, H]:

    g_t   = softmax_j( w2_j . tanh(W1_j^T h_t) )            [B, L, C], zero at pads
    h'_t  = sum_j g_t,j * Unit_j(h)_t                        [B, L, H]

The C units of a level all read the same h. The official code keeps a redundant slot
axis ([B, L, C, H], C identical copies of h) and averages the gate over it at the last
level; since the slots start identical they stay identical, so dropping the axis is
exact (spec section 7).

The C copies are independent units built by the backbone's own `make_unit` factory
(`branch_0 .. branch_{C-1}`), so the wrapper never forks a backbone. They are a Python
loop rather than one `nn.vmap` over a stacked "expert" axis: on XLA:CPU the vmapped
matmuls become batched 3-D products that cost more than C plain ones (a CaseQ step on
ML-1M budget shapes measured 2.6x its backbone with vmap and 2.2x with the loop for SASRec,
3.0x and 2.6x for GRU4Rec).

The path distribution over the C^K contexts is the product of the level gates,
q(c_1..c_K | S) = prod_k g^(k)_{c_k}, flattened with level 1 varying slowest (the
order of the official code; any fixed order works as long as q and the prior share it).
Each level sows its gate as `intermediates/levels_{k}/gate`; `level_gates` collects them.

Init (torch, spec section 3): W1 [C, H, H] xavier-normal with torch's fans (H*H, C*H),
w2 [C, H, 1] with (H, C); the units keep their backbone's own init.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.layers import logical, torch_xavier_normal

UnitFactory = Callable[..., nn.Module]


class ContextGate(nn.Module):
    """g [B, L, C] = softmax_j(w2_j . tanh(W1_j^T x)), rows at pads set to 0."""
    n_contexts: int
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        C, H = self.n_contexts, self.hidden
        w1 = self.param("hidden_kernel", logical(torch_xavier_normal(H * H, C * H), ("expert", "embed", "mlp")),
                        (C, x.shape[-1], H), self.param_dtype)
        w2 = self.param("out_kernel", logical(torch_xavier_normal(H, C), ("expert", "mlp")), (C, H),
                        self.param_dtype)
        a = jnp.tanh(jnp.einsum("blh,chk->blck", x.astype(self.dtype), w1.astype(self.dtype)))
        logits = jnp.einsum("blck,ck->blc", a, w2.astype(self.dtype), preferred_element_type=jnp.float32)
        gate = jax.nn.softmax(logits, axis=-1)
        return jnp.where(valid[..., None], gate, 0.0)


class BranchingLevel(nn.Module):
    """A level of C context branches (copies of one backbone unit), mixed by a per-position gate.

    Called like a unit: `(x [B,L,H], valid [B,L], deterministic, last_only) -> [B,L',H]`
    (L' = 1 with last_only). Sows `gate` [B, L', C] (probabilities, 0 at pads). With
    C = 1 the gate is identically 1 (a softmax over one branch), so no gate parameters
    are created and the level is exactly its unit.
    """
    make_unit: UnitFactory
    n_contexts: int
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True,
                 last_only: bool = False) -> jax.Array:
        C = self.n_contexts
        ys = [self.make_unit(name=f"branch_{j}")(x, valid, deterministic, last_only=last_only) for j in range(C)]
        x_at, valid_at = (x[:, -1:], valid[:, -1:]) if last_only else (x, valid)
        if C == 1:
            self.sow("intermediates", "gate", valid_at[..., None].astype(jnp.float32))
            return ys[0]
        gate = ContextGate(C, self.hidden, self.dtype, self.param_dtype, name="gating")(x_at, valid_at)
        self.sow("intermediates", "gate", gate)
        mixed = ys[0] * gate[..., :1].astype(ys[0].dtype)
        for j in range(1, C):
            mixed = mixed + ys[j] * gate[..., j:j + 1].astype(ys[j].dtype)
        return mixed


def branching_levels(n_contexts: int, hidden: int, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32) -> Callable[[int, UnitFactory], nn.Module]:
    """The `make_level` hook that turns every backbone layer into a `BranchingLevel`."""
    if n_contexts < 1:
        raise ValueError(f"n_contexts must be >= 1, got {n_contexts}")

    def make_level(index: int, make_unit: UnitFactory) -> nn.Module:
        del index
        return BranchingLevel(make_unit=make_unit, n_contexts=n_contexts, hidden=hidden, dtype=dtype,
                              param_dtype=param_dtype)

    return make_level


def level_gates(intermediates: Mapping[str, Any], n_levels: int) -> list[jax.Array]:
    """The gates [B, L_k, C] sown by levels 0..n_levels-1 in one `apply`."""
    try:
        return [intermediates["levels_" + str(k)]["gate"][-1] for k in range(n_levels)]
    except KeyError as e:
        raise ValueError(f"no gate sown by level {e.args[0]!r}: was the encoder built with branching_levels "
                         "and applied with mutable=['intermediates']?") from None


def path_distribution(gates: Sequence[jax.Array]) -> jax.Array:
    """q [B, L, C^K]: the outer product of the level gates [B, L_k, C], level 1 slowest.

    Gates of different lengths (earlier levels are full-length, the last one may be
    last-position only) are aligned at their last position: L = min L_k.
    """
    length = min(g.shape[1] for g in gates)
    q = None
    for g in gates:
        g = g[:, g.shape[1] - length:]
        q = g if q is None else (q[..., :, None] * g[..., None, :]).reshape(*g.shape[:-1], -1)
    return q
