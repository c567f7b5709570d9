"""The two generator backbones over a code-only vocabulary, and their beam-search scorers.

Vocabulary (a documented deviation from LETTER, whose T5 keeps its 32,128 text tokens
beside the codes and so normalises every softmax over them too): token 0 = pad, 1 = bos
(the T5 decoder's start token), then level k's n_k codes at `offset_k + code`. No eos: a
semantic ID has a fixed number of levels, so decoding is always exactly K steps.

Input embedding of the token for level k of the history item in slot t (spec §1):

    E_code(token) + E_level(k) + E_pos(t)          (each of the last two can be turned off)

Slots are right-aligned: the most recent history item sits in the last history slot, so a
slot means "how long ago" whatever the history length (padding slots are masked out).

- `CodeT5`: LETTER's T5 encoder–decoder (`jaxrec.models.t5`, tied code embeddings). The
  encoder reads the flattened code stream of the history [B, T·K]; the decoder is teacher
  forced on (bos, c_1 .. c_{K-1}) and predicts c_1 .. c_K. Decoder step k gets its own
  level embedding E_dec_level(k) (the level it predicts), added to the previous code's
  embedding (the spec's choice; CoFiRec's is not published).
- `CodeDecoder`: a decoder-only model from jaxrec's Llama blocks (RoPE over token
  positions, SwiGLU, RMSNorm; no dropout inside, dropout on the input embeddings) over
  the stream of T+1 item slots [B, (T+1)·K], trained with CE at every code position (as
  SASRec trains at every item). The input embeddings are its own table; Llama's
  `embed_tokens` serves as the (untied) output projection.

Both expose `logprob_fn(params, ...)` for `jaxrec.eval.beam_search`: a function of
(context, prefix codes [B, W, k]) returning log-probabilities [B, W, V] of level k's codes
(V = the widest level; codes past n_k get -inf). The log-softmax runs over the whole
code vocabulary, as the model was trained, and is then restricted to the level.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models.llama import KVCache, Llama, LlamaConfig
from jaxrec.models.t5 import T5, T5Config
from jaxrec.sharding import constrain

PAD, BOS, N_SPECIAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each level's codes live in the code-only vocabulary (hashable: a static field)."""

    codebook_sizes: tuple[int, ...]

    @property
    def n_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in N_SPECIAL + np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]))

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + int(sum(self.codebook_sizes))

    @property
    def width(self) -> int:
        """V: the trie's table width (the widest level)."""
        return int(max(self.codebook_sizes))

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """[n_items + 1, K] codes (row 0 = -1) → token ids, row 0 = pad."""
        tokens = np.asarray(codes, np.int64) + np.asarray(self.offsets)
        tokens[np.asarray(codes)[:, 0] < 0] = PAD
        return tokens.astype(np.int32)

    def prefix_tokens(self, prefix_codes: jax.Array) -> jax.Array:
        """[..., k] codes of levels 0..k-1 → token ids."""
        k = prefix_codes.shape[-1]
        return prefix_codes + jnp.asarray(self.offsets[:k], jnp.int32)

    def level_logprobs(self, logits: jax.Array, level: int) -> jax.Array:
        """logits [..., vocab] → log-probs [..., V] of level `level`'s codes (-inf past n_k)."""
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        n = self.codebook_sizes[level]
        start = self.offsets[level]
        out = logp[..., start:start + n]
        pad = self.width - n
        if pad:
            out = jnp.concatenate([out, jnp.full(out.shape[:-1] + (pad,), -jnp.inf, out.dtype)], axis=-1)
        return out


def _table(module: nn.Module, name: str, rows: int, dim: int, std: float, first_axis: str | None):
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), (first_axis, "embed")),
                        (rows, dim), jnp.float32)


