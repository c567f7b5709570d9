"""scripts/bench_caseq.py --vs-official: the summary arithmetic and the refusal of a directory
that is not the official checkout (nothing is trained here)."""
import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_caseq", REPO / "scripts" / "bench_caseq.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_caseq"] = module
    spec.loader.exec_module(module)
    return module


def _cell(side, seed, no_gap, gap, seconds):
    split = {"ndcg@10": no_gap, "hr@10": 2 * no_gap, "context_entropy": 2.0, "context_mix_entropy": 2.5}
    return {"side": side, "backbone": "gru4rec", "method": "caseq", "seed": seed, "seconds_per_epoch": seconds,
            "test": {**split, "mutual_information": 0.5}, "test_gap": {"ndcg@10": gap, "hr@10": 2 * gap},
            "drop_ndcg@10": (no_gap - gap) / no_gap, "drop_hr@10": (no_gap - gap) / no_gap}


def test_summary_is_mean_and_sample_std_over_seeds_and_the_time_ratio(bench):
    cells = {"a": _cell("jaxrec", 100, 0.40, 0.30, 2.0), "b": _cell("jaxrec", 101, 0.36, 0.30, 4.0),
             "c": _cell("official", 100, 0.38, 0.29, 6.0), "d": {"error": "RuntimeError: lost"}}
    summary = bench.vs_summary(cells)
    jaxrec = summary["jaxrec/gru4rec/caseq"]
    assert jaxrec["ndcg@10"]["mean"] == pytest.approx(0.38)
    assert jaxrec["ndcg@10"]["std"] == pytest.approx(statistics.stdev([0.40, 0.36]))
    assert jaxrec["drop_ndcg@10"]["mean"] == pytest.approx(((0.40 - 0.30) / 0.40 + (0.36 - 0.30) / 0.36) / 2)
    assert jaxrec["ndcg@10"]["n"] == 2 and summary["official/gru4rec/caseq"]["ndcg@10"]["n"] == 1
    assert summary["ratio/gru4rec/caseq"]["jaxrec_over_official_seconds_per_epoch"] == pytest.approx(3.0 / 6.0)
    table = bench.vs_table({"summary": summary})
    assert "| gru4rec | caseq | jaxrec | 2 | 0.3800 ± 0.0283 |" in table
    assert "| sasrec | backbone | official | 0 | not run |" in table


def test_a_directory_without_the_official_code_is_one_error_line(bench, tmp_path, capsys):
    rc = bench.main(["--vs-official", str(tmp_path), "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tmp_path) in err[0] and "main.py" in err[0]
    assert not (tmp_path / "out.json").exists()


def test_the_official_runner_refuses_a_malformed_command_line():
    import subprocess
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "caseq_official_run.py"), "only-one-arg"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("usage:")


def test_speed_is_the_time_between_the_two_evaluation_rounds_and_the_rest_is_start_up(bench, monkeypatch, tmp_path):
    # Planted timings: 30 s of start-up, then 2 s per epoch (jaxrec) and 5 s (official).
    raws = {"jaxrec": {"seconds": 30 + 20 * 2.0, "valid_times": [[10, 1000.0 + 20 + 10 * 2.0],
                                                                  [20, 1000.0 + 20 + 20 * 2.0]]},
            "official": {"seconds": 30 + 20 * 5.0, "evaluations": [
                {"kind": "test_gap", "time": 1.0}, {"kind": "valid", "time": 100.0},
                {"kind": "test", "time": 101.0}, {"kind": "valid", "time": 150.0}]}}
    monkeypatch.setattr(bench, "run_vs_process", lambda side, *a, **k: raws[side])
    speed = {f"{side}/sasrec/caseq": bench.run_vs_speed(side, "sasrec", "caseq", tmp_path, tmp_path, 1)
             for side in ("jaxrec", "official")}
    jaxrec, official = speed["jaxrec/sasrec/caseq"], speed["official/sasrec/caseq"]
    assert jaxrec["steady_seconds_per_epoch"] == pytest.approx(2.0)
    assert jaxrec["startup_seconds"] == pytest.approx(30.0)
    assert jaxrec["per_epoch_at_101"] == pytest.approx(2.0 + 30.0 / 101)
    assert official["steady_seconds_per_epoch"] == pytest.approx(5.0)
    summary = bench.speed_summary(speed)["sasrec/caseq"]
    assert summary["speedup_steady"] == pytest.approx(2.5)
    assert summary["speedup_at_101"] == pytest.approx((5.0 + 30 / 101) / (2.0 + 30 / 101))
    table = bench.speed_table({"speed": speed, "speed_summary": bench.speed_summary(speed)})
    assert "| sasrec | caseq | 5.00 / 5.30 | 2.00 / 2.30 | 30.0 | 2.50x / 2.31x |" in table
    assert "| gru4rec | caseq | not run |" in table


def test_a_speed_run_missing_an_evaluation_round_is_an_error(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "run_vs_process", lambda *a, **k: {"seconds": 10.0, "valid_times": [[10, 5.0]]})
    with pytest.raises(RuntimeError, match="1 validation times, expected 2"):
        bench.run_vs_speed("jaxrec", "gru4rec", "backbone", tmp_path, tmp_path, 1)


def test_a_job_is_pinned_to_as_many_cores_as_threads(bench):
    import os
    import subprocess
    allowed = sorted(os.sched_getaffinity(0))
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=bench.pinned_to(1),
                          env=bench.thread_env(1))
    assert done.stdout.strip() == str(allowed[:1])
    with pytest.raises(SystemExit, match="cores available"):
        bench.pinned_to(len(allowed) + 1)


def test_a_write_keeps_what_another_invocation_wrote_meanwhile(bench, tmp_path):
    import json
    out = tmp_path / "out.json"
    speed_entry = {"steady_seconds_per_epoch": 2.0, "per_epoch_at_101": 2.5}
    # This process read the file before the other invocation wrote a cell and a speed entry.
    mine = {"cells": {}, "speed": {}}
    out.write_text(json.dumps({"cells": {"official/gru4rec/caseq/seed100": _cell("official", 100, 0.38, 0.29, 6.0)},
                               "speed": {"official/gru4rec/caseq": speed_entry},
                               "speed_protocol": "p", "speed_date": "d"}))
    bench.write_merged(out, mine, "cells", "jaxrec/gru4rec/caseq/seed100", _cell("jaxrec", 100, 0.40, 0.30, 2.0))
    written = json.loads(out.read_text())
    assert set(written["cells"]) == {"official/gru4rec/caseq/seed100", "jaxrec/gru4rec/caseq/seed100"}
    assert written["speed"] == {"official/gru4rec/caseq": speed_entry}
    assert written["speed_protocol"] == "p" and written["summary"]["jaxrec/gru4rec/caseq"]["ndcg@10"]["n"] == 1
    bench.write_merged(out, {"cells": {}}, "speed", "jaxrec/gru4rec/caseq", {**speed_entry, "per_epoch_at_101": 1.25})
    written = json.loads(out.read_text())
    assert len(written["cells"]) == 2
    assert written["speed_summary"]["gru4rec/caseq"]["speedup_at_101"] == pytest.approx(2.0)
