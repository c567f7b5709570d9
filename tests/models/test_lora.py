"""LoRA / MoE-LoRA: closed-form expectations (zero B, one-hot gates, merging, gradients)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxrec.models.llama import Llama, LlamaConfig, abstract_params, forward, init_adapters, init_params
from jaxrec.models.lora import (ALL_PROJECTIONS, LoRADense, LoraConfig, count_params, merge_lora, merge_trainable,
                                split_trainable)

BASE = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
MOE = LoraConfig(rank=8, alpha=16.0, num_experts=4, targets=ALL_PROJECTIONS)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (3, 7)))


@pytest.fixture(scope="module")
def base_params():
    return init_params(Llama(BASE), jax.random.key(0))


@pytest.fixture(scope="module")
def moe_params(base_params):
    """Base + freshly initialised MoE-LoRA adapters (B = 0)."""
    return init_adapters(Llama(BASE.with_lora(MOE)), base_params, jax.random.key(3))


def randomize_b(params, seed=1, scale=0.3):
    """Give every lora_b a nonzero value (init has B = 0)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for path in sorted(flat):
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(scale * rng.normal(size=flat[path].shape), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def softmax_gates(seed, batch=3, experts=4):
    z = np.random.default_rng(seed).normal(size=(batch, experts)) * 2
    return jnp.asarray(np.exp(z) / np.exp(z).sum(-1, keepdims=True), jnp.float32)


def test_lora_dense_matches_per_expert_sum():
    """Gate folding equals the unfolded mixture y = xW + s Σ_e g_e (x A_e) B_e (numpy)."""
    layer = LoRADense(12, ("embed", "mlp"), use_bias=True, lora=LoraConfig(rank=6, alpha=3.0, num_experts=3))
    x = np.random.default_rng(1).normal(size=(2, 5, 10)).astype(np.float32)
    g = np.asarray(softmax_gates(2, batch=2, experts=3))
    params = layer.init(jax.random.key(0), x, g)["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero B and bias
    got = layer.apply({"params": params}, x, g)
    p = jax.tree.map(np.asarray, params)
    p = {k: getattr(v, "value", v) for k, v in p.items()}
    want = x @ p["kernel"] + p["bias"]
    for e in range(3):
        a_e, b_e = p["lora_a"][:, 2 * e:2 * e + 2], p["lora_b"][2 * e:2 * e + 2]
        want = want + (3.0 / 2) * g[:, e, None, None] * ((x @ a_e) @ b_e)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [LoraConfig(rank=4, targets="q_proj|v_proj"), MOE], ids=["lora", "moe"])
def test_zero_b_equals_base(base_params, moe_params, lora):
    model = Llama(BASE.with_lora(lora))
    params = moe_params if lora is MOE else init_adapters(model, base_params, jax.random.key(3))
    gates = softmax_gates(4) if lora.num_experts > 1 else None
    got = forward(model, params, IDS, lora_gates=gates).logits
    want = forward(Llama(BASE), base_params, IDS).logits
    np.testing.assert_allclose(got, want, atol=1e-6)
    # and the adapters are really there: a nonzero B moves the output
    moved = forward(model, randomize_b(params), IDS, lora_gates=gates).logits
    assert np.abs(np.asarray(moved - want)).max() > 1e-2


def adapted_projections(lora):
    trainable, _ = split_trainable(abstract_params(Llama(BASE.with_lora(lora))))
    return {p[-2] for p in traverse_util.flatten_dict(trainable) if p[-1] == "lora_a"}


def test_targets_select_projections():
    assert adapted_projections(LoraConfig(targets="q_proj|v_proj")) == {"q_proj", "v_proj"}
    assert adapted_projections(LoraConfig(targets=".*_proj")) == set(ALL_PROJECTIONS.split("|"))
    assert adapted_projections(LoraConfig(targets="(gate|up|down)_proj")) == {"gate_proj", "up_proj", "down_proj"}


def test_one_hot_gate_equals_plain_lora_of_that_expert(moe_params):
    moe_model = Llama(BASE.with_lora(MOE))
    moe = randomize_b(moe_params, seed=5)
    experts = [2, 0, 3]                       # a different expert per row
    gates = jax.nn.one_hot(jnp.asarray(experts), 4)
    got = forward(moe_model, moe, IDS, lora_gates=gates).logits

    r_e = MOE.expert_rank
    plain_model = Llama(BASE.with_lora(dataclasses.replace(MOE, rank=r_e, num_experts=1)))
    for row, e in enumerate(experts):
        def slice_expert(path, leaf):
            if path[-1].key == "lora_a":
                return leaf[..., e * r_e:(e + 1) * r_e]
            if path[-1].key == "lora_b":
                return leaf[..., e * r_e:(e + 1) * r_e, :]
            return leaf
        plain = jax.tree_util.tree_map_with_path(slice_expert, moe)
        want = forward(plain_model, plain, IDS).logits
        np.testing.assert_allclose(got[row], want[row], atol=1e-5)


def test_merged_weights_equal_adapter_forward(base_params, moe_params):
    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL_PROJECTIONS)
    model = Llama(BASE.with_lora(lora))
    params = randomize_b(init_adapters(model, base_params, jax.random.key(6)))
    merged = merge_lora(params, lora)
    assert not any(p[-1].startswith("lora_") for p in traverse_util.flatten_dict(merged))
    np.testing.assert_allclose(forward(Llama(BASE), merged, IDS).logits, forward(model, params, IDS).logits,
                               atol=1e-5)

    # MoE-LoRA merges for one fixed gate (one user's adapter)
    moe_model = Llama(BASE.with_lora(MOE))
    moe = randomize_b(moe_params, seed=7)
    gate = softmax_gates(8, batch=1)[0]
    want = forward(moe_model, moe, IDS, lora_gates=jnp.tile(gate, (3, 1))).logits
    np.testing.assert_allclose(forward(Llama(BASE), merge_lora(moe, MOE, gate), IDS).logits, want, atol=1e-5)
    with pytest.raises(ValueError, match="gate"):
        merge_lora(moe, MOE)