def _stream_pattern(n_tokens: int, n_levels: int, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(level, slot) of every position of a flattened code stream of `n_tokens` tokens that
    holds the *last* n_tokens / n_levels of `n_slots` right-aligned slots (a batch cut to its
    length bucket keeps the most recent slots, which keep their slot numbers)."""
    if n_tokens % n_levels or n_tokens > n_slots * n_levels:
        raise ValueError(f"a code stream of {n_tokens} tokens is not whole items of {n_levels} codes within "
                         f"{n_slots} slots")
    shown = n_tokens // n_levels
    return np.tile(np.arange(n_levels), shown), np.repeat(np.arange(n_slots - shown, n_slots), n_levels)


class CodeT5(nn.Module):
    """T5 encoder over the history's code stream, decoder over one item's codes."""

    t5: T5Config
    layout: TokenLayout
    max_history: int
    level_embedding: bool = True
    position_embedding: bool = True

    def setup(self):
        d, K = self.t5.d_model, self.layout.n_levels
        self.backbone = T5(self.t5)
        std = 1.0                      # the scale of T5's shared table (transformers' init)
        if self.level_embedding:
            self.levels = _table(self, "level_embedding", K, d, std, "levels")
            self.decoder_levels = _table(self, "decoder_level_embedding", K, d, std, "levels")
        if self.position_embedding:
            self.positions = _table(self, "position_embedding", self.max_history, d, std, None)

    def _history_embeds(self, tokens):
        level, slot = _stream_pattern(tokens.shape[1], self.layout.n_levels, self.max_history)
        h = self.backbone.embed(tokens)
        if self.level_embedding:
            h = h + self.levels[jnp.asarray(level)].astype(h.dtype)
        if self.position_embedding:
            h = h + self.positions[jnp.asarray(slot)].astype(h.dtype)
        return constrain(h, ("batch", "seq", "embed"))

    def encode(self, history_tokens, deterministic: bool = True):
        """history_tokens [B, t·K], the last t <= T slots → (encoder states [B, t·K, d], mask [B, t·K])."""
        mask = history_tokens != PAD
        enc = self.backbone.encode(inputs_embeds=self._history_embeds(history_tokens), attention_mask=mask,
                                   deterministic=deterministic)
        return enc, mask

    def decode(self, enc, mask, prefix_tokens, deterministic: bool = True):
        """Logits [N, k+1, vocab] for decoder inputs (bos, prefix tokens [N, k]); N = B·W rows,
        row b·W+j reading encoder row b."""
        n = prefix_tokens.shape[0]
        ids = jnp.concatenate([jnp.full((n, 1), BOS, prefix_tokens.dtype), prefix_tokens], axis=1)
        h = self.backbone.embed(ids)
        if self.level_embedding:
            h = h + self.decoder_levels[: ids.shape[1]].astype(h.dtype)
        h = constrain(h, ("batch", "seq", "embed"))
        return self.backbone.decode(enc, mask, decoder_inputs_embeds=h, deterministic=deterministic)

    def decode_step(self, enc, mask, tokens, position: int, past):
        """Incremental decoding: logits [N, vocab] after decoder input `tokens` [N] (bos at
        position 0, else the code token of level position - 1) at decoder position
        `position`, given the self-attention cache `past` of the positions before; returns
        (logits, the cache extended by this position). Equals `decode` of the whole prefix."""
        h = self.backbone.embed(tokens[:, None])
        if self.level_embedding:
            h = h + self.decoder_levels[position:position + 1].astype(h.dtype)
        h = constrain(h, ("batch", "seq", "embed"))
        logits, present = self.backbone.decode(enc, mask, decoder_inputs_embeds=h, past=past)
        return logits[:, 0], present

    def __call__(self, history_tokens, target_tokens, deterministic: bool = True):
        """Teacher forcing: logits [B, K, vocab] for the target's K codes."""
        enc, mask = self.encode(history_tokens, deterministic)
        return self.decode(enc, mask, target_tokens[:, :-1], deterministic)


class CodeDecoder(nn.Module):
    """A decoder-only generator over the code stream of T history slots + 1 target slot."""

    llama: LlamaConfig
    layout: TokenLayout
    max_history: int
    level_embedding: bool = True
    position_embedding: bool = True
    dropout: float = 0.0

    def setup(self):
        d, K = self.llama.hidden_size, self.layout.n_levels
        self.backbone = Llama(self.llama)
        std = 0.02                     # Llama's embedding init
        self.codes = _table(self, "code_embedding", self.layout.vocab_size, d, std, "vocab")
        if self.level_embedding:
            self.levels = _table(self, "level_embedding", K, d, std, "levels")
        if self.position_embedding:
            self.positions = _table(self, "position_embedding", self.max_history + 1, d, std, None)
        self.embed_dropout = nn.Dropout(self.dropout)

    def _embeds(self, tokens, level, slot, deterministic):
        h = jnp.take(self.codes, tokens, axis=0)
        if self.level_embedding:
            h = h + self.levels[jnp.asarray(level)]
        if self.position_embedding:
            h = h + self.positions[jnp.asarray(slot)]
        h = self.embed_dropout(h.astype(jnp.dtype(self.llama.dtype)), deterministic=deterministic)
        return constrain(h, ("batch", "seq", "embed"))

    def __call__(self, stream_tokens, deterministic: bool = True):
        """stream_tokens [B, t·K] (left-padded; the last t <= T + 1 slots) → next-token logits [B, t·K, vocab]."""
        level, slot = _stream_pattern(stream_tokens.shape[1], self.layout.n_levels, self.max_history + 1)
        h = self._embeds(stream_tokens, level, slot, deterministic)
        return self.backbone(inputs_embeds=h, attention_mask=stream_tokens != PAD).logits

    def prefill(self, history_tokens):
        """History [B, t·K] (the last t <= T slots) → (its KV cache, logits [B, vocab] for the first
        code of the next item)."""
        B, S = history_tokens.shape
        level, slot = _stream_pattern(S, self.layout.n_levels, self.max_history)
        h = self._embeds(history_tokens, level, slot, True)
        out = self.backbone(inputs_embeds=h, attention_mask=history_tokens != PAD,
                            cache=KVCache.create(self.llama, B, S), logit_index=jnp.full((B,), S - 1))
        return out.cache, out.logits

    def extend(self, cache: KVCache, prefix_tokens):
        """Logits [N, vocab] after the target item's first k codes [N, k] (N = B·W rows,
        row b·W+j continuing cache row b; the cache is shared, never copied)."""
        n, k = prefix_tokens.shape
        h = self._embeds(prefix_tokens, np.arange(k), np.full(k, self.max_history), True)
        return self.backbone(inputs_embeds=h, prefix=cache, logit_index=jnp.full((n,), k - 1)).logits


    def step(self, prefix: KVCache, own: KVCache, tokens, level: int):
        """Incremental decoding after the shared history `prefix`: the code token of level
        `level` [N, 1] of the target item, written into each row's `own` cache (its earlier
        target codes) → (logits [N, vocab] for the next level's code, the extended cache).
        Equals `extend` of the whole prefix."""
        h = self._embeds(tokens, np.array([level]), np.array([self.max_history]), True)
        out = self.backbone(inputs_embeds=h, prefix=prefix, cache=own, logit_index=jnp.zeros((tokens.shape[0],),
                                                                                              jnp.int32))
        return out.logits, out.cache


# ---------------------------------------------------------------------------------------
# Beam-search scorers: context pytrees with a leading batch dim, and logprob functions
# ---------------------------------------------------------------------------------------
def t5_context(model: CodeT5, params, history_tokens):
    enc, mask = model.apply({"params": params}, history_tokens, method="encode")
    return {"enc": enc, "mask": mask}


def t5_logprob_fn(model: CodeT5, params):
    layout = model.layout

    def fn(context, prefix_codes):
        B, W, k = prefix_codes.shape
        tokens = layout.prefix_tokens(prefix_codes).reshape(B * W, k)
        logits = model.apply({"params": params}, context["enc"], context["mask"], tokens, method="decode")[:, -1]
        return layout.level_logprobs(logits, k).reshape(B, W, -1)
    return fn


def t5_initial_state(model: CodeT5, n_batch: int, beam: int):
    """The per-beam decoder cache before the first code: leaves [B, W, layers, 0, heads, d_kv]."""
    cfg = model.t5
    shape = (n_batch, beam, cfg.num_decoder_layers, 0, cfg.num_heads, cfg.d_kv)
    return {"k": jnp.zeros(shape, jnp.dtype(cfg.dtype)), "v": jnp.zeros(shape, jnp.dtype(cfg.dtype))}


def t5_incremental_logprob_fn(model: CodeT5, params):
    """The beam search's incremental scorer: (context, prefix codes [B, W, k], state) ->
    (log-probs [B, W, V] of level k, state with position k appended). Each step runs the
    decoder on one position per beam against the beam's cache (K positions in all, where
    recomputing the prefix runs 1 + 2 + … + K)."""
    layout = model.layout

    def fn(context, prefix_codes, state):
        B, W, k = prefix_codes.shape
        if k == 0:
            tokens = jnp.full((B * W,), BOS, jnp.int32)
        else:
            tokens = layout.prefix_tokens(prefix_codes)[..., -1].reshape(B * W)
        past = tuple(jnp.moveaxis(state[n].reshape(B * W, *state[n].shape[2:]), 1, 0) for n in ("k", "v"))
        logits, present = model.apply({"params": params}, context["enc"], context["mask"], tokens, k, past,
                                      method="decode_step")
        new = {n: jnp.moveaxis(x, 0, 1).reshape(B, W, *x.shape[:1], *x.shape[2:]) for n, x in zip(("k", "v"), present)}
        return layout.level_logprobs(logits, k).reshape(B, W, -1), new
    return fn


def decoder_initial_state(model: CodeDecoder, n_batch: int, beam: int):
    """Each beam's own cache of its target codes (after the shared history), empty:
    k/v [B, W, layers, K, kv heads, head dim], valid/positions [B, W, K]."""
    cfg, K = model.llama, model.layout.n_levels
    shape = (n_batch, beam, cfg.num_layers, K, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, jnp.dtype(cfg.dtype)), "v": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
            "valid": jnp.zeros((n_batch, beam, K), bool), "positions": jnp.zeros((n_batch, beam, K), jnp.int32)}


