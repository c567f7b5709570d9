"""SASRec block and the shared encoder: torch parity, causality, padding, hooks, sharding."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.encoder import build_sequence_model
from jaxrec.models.layers import hash_bits, hash_dropout
from jaxrec.models.sasrec import SASRecBlock
from jaxrec.sharding import Layout

H, L, N_ITEMS = 16, 12, 40


def _inputs(rs, batch=4, length=L, n_pads=(0, 3, 7, 11)):
    x = rs.randint(1, N_ITEMS + 1, (batch, length))
    for row, p in enumerate(n_pads[:batch]):
        x[row, :p] = 0
    return jnp.asarray(x)


def _perturbed(params, seed=0, scale=0.1):
    """Move every leaf off its init (biases start at 0) so parity tests see them."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _model(**kw):
    args = dict(n_items=N_ITEMS, max_len=L, hidden=H, n_layers=2, n_heads=2, inner=24, dropout=0.3)
    args.update(kw)
    return build_sequence_model("sasrec", **args)


# rbg keys: threefry-based init compiles ~3x slower and these tests only need values.
KEY = jax.random.key(0, impl="rbg")


@functools.lru_cache(maxsize=None)
def _params():
    """One set of encoder params (the config of `_model()`), shared across tests."""
    x = jnp.zeros((1, L), jnp.int32)
    return jax.jit(_model().init)(KEY, x)


def _torch_block(p, x, valid, n_heads, mask_pad_keys):
    """The SASRec.pytorch / CaseQ block in torch, with our parameters copied in."""
    torch = pytest.importorskip("torch")
    Hd = x.shape[-1]
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
    mha = torch.nn.MultiheadAttention(Hd, n_heads, dropout=0.0).double()
    kv = np.asarray(p["key_value"]["kernel"]).reshape(Hd, 2, Hd)
    w_in = np.concatenate([np.asarray(p["query"]["kernel"]).reshape(Hd, Hd), kv[:, 0], kv[:, 1]], axis=1).T
    b_in = np.concatenate([np.asarray(p["query"]["bias"]).reshape(-1),
                           np.asarray(p["key_value"]["bias"]).reshape(2, -1).reshape(-1)])
    ln1, ln2 = (torch.nn.LayerNorm(Hd, eps=1e-8).double() for _ in range(2))
    inner = p["ffn_in"]["kernel"].shape[1]
    conv1, conv2 = torch.nn.Conv1d(Hd, inner, 1).double(), torch.nn.Conv1d(inner, Hd, 1).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(t(w_in)); mha.in_proj_bias.copy_(t(b_in))
        mha.out_proj.weight.copy_(t(np.asarray(p["out"]["kernel"]).reshape(Hd, Hd).T))
        mha.out_proj.bias.copy_(t(p["out"]["bias"]))
        for ln, name in ((ln1, "attn_norm"), (ln2, "ffn_norm")):
            ln.weight.copy_(t(p[name]["scale"])); ln.bias.copy_(t(p[name]["bias"]))
        conv1.weight.copy_(t(np.asarray(p["ffn_in"]["kernel"]).T[..., None])); conv1.bias.copy_(t(p["ffn_in"]["bias"]))
        conv2.weight.copy_(t(np.asarray(p["ffn_out"]["kernel"]).T[..., None])); conv2.bias.copy_(t(p["ffn_out"]["bias"]))
        seqs = t(x).transpose(0, 1)                                   # [L, B, H]
        Lx = seqs.shape[0]
        causal = ~torch.tril(torch.ones(Lx, Lx, dtype=torch.bool))
        pad = torch.tensor(~np.asarray(valid)) if mask_pad_keys else None
        Q = ln1(seqs)
        out, _ = mha(Q, seqs, seqs, attn_mask=causal, key_padding_mask=pad)
        s = (Q + out).transpose(0, 1)
        s = ln2(s)
        s = s + conv2(torch.relu(conv1(s.transpose(-1, -2)))).transpose(-1, -2)
        s = s.masked_fill(torch.tensor(~np.asarray(valid))[..., None], 0.0)
    return s.numpy()


@pytest.mark.parametrize("mask_pad_keys,query_block", [(False, 0), (True, 0), (False, 5), (True, 5)])
def test_block_matches_the_torch_reference(mask_pad_keys, query_block):
    rs = np.random.RandomState(0)
    block = SASRecBlock(hidden=H, n_heads=2, inner=24, dropout=0.0, mask_pad_keys=mask_pad_keys,
                        query_block=query_block)      # 5: blocks of 5, 5, 2 queries over L = 12
    valid = jnp.asarray(np.asarray(_inputs(rs)) > 0)
    x = jnp.asarray(rs.randn(4, L, H).astype(np.float32)) * valid[..., None]
    params = _perturbed(nn.unbox(_params())["params"]["levels_0"])
    ours = jax.jit(block.apply)({"params": params}, x, valid)
    ref = _torch_block(params, x, valid, 2, mask_pad_keys)
    keep = np.asarray(valid)  # torch gives NaN at fully masked pad queries
    np.testing.assert_allclose(np.asarray(ours)[keep], ref[keep], atol=2e-5)
    assert np.all(np.asarray(ours)[~keep] == 0)


