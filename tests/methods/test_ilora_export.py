"""LLM exports: the merged Hugging Face model and the PEFT adapter of a LoRA run, checked
against transformers/peft, and the iLoRA export's recommender after the run is deleted.

Runs are not trained: one checkpoint of freshly initialised variables with random LoRA B
(B = 0 at init would make every merge trivially the base) and random router BatchNorm
statistics, so every exported piece changes the numbers.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.cli import main
from tests.helpers import torch_logits
from tests.methods.ilora_fixtures import ilora_raw_config, make_llara_dir, make_tiny_llm, save_untrained_guide

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _randomized(tree, rng: np.random.Generator, scale: float):
    """Replace lora_b leaves by noise and BatchNorm mean/var by plausible random values."""
    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name == "lora_b":
            return jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
        if name == "mean":
            return jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(leaf, tree)


def save_run(raw: dict, run_dir, seed: int = 0):
    """A run directory with one checkpoint of random (untrained) iLoRA/LoRA variables."""
    from jaxrec.config import build_config, to_dict
    from jaxrec.train.checkpoint import RunCheckpoints
    from jaxrec.train.runs import start_session
    from jaxrec.train.state import schedule, with_clipping

    config = build_config({**raw, "run": {**raw["run"], "dir": str(run_dir)}}, "untrained")
    session = start_session(config)     # opens the guide: the projector's input size is its hidden size
    make_state, _, shardings = session.state_layout(
        with_clipping(session.task.optimizer(schedule(config.train, 1)), config.train.grad_clip))
    state = session.init_state(make_state, shardings)
    rng = np.random.default_rng(seed)
    state = state.replace(params=_randomized(state.params, rng, 0.05),
                          model_state=_randomized(state.model_state, rng, 0.0))
    ckpts = RunCheckpoints(run_dir, async_save=False)
    ckpts.save(1, state, None, meta={"best_step": 1, "step": 1}, config=to_dict(config),
               vocab=dict(session.task.vocabulary()), inputs=session.fingerprints())
    ckpts.close()
    return run_dir


@pytest.fixture()
def inputs(tmp_path):
    data = make_llara_dir(tmp_path / "data")
    llm = make_tiny_llm(tmp_path / "llm", tie=False)
    guide = save_untrained_guide(data, tmp_path / "guide")
    return tmp_path, data, llm, guide


def _jaxrec_logits(run_dir, ids, mask):
    """The run's LLM with its adapters applied unmerged (the in-process model)."""
    from jaxrec.models.lora import merge_trainable
    from jaxrec.train.runs import open_run
    opened = open_run(run_dir)
    task = opened.task
    llm = merge_trainable(opened.state.params["adapters"], opened.session.frozen["llm"])
    out = task.model.apply({"params": jax.device_get(llm)}, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out.logits)


def _close_on_logit_scale(got, want, mask):
    # float32 on both sides, different summation orders: differences are ~1e-6 of the logit
    # scale; 1e-4 of it (the bar) still catches a missing delta, a wrong transpose or
    # scale, or a q/k permutation, each of which moves logits by a sizeable fraction of it.
    # Padding positions are compared nowhere: what a fully masked query attends to is arbitrary.
    got, want = got[mask == 1], want[mask == 1]
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-4 * scale, (float(np.abs(got - want).max()), scale)


def _reference_recommendations(run_dir, histories, k):
    """In-process answers: the guide's top K by a numpy brute force, then the run's own
    evaluation scoring (`evaluation._eval_functions`) of template 0 prompts."""
    from jaxrec.methods.ilora import evaluation
    from jaxrec.methods.ilora.examples import Examples, FixedDraws
    from jaxrec.train.runs import open_run
    opened = open_run(run_dir)
    task, session = opened.task, opened.session
    index = {t: i for i, t in enumerate(task.store.item_vocab.tolist())}
    ids = [[index[t] for t in h] for h in histories]
    H = task.m.max_history
    history = np.zeros((len(ids), H), np.int32)
    for r, h in enumerate(ids):          # the prompt shows the last max_history items
        history[r, :len(h[-H:])] = h[-H:]
    examples = Examples(history, np.asarray([len(h[-H:]) for h in ids], np.int32), np.zeros(len(ids), np.int32),
                        np.arange(len(ids)))
    guide = task.guide
    h = np.asarray(guide.model.apply({"params": guide.params}, jnp.asarray(examples.left_padded()),
                                     deterministic=True, last_only=True), np.float64)
    scores = h @ np.asarray(guide.params["item_embedding"], np.float64).T
    scores[:, 0] = -np.inf
    if task.config.eval.exclude_history:
        for r, hist in enumerate(ids):
            scores[r, hist] = -np.inf
    candidates = np.argsort(-scores, axis=1, kind="stable")[:, :task.m.candidates].astype(np.int32)
    draws = FixedDraws(candidates, np.zeros(len(ids), np.int32), np.zeros(len(ids), np.int32))
    data = task.builder.evaluation("reference", examples, draws)
    _, score = evaluation._eval_functions(task, True, session.layout)
    batch = {key: jnp.asarray(v) for key, v in data.arrays.items()}
    with session.layout.activate():
        llm_scores = np.asarray(score(opened.state.params, session.frozen, opened.state.model_state["gate_stats"],
                                      batch))
    items = task.store.item_vocab.tolist()
    out = []
    for c, s in zip(candidates, llm_scores):
        order = np.argsort(-s, kind="stable")[:k]
        out.append([(items[c[j]], float(s[j])) for j in order])
    return out