def decoder_incremental_logprob_fn(model: CodeDecoder, params):
    """The decoder-only model's incremental scorer: at level k >= 1 it runs one token per
    beam (the code of level k - 1) against the shared history cache and the beam's own cache;
    level 0 reads the prefill's logits."""
    layout = model.layout

    def fn(context, prefix_codes, state):
        B, W, k = prefix_codes.shape
        if k == 0:
            logp = layout.level_logprobs(context["first"], 0)
            return jnp.broadcast_to(logp[:, None], (B, W, logp.shape[-1])), state
        history = KVCache(k=jnp.moveaxis(context["k"], 1, 0), v=jnp.moveaxis(context["v"], 1, 0),
                          valid=context["valid"], positions=context["positions"],
                          index=jnp.asarray(context["valid"].shape[1], jnp.int32))

        def rows(x):
            return x.reshape(B * W, *x.shape[2:])
        own = KVCache(k=jnp.moveaxis(rows(state["k"]), 1, 0), v=jnp.moveaxis(rows(state["v"]), 1, 0),
                      valid=rows(state["valid"]), positions=rows(state["positions"]),
                      index=jnp.asarray(k - 1, jnp.int32))
        tokens = layout.prefix_tokens(prefix_codes)[..., -1:].reshape(B * W, 1)
        logits, cache = model.apply({"params": params}, history, own, tokens, k - 1, method="step")

        def beams(x):
            return x.reshape(B, W, *x.shape[1:])
        new = {"k": beams(jnp.moveaxis(cache.k, 0, 1)), "v": beams(jnp.moveaxis(cache.v, 0, 1)),
               "valid": beams(cache.valid), "positions": beams(cache.positions)}
        return layout.level_logprobs(logits, k).reshape(B, W, -1), new
    return fn


