"""The bottom layer: one rules table (from YAML), one fallback, constraints that apply.

The two lowering tests are the point of `Layout.activate()`: on a data × fsdp × tensor
mesh of 8 simulated devices the compiled train step carries the activation layouts the
models ask for, and computes the same loss as one device.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from jaxrec.config import build_config
from jaxrec.models.llama import Llama, LlamaConfig, init_params, param_shardings
from jaxrec.models.lora import ALL_PROJECTIONS, LoraConfig
from jaxrec.sharding import RULES_FILE, Layout, MeshError, constrain, default_rules, fit_spec
from jaxrec.train import pipeline
from jaxrec.train.session import Session, make_train_step
from jaxrec.train.state import TrainState
from jaxrec.train.task import Clock
from tests.helpers import TINY_RUN

MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}
BATCH_ROWS = '[{"data", "fsdp"}, {}, {}]'       # a [batch, seq, embed] activation, batch over data × fsdp


def constraints(lowered) -> set[str]:
    """The shardings of every `sdy.sharding_constraint` in a lowered program."""
    return set(re.findall(r"sdy\.sharding_constraint[^\n]*?<@mesh, (\[[^\n]*?\])>", lowered.as_text()))


def loss_tolerance(value: float) -> float:
    # float32 sums regrouped across 8 shards: a few ulps of each term, far below 1e-5 for
    # losses of order 1 (the bound), scaled for larger ones.
    return 1e-5 * max(1.0, abs(value))


def test_default_rules_come_from_the_yaml_table():
    table = yaml.safe_load(RULES_FILE.read_text())["rules"]
    assert default_rules() == tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in table)
    assert ("batch", ("data", "fsdp")) in default_rules()
    with pytest.raises(MeshError, match=r"mesh.rules\[0\]: \['model'\] are not mesh axes"):
        Layout.build((-1, 1, 1), [["embed", "model"]])


def test_fit_spec_is_the_one_fallback_for_uneven_dimensions():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert fit_spec(P(("data", "fsdp"), None), (1, 5), sizes) == P(None, None)      # an init trace's batch of 1
    assert fit_spec(P("tensor", "fsdp"), (7, 4), sizes) == P(None, "fsdp")
    layout = Layout.build((2, 2, 2))
    assert layout.spec(("vocab", "embed"), (49, 32)) == P(None, "fsdp")
    assert layout.round_batch(5) == 8 and layout.data_parallel_size == 4


def test_constrain_is_a_no_op_outside_an_active_layout():
    x = jnp.ones((4, 3, 2))
    text = jax.jit(lambda x: constrain(x, ("batch", "seq", "embed"))).lower(x).as_text()
    assert "sharding_constraint" not in text
    layout = Layout.build((2, 2, 2))
    with layout.activate():
        text = jax.jit(lambda x: constrain(x, ("batch", "seq", "embed"))).lower(x).as_text()
    assert "sharding_constraint" in text


def _sasrec_step(mesh: dict):
    raw = {**TINY_RUN, "mesh": mesh}
    session = Session(build_config(raw, "tiny"))
    tx = optax.sgd(0.1)
    make_state, _, shardings = session.state_layout(tx)
    state = session.init_state(make_state, shardings)
    records = session.task.train_records()
    batch = {k: np.stack([records[i][k] for i in range(16)]) for k in records[0]}
    step = make_train_step(session.task, tx, lambda s: 0.1, 1)
    return session, state, shardings, batch, step


def test_sasrec_train_step_carries_the_activation_constraints_and_the_one_device_loss():
    assert jax.device_count() == 8
    session, state, shardings, batch, step = _sasrec_step(MESH_222)
    layout = session.layout
    with layout.activate():
        global_batch = pipeline.to_global(batch, layout)
        jitted = jax.jit(step, in_shardings=(shardings, None, jax.tree.map(lambda x: x.sharding, global_batch),
                                             layout.replicated()), out_shardings=(shardings, None))
        lowered = jitted.lower(state, session.frozen, global_batch, jax.random.key(0))
        _, metrics = lowered.compile()(state, session.frozen, global_batch, jax.random.key(0))
    assert BATCH_ROWS in constraints(lowered)

    # One device, the same parameters and key: the loss the step computes without a mesh.
    host = jax.device_get(state)
    single = TrainState(step=host.step, params=host.params, opt_state=host.opt_state, model_state=host.model_state)
    rng = jax.random.fold_in(jax.random.key(0), 0)
    want, _ = jax.jit(lambda p: session.task.loss(p, {}, {}, batch, rng, Clock.at(0)))(single.params)
    got = float(metrics["loss"])
    assert got == pytest.approx(float(want), abs=loss_tolerance(float(want)))


def test_llama_lora_loss_carries_the_activation_constraints_and_the_one_device_loss():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, lora=LoraConfig(rank=4, alpha=8.0, targets=ALL_PROJECTIONS))
    model = Llama(config)
    params = init_params(model, jax.random.key(0))
    # B != 0 so the adapters take part in the loss
    params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, params)
    ids = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int32)

    def loss(p, ids):
        logits = model.apply({"params": p}, ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    want = float(jax.jit(loss)(jax.device_put(params, jax.devices()[0]), ids))
    layout = Layout.build((2, 2, 2))
    shardings = param_shardings(model, layout)
    sharded, sharded_ids = jax.device_put(params, shardings), jax.device_put(ids, layout.batch(ids.shape))
    with layout.activate():
        lowered = jax.jit(jax.value_and_grad(loss)).lower(sharded, sharded_ids)
        got, _ = lowered.compile()(sharded, sharded_ids)
    found = constraints(lowered)
    assert BATCH_ROWS in found                                          # hidden states [batch, seq, embed]
    assert '[{"data", "fsdp"}, {}, {"tensor"}]' in found                # MLP [batch, seq, mlp] / logits
    assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in found            # attention [batch, seq, heads, kv]
    assert float(got) == pytest.approx(want, abs=loss_tolerance(want))
