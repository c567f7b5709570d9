"""iLoRA vs LLaRA's LoRA vs SASRec vs the untuned LLM on LastFM (LLaRA split), one CPU budget.

Cells, each run in its own process (so its peak memory is its own) and appended to the
JSON as soon as it finishes; rerunning skips finished cells:

  guide    the SASRec guide (configs/ilora/sasrec_lastfm.yaml, reduced epochs)
  ilora    configs/ilora/lastfm_smollm2.yaml: 4 experts x rank 2 (total 8), ResNet router, hybrid
           prompts with the curriculum — trained for the budget below
  lora     the same with one expert of rank 8 (LLaRA's LoRA), same budget, data order and seed
  untuned  the frozen SmolLM2 on text-only prompts (no adapters, no projector)
  sasrec   the guide ranking the same 20 candidates

All four are evaluated on the 122 test examples with the same 20 candidates per example
(fixed by seed): greedy generation (ValidRatio, HR@1 over valid outputs = the official
number, HR@1 over all examples) and likelihood ranking of the 20 titles.

    python scripts/bench_ilora.py                  # the CPU budget (about 1 h on 2 quiet cores)
    python scripts/bench_ilora.py --quick          # smoke run: 2 steps, 4 test examples
    python scripts/bench_ilora.py --table          # print the table of an existing JSON
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CELLS = ("guide", "ilora", "lora", "untuned", "sasrec")
CONFIGS = {"guide": "configs/ilora/sasrec_lastfm.yaml", "ilora": "configs/ilora/lastfm_smollm2.yaml",
           "lora": "configs/ilora/lora_lastfm_smollm2.yaml", "untuned": "configs/ilora/lastfm_smollm2.yaml",
           "sasrec": "configs/ilora/lastfm_smollm2.yaml"}
REPORTED = ("valid_ratio", "hr@1_valid", "hr@1", "rank_hr@1", "rank_ndcg@5", "rank_ndcg@10", "examples")


def budget(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch, "microbatches": args.microbatches,
            "examples_seen": args.steps * args.batch, "lr": args.lr, "warmup_steps": max(1, args.steps // 20),
            "max_length": args.max_length, "guide_epochs": args.guide_epochs, "eval_limit": args.eval_limit,
            "eval_batch": args.eval_batch, "seed": 1234}


def overrides(cell: str, args, work: Path) -> list[str]:
    b = budget(args)
    if cell == "guide":
        out = [f"run.dir={work / 'guide'}", f"train.epochs={args.guide_epochs}", "train.progress=false",
               "checkpoint.async_save=false"]
        return out + (["train.steps=20", "train.eval_every=0"] if args.quick else [])
    common = [f"model.guide={work / 'guide'}", f"model.max_length={args.max_length}",
              f"model.eval_limit={args.eval_limit}", f"eval.batch_size={args.eval_batch}",
              "model.report_baselines=[]"]
    if cell in ("untuned", "sasrec"):
        return common + [f"run.dir={work / cell}"]
    return common + [f"run.dir={work / cell}", f"train.steps={b['steps']}", f"train.batch_size={b['batch_size']}",
                     f"train.microbatches={b['microbatches']}", f"train.lr={b['lr']}",
                     f"train.warmup_steps={b['warmup_steps']}", "train.eval_every=0", "checkpoint.every=0",
                     "checkpoint.async_save=false", "model.valid_modes=[]", "train.progress=false",
                     f"train.log_every={max(1, min(8, b['steps'] // 4))}"]


# ------------------------------------------------------------------------------ one cell (child process)
def run_cell(cell: str, args) -> dict:
    from jaxrec.bench import peak_rss_mib
    from jaxrec.config import load_config
    work = Path(args.work).absolute()
    config = load_config(REPO / CONFIGS[cell], overrides(cell, args, work))
    started = time.time()
    if cell in ("guide", "ilora", "lora"):
        from jaxrec.train.reporting import read_metrics
        from jaxrec.train.trainer import train
        result = train(config)
        out = {"test": result.tests.get("test", {}), "train_seconds": round(result.train_seconds, 1),
               "steps": result.steps}
        if cell != "guide":
            records = read_metrics(result.run_dir)
            per_example = [r["tokens_per_example"] for r in records if r["kind"] == "train"]
            rates = [r["samples_per_s"] for r in records if r["kind"] == "throughput"][1:]   # first window compiles
            if per_example and rates:
                mean_tokens = sum(per_example) / len(per_example)
                out["tokens_per_example"] = round(mean_tokens, 1)
                out["train_tokens_per_s"] = round(mean_tokens * sum(rates) / len(rates), 1)
            out["trainable_params"] = _trainable_params(result.run_dir)
    else:
        from jaxrec.train.runs import start_session
        session = start_session(config)
        task = session.task
        eval_set = task.eval_sets("test")[0]
        out = {"test": task.baseline_metrics(cell, eval_set, session.frozen, session.layout)}
        if cell == "untuned":
            out["outputs_sample"] = task.last_outputs.get("untuned/test", [])[:5]
    out["seconds"] = round(time.time() - started, 1)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return out


def _trainable_params(run_dir) -> dict:
    """Trainable parameters per group, read back from the run's checkpoint."""
    import jax
    import numpy as np
    from jaxrec.train.runs import open_run
    state = open_run(run_dir).state
    return {k: int(sum(np.size(x) for x in jax.tree.leaves(v))) for k, v in state.params.items()}


