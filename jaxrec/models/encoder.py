"""The sequence encoder shared by SASRec, GRU4Rec and the methods built on them.

    x = E[s] * sqrt(H)  (+ P[positions], SASRec)      E: [n_items + 1, H], row 0 = pad
    x = dropout(x); x[pads] = 0
    for k in range(n_layers):  x = level_k(x, valid, deterministic)
    h = LayerNorm(x)                                   [B, L, H]; score(i) = <h_t, E[i]>

Conventions: item 0 is padding, items are 1..n_items; sequences are LEFT-padded, the
newest item sits at the last position; valid = inputs > 0. Inputs may be shorter than
`max_len`: positions are counted from the right end (the last position always uses
P[max_len - 1]), so with pad keys masked a sequence's outputs do not depend on how
much left padding it carries. Item ids are not range-checked here (jit cannot raise);
the data layer guarantees 0 <= id <= n_items.

The level hook (the contract CaseQ relies on)
---------------------------------------------
`make_unit(**overrides) -> nn.Module` builds one fresh backbone unit (SASRecBlock or
GRULayer, already configured). `make_level(index, make_unit) -> nn.Module` builds
level `index`; by default the level is just `make_unit()`. It is called from the
encoder's `setup`, so its module becomes the child `levels_{index}`. A custom level
should create its units *inside its own* `setup`/`compact` (call `make_unit()` there;
do not pass pre-built units in as attributes) so that each copy owns its parameters.

Units and levels are all called as

    level(x [B, L, H], valid [B, L] bool, deterministic: bool, last_only: bool) -> y

with y = [B, L, H], zero at pads; with last_only=True, y = [B, 1, H] and must equal
the full output's last row (a level that cannot save work may compute everything and
slice). A level may record diagnostics with `self.sow("intermediates", name, value)`;
callers collect them with `apply(..., mutable=["intermediates"])`.

GRU4Rec: RecBole adds Dense(H -> H) after the GRU stack because its GRU width may
differ from the embedding width. Here they are equal and the final LayerNorm is kept
for every backbone (CaseQ's output is LN of the mixed levels), so no extra Dense:
GRU4Rec = embedding -> GRU levels -> LayerNorm -> tied item table.

Init (torch xavier-normal, see layers.py): E std sqrt(2/(H + n_items + 1)), P std
sqrt(2/(H + max_len)); the final LayerNorm 1/0.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.gru4rec import GRULayer
from jaxrec.models.layers import Dropout, layer_norm, logical, torch_xavier_normal, zero_pads
from jaxrec.sharding import constrain
from jaxrec.models.sasrec import SASRecBlock

UnitFactory = Callable[..., nn.Module]
LevelFactory = Callable[[int, UnitFactory], nn.Module]


class SequenceEncoder(nn.Module):
    n_items: int
    max_len: int
    hidden: int
    n_layers: int
    make_unit: UnitFactory
    make_level: LevelFactory | None = None
    use_positions: bool = True
    scale_embedding: bool = True
    dropout: float = 0.2
    ln_eps: float = 1e-8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        H, V = self.hidden, self.n_items + 1
        self.item_embedding = self.param(
            "item_embedding", logical(torch_xavier_normal(H, V), ("items", "embed")), (V, H), self.param_dtype)
        if self.use_positions:
            self.position_embedding = self.param(
                "position_embedding", logical(torch_xavier_normal(H, self.max_len), ("seq", "embed")),
                (self.max_len, H), self.param_dtype)
        make_level = self.make_level or (lambda index, make_unit: make_unit())
        self.levels = [make_level(k, self.make_unit) for k in range(self.n_layers)]
        self.embed_dropout = Dropout(self.dropout)
        self.final_norm = layer_norm(self.ln_eps, self.dtype, self.param_dtype)

    def __call__(self, inputs: jax.Array, deterministic: bool = True, last_only: bool = False) -> jax.Array:
        """inputs [B, L] int item ids (L <= max_len) -> h [B, L, H], or [B, H] if last_only."""
        if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"encoder inputs must be an integer [batch, seq] array, got {inputs.dtype}{inputs.shape}")
        L = inputs.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_len={self.max_len}")
        valid = inputs > 0
        x = jnp.take(self.item_embedding, inputs, axis=0).astype(self.dtype)
        if self.scale_embedding:
            x = x * jnp.asarray(math.sqrt(self.hidden), self.dtype)
        if self.use_positions:
            x = x + self.position_embedding[self.max_len - L:].astype(self.dtype)
        x = zero_pads(self.embed_dropout(x, deterministic), valid)
        x = constrain(x, ("batch", "seq", "embed"))
        for k, level in enumerate(self.levels):
            x = constrain(level(x, valid, deterministic, last_only=last_only and k == self.n_layers - 1),
                              ("batch", "seq", "embed"))
        h = self.final_norm(x)
        return h[:, -1] if last_only else h

    def item_table(self) -> jax.Array:
        """The tied output table [n_items + 1, H] (row 0 = pad); scores = h @ table.T."""
        return self.item_embedding


def item_table(params: Any) -> jax.Array:
    """The output item table from a SequenceEncoder's params (boxed or unboxed)."""
    table = params["params"]["item_embedding"] if "params" in params else params["item_embedding"]
    return nn.unbox(table)


MODEL_KINDS = ("sasrec", "gru4rec")


def build_sequence_model(kind: str, n_items: int, max_len: int, hidden: int = 64, n_layers: int = 2,
                         n_heads: int = 1, inner: int | None = None, dropout: float = 0.2,
                         attn_dropout: float | None = None, dtype: Any = jnp.float32,
                         param_dtype: Any = jnp.float32, make_level: LevelFactory | None = None,
                         mask_pad_keys: bool = True, use_positions: bool | None = None,
                         ln_eps: float = 1e-8) -> SequenceEncoder:
    """A SASRec or GRU4Rec encoder. `use_positions` defaults to True for SASRec and
    False for GRU4Rec (CaseQ's gru backbone keeps them: pass True)."""
    if kind == "sasrec":
        make_unit = functools.partial(SASRecBlock, hidden=hidden, n_heads=n_heads, inner=inner, dropout=dropout,
                                      attn_dropout=attn_dropout, ln_eps=ln_eps, mask_pad_keys=mask_pad_keys,
                                      dtype=dtype, param_dtype=param_dtype)
    elif kind == "gru4rec":
        make_unit = functools.partial(GRULayer, hidden=hidden, dtype=dtype, param_dtype=param_dtype)
    else:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    for key, value in (("n_items", n_items), ("max_len", max_len), ("hidden", hidden), ("n_layers", n_layers)):
        if int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return SequenceEncoder(n_items=n_items, max_len=max_len, hidden=hidden, n_layers=n_layers, make_unit=make_unit,
                           make_level=make_level, use_positions=(kind == "sasrec") if use_positions is None
                           else use_positions, dropout=dropout, ln_eps=ln_eps, dtype=dtype, param_dtype=param_dtype)