def beam_scorer(model, backbone: str, params, history_tokens, beam: int):
    """(logprob_fn, context, initial state) of the beam search over `history_tokens`: both
    backbones decode incrementally, each beam with its own cache of the codes it chose."""
    B = history_tokens.shape[0]
    if backbone == "t5":
        return (t5_incremental_logprob_fn(model, params), t5_context(model, params, history_tokens),
                t5_initial_state(model, B, beam))
    return (decoder_incremental_logprob_fn(model, params), decoder_context(model, params, history_tokens),
            decoder_initial_state(model, B, beam))


def decoder_context(model: CodeDecoder, params, history_tokens):
    """The prefilled cache, batch-major (the beam search wants one leading batch dim)."""
    cache, first = model.apply({"params": params}, history_tokens, method="prefill")
    return {"k": jnp.moveaxis(cache.k, 0, 1), "v": jnp.moveaxis(cache.v, 0, 1), "valid": cache.valid,
            "positions": cache.positions, "first": first}


def decoder_logprob_fn(model: CodeDecoder, params):
    layout = model.layout

    def fn(context, prefix_codes):
        B, W, k = prefix_codes.shape
        if k == 0:
            logp = layout.level_logprobs(context["first"], 0)
            return jnp.broadcast_to(logp[:, None], (B, W, logp.shape[-1]))
        cache = KVCache(k=jnp.moveaxis(context["k"], 1, 0), v=jnp.moveaxis(context["v"], 1, 0),
                        valid=context["valid"], positions=context["positions"],
                        index=jnp.asarray(context["valid"].shape[1], jnp.int32))
        tokens = layout.prefix_tokens(prefix_codes).reshape(B * W, k)
        logits = model.apply({"params": params}, cache, tokens, method="extend")
        return layout.level_logprobs(logits, k).reshape(B, W, -1)
    return fn