def test_init_follows_torch_fans():
    H_big, inner = 64, 128
    block = SASRecBlock(hidden=H_big, n_heads=2, inner=inner)
    x, valid = jnp.zeros((1, 3, H_big)), jnp.ones((1, 3), bool)
    p = nn.unbox(jax.jit(block.init)(KEY, x, valid))["params"]
    expected = {("query", "kernel"): math.sqrt(1 / (2 * H_big)), ("key_value", "kernel"): math.sqrt(1 / (2 * H_big)),
                ("out", "kernel"): math.sqrt(1 / H_big), ("ffn_in", "kernel"): math.sqrt(2 / (H_big + inner))}
    for (mod, name), std in expected.items():
        assert np.std(np.asarray(p[mod][name])) == pytest.approx(std, rel=0.06), mod
    assert np.all(np.asarray(p["query"]["bias"]) == 0) and np.all(np.asarray(p["out"]["bias"]) == 0)
    bound = 1 / math.sqrt(H_big)
    b = np.asarray(p["ffn_in"]["bias"])
    assert b.min() >= -bound and b.max() <= bound and b.std() > bound / 3


def test_every_parameter_has_logical_axes():
    model = _model()
    boxed = jax.eval_shape(model.init, KEY, _inputs(np.random.RandomState(0)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    assert nn.get_partition_spec(boxed)["params"]["item_embedding"] == jax.sharding.PartitionSpec("items", "embed")


def test_causal_and_last_only():
    rs = np.random.RandomState(1)
    model = _model()
    x = _inputs(rs)
    params = _params()
    apply = jax.jit(model.apply, static_argnames="last_only")
    h = apply(params, x)
    y = x.at[:, 8].set((x[:, 8] % N_ITEMS) + 1)   # change one item: positions < 8 are unaffected
    h2 = apply(params, y)
    np.testing.assert_array_equal(np.asarray(h[:, :8]), np.asarray(h2[:, :8]))
    assert not np.allclose(h[:, 8:], h2[:, 8:])
    np.testing.assert_allclose(apply(params, x, last_only=True), h[:, -1], atol=1e-6)


def test_more_left_padding_changes_nothing_when_pad_keys_are_masked():
    rs = np.random.RandomState(2)
    model = _model()
    short = _inputs(rs, length=8, n_pads=(0, 2, 5, 7))
    longer = jnp.pad(short, ((0, 0), (L - 8, 0)))
    params = _params()
    np.testing.assert_allclose(jax.jit(model.apply)(params, longer)[:, L - 8:],
                               jax.jit(model.apply)(params, short), atol=1e-6)
    # SASRec.pytorch's convention (pads attended to) is not padding invariant.
    ref = jax.jit(_model(mask_pad_keys=False).apply)
    a, b = ref(params, longer)[:, L - 8:], ref(params, short)
    assert not np.allclose(a[0], b[0], atol=1e-4)


class _OneBranchLevel(nn.Module):
    """A CaseQ-style level with C = 1: gate == 1, recorded with sow."""
    make_unit: object

    @nn.compact
    def __call__(self, x, valid, deterministic, last_only=False):
        y = self.make_unit(name="branch_0")(x, valid, deterministic, last_only=last_only)
        gate = jnp.ones(y.shape[:2] + (1,)) * valid[:, -y.shape[1]:, None]
        self.sow("intermediates", "gate", gate)
        return gate[..., :1] * y


def test_level_hook_with_one_branch_equals_the_backbone():
    rs = np.random.RandomState(3)
    x = _inputs(rs)
    plain, hooked = _model(), _model(make_level=lambda k, make_unit: _OneBranchLevel(make_unit))
    params = nn.unbox(_params())
    p = dict(params["params"])
    for k in range(2):
        p[f"levels_{k}"] = {"branch_0": p[f"levels_{k}"]}
    assert jax.tree.structure(nn.unbox(jax.eval_shape(hooked.init, KEY, x))["params"]) \
        == jax.tree.structure(p)
    out, state = jax.jit(lambda p, x: hooked.apply({"params": p}, x, mutable=["intermediates"]))(p, x)
    np.testing.assert_allclose(out, jax.jit(plain.apply)(params, x), atol=1e-6)
    last = jax.jit(lambda p, x: hooked.apply({"params": p}, x, last_only=True))(p, x)
    np.testing.assert_allclose(last, out[:, -1], atol=1e-6)
    assert state["intermediates"]["levels_1"]["gate"][0].shape == (4, L, 1)


def test_dropout_is_active_in_training_and_reproducible():
    rs = np.random.RandomState(4)
    model, x = _model(), _inputs(rs)
    params = _params()
    run = jax.jit(lambda key: model.apply(params, x, deterministic=False, rngs={"dropout": key}))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    rbg = run(jax.random.key(3, impl="rbg"))
    assert np.all(np.isfinite(np.asarray(rbg))) and not np.allclose(rbg, a)


def test_hash_bits_of_a_window_are_that_window_of_the_whole():
    seed = jnp.array([5, 9], jnp.uint32)
    whole = np.asarray(hash_bits(seed, (3, 7, 11)))
    window = np.asarray(hash_bits(seed, (3, 4, 6), within=(3, 7, 11), start=(0, 2, 0)))
    np.testing.assert_array_equal(window, whole[:, 2:6, :6])


@pytest.mark.parametrize("mask_pad_keys", [False, True])
def test_query_blocks_give_the_unblocked_attention_with_the_same_dropout_masks(mask_pad_keys):
    """Training mode (attention dropout on): blocked and unblocked outputs and parameter
    gradients agree to float32 summation-order rounding, so the blocks draw the same mask."""
    rs = np.random.RandomState(6)
    valid = jnp.asarray(np.asarray(_inputs(rs)) > 0)
    x = jnp.asarray(rs.randn(4, L, H).astype(np.float32)) * valid[..., None]
    w = jnp.asarray(rs.randn(4, L, H).astype(np.float32))
    params = _perturbed(nn.unbox(_params())["params"]["levels_0"])

    def run(query_block):
        block = SASRecBlock(hidden=H, n_heads=2, inner=24, dropout=0.4, mask_pad_keys=mask_pad_keys,
                            query_block=query_block)
        def loss(p):
            y = block.apply({"params": p}, x, valid, deterministic=False, rngs={"dropout": jax.random.key(3)})
            return (y * w).sum(), y
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, full), g_full = run(0)
    (_, blocked), g_blocked = run(5)
    no_dropout = SASRecBlock(hidden=H, n_heads=2, inner=24, dropout=0.0, mask_pad_keys=mask_pad_keys).apply(
        {"params": params}, x, valid)
    assert not np.allclose(full, no_dropout, atol=1e-3)          # dropout is on
    # Values are O(1) (layer-normed); sums of <= L + H terms in float32: a few ulps of the scale.
    np.testing.assert_allclose(blocked, full, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_blocked), jax.tree.leaves(g_full)):
        scale = max(float(np.abs(b).max()), 1.0)                   # gradients sum over B x L rows
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)


