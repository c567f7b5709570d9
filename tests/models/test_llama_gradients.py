"""The training step's hand-written gradients against independent references.

`grouped_attention` computes the key and value gradients transposed so XLA:CPU never copies
the score matrix; the reference below repeats the KV heads and runs plain softmax attention
head by head, with no custom rule, so the two share nothing but the definition. The LM loss
that never forms the logits is checked against log-softmax of the logits the model returns.
"""
import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.llama import Llama, LlamaConfig, output_table
from jaxrec.models.llama_attention import attend, grouped_attention
from jaxrec.models.lora import LoraConfig, merge_trainable, split_trainable
from jaxrec.models.losses import lm_cross_entropy


def per_head_attention(q, k, v, mask):
    """q [B,T,H,hd] pre-scaled, k/v [B,S,Hkv,hd], mask [B,T,S] → [B,T,H,hd]."""
    repeat = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    heads = []
    for h in range(q.shape[2]):
        scores = q[:, :, h] @ jnp.swapaxes(k[:, :, h], -1, -2)                 # [B,T,S]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        heads.append(jax.nn.softmax(scores, axis=-1) @ v[:, :, h])
    return jnp.stack(heads, axis=2)


def inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    B, T, H, Hkv, hd = 2, 7, 6, 2, 8
    q = rng.standard_normal((B, T, H, hd)) * hd ** -0.5
    k, v = rng.standard_normal((2, B, T, Hkv, hd))
    causal = np.tril(np.ones((T, T), bool))
    mask = np.broadcast_to(causal, (B, T, T)).copy()
    mask[1, :, :3] = False           # left padding: row 1's first three keys are not real
    mask[1, 0] = False               # and one query with no real key at all
    d_out = rng.standard_normal((B, T, H, hd))
    as_dtype = lambda x: jnp.asarray(x, dtype)
    return as_dtype(q), as_dtype(k), as_dtype(v), jnp.asarray(mask), as_dtype(d_out)


def test_attention_and_its_gradient_match_autodiff_of_a_per_head_reference():
    q, k, v, mask, d_out = inputs()
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: per_head_attention(q, k, v, mask), q, k, v)
    # float32 sums of at most T·G·hd = 168 products of O(1) terms: a few hundred ulps of the
    # largest magnitude compared bounds any summation order.
    for got, want in [(out, ref), *zip(vjp(d_out), ref_vjp(d_out))]:
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=256 * np.finfo(np.float32).eps * scale)


def test_a_query_with_no_real_key_passes_no_gradient_to_the_keys():
    q, k, v, mask, d_out = inputs()
    only_empty_row = jnp.zeros_like(d_out).at[1, 0].set(d_out[1, 0])
    _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    d_q, d_k, d_v = vjp(only_empty_row)
    assert float(jnp.max(jnp.abs(d_q))) == 0.0 and float(jnp.max(jnp.abs(d_k))) == 0.0
    assert np.isfinite(np.asarray(d_v)).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_low_precision_gradient_follows_the_float32_one(dtype):
    q, k, v, mask, d_out = inputs(dtype)
    low = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)[1](d_out)
    q32, k32, v32, d32 = (x.astype(jnp.float32) for x in (q, k, v, d_out))
    ref = jax.vjp(lambda q, k, v: per_head_attention(q, k, v, mask), q32, k32, v32)[1](d32)
    # Inputs are the same bf16 values; the rule rounds p and the score gradient to bf16 once
    # each (relative 2^-8) before O(1)-term sums, so a few bf16 ulps of the scale bound it.
    for got, want in zip(low, ref):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=8 * 2.0 ** -8 * scale)


def test_bfloat16_gradient_compiles_and_runs_at_training_shapes():
    """XLA:CPU has no bf16 x bf16 -> f32 dot for some batched shapes (a rule that asked for
    float32 outputs failed at run time at batch 2 x 512 tokens, not at the sizes above)."""
    B, T = 2, 512
    q = jnp.full((B, T, 9, 64), 0.01, jnp.bfloat16)
    k = jnp.full((B, T, 3, 64), 0.01, jnp.bfloat16)
    mask = jnp.asarray(np.tril(np.ones((T, T), bool)))[None].repeat(B, 0)
    grads = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, mask).astype(jnp.float32).sum(), (0, 1, 2)))(q, k, k)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)


def causal_inputs(dtype=jnp.float32, T=11):
    """T = 11 tokens in query blocks of 4 (the last block is short), 3 query heads per KV head,
    row 1 left-padded by three slots (its first three queries see no key at all)."""
    rng = np.random.default_rng(2)
    B, H, Hkv, hd = 2, 6, 2, 8
    q = rng.standard_normal((B, T, H, hd)) * hd ** -0.5
    k, v = rng.standard_normal((2, B, T, Hkv, hd))
    real = np.ones((B, T), bool)
    real[1, :3] = False
    mask = np.tril(np.ones((T, T), bool))[None] & real[:, None, :]
    d_out = rng.standard_normal((B, T, H, hd)) * mask.any(-1)[:, :, None, None]   # no cotangent on empty rows
    as_dtype = lambda x: jnp.asarray(x, dtype)
    return as_dtype(q), as_dtype(k), as_dtype(v), jnp.asarray(mask), as_dtype(d_out)


