"""The Flax T5 against transformers' PyTorch T5, and its beam, embeds and sharded paths.

Tolerance of the parity checks: a float32 dot product of length n carries a rounding
error of about eps·sqrt(n)·|result| (random walk of n roundings, eps = 2^-23); the
errors of the `depth` layers add in quadrature, so the logits' expected error is about
eps·sqrt(depth·n)·max|logits| with n = d_ff, the longest contraction. The bound below is
32× that, room for softmax/exp/rsqrt amplification and for torch and XLA summing in
different orders; an architectural slip (a missing rescale, a wrong bucket, a mask
leak) costs orders of magnitude more.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.t5 import T5, T5Config, abstract_params, init_params, params_from_torch_state
from jaxrec.models.t5_layers import relative_position_buckets
from jaxrec.sharding import Layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 64
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2)
CASES = {
    "relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "relu-untied": dict(feed_forward_proj="relu", tie_word_embeddings=False, num_decoder_layers=3),
    # Few buckets and a short max distance so the test sequences reach the logarithmic
    # buckets and the clamp, in both the bidirectional and the causal table.
    "gated-gelu-tied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=True,
                            relative_attention_num_buckets=8, relative_attention_max_distance=12),
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              relative_attention_num_buckets=8, relative_attention_max_distance=12),
}
EPS32 = float(np.finfo(np.float32).eps)


def make_hf(case: str, seed: int = 0):
    """A random T5ForConditionalGeneration (eval mode) with sharper-than-init weights."""
    torch.manual_seed(seed)
    hf_cfg = transformers.T5Config(**{**TINY, **CASES[case]}, dropout_rate=0.1, attn_implementation="eager")
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layer_norm.weight"):          # every norm scale matters
                p.copy_(torch.rand_like(p) + 0.5)
            elif "relative_attention_bias" in name:           # position bias comparable to q·k
                p.mul_(10.0)
        if not hf_cfg.tie_word_embeddings:
            # transformers 5 ties lm_head to `shared` even when the config says untied (it
            # only drops the rescale); give it its own weights, as a T5 v1.1 checkpoint has.
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, TINY["d_model"]))
    return hf


@pytest.fixture(scope="module")
def converted():
    """case → (transformers model, jaxrec config, jaxrec params), built once per case."""
    built = {}

    def get(case):
        if case not in built:
            hf = make_hf(case)
            config = T5Config.from_hf(hf.config)
            state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
            built[case] = (hf, config, params_from_torch_state(state, config))
        return built[case]
    return get


def padded_inputs(rng, batch=3, enc_len=13, dec_len=9):
    ids = rng.integers(2, VOCAB, (batch, enc_len))
    mask = np.ones((batch, enc_len), np.int64)
    mask[1, 9:] = 0                 # right padding
    if batch > 2:
        mask[2, :4] = 0             # left padding
    dec = rng.integers(2, VOCAB, (batch, dec_len))
    dec[:, 0] = 0                   # decoder start token
    return ids, mask, dec


def forward(config, params, ids, mask, dec, **kw):
    model = T5(config)
    return jax.jit(lambda p, i, m, d: model.apply({"params": p}, i, m, d, **kw))(params, ids, mask, dec)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 12)])
def test_relative_position_buckets_match_transformers(bidirectional, buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    n = 300                                   # distances −299 … 299
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = T5Attention._relative_position_bucket(rel, bidirectional, buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, n, bidirectional, buckets, max_distance), want)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_encoder_states_match_transformers(converted, case):
    hf, config, params = converted(case)
    ids, mask, dec = padded_inputs(np.random.default_rng(0))
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 decoder_input_ids=torch.as_tensor(dec))
    want, want_enc = out.logits.numpy(), out.encoder_last_hidden_state.numpy()
    model = T5(config)
    enc = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode"))(params, ids, mask)
    got = jax.jit(lambda p, e, m, d: model.apply({"params": p}, e, m, d, method="decode"))(params, enc, mask, dec)

    depth = config.num_layers + config.num_decoder_layers
    tol = 32 * EPS32 * np.sqrt(depth * config.d_ff)
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got) - want).max()
    assert err <= tol * scale, (err / scale, tol)
    real = mask.astype(bool)                # padded encoder rows are don't-care values
    enc_err = np.abs(np.asarray(enc)[real] - want_enc[real]).max()
    assert enc_err <= tol * np.abs(want_enc[real]).max()
    assert want.std() > 0.5                  # not a degenerate near-constant model


def test_shared_encoder_beams_equal_tiled_encoder(converted):
    _, config, params = converted("relu-untied")
    B, W, S = 2, 3, 4
    ids, mask, _ = padded_inputs(np.random.default_rng(1), batch=B)
    prefixes = np.random.default_rng(2).integers(2, VOCAB, (B * W, S))
    model = T5(config)
    enc = model.apply({"params": params}, ids, mask, method="encode")
    decode = jax.jit(lambda e, m, d: model.apply({"params": params}, e, m, d, method="decode"))
    shared = decode(enc, mask, prefixes)
    tiled = decode(jnp.repeat(enc, W, axis=0), jnp.repeat(mask, W, axis=0), prefixes)
    assert shared.shape == (B * W, S, VOCAB)
    np.testing.assert_allclose(shared, tiled, rtol=0, atol=1e-6 * np.abs(tiled).max())
    # the grouping is not vacuous: the same prefix under the two users differs
    same = decode(enc, mask, np.tile(prefixes[:1], (B * W, 1)))
    assert np.abs(same[0] - same[W]).max() > 1e-2


@pytest.mark.parametrize("case", ["relu-untied", "gated-gelu-tied"])
def test_incremental_decoding_with_the_cache_equals_teacher_forcing(converted, case):
    """Decoding one position at a time against the cache (beams sharing a user's encoder
    output) gives the logits of decoding the whole prefix at once, position by position."""
    from jaxrec.models.t5 import empty_cache
    _, config, params = converted(case)
    B, W, S = 2, 3, 5
    ids, mask, _ = padded_inputs(np.random.default_rng(4), batch=B)
    dec = np.random.default_rng(5).integers(2, VOCAB, (B * W, S))
    model = T5(config)
    enc = model.apply({"params": params}, ids, mask, method="encode")
    want = model.apply({"params": params}, enc, mask, dec, method="decode")
    step = jax.jit(lambda e, m, d, past: model.apply({"params": params}, e, m, d, past=past, method="decode"))
    # Same products, other groupings (one query row vs all of them): float32 round-off through
    # the decoder's depth, bounded as in the transformers parity test.
    tol = 32 * EPS32 * np.sqrt(config.num_decoder_layers * config.d_ff) * np.abs(want).max()
    past = empty_cache(config, B * W)
    for t in range(S):
        got, past = step(enc, mask, dec[:, t:t + 1], past)
        assert past[0].shape == (config.num_decoder_layers, B * W, t + 1, config.num_heads, config.d_kv)
        np.testing.assert_allclose(got[:, 0], want[:, t], rtol=0, atol=tol)
    # Two positions at once continue the cache too.
    got2, _ = step(enc, mask, dec[:, 3:5], step(enc, mask, dec[:, :3], empty_cache(config, B * W))[1])
    np.testing.assert_allclose(got2, want[:, 3:5], rtol=0, atol=tol)


def test_inputs_embeds_equal_input_ids(converted):
    _, config, params = converted("gated-gelu-untied")
    ids, mask, dec = padded_inputs(np.random.default_rng(3))
    table = params["shared"]
    by_ids = forward(config, params, ids, mask, dec)
    model = T5(config)
    by_embeds = jax.jit(lambda p, e, m, de: model.apply({"params": p}, None, m, inputs_embeds=e,
                                                        decoder_inputs_embeds=de))(params, table[ids], mask, table[dec])
    np.testing.assert_allclose(by_embeds, by_ids, rtol=0, atol=1e-6 * np.abs(by_ids).max())
    emb = model.apply({"params": params}, ids, method="embed")
    np.testing.assert_array_equal(emb, table[ids])


def test_dropout_is_keyed_and_off_when_deterministic(converted):
    _, config, params = converted("relu-tied")
    ids, mask, dec = padded_inputs(np.random.default_rng(4))
    model = T5(config)
    train = jax.jit(lambda key: model.apply({"params": params}, ids, mask, dec, deterministic=False,
                                            rngs={"dropout": key}))
    a, a2, b = train(jax.random.key(0)), train(jax.random.key(0)), train(jax.random.key(1))
    evaluated = forward(config, params, ids, mask, dec)
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - evaluated).max() > 1e-3


def test_letter_config_parameters_are_named_and_initialised_like_transformers():
    config = T5Config.letter(vocab_size=1040)
    assert (config.d_model, config.num_layers, config.num_decoder_layers, config.num_heads, config.d_kv,
            config.d_ff, config.dropout_rate, config.feed_forward_proj) == (128, 4, 4, 6, 64, 1024, 0.1, "relu")
    model = T5(config)
    boxed = abstract_params(model)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)    # every parameter has axis names
    assert "lm_head" not in boxed                                           # LETTER ties the embeddings
    q = boxed["encoder"]["layers"]["self_attn"]["q"]["kernel"]
    assert q.value.shape == (4, 128, 6, 64) and q.names == ("layers", "embed", "heads", "kv")

    p = init_params(model, jax.random.key(0))
    enc, dec = p["encoder"]["layers"], p["decoder"]["layers"]
    d, dk, H, ff = 128, 64, 6, 1024
    expected = {  # transformers' T5PreTrainedModel._init_weights, initializer_factor 1
        "shared": (p["shared"], 1.0), "q": (enc["self_attn"]["q"]["kernel"], (d * dk) ** -0.5),
        "k": (dec["cross_attn"]["k"]["kernel"], d ** -0.5), "o": (enc["self_attn"]["o"]["kernel"], (H * dk) ** -0.5),
        "wi": (dec["mlp"]["wi"]["kernel"], d ** -0.5), "wo": (enc["mlp"]["wo"]["kernel"], ff ** -0.5),
        "bias": (p["decoder"]["relative_attention_bias"], d ** -0.5)}
    for name, (w, std) in expected.items():
        assert abs(float(np.std(w)) / std - 1) < 0.1, name
    assert np.all(np.asarray(enc["mlp_norm"]["scale"]) == 1)


def test_sharded_forward_matches_single_device(converted):
    assert jax.device_count() == 8
    _, config, params = converted("relu-untied")
    model = T5(config)
    B, W, S = 4, 2, 5
    ids, mask, _ = padded_inputs(np.random.default_rng(5), batch=B)
    mask[3, 7:] = 0
    prefixes = np.random.default_rng(6).integers(2, VOCAB, (B * W, S))

    def logits(p, i, m, d):
        enc = model.apply({"params": p}, i, m, method="encode")
        return model.apply({"params": p}, enc, m, d, method="decode")

    want = jax.jit(logits)(params, ids, mask, prefixes)

    layout = Layout.build((2, 2, 2))
    shardings = layout.shardings(abstract_params(model))
    spec = shardings["decoder"]["layers"]["cross_attn"]["q"]["kernel"].spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)          # [layers, embed, heads, kv]
    sharded = jax.device_put(params, shardings)
    inputs = [jax.device_put(jnp.asarray(x), layout.batch(x.shape)) for x in (ids, mask, prefixes)]
    with layout.activate():
        step = jax.jit(logits, in_shardings=(shardings, *(x.sharding for x in inputs)))
        lowered = step.lower(sharded, *inputs)
        assert "sdy.sharding_constraint" in lowered.as_text()
        got = lowered.compile()(sharded, *inputs)
    assert got.sharding.shard_shape(got.shape)[0] == B * W // 4   # rows stay split over data × fsdp
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * np.abs(want).max())
