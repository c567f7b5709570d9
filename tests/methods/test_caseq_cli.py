"""End-to-end: `jaxrec train` + `jaxrec evaluate` of CaseQ on the tiny synthetic preset."""
import json
import logging

import numpy as np
import pytest

from jaxrec.cli import main
from tests.helpers import results, write_config

pytestmark = pytest.mark.slow   # ~50 s of CPU: two compiled models on an 8-device mesh


@pytest.fixture(scope="module")
def caseq_run(tmp_path_factory):
    """CaseQ (C=2, 2 levels, lambda=0.5) trained on a 2x2x2 mesh of 8 simulated devices."""
    tmp = tmp_path_factory.mktemp("caseq")
    cfg = write_config(tmp / "caseq.yaml", tmp / "run", task="caseq",
                       data={"split": "gap", "lapse": 5},
                       model={"hidden": 16, "layers": 2, "contexts": 2, "kl_weight": 0.5, "pseudo_sequences": 3,
                              "loss": "ce", "eval_gaps": [2]},
                       mesh={"data": 2, "fsdp": 2, "tensor": 2})
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


def test_train_reports_gap_tests_and_beats_popularity(caseq_run):
    report = results(caseq_run)
    assert set(report["tests"]) == {"test", "test_gap", "test_gap2"}
    for split, values in report["tests"].items():
        assert values["ndcg@10"] > 1.5 * report["baselines"]["popularity"][split]["ndcg@10"], split
        q = np.asarray(values["context"])
        assert q.shape == (4,) and q.sum() == pytest.approx(1.0, abs=1e-5) and q.min() > 0
        assert 0 <= values["context_entropy"] <= values["context_mix_entropy"] + 1e-6 <= np.log(4) + 2e-6
    train_logs = [json.loads(line) for line in (caseq_run / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "train"' in line]
    assert train_logs and all(r["kl"] >= 0 and np.isfinite(r["loss"]) for r in train_logs)


def test_evaluate_prints_the_context_report_per_split(caseq_run, capsys, caplog):
    caplog.set_level(logging.INFO, logger="jaxrec")
    assert main(["evaluate", str(caseq_run), "eval.candidates=sampled:20", "eval.exclude_history=true"]) == 0
    out = capsys.readouterr().out
    assert "target + 20 negatives" in out and "context_entropy" in out
    lines = [r.getMessage() for r in caplog.records if "contexts (C=2, 2 levels, 4 paths)" in r.getMessage()]
    assert [line.split("]")[0] for line in lines] == ["[test", "[test_gap", "[test_gap2"]
    assert all("mean q = [" in line and "H(mean q) = " in line for line in lines)
    saved = json.loads(next(caseq_run.glob("evaluate-step*.json")).read_text())
    assert saved["results"]["test_gap"]["context"] == pytest.approx(results(caseq_run)["tests"]["test_gap"]["context"],
                                                                    abs=1e-5)


def test_export_recommends_from_the_files_alone_like_the_model(caseq_run, tmp_path):
    """`jaxrec export` of a CaseQ run: the scoring artifact ranks as the model's test-time
    query does (a numpy brute force over the catalogue, history excluded)."""
    import jax

    from jaxrec.export.recommend import load_recommender
    from jaxrec.train.runs import open_run
    out = tmp_path / "export"
    assert main(["export", str(caseq_run), str(out), "--top-k", "10"]) == 0
    rec = load_recommender(out)
    assert rec.manifest["task"] == "caseq" and rec.manifest["kind"] == "scoring"

    run = open_run(caseq_run)
    params, store = run.host_params(), run.task.store
    examples = run.task.split.tests["test_gap"]
    users, ends = examples.users[:7], examples.history_end[:7]
    ids = [store.item_ids[store.user_offsets[u]:end] for u, end in zip(users, ends)]
    L = run.config.data.max_len
    inputs = np.zeros((len(ids), L), np.int32)
    for row, h in enumerate(ids):
        inputs[row, L - len(h[-L:]):] = h[-L:]
    query = np.asarray(jax.jit(run.task.query)(params, inputs), np.float64)
    table = np.asarray(params["item_embedding"], np.float64)
    brute = query @ table.T
    brute[:, 0] = -np.inf
    for row, h in enumerate(ids):
        brute[row, h] = -np.inf
    got = rec.recommend([store.item_vocab[h].tolist() for h in ids], k=10, exclude_history=True)
    # float32 scores of 16-term dot products: error <= ~16 * eps32 * sum|q_i e_i|; 4x margin.
    tol = 4 * 16 * np.finfo(np.float32).eps * (np.abs(query) @ np.abs(table).T).max()
    index = {token: i for i, token in enumerate(store.item_vocab.tolist())}
    for row, top in enumerate(got):
        want = np.sort(brute[row])[::-1][:10]
        assert np.allclose([brute[row, index[t]] for t, _ in top], want, atol=tol, rtol=0)
        assert np.allclose([s for _, s in top], want, atol=tol, rtol=0)