def test_gradients_reach_only_adapters(moe_params):
    model = Llama(BASE.with_lora(MOE))
    params = moe_params
    trainable, frozen = split_trainable(params)
    assert count_params(trainable) + count_params(frozen) == count_params(params)
    assert all(p[-1].startswith("lora_") for p in traverse_util.flatten_dict(trainable))
    gates = softmax_gates(10)
    tx = optax.adam(1e-2)

    def loss(trainable, frozen):
        logits = model.apply({"params": merge_trainable(trainable, frozen)}, IDS, lora_gates=gates).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    @jax.jit
    def train_step(trainable, frozen):
        grads = jax.grad(loss)(trainable, frozen)
        state = tx.init(trainable)
        updates, state = tx.update(grads, state, trainable)
        return grads, state, optax.apply_updates(trainable, updates)

    grads, state, updated = train_step(trainable, frozen)
    flat = traverse_util.flatten_dict(grads)
    assert set(flat) == set(traverse_util.flatten_dict(trainable))
    # Closed form at init (B = 0): dL/dA = (…)·Bᵀ = 0 exactly, dL/dB ≠ 0.
    assert all(np.all(np.asarray(g) == 0) for p, g in flat.items() if p[-1] == "lora_a")
    assert all(np.abs(np.asarray(g)).max() > 0 for p, g in flat.items() if p[-1] == "lora_b")
    # optimizer moments exist for the adapters only
    assert count_params([x for x in jax.tree.leaves(state) if x.ndim]) == 2 * count_params(trainable)
    new = merge_trainable(updated, frozen)
    for path, leaf in traverse_util.flatten_dict(new).items():
        if not path[-1].startswith("lora_"):
            assert leaf is traverse_util.flatten_dict(params)[path]   # frozen leaves untouched


def test_extra_trainable_patterns(base_params):
    trainable, frozen = split_trainable(base_params, extra=("lm_head", r"^norm/scale$"))
    assert set(traverse_util.flatten_dict(trainable)) == {("lm_head", "kernel"), ("norm", "scale")}
    assert ("lm_head", "kernel") not in traverse_util.flatten_dict(frozen)


def test_bf16_base_fp32_adapters(base_params):
    config = BASE.with_dtypes("bfloat16", "bfloat16").with_lora(MOE)
    model = Llama(config)
    bf16_base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base_params)
    params = init_adapters(model, bf16_base, jax.random.key(2))
    trainable, frozen = split_trainable(params)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    logits = forward(model, randomize_b(params), IDS, lora_gates=softmax_gates(3)).logits
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def test_dropout_only_in_training(base_params):
    lora = LoraConfig(rank=4, dropout=0.5, targets="q_proj")
    model = Llama(BASE.with_lora(lora))
    params = randomize_b(init_adapters(model, base_params, jax.random.key(0)))
    det = forward(model, params, IDS).logits
    np.testing.assert_array_equal(det, forward(model, params, IDS).logits)
    a = forward(model, params, IDS, deterministic=False, dropout_rng=jax.random.key(1)).logits
    b = forward(model, params, IDS, deterministic=False, dropout_rng=jax.random.key(2)).logits
    assert np.abs(np.asarray(a - b)).max() > 1e-4 and np.abs(np.asarray(a - det)).max() > 1e-4


def test_gate_errors(base_params, moe_params):
    moe_model = Llama(BASE.with_lora(MOE))
    params = moe_params
    with pytest.raises(ValueError, match="lora_gates"):
        moe_model.apply({"params": params}, IDS)
    with pytest.raises(ValueError, match="lora_gates must have shape"):
        moe_model.apply({"params": params}, IDS, lora_gates=jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="no MoE-LoRA"):
        Llama(BASE).apply({"params": base_params}, IDS, lora_gates=jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="multiple of num_experts"):
        LoraConfig(rank=6, num_experts=4)


def test_ilora_trainable_count_on_llama2_7b_shapes():
    """iLoRA spec: r=8 on all 7 projections of Llama-2-7B = 624,640 adapter params per layer
    (E=4 experts of rank 2 have the same count as one rank-8 LoRA). No weights allocated."""
    llama2 = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                         num_heads=32, num_kv_heads=32, head_dim=128, lora=LoraConfig(8, 32.0, 0.1, 4, ALL_PROJECTIONS))
    trainable, _ = split_trainable(abstract_params(Llama(llama2)))
    assert count_params(trainable) == 624_640 * 32
