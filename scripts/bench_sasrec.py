"""Benchmark SASRec / GRU4Rec training and full-ranking evaluation; writes JSON.

    python scripts/bench_sasrec.py --data PATH/ml-1m.txt                      # SASRec, default training
    python scripts/bench_sasrec.py --data PATH/ml-1m.txt --model gru4rec
    python scripts/bench_sasrec.py --data PATH/ml-1m.txt --setting recbole    # RecBole's prefix setting, 1 epoch
    python scripts/bench_sasrec.py --data PATH/Beauty.txt --config configs/sasrec_beauty.yaml

Each measurement runs in a fresh subprocess so peak RSS is its own. Figures: seconds
per epoch and training samples/s (training steps only), evaluation users/s (a warm
full-ranking pass over the test users), peak RSS, test NDCG@10/HR@10 at the best
validation step, and the training time at which test NDCG@10 first reached
`--target` (test metrics are logged at every evaluation for this curve only; the
reported numbers are selected on validation).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {"sasrec": "configs/sasrec_ml1m.yaml", "gru4rec": "configs/gru4rec_ml1m.yaml"}


def run_job(config_path: str, overrides: list[str], target: float) -> dict:
    """Train one config in this process and measure it."""
    import jax

    from jaxrec.bench import peak_rss_mib
    from jaxrec.config import load_config
    from jaxrec.train.evaluation import Evaluator
    from jaxrec.train.reporting import read_metrics
    from jaxrec.train.runs import open_run
    from jaxrec.train.trainer import train

    config = load_config(config_path, overrides)
    started = time.time()
    result = train(config)
    wall = time.time() - started
    records = read_metrics(result.run_dir)
    n_records = len_records(config)
    epochs_done = result.steps * config.train.batch_size / n_records
    curve = [r for r in records if r["kind"] == "test_curve" and r.get("split") == "test"]
    reached = next((r for r in curve if r["ndcg@10"] >= target), None)

    # The same checkpoint under the other history rule, so both numbers are on record.
    flipped = f"eval.exclude_history={'false' if config.eval.exclude_history else 'true'}"
    opened = open_run(result.run_dir, "best", [flipped])
    session, state = opened.session, opened.state
    evaluator = Evaluator(session.task, session.layout, config.eval.batch_size)
    test_set = session.task.eval_sets("test")[0]
    other = session.task.evaluate(test_set, state.params, session.frozen, state.model_state, evaluator)
    t0 = time.time()   # second pass: compiled, so this is the evaluation's own speed
    session.task.evaluate(test_set, state.params, session.frozen, state.model_state, evaluator)
    eval_seconds = time.time() - t0
    test = result.tests["test"]
    return {
        "config": config_path, "overrides": overrides, "devices": jax.device_count(),
        "steps": result.steps, "epochs": round(epochs_done, 3), "records_per_epoch": n_records,
        "train_seconds": round(result.train_seconds, 2), "wall_seconds": round(wall, 2),
        "seconds_per_epoch": round(result.train_seconds / epochs_done, 2),
        "train_samples_per_s": round(result.steps * config.train.batch_size / result.train_seconds, 1),
        "eval_users": len(test_set.records), "eval_seconds": round(eval_seconds, 3),
        "eval_users_per_s": round(len(test_set.records) / eval_seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1), "best_step": result.best_step,
        "test_ndcg@10": test.get("ndcg@10"), "test_hr@10": test.get("hr@10"), "test": test,
        "protocol": result.protocols.get("test"),
        "other_protocol": test_set.protocol,
        "other_protocol_ndcg@10": other.get("ndcg@10"), "other_protocol_hr@10": other.get("hr@10"),
        "target_ndcg@10": target,
        "reached_target_at_train_seconds": reached["train_seconds"] if reached else None,
        "reached_target_at_step": reached["step"] if reached else None,
        "test_curve": [{"step": r["step"], "train_seconds": r["train_seconds"], "ndcg@10": r["ndcg@10"],
                        "hr@10": r["hr@10"]} for r in curve],
    }


def len_records(config) -> int:
    from jaxrec.registry import task_class
    return len(task_class(config.task)(config).train_records())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the data file (e.g. ml-1m.txt or Beauty.txt)")
    parser.add_argument("--model", choices=sorted(DEFAULT_CONFIGS), default="sasrec")
    parser.add_argument("--config", help="config file (default: configs/<model>_ml1m.yaml)")
    parser.add_argument("--setting", choices=["default", "recbole"], default="default",
                        help="recbole = RecBole's prefix setting (configs/sasrec_ml1m_recbole.yaml), 1 epoch")
    parser.add_argument("--target", type=float, default=0.16, help="test NDCG@10 whose time-to-reach is reported")
    parser.add_argument("--out", help="JSON path (default: results/bench_<model>_<data>_<setting>.json)")
    parser.add_argument("--run-root", default="runs/bench", help="where the benchmark runs write checkpoints")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    parser.add_argument("--job", help=argparse.SUPPRESS)   # internal: run one measurement in this process
    args = parser.parse_args()

    if args.job:
        job = json.loads(args.job)
        print("JOB_RESULT " + json.dumps(run_job(job["config"], job["overrides"], job["target"])), flush=True)
        return

    from jaxrec.bench import machine_info, write_json
    config = args.config or ("configs/sasrec_ml1m_recbole.yaml" if args.setting == "recbole"
                             else DEFAULT_CONFIGS[args.model])
    data_name = Path(args.data).stem.lower()
    name = f"{args.model}_{data_name}_{args.setting}"
    run_dir = REPO / args.run_root / name
    shutil.rmtree(run_dir, ignore_errors=True)   # a benchmark always starts from scratch
    overrides = [f"data.source={args.data}", f"run.dir={run_dir}", "eval.track_test=true", *args.overrides]
    job = json.dumps({"config": config, "overrides": overrides, "target": args.target})
    proc = subprocess.run([sys.executable, __file__, "--data", args.data, "--job", job], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("JOB_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"benchmark job failed (exit {proc.returncode})")
    figures = json.loads(lines[-1][len("JOB_RESULT "):])
    out = Path(args.out or REPO / "results" / f"bench_{name}.json")
    write_json(out, {"benchmark": "bench_sasrec", "name": name, "machine": machine_info(), **figures})
    print(f"wrote {out}")
    keys = ("seconds_per_epoch", "train_samples_per_s", "eval_users_per_s", "peak_rss_mib", "test_ndcg@10",
            "test_hr@10", "reached_target_at_train_seconds")
    print(json.dumps({k: figures[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
