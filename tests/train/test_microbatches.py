"""Gradient accumulation over strided slices equals the one-big-batch update."""
import jax
import numpy as np
import optax
import pytest

from jaxrec.config import build_config
from jaxrec.train import pipeline
from jaxrec.train.session import Session, make_train_step
from tests.helpers import TINY_RUN


def one_step(microbatches: int, mesh: dict):
    raw = {**TINY_RUN, "model": {**TINY_RUN["model"], "dropout": 0.0}, "mesh": mesh}
    session = Session(build_config(raw, "tiny"))
    tx = optax.sgd(0.1)
    make_state, _, shardings = session.state_layout(tx)
    state = session.init_state(make_state, shardings)
    records = session.task.train_records()
    # Uneven target counts per row: exactness needs slices weighted by their target counts.
    batch = {k: np.stack([records[i][k] for i in range(16)]) for k in records[0]}
    step = jax.jit(make_train_step(session.task, tx, lambda s: 0.1, 1, microbatches))
    with session.layout.activate():
        new_state, metrics = step(state, session.frozen, pipeline.to_global(batch, session.layout), jax.random.key(0))
    return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mesh", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_four_slices_equal_one_batch(mesh):
    whole, m1 = one_step(1, mesh)
    sliced, m4 = one_step(4, mesh)
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert m4["weight"] == m1["weight"]
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