@pytest.mark.parametrize("block", [1, 4, 5])
def test_causal_blocks_match_autodiff_of_the_per_head_reference(block):
    q, k, v, mask, d_out = causal_inputs()
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, causal_block=block), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: per_head_attention(q, k, v, mask), q, k, v)
    seen = np.asarray(mask.any(-1))                  # a query that sees no key has no defined output
    # float32 sums of at most T·G·hd = 264 products of O(1) terms, in another order: a few
    # hundred ulps of the largest magnitude compared.
    tol = lambda want: 256 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], rtol=0, atol=tol(ref))
    for got, want in zip(vjp(d_out), ref_vjp(d_out)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol(want))


def test_causal_blocks_in_bfloat16_follow_the_float32_reference():
    q, k, v, mask, d_out = causal_inputs(jnp.bfloat16)
    low = jax.vjp(lambda q, k, v: attend(q, k, v, mask, causal_block=4), q, k, v)[1](d_out)
    q32, k32, v32, d32 = (x.astype(jnp.float32) for x in (q, k, v, d_out))
    ref = jax.vjp(lambda q, k, v: per_head_attention(q, k, v, mask), q32, k32, v32)[1](d32)
    # As the unblocked rule: p and the score gradient are rounded to bf16 once each.
    for got, want in zip(low, ref):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=8 * 2.0 ** -8 * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_blocks_compile_and_run_at_training_shapes(dtype):
    B, T = 2, 512
    q = jnp.full((B, T, 9, 64), 0.01, dtype)
    k = jnp.full((B, T, 3, 64), 0.01, dtype)
    mask = jnp.asarray(np.tril(np.ones((T, T), bool)))[None].repeat(B, 0)
    loss = lambda q, k, v: attend(q, k, v, mask, causal_block=128).astype(jnp.float32).sum()
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, k)
    assert all(g.dtype == dtype and bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)


def test_the_model_gives_the_same_logits_and_gradients_with_and_without_query_blocks():
    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, lora=LoraConfig(rank=2, targets="q_proj|v_proj|down_proj"),
                         attention_query_block=3)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 37, (2, 10)), jnp.int32)
    attention_mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [4]]), jnp.int32)   # row 1 left-padded
    blocked, whole = Llama(config), Llama(dataclasses.replace(config, attention_query_block=0))
    params = jax.tree.map(lambda x: x + 0.05, nn.unbox(blocked.init(jax.random.key(0), ids)["params"]))
    trainable, frozen = split_trainable(params)

    def loss(model, trainable):
        logits = model.apply({"params": merge_trainable(trainable, frozen)}, ids, attention_mask).logits
        return jnp.sum(jnp.where(attention_mask[:, :, None] > 0, jax.nn.log_softmax(logits), 0.0)), logits

    (value, logits), grads = jax.value_and_grad(partial(loss, blocked), has_aux=True)(trainable)
    (ref_value, ref_logits), ref_grads = jax.value_and_grad(partial(loss, whole), has_aux=True)(trainable)
    real = np.asarray(attention_mask, bool)
    # Same float32 math in another order: ulps of the compared magnitude.
    tol = lambda want: 256 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], rtol=0, atol=tol(ref_logits))
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol(want))


def test_grouped_attention_is_the_layout_attend_uses():
    q, k, v, mask, _ = inputs()
    B, T, H, hd = q.shape
    grouped = q.reshape(B, T, 2, H // 2, hd).transpose(0, 2, 3, 1, 4)
    out = grouped_attention(grouped, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_array_equal(out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd), attend(q, k, v, mask))


@pytest.mark.parametrize("tied", [True, False])
def test_lm_loss_from_hidden_states_equals_the_loss_on_the_models_logits(tied):
    """The LoRA step's loss (chunked, from the hidden states and `output_table`) against the
    plain log-softmax of the logits the model returns, value and adapter gradients."""
    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, tie_word_embeddings=tied,
                         lora=LoraConfig(rank=2, targets="q_proj|up_proj"))
    model = Llama(config)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 37, (2, 9)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda x: x + 0.05, nn.unbox(params))      # non-zero LoRA B: real gradients
    trainable, frozen = split_trainable(params)

    def chunked(trainable):
        p = merge_trainable(trainable, frozen)
        hidden = model.apply({"params": p}, ids, return_hidden=True).hidden
        return lm_cross_entropy(hidden[:, :-1], output_table(p, config), ids[:, 1:], chunk=5)[0]

    def on_logits(trainable):
        logits = model.apply({"params": merge_trainable(trainable, frozen)}, ids).logits[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    value, grads = jax.value_and_grad(chunked)(trainable)
    ref_value, ref_grads = jax.value_and_grad(on_logits)(trainable)
    # Same float32 math in a different order: ulps of the compared magnitude.
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=256 * np.finfo(np.float32).eps * scale)

