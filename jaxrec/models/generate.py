"""Cached decoding for `jaxrec.models.llama.Llama`: prefill, greedy, beam, continuation scoring.

Every entry point is one jitted program whose static arguments are the model (a
hashable linen module), lengths, stop ids and the optional token-mask function, so
repeated calls with the same shapes never recompile. Pass the same `token_mask_fn`
object each time (a new lambda per call is a new static argument).

Padding: prompts may be left- or right-padded; positions come from the attention mask
and padded slots are never attended, so both give the unpadded result. New tokens go to
cache slots after the prompt's last slot; the first token is read from each row's last
real prompt position.

Token-mask hook: `token_mask_fn(generated, step) -> allowed`, with generated [rows, N]
int32 (pad_id where nothing was generated yet), step a scalar int32 and allowed a bool
[rows, vocab]; rows = batch (greedy) or batch·beams (beam search, beam-major per
example). Constrained decoding (e.g. a trie of semantic IDs) plugs in here.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.models.llama import KVCache, Llama, unstack_layers

TokenMaskFn = Callable[[jax.Array, jax.Array], jax.Array]


class Generation(struct.PyTreeNode):
    tokens: jax.Array    # [B, N] (greedy) or [B, W, N] (beam), pad_id after a stop token
    lengths: jax.Array   # generated tokens per row, the stop token included
    scores: jax.Array | None = None          # beam: sum of token log-probs [B, W]
    normalized_scores: jax.Array | None = None  # beam: scores / length**length_penalty (sort key)


def _last_index(mask: jax.Array) -> jax.Array:
    t = jnp.arange(mask.shape[1])
    return jnp.maximum(jnp.max(jnp.where(mask.astype(bool), t, -1), axis=-1), 0)


def _prefill(model: Llama, params, input_ids, inputs_embeds, attention_mask, lora_gates, max_length: int):
    ref = input_ids if input_ids is not None else inputs_embeds
    B, T = ref.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), bool)
    if max_length < T:
        raise ValueError(f"max_length={max_length} is shorter than the prompt ({T} tokens)")
    out = model.apply({"params": params}, input_ids, attention_mask, inputs_embeds=inputs_embeds,
                      lora_gates=lora_gates, cache=KVCache.create(model.config, B, max_length),
                      logit_index=_last_index(attention_mask))
    return out.cache, out.logits


def _decode(model: Llama, params, cache: KVCache, tokens: jax.Array, lora_gates):
    out = model.apply({"params": params}, tokens[:, None], jnp.ones((tokens.shape[0], 1), bool),
                      lora_gates=lora_gates, cache=cache)
    return out.cache, out.logits[:, 0]


@partial(jax.jit, static_argnames=("model", "max_length"))
def prefill(model: Llama, params, input_ids=None, attention_mask=None, *, inputs_embeds=None, lora_gates=None,
            max_length: int) -> tuple[KVCache, jax.Array]:
    """Run the prompt ([B,T] ids or [B,T,d] embeddings) into a fresh cache of
    `max_length` slots. Returns (cache, logits [B, vocab] at each row's last real token)."""
    return _prefill(model, params, input_ids, inputs_embeds, attention_mask, lora_gates, max_length)


@partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_step(model: Llama, params, cache: KVCache, tokens: jax.Array, lora_gates=None):
    """Append one token per row ([B] ids); returns (cache, next-token logits [B, vocab])."""
    return _decode(model, params, cache, tokens, lora_gates)


def _allowed_logits(logits, token_mask_fn, generated, step):
    if token_mask_fn is None:
        return logits
    return jnp.where(token_mask_fn(generated, step), logits, -jnp.inf)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_token_ids", "pad_token_id", "token_mask_fn"))
def greedy_generate(model: Llama, params, input_ids=None, attention_mask=None, *, inputs_embeds=None,
                    lora_gates=None, max_new_tokens: int, stop_token_ids: tuple[int, ...] = (),
                    pad_token_id: int = 0, token_mask_fn: TokenMaskFn | None = None) -> Generation:
    """Greedy decoding of up to `max_new_tokens` tokens with a KV cache.

    A row stops after emitting any of `stop_token_ids` (EOS, newline tokens, …; see
    `jaxrec.weights.token_ids_containing`); the loop ends when every row has stopped.
    """
    ref = input_ids if input_ids is not None else inputs_embeds
    B, T = ref.shape[:2]
    N = max_new_tokens
    cache, logits = _prefill(model, params, input_ids, inputs_embeds, attention_mask, lora_gates, T + N)
    stops = jnp.asarray(stop_token_ids, jnp.int32)
    step_model, step_params = unstack_layers(model, params)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, cache, logits, done, lengths, out = state
        tok = jnp.argmax(_allowed_logits(logits, token_mask_fn, out, step), axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_token_id, tok)
        out = out.at[:, step].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        cache, logits = _decode(step_model, step_params, cache, tok, lora_gates)
        return step + 1, cache, logits, done, lengths, out

    state = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
             jnp.full((B, N), pad_token_id, jnp.int32))
    *_, lengths, out = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=out, lengths=lengths)


@partial(jax.jit, static_argnames=("model", "num_beams", "max_new_tokens", "stop_token_ids", "pad_token_id",
                                   "length_penalty", "token_mask_fn"))