# ------------------------------------------------------------------------------ orchestration
def table(payload: dict) -> str:
    rows = [("cell", *REPORTED, "train tok/s", "peak RSS MiB")]
    for name in ("ilora", "lora", "untuned", "sasrec"):
        cell = payload.get("cells", {}).get(name)
        if not cell:
            continue
        m = cell.get("test", {})
        rows.append((name, *[f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, "-")) for k in REPORTED],
                     str(cell.get("train_tokens_per_s", "-")), str(cell.get("peak_rss_mib", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 4 test examples, tiny guide")
    p.add_argument("--out", default=None, help="JSON path (default results/bench_ilora.json; quick: results/local/)")
    p.add_argument("--work", default=None, help="run directories (default runs/bench_ilora[_quick])")
    p.add_argument("--cells", nargs="*", default=list(CELLS), choices=CELLS)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--max-length", type=int, default=288)
    p.add_argument("--guide-epochs", type=float, default=3.0)
    p.add_argument("--eval-limit", type=int, default=0, help="test examples (0 = all 122)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--table", action="store_true")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)      # child mode
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.microbatches, args.eval_limit, args.guide_epochs = 2, 2, 1, 4, 1.0
    out_path = Path(args.out or ("results/local/bench_ilora_quick.json" if args.quick else "results/bench_ilora.json"))
    args.work = args.work or ("runs/bench_ilora_quick" if args.quick else "runs/bench_ilora")
    logging.basicConfig(level=logging.WARNING)

    if args.cell:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print("BENCH_RESULT " + json.dumps(run_cell(args.cell, args)), flush=True)
        return 0

    payload = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.table:
        print(table(payload))
        return 0
    from jaxrec.bench import machine_info, write_json
    if payload and payload.get("budget") != budget(args):
        raise SystemExit(f"{out_path} holds results for another budget {payload.get('budget')}; "
                         "use --out for a new file")
    payload.setdefault("machine", machine_info())
    payload["budget"] = budget(args)
    payload["protocol"] = ("LastFM (LLaRA split) test, 122 examples (or --eval-limit), 20 candidates = target + 19 "
                           "negatives outside the history, fixed by seed 1234; greedy generation <= 64 tokens cut at "
                           "the first newline; valid = exactly one candidate title in the output; hr@1_valid = "
                           "correct/valid (official HR@1), hr@1 = correct/all; rank_* = the 20 titles ranked by "
                           "log p(' title\\n' | prompt); SASRec ranks them by <h, e_item>")
    payload.setdefault("cells", {})
    for cell in args.cells:
        if cell in payload["cells"]:
            print(f"{cell}: done already (in {out_path})")
            continue
        print(f"{cell}: running ...", flush=True)
        cmd = [sys.executable, __file__, "--cell", cell, "--work", args.work,
               *(["--quick"] if args.quick else []),
               "--steps", str(args.steps), "--batch", str(args.batch), "--microbatches", str(args.microbatches),
               "--lr", str(args.lr), "--max-length", str(args.max_length), "--guide-epochs", str(args.guide_epochs),
               "--eval-limit", str(args.eval_limit), "--eval-batch", str(args.eval_batch)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"{cell}: failed (exit {proc.returncode})")
        payload["cells"][cell] = json.loads(lines[-1][len("BENCH_RESULT "):])
        write_json(out_path, payload)
        print(f"{cell}: {json.dumps(payload['cells'][cell].get('test', {}))}", flush=True)
    ilora, lora = payload["cells"].get("ilora"), payload["cells"].get("lora")
    if ilora and lora:
        payload["ilora_minus_lora"] = {k: round(ilora["test"][k] - lora["test"][k], 4)
                                       for k in REPORTED[:-1] if k in ilora["test"] and k in lora["test"]}
        write_json(out_path, payload)
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
