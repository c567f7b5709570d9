"""scripts/bench_llm.py end to end on a tiny checkpoint: every side and dtype in its own process,
with its own peak RSS, and the jaxrec step's GFLOP/s set against a matmul timed in the same run."""
import importlib.util
import json
from pathlib import Path

import pytest

from tests.models.llm_fixtures import make_hf_model, save_hf_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_llm.py"
_spec = importlib.util.spec_from_file_location("bench_llm", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_each_side_runs_in_its_own_process_and_reports_its_own_figures(tmp_path):
    pytest.importorskip("peft")
    # The bench draws token ids up to 20,000 (SmolLM2's vocabulary is larger): the tiny model must cover them.
    model_dir = save_hf_model(make_hf_model("qwen2", vocab_size=20100, hidden_size=32, intermediate_size=64),
                              tmp_path / "tiny")
    out = tmp_path / "llm.json"
    payload = bench.main(["--model", str(model_dir), "--seq", "16", "--batch", "2", "--steps", "1",
                          "--decode-tokens", "2", "--decode-repeats", "1", "--prompt-len", "8",
                          "--dtypes", "float32,bfloat16", "--torch-dtypes", "float32", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == payload["results"]
    assert set(payload["results"]["float32"]) == {"jaxrec", "torch_peft", "ratio_jaxrec_over_torch"}
    assert set(payload["results"]["bfloat16"]) == {"jaxrec"}          # --torch-dtypes leaves torch's bf16 out
    assert payload["config"]["torch_dtypes"] == ["float32"]
    jaxrec, torch_side = payload["results"]["float32"]["jaxrec"], payload["results"]["float32"]["torch_peft"]
    assert jaxrec["peak_rss_mib"] > 0 and torch_side["peak_rss_mib"] > 0
    assert jaxrec["train_fraction_of_matmul_peak"] == pytest.approx(
        jaxrec["train_model_gflops_per_s"] / jaxrec["matmul_peak_gflops_per_s"])
    assert payload["machine"]["cpu_vector_flags"] is not None
