"""The accelerator recipe runs end to end on CPU with tiny shapes, on a data x fsdp mesh of 8 simulated devices."""
import importlib.util
import json
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_llm_accel.py"
_spec = importlib.util.spec_from_file_location("bench_llm_accel", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_flops_count_matches_a_by_hand_count():
    # tiny: d 64, f 128, 2 layers, 4 heads x 16 = 64, 2 kv heads x 16 = 32, vocab 512, seq 8, rank 2
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    n_matmul = 2 * per_layer + 64 * 512
    attention = 2 * 2 * 8 * 64
    adapters = 2 * 2 * 2 * (128 + 96 + 96 + 128 + 3 * 192)
    assert bench.model_flops_per_token(bench.PRESETS["tiny"], 8, 2) == 2 * (2 * n_matmul + attention) + 3 * adapters


def test_recipe_runs_on_a_data_by_fsdp_mesh(tmp_path):
    out = tmp_path / "accel.json"
    args = ["--preset", "tiny", "--seq", "32", "--batch", "4", "--steps", "1", "--mesh", "2,4",
            "--dtype", "float32", "--peak-tflops", "1.0", "--out", str(out)]
    if importlib.util.find_spec("peft") is None:
        args.append("--no-torch")
    bench.main(args)
    payload = json.loads(out.read_text())
    row = payload["results"]["jaxrec"]
    assert row["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert payload["model_flops_per_step"] == bench.model_flops_per_token(bench.PRESETS["tiny"], 32, 16) * 4 * 32
    for side in payload["results"].values():
        if isinstance(side, dict):          # random init: the loss sits near ln(vocab) = 6.24 on both sides
            assert 5.0 < side["final_loss"] < 7.5, side
