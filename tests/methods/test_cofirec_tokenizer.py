"""The CoFiRec / TIGER tokenizer task (`task: cofirec.tokenizer`) on the planted hierarchy.

References are independent of the code under test: the planted topic / sub-topic labels of
`jaxrec.data.synthetic_hierarchy`, a label-shuffled purity (chance), a 1-device run of the
same step (for the 8-device mesh), and the artifact saved in the checkpoint (for reload
and resume).
"""
from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

from jaxrec.config import ConfigError, build_config
from jaxrec.methods.cofirec.semantic_ids import SemanticIds
from jaxrec.methods.cofirec.tokenizer import purity
from jaxrec.sharding import Layout
from jaxrec.train import pipeline
from jaxrec.train.session import Session, make_train_step

pytestmark = pytest.mark.slow   # ~4 min on 2 cores: trained runs and k-means inits on 8 simulated devices

SIZES = [16, 64, 256]          # 8 topics, 32 sub-topics, 512 items in the default hierarchy


def raw_config(run_dir, mode="levels", steps=200, **model):
    return {"task": "cofirec.tokenizer", "run": {"dir": str(run_dir), "seed": 0},
            "data": {"source": "synthetic", "synthetic": "hierarchy", "num_threads": 1, "prefetch": 2},
            "model": {"mode": mode, "codebook_sizes": SIZES, "hidden": [64], "latent": 16, "restart_every": 20,
                      **model},
            "train": {"batch_size": 128, "steps": steps, "lr": 1e-3, "warmup_steps": 5, "eval_every": 100,
                      "log_every": 50, "progress": False},
            "eval": {"metric": "unique_ratio"},
            "checkpoint": {"every": 100, "keep": 3, "async_save": False}}


def train_run(raw, stop_at_step=None):
    from jaxrec.train.trainer import train
    return train(build_config(raw, "test"), stop_at_step=stop_at_step)