def test_hash_dropout_keeps_the_right_fraction_and_scales():
    x = jnp.ones((200, 1000))
    y = hash_dropout(x, 0.3, jnp.array([7, 11], jnp.uint32))
    kept = np.asarray(y) != 0
    assert kept.mean() == pytest.approx(0.7, abs=0.005)            # 200k draws: sd 0.001
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    # Neighbouring elements and two seeds are uncorrelated.
    assert abs(np.corrcoef(kept[:, :-1].ravel(), kept[:, 1:].ravel())[0, 1]) < 0.01
    other = np.asarray(hash_dropout(x, 0.3, jnp.array([8, 11], jnp.uint32))) != 0
    assert abs(np.corrcoef(kept.ravel(), other.ravel())[0, 1]) < 0.01
    bits = np.asarray(hash_bits(jnp.array([1, 2], jnp.uint32), (1 << 16,)))
    assert np.histogram(bits, bins=16, range=(0, 2**32))[0].min() > 3700   # 4096 expected per bin


def test_bf16_compute_with_fp32_params():
    rs = np.random.RandomState(5)
    x = _inputs(rs)
    f32, bf16 = _model(), _model(dtype=jnp.bfloat16)
    params = _params()
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(params)))
    hb = jax.jit(bf16.apply)(params, x)
    assert hb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(hb, np.float32), jax.jit(f32.apply)(params, x), atol=0.1)


def test_sharded_forward_matches_one_device():
    """Also in training mode: hash dropout masks depend on global element indices only,
    so 8 devices draw exactly the masks 1 device draws."""
    rs = np.random.RandomState(6)
    model = _model(n_items=39)  # 40 table rows: divisible by the tensor axis
    x = _inputs(rs, batch=8, n_pads=(0, 3, 7, 11, 1, 2, 4, 5)) % 40
    init = lambda: model.init(KEY, x)
    train = lambda p, x: model.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    ref = jax.jit(train)(jax.jit(init)(), x)
    layout = Layout.build((2, 2, 2))
    mesh = layout.mesh
    shardings = layout.shardings(jax.eval_shape(init))
    with layout.activate():
        params = jax.jit(init, out_shardings=shardings)()
        assert params["params"]["item_embedding"].value.sharding.spec[0] == "tensor"
        x_sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        out = jax.jit(train)(params, x_sharded)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(out, ref, atol=1e-5)
