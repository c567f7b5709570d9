"""The same decoder on an fsdp × tensor mesh of 8 simulated devices equals one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.llama import Llama, init_adapters, param_shardings
from jaxrec.models.lora import ALL_PROJECTIONS, LoraConfig
from jaxrec.sharding import Layout
from jaxrec.weights import load_pretrained
from tests.models import llm_fixtures as fx

pytest.importorskip("torch")
MOE = LoraConfig(rank=8, alpha=16.0, num_experts=2, targets=ALL_PROJECTIONS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 4 KV heads so the tensor axis (4) splits K/V on head boundaries.
    hf = fx.make_hf_model("llama", seed=8, num_key_value_heads=4)
    return fx.save_hf_model(hf, tmp_path_factory.mktemp("shard"))


def with_random_adapters(model, params, shardings=None):
    params = init_adapters(model, params, jax.random.key(1), shardings)
    return jax.tree_util.tree_map_with_path(lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, params)


def test_fsdp_tensor_mesh_equals_single_device(checkpoint):
    assert jax.device_count() == 8
    layout = Layout.build((1, 2, 4))
    config, sharded = load_pretrained(checkpoint, layout=layout, lora=None)
    config = config.with_lora(MOE)
    model = Llama(config)
    shardings = param_shardings(model, layout)
    sharded = with_random_adapters(model, sharded, shardings)
    assert sharded["layers"]["mlp"]["up_proj"]["lora_b"].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "tensor")

    ids, mask = fx.padded_batch(np.random.default_rng(0), [9, 5, 7, 2], total=9)
    gates = jnp.asarray([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5], [1.0, 0.0]], jnp.float32)

    def logits(params, ids, mask, gates):
        return model.apply({"params": params}, ids, mask, lora_gates=gates).logits

    batch = layout.batch((4, 9))
    inputs = jax.device_put((jnp.asarray(ids), jnp.asarray(mask), gates), batch)
    with layout.activate():
        step = jax.jit(logits, in_shardings=(shardings, batch, batch, batch))
        got = step(sharded, *inputs)
        assert got.sharding.shard_shape(got.shape)[0] == 2   # the batch stays split over fsdp

    single_params = jax.device_put(sharded, jax.devices()[0])
    want = jax.jit(logits)(single_params, jnp.asarray(ids), jnp.asarray(mask), gates)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
