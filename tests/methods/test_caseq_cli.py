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