def _same_recommendations(got, want, rel):
    for g, w in zip(got, want):
        scale = max(abs(s) for _, s in w)
        assert [t for t, _ in g] == [t for t, _ in w]
        assert np.allclose([s for _, s in g], [s for _, s in w], rtol=0, atol=rel * scale)


HISTORIES = [["3", "4", "5"], ["10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20", "21"], ["35"]]


@pytest.mark.slow   # ~1 min: two LLM loads in torch, the jaxrec scoring compiled twice
def test_lora_export_loads_in_transformers_and_peft_and_recommends_alone(inputs):
    from jaxrec.export.manifest import read_manifest
    from jaxrec.export.recommend import load_recommender
    tmp, data, llm, guide = inputs
    run = save_run(ilora_raw_config(data, llm, guide, tmp / "run", experts=1), tmp / "run")
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 400, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0                                     # left padding
    want = _jaxrec_logits(run, ids, mask)
    reference = _reference_recommendations(run, HISTORIES, k=5)

    assert main(["export", str(run), str(tmp / "out")]) == 0
    out = tmp / "out"
    manifest = read_manifest(out)
    assert manifest["kind"] == "llm_rerank" and manifest["external"] == {}
    assert manifest["details"]["adapter_base"]["path"] == str(llm.absolute())
    assert {"merged/config.json", "merged/model.safetensors", "merged/tokenizer.json",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["files"])

    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    _close_on_logit_scale(torch_logits(merged, ids, mask), want, mask)
    base = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    base_logits = torch_logits(base, ids, mask)
    assert np.abs(base_logits - want).max() > 1e-2 * np.abs(want).max()   # the adapter matters
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    _close_on_logit_scale(torch_logits(adapted, ids, mask), want, mask)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer("Red Wolf, Blue Moon")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(llm)("Red Wolf, Blue Moon")["input_ids"]

    for gone in (run, guide, data):
        shutil.rmtree(gone)
    got = load_recommender(out).recommend(HISTORIES, k=5)
    # merged weights vs adapters applied on the fly: float32 rounding of W + s·AB only
    _same_recommendations(got, reference, rel=1e-4)


@pytest.mark.slow   # ~1 min: the scoring compiled in process and in the recommender
def test_ilora_export_recommends_like_the_run_after_it_is_deleted(inputs):
    from jaxrec.export.manifest import ExportError, read_manifest
    from jaxrec.export.recommend import UnknownItems, load_recommender
    from jaxrec.weights.fingerprint import checkpoint_sha256
    tmp, data, llm, guide = inputs
    run = save_run(ilora_raw_config(data, llm, guide, tmp / "run", experts=4, gate="resnet"), tmp / "run")
    reference = _reference_recommendations(run, HISTORIES, k=20)

    assert main(["export", str(run), str(tmp / "out")]) == 0
    out = tmp / "out"
    manifest = read_manifest(out)
    assert manifest["external"]["base_model"] == {"path": str(llm.absolute()), "sha256": checkpoint_sha256(llm)}
    assert not (out / "merged").exists() and not (out / "adapter").exists()
    assert "top 20" in manifest["details"]["candidates"]
    spec = json.loads((out / "ilora.json").read_text())
    assert spec["lora"] == {"rank": 8, "alpha": 32.0, "experts": 4, "scale": 16.0,
                            "targets": spec["model_config"]["lora_targets"]}
    from safetensors.numpy import load_file
    trained = load_file(str(out / "trained.safetensors"))
    assert any(k.startswith("gate/batch_stats/") and k.endswith("/var") for k in trained)

    for gone in (run, guide, data):
        shutil.rmtree(gone)
    rec = load_recommender(out)
    # the same computation on the same device: only batch-shape-dependent fusion can differ
    _same_recommendations(rec.recommend(HISTORIES, k=20), reference, rel=1e-5)
    with pytest.raises(UnknownItems, match="row 1: 'nope'"):
        rec.recommend([["3"], ["nope"]], k=5)
    with pytest.raises(ExportError, match="k: 21"):
        rec.recommend(HISTORIES, k=21)