def beam_search(model: Llama, params, input_ids=None, attention_mask=None, *, inputs_embeds=None,
                lora_gates=None, num_beams: int, max_new_tokens: int, stop_token_ids: tuple[int, ...] = (),
                pad_token_id: int = 0, length_penalty: float = 1.0,
                token_mask_fn: TokenMaskFn | None = None) -> Generation:
    """Beam search with a KV cache; returns the `num_beams` beams of each prompt, best first.

    Scores are sums of token log-probabilities. A beam that emits a stop token is frozen
    (it continues with pad at zero cost) and competes with live beams on its raw score;
    the final order divides by length**length_penalty. The prompt is prefilled once and
    its cache broadcast to the beams; beams are reordered by gathering cache rows.
    """
    ref = input_ids if input_ids is not None else inputs_embeds
    B, T = ref.shape[:2]
    W, N = num_beams, max_new_tokens
    cache, logits = _prefill(model, params, input_ids, inputs_embeds, attention_mask, lora_gates, T + N)
    cache, logits = cache.repeat(W), jnp.repeat(logits, W, axis=0)
    gates = None if lora_gates is None else jnp.repeat(lora_gates, W, axis=0)
    stops = jnp.asarray(stop_token_ids, jnp.int32)
    step_model, step_params = unstack_layers(model, params)
    V = logits.shape[-1]
    pad_only = jnp.where(jnp.arange(V) == pad_token_id, 0.0, -jnp.inf)
    # Only beam 0 is live at first, so the first step picks W distinct tokens.
    scores = jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf), (B, 1))

    def cond(state):
        step, *_, finished, _, _ = state
        return (step < N) & ~jnp.all(finished)

    def body(state):
        step, cache, logits, scores, finished, lengths, tokens = state
        logp = jax.nn.log_softmax(_allowed_logits(logits, token_mask_fn, tokens.reshape(B * W, N), step))
        logp = jnp.where(finished[..., None], pad_only, logp.reshape(B, W, V))
        top_scores, top = jax.lax.top_k((scores[..., None] + logp).reshape(B, W * V), W)
        beam, tok = top // V, (top % V).astype(jnp.int32)
        was_finished = jnp.take_along_axis(finished, beam, axis=1)
        tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1).at[:, :, step].set(tok)
        lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~was_finished).astype(jnp.int32)
        finished = was_finished | jnp.isin(tok, stops)
        cache = cache.take((jnp.arange(B)[:, None] * W + beam).reshape(-1))
        cache, logits = _decode(step_model, step_params, cache, tok.reshape(-1), gates)
        return step + 1, cache, logits, top_scores, finished, lengths, tokens

    state = (jnp.zeros((), jnp.int32), cache, logits, scores, jnp.zeros((B, W), bool),
             jnp.zeros((B, W), jnp.int32), jnp.full((B, W, N), pad_token_id, jnp.int32))
    _, _, _, scores, _, lengths, tokens = jax.lax.while_loop(cond, body, state)
    normalized = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    order = jnp.argsort(-normalized, axis=1)
    take = partial(jnp.take_along_axis, indices=order, axis=1)
    return Generation(tokens=jnp.take_along_axis(tokens, order[..., None], axis=1), lengths=take(lengths),
                      scores=take(scores), normalized_scores=take(normalized))


class ContinuationScores(struct.PyTreeNode):
    total: jax.Array       # [B, K] sum of log p(continuation token | prompt, earlier tokens)
    per_token: jax.Array   # [B, K, C] (0 at padding)


@partial(jax.jit, static_argnames=("model",))
def score_continuations(model: Llama, params, continuations: jax.Array, continuation_mask: jax.Array,
                        prompt_ids=None, prompt_mask=None, *, prompt_embeds=None,
                        lora_gates=None) -> ContinuationScores:
    """Log-likelihood of K continuations [B,K,C] of each of B prompts (e.g. iLoRA's ranking
    of 20 candidate titles), prefilling each prompt once.

    The prompt ([B,T] ids or [B,T,d] embeddings, left- or right-padded) is run into a
    cache; the B·K continuations then attend to it as a read-only shared prefix (no copy
    per continuation; see `Llama.__call__(prefix=...)`). Continuations are right-padded
    (`continuation_mask` [B,K,C], real tokens first). `lora_gates` [B,E] is per prompt.
    """
    B, K, C = continuations.shape
    ref = prompt_ids if prompt_ids is not None else prompt_embeds
    cache, first_logits = _prefill(model, params, prompt_ids, prompt_embeds, prompt_mask, lora_gates, ref.shape[1])
    gates = None if lora_gates is None else jnp.repeat(lora_gates, K, axis=0)
    flat = continuations.reshape(B * K, C)
    mask = continuation_mask.reshape(B * K, C).astype(bool)
    out = model.apply({"params": params}, flat, mask, lora_gates=gates, prefix=cache)
    logits = jnp.concatenate([jnp.repeat(first_logits, K, axis=0)[:, None], out.logits[:, :-1]], axis=1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), flat[..., None], axis=-1)[..., 0]
    logp = jnp.where(mask, logp, 0.0).reshape(B, K, C)
    return ContinuationScores(total=logp.sum(-1), per_token=logp)