def saved_table(run_dir, step="best") -> SemanticIds:
    from jaxrec.train.runs import open_run
    run = open_run(run_dir, step, load_frozen=False)
    return SemanticIds.from_artifact(run.artifacts["semantic_ids"], str(run_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokenizer")
    levels = train_run(raw_config(tmp / "levels"))
    residual = train_run(raw_config(tmp / "residual", mode="residual"))
    return tmp, levels, residual


def chance_purity(codes, labels, seed=0):
    return purity(codes, np.random.default_rng(seed).permutation(labels))


def test_levels_recover_the_planted_hierarchy_and_residual_codes_do_not(runs):
    """CoFiRec's level 1 groups items by planted topic and level 2 by sub-topic (purity >= 0.95
    each, where chance is < 0.35). TIGER's first residual level also finds the topics (they
    dominate the fused vector), but its second level codes the offset from the level-1
    centroid, shared across topics, so it does not isolate sub-topics (purity < 0.7)."""
    tmp, levels, residual = runs
    from jaxrec.data.synthetic_hierarchy import HierarchyConfig, hierarchy_world
    world = hierarchy_world(HierarchyConfig.default())
    topic, subtopic = world.item_topic[1:], world.item_subtopic[1:]
    table = saved_table(tmp / "levels").item_codes
    assert table.shape == (512, 4) and saved_table(tmp / "levels").level_names[:3] == ("topic", "subtopic", "title")
    assert purity(table[:, 0], topic) >= 0.95 > 0.35 > chance_purity(table[:, 0], topic)
    assert purity(table[:, 1], subtopic) >= 0.95 > 0.35 > chance_purity(table[:, 1], subtopic)
    assert levels.tests["test"]["purity/topic"] == purity(table[:, 0], topic)
    rq = saved_table(tmp / "residual").item_codes
    assert rq.shape == (512, 4)            # 3 residual levels + TIGER's dedup position
    assert purity(rq[:, 1], subtopic) < 0.7
    assert residual.tests["test"]["purity/subtopic"] < levels.tests["test"]["purity/subtopic"] - 0.25


def test_reports_and_dedup_leave_no_shared_id(runs):
    _, levels, residual = runs
    for report in (levels.tests["test"], residual.tests["test"]):
        assert report["collision_rate_dedup"] == 0.0
        assert report["unique_ratio"] == pytest.approx(1 - report["collision_rate_letter"])
        assert 0 < report["utilisation/" + next(k.split("/")[1] for k in report if k.startswith("utilisation/"))] <= 1
        assert np.isfinite(report["reconstruction"]) and report["reconstruction"] > 0
    assert residual.tests["test"]["dedup_levels"] == 1
    # Items identical in every level: the dedup column numbers them 0, 1, ... by item index.
    table = SemanticIds(np.array([[-1, -1], [0, 1], [0, 1], [2, 0], [0, 1]], np.int32), (3, 2), ("a", "b"))
    assert table.with_dedup().item_codes[:, -1].tolist() == [0, 1, 0, 2]


def test_table_is_identical_after_reload_and_after_resume(runs, tmp_path):
    tmp, _, _ = runs
    from jaxrec.train.runs import open_run
    run = open_run(tmp / "levels", "latest")
    again = run.task.artifacts(run.state.params, run.session.frozen, run.state.model_state)["semantic_ids"]
    assert again == run.artifacts["semantic_ids"]        # recomputed from the restored parameters
    raw = raw_config(tmp_path / "resumed")
    train_run(raw, stop_at_step=100)
    train_run(raw)                                         # resumes at step 100, with restarts at 120, 140, ...
    for step in ("100", "200"):
        assert saved_table(tmp_path / "resumed", step).codes.tobytes() == \
            saved_table(tmp / "levels", step).codes.tobytes()


def test_export_writes_the_table_and_a_manifest(runs, tmp_path):
    from jaxrec.train.runs import export_run
    tmp, _, _ = runs
    paths = export_run(tmp / "residual", tmp_path / "out")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["manifest.json", "semantic_ids.json", "semantic_ids.npy"]
    table = np.load(tmp_path / "out" / "semantic_ids.npy", allow_pickle=False)
    assert np.array_equal(table, saved_table(tmp / "residual").codes)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "semantic_ids" and manifest["task"] == "cofirec.tokenizer"
    assert manifest["details"]["levels"] == ["rq1", "rq2", "rq3", "dedup"] and manifest["details"]["n_items"] == 512
    assert set(manifest["files"]) == {"semantic_ids.json", "semantic_ids.npy"}


def _steps(raw, layout=None, steps=3):
    """Init (k-means included) and `steps` SGD updates on the config's mesh, or on `layout`."""
    session = Session(build_config(raw, "test"), load_frozen=layout is None)
    if layout is not None:
        session.layout, session.frozen = layout, session.task.load_frozen(layout)
    tx = optax.sgd(0.1)
    make_state, _, shardings = session.state_layout(tx)
    state = session.init_state(make_state, shardings)
    init = jax.device_get(state.params)
    step = jax.jit(make_train_step(session.task, tx, lambda s: 0.1, steps), donate_argnums=0)
    with session.layout.activate():
        for s in range(steps):
            batch = {"item": (np.arange(16, dtype=np.int32) * 7 + s) % 30 + 1}
            state, metrics = step(state, session.frozen, pipeline.to_global(batch, session.layout), jax.random.key(0))
    codes, _ = session.task.item_codes(state.params, session.frozen, state.model_state)
    return init, jax.device_get(state.params), jax.device_get(state.model_state), codes


def test_eight_devices_match_one_device(tmp_path):
    """(2, 2, 2) mesh vs a single device on the tiny hierarchy (30 items): the same k-means
    init and 3 SGD updates (plain SGD: Adam's g / sqrt(v) would magnify round-off in near-zero
    gradients) up to float32 reduction order, ~1e-7 relative per op over a few dozen ops,
    bounded at rtol 1e-5 / atol 1e-6; identical codes. Restarts at every step exercise the
    dead-code restart on sharded batches. Levels mode only: residual mode shares the
    parameter and batch layouts, and its quantizer's sharded gradients are checked in
    tests/models/test_quantizers.py."""
    assert jax.device_count() == 8
    raw = raw_config(tmp_path, "levels", restart_every=1, restart_until=1.0, codebook_sizes=[4, 8, 16])
    raw["data"]["synthetic"] = "hierarchy_tiny"
    raw["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
    init8, params8, state8, codes8 = _steps(raw)
    init1, params1, state1, codes1 = _steps(raw, Layout.build((1, 1, 1), devices=jax.devices()[:1]))
    for a, b in zip(jax.tree.leaves(init8), jax.tree.leaves(init1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((params8, state8)), jax.tree.leaves((params1, state1))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(codes8, codes1)


def _error(tmp_path, **changes) -> str:
    raw = raw_config(tmp_path)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        raw[section][name] = value
    from jaxrec.train.runs import start_session
    with pytest.raises(ConfigError) as info:
        start_session(build_config(raw, "bad.yaml"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad.yaml")
    return message


def test_bad_inputs_are_one_line_errors_naming_the_key(tmp_path):
    assert "model.levels" in _error(tmp_path, model__levels=["topic", "colour"])
    assert "model.codebook_sizes" in _error(tmp_path, model__codebook_sizes=[16, 64])            # 3 levels
    msg = _error(tmp_path, data__synthetic="hierarchy_tiny", model__codebook_sizes=[64, 8, 8])  # 30 items
    assert "model.codebook_sizes" in msg and "30 distinct" in msg
    wrong = tmp_path / "emb.npy"
    np.save(wrong, np.zeros((512, 2, 4), np.float32))                   # 2 levels, 3 expected
    msg = _error(tmp_path, model__embeddings=str(wrong))
    assert "model.embeddings" in msg and "emb.npy" in msg
    np.save(wrong, np.zeros((512, 3, 4), np.int64))                     # integer dtype
    assert "model.embeddings" in _error(tmp_path, model__embeddings=str(wrong))
    assert "model.text" in _error(tmp_path, model__text=str(tmp_path / "item_text.json"))
    assert "eval.metric" in _error(tmp_path, eval__metric="purity")
    assert "model.cf_guide" in _error(tmp_path, model__mode="residual", model__cf_guide=str(tmp_path))


def _untrained_guide(run_dir, synthetic):
    """A seqrec run directory with one checkpoint of a random SASRec (hidden 8)."""
    from tests.methods.ilora_fixtures import save_untrained_run
    raw = {"task": "seqrec", "data": {"source": "synthetic", "synthetic": synthetic, "max_len": 10},
           "model": {"hidden": 8, "layers": 1}}
    return save_untrained_run(raw, run_dir)


def test_cf_level_comes_from_a_guide_on_the_same_items(tmp_path):
    other = _untrained_guide(tmp_path / "other", "hierarchy_tiny")
    msg = _error(tmp_path, model__cf_guide=str(other))
    assert "model.cf_guide" in msg and "different item vocabulary" in msg
    guide = _untrained_guide(tmp_path / "guide", "hierarchy")
    raw = raw_config(tmp_path / "run", cf_guide=str(guide), codebook_sizes=[16, 64, 256, 32])
    from jaxrec.train.runs import start_session
    session = start_session(build_config(raw, "test"))
    task = session.task
    assert task.level_names == ("topic", "subtopic", "title", "cf") and task.net.d_cf == 8
    table = np.asarray(session.upstream["cf_guide"].host_params()["item_embedding"])
    # the CF input is the guide's item table, row for row, standardised per dimension
    z = (table[1:] - table[1:].mean(0)) / table[1:].std(0) / np.sqrt(8)
    np.testing.assert_allclose(task.inputs.cf[1:], z, rtol=1e-4, atol=1e-5)
    tx = optax.adam(1e-3)
    make_state, _, shardings = session.state_layout(tx)
    state = session.init_state(make_state, shardings)
    assert state.params["quantizer"]["codebooks"].shape == (4, 256, 16) and "cf_encoder" in state.params
    ids = task.semantic_ids(task.item_codes(state.params, session.frozen, state.model_state)[0])
    assert ids.level_names[:4] == ("topic", "subtopic", "title", "cf") and ids.is_unique()
