"""CaseQ vs its backbone under the gap protocol: accuracy with and without gap, and cost.

For every cell (dataset, backbone, method, seed) it trains one run from
configs/caseq/<dataset>_<backbone>.yaml (method "backbone" = the same config with
model.contexts=1 model.kl_weight=0, which is exactly the backbone with the same data,
negatives and optimiser), then evaluates the best checkpoint (selected by validation
NDCG@10 under full ranking) under both protocols:

  full      full ranking over all items, history included (jaxrec's default)
  sampled   the paper's: target + 100 negatives avoiding the target and the user's
            history, fixed by seed

on the no-gap test ("test"), the gap test ("test_gap") and any intermediate gaps
("test_gap<g>"). Each cell is appended to the JSON as soon as it finishes; rerunning
skips finished cells (and an interrupted run resumes from its own checkpoint).

    python scripts/bench_caseq.py                                   # ML-100K + ML-1M, 3 seeds
    python scripts/bench_caseq.py --datasets synthetic              # the planted-shift experiment
    python scripts/bench_caseq.py --datasets synthetic-sticky       # ... with a persistent latent context
    python scripts/bench_caseq.py --cost-only --remeasure-cost --cost-losses bce ce   # cost alone
    python scripts/bench_caseq.py --datasets ml-100k --seeds 0 --quick   # smoke run
    python scripts/bench_caseq.py --table                           # print the tables only
    python scripts/bench_caseq.py --vs-official OFFICIAL_DIR        # jaxrec vs the official code, side by side
    python scripts/bench_caseq.py --vs-official OFFICIAL_DIR --speed    # seconds per epoch, both sides
    python scripts/bench_caseq.py --vs-official OFFICIAL_DIR --table

--vs-official runs jaxrec and a checkout of the official code (chr26195/Caseq, kept outside
the repository) on CaseQ's own ML-100K file with the official protocol, one job at a time with
the same thread count; see `vs_official` below.

Budgets are CPU-sized and labelled in the JSON (see BUDGETS); --official trains with the
configs' own (official) budget instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = ("synthetic", "synthetic-sticky", "ml-100k", "ml-1m")
CONFIG_NAMES = {"synthetic": "synthetic", "synthetic-sticky": "synthetic", "ml-100k": "ml100k", "ml-1m": "ml1m"}
# Reduced training budgets for a 2-core CPU (the configs hold the official recipe:
# max_len 200, "last" windows, 301 epochs). Every result row carries its budget.
BUDGETS = {
    "synthetic": {"label": "config as is (400 steps)", "overrides": []},
    # The same generator with a persistent latent context (kept from one event to the next with
    # probability 0.9), so the recent history reveals the context a target comes from; in the
    # default set it is redrawn at every event and only its time-drifting mix is inferable.
    "synthetic-sticky": {"label": "config as is (400 steps), context_persistence 0.9",
                         "overrides": ["data.synthetic_options={context_persistence: 0.9}"]},
    "ml-100k": {"label": "max_len 50, chunk windows, 100 epochs (300 steps of 512)",
                "overrides": ["data.max_len=50", "data.train_windows=chunks", "train.epochs=100",
                              "train.eval_every=30", "train.log_every=10"]},
    "ml-1m": {"label": "max_len 50, chunk windows, 10 epochs (380 steps of 512)",
              "overrides": ["data.max_len=50", "data.train_windows=chunks", "train.epochs=10",
                            "train.eval_every=38", "train.log_every=10"]},
}
DEFAULT_SEEDS = [0, 1, 2]
PARSER_DEFAULT_RUNS = str(REPO / "runs" / "bench_caseq")
QUICK = ["train.steps=4", "train.eval_every=2", "train.log_every=1"]
METHODS = {"backbone": ["model.contexts=1", "model.kl_weight=0"], "caseq": [],
           "caseq-kl0": ["model.kl_weight=0"]}   # ablation: the branches without the backdoor objective
PROTOCOLS = {"full": [], "sampled": ["eval.candidates=sampled:100", "eval.exclude_history=true"]}
REPORTED = ("ndcg@10", "hr@10", "context_entropy", "context_mix_entropy", "context", "examples")


def cell_key(dataset, backbone, method, seed) -> str:
    return f"{dataset}/{backbone}/{method}/seed{seed}"


def seconds_per_step(run_dir: Path) -> float | None:
    """Median wall time per step between consecutive train logs that no evaluation or
    compilation falls into (the first window and windows holding an evaluation are skipped)."""
    from jaxrec.train.reporting import read_metrics
    records = read_metrics(run_dir)
    evals = {r["step"] for r in records if r["kind"] == "valid"}
    train = [r for r in records if r["kind"] == "train"]
    rates = []
    for a, b in zip(train[1:], train[2:]):
        if not any(a["step"] <= s < b["step"] for s in evals) and b["step"] > a["step"]:
            rates.append((b["time"] - a["time"]) / (b["step"] - a["step"]))
    return statistics.median(rates) if rates else None


def run_cell(dataset, backbone, method, seed, runs_dir: Path, quick: bool, official: bool) -> dict:
    from jaxrec.config import load_config
    from jaxrec.train.runs import evaluate_run
    from jaxrec.train.trainer import train

    config_path = REPO / "configs" / "caseq" / f"{CONFIG_NAMES[dataset]}_{backbone}.yaml"
    run_dir = runs_dir / cell_key(dataset, backbone, method, seed).replace("/", "_")
    budget = [] if official else BUDGETS[dataset]["overrides"]
    overrides = [*budget, *(QUICK if quick else []), *METHODS[method], f"run.seed={seed}",
                 f"run.dir={run_dir}", "train.progress=false"]
    config = load_config(config_path, overrides)
    started = time.time()
    result = train(config)
    train_seconds = time.time() - started
    protocols = {"full": {split: _pick(values) for split, values in result.tests.items()}}
    protocols["full"]["_label"] = result.protocols.get("test", "")
    for name, extra in PROTOCOLS.items():
        if name == "full":
            continue
        values = evaluate_run(run_dir, overrides=extra)
        protocols[name] = {split: _pick(v) for split, v in values.items()}
        newest = max(run_dir.glob("evaluate-step*.json"), key=lambda p: p.stat().st_mtime)
        protocols[name]["_label"] = json.loads(newest.read_text())["protocols"].get("test", "")
    from jaxrec.registry import task_class
    n_records = len(task_class(config.task)(config).train_records())
    steps_per_epoch = max(1, n_records // config.train.batch_size)
    per_step = seconds_per_step(run_dir)
    return {"dataset": dataset, "backbone": backbone, "method": method, "seed": seed,
            "config": str(config_path.relative_to(REPO)), "overrides": overrides,
            "budget": "quick smoke run" if quick else ("official" if official else BUDGETS[dataset]["label"]),
            "steps": result.steps, "best_step": result.best_step, "train_seconds": round(train_seconds, 1),
            "seconds_per_step": per_step, "steps_per_epoch": steps_per_epoch,
            "seconds_per_epoch": None if per_step is None else per_step * steps_per_epoch,
            "protocols": protocols}


COST_LOSSES = {"bce": [], "ce": ["model.loss=ce"]}   # the official loss, and the spine's full-softmax CE


def step_costs(dataset, backbone, rounds: int, quick: bool, loss: str = "bce", official: bool = False) -> dict:
    """Steady-state seconds per training step of the backbone, of the backbone with one
    layer, and of CaseQ, measured in one process, round-robin (one step of each per round,
    median over rounds), so all see the same machine load. Per epoch = per step x steps per
    epoch of the budget.

    The one-layer backbone prices a layer, t_layer = t(backbone) - t(1 layer). CaseQ runs C
    units per level where the backbone runs one, so C independent copies of every layer
    would cost naive = 1 + (C - 1) * levels * t_layer / t(backbone). Below naive, XLA shares
    work between the C units of a level (they all read the same input); above it, the
    gates, the mixing and the prior cost more than that saves."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import flax.linen as nn
    from jaxrec.config import load_config
    from jaxrec.registry import task_class
    from jaxrec.train.task import Clock

    config_path = REPO / "configs" / "caseq" / f"{CONFIG_NAMES[dataset]}_{backbone}.yaml"
    budget = [] if official else BUDGETS[dataset]["overrides"]
    variants = {"backbone": METHODS["backbone"], "backbone_one_layer": [*METHODS["backbone"], "model.layers=1"],
                "caseq": METHODS["caseq"]}
    steps = {}
    for method, overrides in variants.items():
        config = load_config(config_path, [*budget, *COST_LOSSES[loss], *overrides])
        task = task_class(config.task)(config)
        records, transform, batch_size = task.train_records(), task.train_transform(), config.train.batch_size
        rng = np.random.default_rng(0)
        rows = [records[i % len(records)] for i in range(batch_size)]
        rows = [transform(r, rng) for r in rows] if transform else rows
        batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
        params = nn.unbox(jax.jit(lambda key, task=task: task.init(key).trainable)(jax.random.key(0)))
        tx = optax.adam(config.train.lr, b1=config.train.b1, b2=config.train.b2)

        def train_step(params, opt_state, batch, key, task=task, tx=tx):
            grads, _ = jax.grad(lambda p: task.loss(p, {}, {}, batch, key, Clock.at(0)), has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        fn = jax.jit(train_step, donate_argnums=(0, 1))
        state = fn(params, tx.init(params), batch, jax.random.key(0))       # compile
        jax.block_until_ready(state)
        steps[method] = {"fn": fn, "state": state, "batch": batch, "times": [], "config": config,
                         "steps_per_epoch": max(1, len(records) // batch_size)}
    for r in range(1 if quick else rounds):
        for item in steps.values():
            started = time.perf_counter()
            item["state"] = item["fn"](*item["state"], item["batch"], jax.random.key(r + 1))
            jax.block_until_ready(item["state"])
            item["times"].append(time.perf_counter() - started)
    out = {m: {"seconds_per_step": statistics.median(v["times"]), "steps_per_epoch": v["steps_per_epoch"],
               "seconds_per_epoch": statistics.median(v["times"]) * v["steps_per_epoch"],
               "step_times": [round(t, 4) for t in v["times"]]} for m, v in steps.items()}
    caseq = steps["caseq"]["config"]
    t_backbone = out["backbone"]["seconds_per_step"]
    t_layer = max(0.0, t_backbone - out["backbone_one_layer"]["seconds_per_step"])
    contexts, levels = caseq.model.contexts, caseq.model.layers
    out.update(loss=loss, max_len=caseq.data.max_len, batch_size=caseq.train.batch_size,
               budget="official" if official else BUDGETS[dataset]["label"], contexts=contexts,
               levels=levels, rounds=1 if quick else rounds,
               ratio=out["caseq"]["seconds_per_step"] / t_backbone,
               layer_share=levels * t_layer / t_backbone,
               naive_ratio=1 + (contexts - 1) * levels * t_layer / t_backbone)
    return out


def _pick(values: dict) -> dict:
    return {k: values[k] for k in REPORTED if k in values}


# ----------------------------------------------------------------------------- tables

def _mean_std(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(mean, std, digits=4, pct=False):
    if mean is None:
        return "-"
    scale, unit = (100, "%") if pct else (1, "")
    return f"{mean * scale:.{1 if pct else digits}f}{unit} ± {std * scale:.{1 if pct else digits}f}{unit}"


def summarise(cells: dict) -> dict:
    """Mean ± std over seeds per (dataset, backbone, method, protocol, metric)."""
    groups: dict = {}
    for cell in cells.values():
        if "error" in cell:
            continue
        for protocol, splits in cell["protocols"].items():
            splits = {k: v for k, v in splits.items() if not k.startswith("_")}
            for metric in ("ndcg@10", "hr@10"):
                no_gap = splits.get("test", {}).get(metric)
                gaps = {s: v.get(metric) for s, v in splits.items() if s.startswith("test_gap")}
                key = (cell["dataset"], cell["backbone"], cell["method"], protocol, metric)
                g = groups.setdefault(key, {"no_gap": [], "gap": [], "drop": []})
                g["no_gap"].append(no_gap)
                g["gap"].append(gaps.get("test_gap"))
                if no_gap and gaps.get("test_gap") is not None:
                    g["drop"].append((no_gap - gaps["test_gap"]) / no_gap)
                for s, v in gaps.items():
                    if s != "test_gap":
                        g.setdefault(s, []).append(v)
    return {"|".join(map(str, k)): {name: _mean_std(v) + (len([x for x in v if x is not None]),)
                                    for name, v in g.items()} for k, g in groups.items()}


def tables(cells: dict, cost: dict | None = None) -> str:
    summary = summarise(cells)
    lines = []
    for protocol in PROTOCOLS:
        for metric in ("ndcg@10", "hr@10"):
            rows = [(k.split("|"), v) for k, v in summary.items() if k.split("|")[3:] == [protocol, metric]]
            if not rows:
                continue
            lines += [f"\n{metric.upper()} — {protocol} protocol (mean ± std over seeds)", "",
                      "| dataset | backbone | method | seeds | no gap | gap | relative drop |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for (dataset, backbone, method, *_), v in sorted(rows):
                lines.append(f"| {dataset} | {backbone} | {method} | {v['no_gap'][2]} | {_fmt(*v['no_gap'][:2])} | "
                             f"{_fmt(*v['gap'][:2])} | {_fmt(*v['drop'][:2], pct=True)} |")
    if cost:
        lines += ["\nTraining cost: steady-state step time (median of round-robin steps in one process). "
                  "Naive = 1 + (C - 1) x levels x (one layer's time) / (backbone step): "
                  "C separate copies of every layer",
                  "", "| dataset | backbone | loss | max_len | steps/epoch | backbone s/epoch | CaseQ s/epoch "
                  "| CaseQ / backbone | layers' share of a backbone step | naive |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, c in sorted(cost.items(), key=lambda kv: (kv[1].get("max_len", 50), kv[0])):
            dataset, backbone = key.split("/")[:2]
            share = f"{c['layer_share']:.0%}" if "layer_share" in c else "–"
            naive = f"{c['naive_ratio']:.2f}×" if "naive_ratio" in c else "–"
            lines.append(f"| {dataset} | {backbone} | {c.get('loss', 'bce')} | {c.get('max_len', 50)} | "
                         f"{c['backbone']['steps_per_epoch']} | "
                         f"{c['backbone']['seconds_per_epoch']:.2f} | {c['caseq']['seconds_per_epoch']:.2f} | "
                         f"{c['ratio']:.2f}× | {share} | {naive} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- vs the official code

VS_OFFICIAL_OUT = REPO / "results" / "bench_caseq_vs_official.json"
VS_OFFICIAL_DATA = "../shared/data/ml-100k/ml-100k.txt"     # CaseQ's own file, byte for byte
VS_EPOCHS, VS_EVAL_EVERY = 101, 10                           # 1 step of 512 users per epoch on ML-100K
# The official protocol on jaxrec's side: target + 100 negatives avoiding the history, model
# selection by validation NDCG@10 under that protocol, every 10 epochs.
VS_JAXREC_OVERRIDES = ["train.log_every=10", "eval.candidates=sampled:100", "eval.exclude_history=true", "eval.metric=ndcg@10",
                       "eval.ks=[10]", "model.eval_gaps=[]", "train.progress=false"]
OFFICIAL_BACKBONES = {"sasrec": "att", "gru4rec": "gru"}
OFFICIAL_METHODS = {"backbone": ["--num_context", "1", "--kl", "0"], "caseq": []}
# One order that answers the open question first: GRU4Rec (CaseQ, then plain), then SASRec.
VS_ORDER = [("gru4rec", "caseq"), ("gru4rec", "backbone"), ("sasrec", "caseq"), ("sasrec", "backbone")]
VS_REPORTED = ("ndcg@10", "hr@10", "examples", "context", "context_entropy", "context_mix_entropy")


def thread_env(threads: int) -> dict:
    """torch/OpenMP thread counts for a job of `threads` threads (XLA:CPU ignores such settings;
    `pinned_to` is what bounds it)."""
    import os
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def pinned_to(threads: int):
    """A subprocess `preexec_fn` that confines the job, with every process it starts (the official
    sampler's workers too), to the first `threads` cores this process may use. CPU affinity is the
    one bound XLA:CPU honours: its pool is sized from the affinity mask, and the XLA_FLAGS usually
    quoted for one thread (`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`)
    leave a jitted matmul using every core."""
    import os
    cores = sorted(os.sched_getaffinity(0))[:threads]
    if len(cores) < threads:
        raise SystemExit(f"--threads {threads}: only {len(cores)} cores available")
    return lambda: os.sched_setaffinity(0, cores)


def vs_cell_key(side, backbone, method, seed) -> str:
    return f"{side}/{backbone}/{method}/seed{seed}"


def context_report(values: dict) -> dict:
    """Gate entropies at the prediction position and their difference, the sequence-path
    mutual information I(S; C) = H(mean q) - mean H(q) (0: every sequence gets the same mix)."""
    if "context_entropy" not in values:
        return {}
    return {"context_entropy": values["context_entropy"], "context_mix_entropy": values["context_mix_entropy"],
            "mutual_information": max(0.0, values["context_mix_entropy"] - values["context_entropy"]),
            "context": values.get("context")}


# (epochs, evaluate every) per --vs-official mode: the official budget, a 2-epoch smoke run, the
# speed measurement's 20 epochs (two evaluation rounds to time between).
VS_BUDGETS = {"official": (VS_EPOCHS, VS_EVAL_EVERY), "quick": (2, 1), "speed": (20, 10)}


def vs_run_name(side: str, backbone: str, method: str, seed: int, mode: str) -> str:
    return f"{side}_{backbone}_{method}_seed{seed}" + ("" if mode == "official" else f"_{mode}")


def jaxrec_vs_cell(backbone: str, method: str, seed: int, raw_out: Path, runs_dir: Path, mode: str) -> None:
    """Train one jaxrec cell under the official protocol (runs in its own process) and write
    the raw result: test metrics at the best validation epoch, their context report, times."""
    from jaxrec.config import load_config
    from jaxrec.train.reporting import read_metrics
    from jaxrec.train.trainer import train

    config_path = REPO / "configs" / "caseq" / f"ml100k_{backbone}.yaml"
    run_dir = runs_dir / vs_run_name("jaxrec", backbone, method, seed, mode)
    epochs, eval_every = VS_BUDGETS[mode]
    overrides = [f"train.epochs={epochs}", f"train.eval_every={eval_every}", *VS_JAXREC_OVERRIDES, *METHODS[method],
                 f"run.seed={seed}", f"run.dir={run_dir}",
                 "checkpoint.resume=false"]
    config = load_config(config_path, overrides)
    started = time.time()
    # This runs only when the cell has no raw output: a run directory left by an interrupted or
    # failed attempt is stale, and the timing must cover a whole run, so start over.
    result = train(config, restart=True)
    seconds = time.time() - started
    tests = {split: {k: v for k, v in values.items() if k in VS_REPORTED}
             for split, values in {**result.tests, "valid": result.valid}.items()}
    valid_times = [[r["step"], r["time"]] for r in read_metrics(run_dir) if r["kind"] == "valid"]
    raw_out.write_text(json.dumps({
        "seconds": seconds, "train_seconds": result.train_seconds, "epochs": epochs,
        "best_epoch": result.best_step, "tests": tests, "overrides": overrides, "valid_times": valid_times,
        "protocol": result.protocols.get("test", "")}, indent=1, default=float))


def run_vs_process(side, backbone, method, seed, official_dir: Path, runs_dir: Path, threads: int,
                   mode: str) -> dict:
    """Train one side in a fresh process (so thread settings and memory start clean) and return
    its raw output, which is kept in runs_dir and reused if the same run is asked for again."""
    import subprocess
    raw = runs_dir / f"{vs_run_name(side, backbone, method, seed, mode)}.json"
    log_path = raw.with_suffix(".log")
    epochs, eval_every = VS_BUDGETS[mode]
    if not raw.exists():
        if side == "official":
            data = (REPO / VS_OFFICIAL_DATA).resolve()
            cmd = [sys.executable, str(REPO / "scripts" / "caseq_official_run.py"), str(official_dir), str(data),
                   str(raw), "--", "--dataset=ml-100k", f"--backbone={OFFICIAL_BACKBONES[backbone]}",
                   f"--seed={seed}", f"--num_epochs={epochs}", f"--eval_every={eval_every}",
                   f"--train_dir=jaxrec_vs_{vs_run_name(side, backbone, method, seed, mode)}",
                   *OFFICIAL_METHODS[method]]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--jaxrec-vs-cell", backbone, method, str(seed),
                   str(raw), "--runs-dir", str(runs_dir), "--vs-mode", mode]
        with open(log_path, "w") as log_file:
            done = subprocess.run(cmd, env=thread_env(threads), stdout=log_file, stderr=subprocess.STDOUT,
                                  cwd=REPO, preexec_fn=pinned_to(threads))
        if done.returncode != 0 or not raw.exists():
            tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{side} cell exited with {done.returncode}: {tail[0]} (log: {log_path})")
    return json.loads(raw.read_text())


def run_vs_cell(side, backbone, method, seed, official_dir: Path, runs_dir: Path, threads: int,
                mode: str = "official") -> dict:
    """One accuracy cell: test metrics with and without the gap at the best validation epoch."""
    r = run_vs_process(side, backbone, method, seed, official_dir, runs_dir, threads, mode)
    tests = r["tests"]
    cell = {"side": side, "backbone": backbone, "method": method, "seed": seed, "threads": threads,
            "best_epoch": r["best_epoch"], "seconds": round(r["seconds"], 1),
            "seconds_per_epoch": r["seconds"] / r["epochs"], "epochs": r["epochs"]}
    if "train_seconds" in r:
        cell["train_seconds_per_epoch"] = r["train_seconds"] / r["epochs"]
    for split in ("test", "test_gap", "valid"):
        values = tests.get(split, {})
        cell[split] = {"ndcg@10": values.get("ndcg@10"), "hr@10": values.get("hr@10"),
                       "examples": values.get("examples"), **context_report(values)}
    cell["valid_ndcg@10_curve"] = valid_curve(side, r, runs_dir / vs_run_name("jaxrec", backbone, method, seed, mode))
    for metric in ("ndcg@10", "hr@10"):
        no_gap, gap = cell["test"][metric], cell["test_gap"][metric]
        cell[f"drop_{metric}"] = None if not no_gap or gap is None else (no_gap - gap) / no_gap
    return cell


def run_vs_speed(side, backbone, method, official_dir: Path, runs_dir: Path, threads: int) -> dict:
    """Seconds per epoch of one side, steady state and whole process, from a 20-epoch run
    evaluated at epochs 10 and 20. steady = (time of the epoch-20 validation - time of the
    epoch-10 one) / 10: ten training epochs plus one evaluation round of that side's own
    protocol (the official code also tests both splits at every round; jaxrec validates, and
    tests once at the end). start-up = whole run - 20 x steady (data loading, compilation,
    the final tests); per_epoch_at_101 spreads it over the official 101 epochs."""
    import os
    seed = 100
    load_before = os.getloadavg()[0]
    r = run_vs_process(side, backbone, method, seed, official_dir, runs_dir, threads, "speed")
    epochs, eval_every = VS_BUDGETS["speed"]
    if side == "official":
        times = [e["time"] for e in r["evaluations"] if e["kind"] == "valid"]
    else:
        times = [t for _, t in r["valid_times"]]
    if len(times) != epochs // eval_every:
        raise RuntimeError(f"{side} {backbone}/{method}: {len(times)} validation times, expected {epochs // eval_every}")
    steady = (times[-1] - times[-2]) / eval_every
    startup = r["seconds"] - epochs * steady
    return {"side": side, "backbone": backbone, "method": method, "threads": threads, "epochs": epochs,
            "seconds": round(r["seconds"], 2), "steady_seconds_per_epoch": steady, "startup_seconds": startup,
            "per_epoch_at_101": steady + startup / VS_EPOCHS,
            "load_average_before": round(load_before, 2)}   # other work on the machine skews both sides


SPEED_PROTOCOL = ("20 epochs evaluated at 10 and 20, seed 100, {threads} core(s) per job (CPU affinity of all the "
                  "job's processes; torch threads set to match), one job at a time, "
                  "alternating sides; steady = (time of the epoch-20 validation - time of the epoch-10 one) / 10, "
                  "i.e. ten training epochs plus one evaluation round of that side's protocol; start-up = whole "
                  "process - 20 x steady (data, compilation with no persistent cache, final tests); per_epoch_at_101 "
                  "= steady + start-up / 101")


def speed_summary(speed: dict) -> dict:
    """official / jaxrec seconds per epoch for every variant measured on both sides (> 1: jaxrec faster)."""
    out = {}
    for backbone, method in VS_ORDER:
        j, o = speed.get(f"jaxrec/{backbone}/{method}"), speed.get(f"official/{backbone}/{method}")
        if j and o and "error" not in j and "error" not in o:
            out[f"{backbone}/{method}"] = {
                "speedup_steady": o["steady_seconds_per_epoch"] / j["steady_seconds_per_epoch"],
                "speedup_at_101": o["per_epoch_at_101"] / j["per_epoch_at_101"]}
    return out


def speed_table(report: dict) -> str:
    speed, summary = report.get("speed", {}), report.get("speed_summary", {})
    lines = ["| backbone | method | official s/epoch (steady / at 101) | jaxrec s/epoch (steady / at 101) | "
             "jaxrec start-up s | speed-up (steady / at 101) |", "| --- | --- | --- | --- | --- | --- |"]
    for backbone, method in VS_ORDER:
        o, j = speed.get(f"official/{backbone}/{method}"), speed.get(f"jaxrec/{backbone}/{method}")
        if not (o and j and f"{backbone}/{method}" in summary):
            lines.append(f"| {backbone} | {method} | not run | | | |")
            continue
        s = summary[f"{backbone}/{method}"]
        lines.append(f"| {backbone} | {method} | {o['steady_seconds_per_epoch']:.2f} / {o['per_epoch_at_101']:.2f} | "
                     f"{j['steady_seconds_per_epoch']:.2f} / {j['per_epoch_at_101']:.2f} | {j['startup_seconds']:.1f} | "
                     f"{s['speedup_steady']:.2f}x / {s['speedup_at_101']:.2f}x |")
    return "\n".join(lines)


def valid_curve(side: str, raw: dict, jaxrec_run_dir: Path) -> list:
    """[[epoch, validation NDCG@10], ...] at every evaluation (how far from converged the
    budget leaves each run)."""
    if side == "official":
        values = [e["ndcg@10"] for e in raw.get("evaluations", []) if e["kind"] == "valid"]
        every = raw["epochs"] // max(1, len(values)) if values else 1
        return [[every * (i + 1), round(v, 4)] for i, v in enumerate(values)]
    from jaxrec.train.reporting import read_metrics
    if not (jaxrec_run_dir / "metrics.jsonl").exists():
        return []
    return [[r["step"], round(r["ndcg@10"], 4)] for r in read_metrics(jaxrec_run_dir) if r["kind"] == "valid"]


def vs_summary(cells: dict) -> dict:
    """Mean ± std over seeds per (side, backbone, method), and jaxrec/official time ratios."""
    groups: dict = {}
    for cell in cells.values():
        if "error" in cell:
            continue
        g = groups.setdefault((cell["side"], cell["backbone"], cell["method"]), {})
        for name, value in (("ndcg@10", cell["test"]["ndcg@10"]), ("hr@10", cell["test"]["hr@10"]),
                            ("gap_ndcg@10", cell["test_gap"]["ndcg@10"]), ("gap_hr@10", cell["test_gap"]["hr@10"]),
                            ("drop_ndcg@10", cell["drop_ndcg@10"]), ("drop_hr@10", cell["drop_hr@10"]),
                            ("seconds_per_epoch", cell["seconds_per_epoch"]),
                            ("mutual_information", cell["test"].get("mutual_information")),
                            ("context_entropy", cell["test"].get("context_entropy")),
                            ("context_mix_entropy", cell["test"].get("context_mix_entropy"))):
            g.setdefault(name, []).append(value)
    out = {}
    for (side, backbone, method), g in groups.items():
        out[f"{side}/{backbone}/{method}"] = {
            name: dict(zip(("mean", "std", "n"), (*_mean_std(v), len([x for x in v if x is not None]))))
            for name, v in g.items()}
    for backbone, method in VS_ORDER:
        j, o = out.get(f"jaxrec/{backbone}/{method}"), out.get(f"official/{backbone}/{method}")
        if j and o and o["seconds_per_epoch"]["mean"]:
            out[f"ratio/{backbone}/{method}"] = {
                "jaxrec_over_official_seconds_per_epoch": j["seconds_per_epoch"]["mean"] / o["seconds_per_epoch"]["mean"]}
    return out


def vs_table(report: dict) -> str:
    summary = report.get("summary", {})
    lines = ["| backbone | method | side | seeds | NDCG@10 no gap | NDCG@10 gap | drop | HR@10 no gap | HR@10 gap "
             "| drop | s/epoch | I(S;C) nats |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for backbone, method in VS_ORDER:
        for side in ("official", "jaxrec"):
            g = summary.get(f"{side}/{backbone}/{method}")
            if not g:
                lines.append(f"| {backbone} | {method} | {side} | 0 | not run | | | | | | | |")
                continue

            def f(name, pct=False, digits=4):
                return _fmt(g[name]["mean"], g[name]["std"], digits, pct)
            mi = g["mutual_information"]["mean"]
            lines.append(f"| {backbone} | {method} | {side} | {g['ndcg@10']['n']} | {f('ndcg@10')} | "
                         f"{f('gap_ndcg@10')} | {f('drop_ndcg@10', True)} | {f('hr@10')} | {f('gap_hr@10')} | "
                         f"{f('drop_hr@10', True)} | {g['seconds_per_epoch']['mean']:.2f} | "
                         f"{'-' if mi is None else f'{mi:.4f}'} |")
    return "\n".join(lines)


def vs_official(args) -> int:
    from jaxrec.bench import machine_info, write_json
    out = Path(args.out or (REPO / "results" / "local" / "bench_caseq_vs_official_quick.json" if args.quick
                            else VS_OFFICIAL_OUT))
    report = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    if args.table:
        print(vs_table(report))
        print()
        print(speed_table(report))
        return 0
    official_dir = Path(args.vs_official).resolve()
    if not (official_dir / "main.py").exists() or not (official_dir / "model.py").exists():
        print(f"error: --vs-official {official_dir}: not a checkout of the official CaseQ code (no main.py/model.py)",
              file=sys.stderr)
        return 2
    runs_dir = Path(args.runs_dir if args.runs_dir != PARSER_DEFAULT_RUNS
                    else REPO / "runs" / ("bench_caseq_vs_official" + ("_quick" if args.quick else "")))
    runs_dir.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "official"
    if args.speed:
        return vs_speed(args, report, out, official_dir, runs_dir)
    report.update(machine=machine_info(), data="CaseQ's ml-100k.txt (" + VS_OFFICIAL_DATA + ")",
                  budget="quick smoke run (2 epochs)" if args.quick else "official",
                  protocol=(f"{VS_EPOCHS} epochs of 1 step x 512 users, gap 30 events, test = target + 100 "
                            "negatives avoiding the history, best epoch by validation NDCG@10 (evaluated every "
                            f"{VS_EVAL_EVERY} epochs); context report on the no-gap test at that epoch"),
                  timing=("seconds_per_epoch = wall time of the whole process (start-up, compilation, training "
                          "and evaluations) / epochs; the cells ran beside other jobs, so these times are not a "
                          "speed comparison (see the speed section)"))
    cells = report.setdefault("cells", {})
    if args.rebuild_cells:   # re-read finished cells from their raw outputs (nothing is trained)
        for key, cell in list(cells.items()):
            if "error" in cell:
                continue
            raw = runs_dir / f"{vs_run_name(cell['side'], cell['backbone'], cell['method'], cell['seed'], mode)}.json"
            if raw.exists():
                cells[key] = run_vs_cell(cell["side"], cell["backbone"], cell["method"], cell["seed"], official_dir,
                                         runs_dir, cell["threads"], mode)
        report["summary"] = vs_summary(cells)
        write_json(out, report)
        print(vs_table(report))
        return 0
    for seed in args.seeds:
        for backbone, method in VS_ORDER:
            if backbone not in args.backbones or method not in args.methods:
                continue
            for side in args.sides:
                key = vs_cell_key(side, backbone, method, seed)
                if key in cells and "error" not in cells[key]:
                    continue
                print(f"== {key}", flush=True)
                try:
                    cells[key] = run_vs_cell(side, backbone, method, seed, official_dir, runs_dir, args.threads,
                                             mode)
                except Exception as e:   # one failed cell must not lose the others
                    cells[key] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"   failed: {cells[key]['error']}", flush=True)
                report["date"] = time.strftime("%Y-%m-%d")
                write_merged(out, report, "cells", key, cells[key])
                cells = report["cells"]
    print(vs_table(report))
    return 0


def write_merged(out: Path, report: dict, section: str, key: str, value: dict) -> None:
    """Write `report` with report[section][key] = value. Other invocations (one per side, or
    --speed beside the accuracy cells) write the same file, so the sections are taken from the
    file as it is now, not as this process read it; the summaries are derived from them."""
    from jaxrec.bench import write_json
    fresh = json.loads(out.read_text()) if out.exists() else {}
    for name in ("cells", "speed"):
        report[name] = dict(fresh.get(name, report.get(name, {})))
    report[section][key] = value
    if section != "speed":
        report.update({k: fresh[k] for k in ("speed_date", "speed_protocol") if k in fresh})
    report["summary"] = vs_summary(report["cells"])
    report["speed_summary"] = speed_summary(report["speed"])
    write_json(out, report)


def vs_speed(args, report: dict, out: Path, official_dir: Path, runs_dir: Path) -> int:
    """--speed: every variant on both sides, one job at a time, alternating sides, into the
    report's "speed" section (the accuracy cells are left as they are)."""
    for backbone, method in VS_ORDER:
        if backbone not in args.backbones or method not in args.methods:
            continue
        for side in args.sides:
            key = f"{side}/{backbone}/{method}"
            if args.remeasure_speed:
                (runs_dir / f"{vs_run_name(side, backbone, method, 100, 'speed')}.json").unlink(missing_ok=True)
            elif key in report.get("speed", {}) and "error" not in report["speed"][key]:
                continue
            print(f"== speed {key}", flush=True)
            try:
                entry = run_vs_speed(side, backbone, method, official_dir, runs_dir, args.threads)
            except Exception as e:   # one failed run must not lose the others
                entry = {"error": f"{type(e).__name__}: {e}"}
                print(f"   failed: {entry['error']}", flush=True)
            report.update(speed_date=time.strftime("%Y-%m-%d"), speed_protocol=SPEED_PROTOCOL.format(threads=args.threads))
            write_merged(out, report, "speed", key, entry)
    print(speed_table(report))
    return 0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"], choices=DATASETS)
    parser.add_argument("--backbones", nargs="+", default=["sasrec", "gru4rec"], choices=["sasrec", "gru4rec"])
    parser.add_argument("--methods", nargs="+", default=["backbone", "caseq"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--out", default=None,
                        help="default results/bench_caseq.json (--quick: results/local/bench_caseq_quick.json)")
    parser.add_argument("--runs-dir", default=PARSER_DEFAULT_RUNS)
    parser.add_argument("--quick", action="store_true", help="4 training steps per cell (a smoke run)")
    parser.add_argument("--official", action="store_true", help="the configs' own (official) budget")
    parser.add_argument("--table", action="store_true", help="only print the tables of --out")
    parser.add_argument("--cost-rounds", type=int, default=20,
                        help="round-robin steps per method for the cost measurement (0: skip it)")
    parser.add_argument("--cost-losses", nargs="+", default=["bce"], choices=list(COST_LOSSES),
                        help="losses to measure the cost under (bce: the official recipe; ce: full softmax)")
    parser.add_argument("--cost-only", action="store_true", help="measure (or re-measure) the cost and train no cell")
    parser.add_argument("--remeasure-cost", action="store_true", help="replace cost entries already in --out")
    parser.add_argument("--vs-official", metavar="OFFICIAL_DIR", default=None,
                        help="side by side with a checkout of the official code (ML-100K, official protocol); "
                             "--seeds default 100 101 102, --out default results/bench_caseq_vs_official.json")
    parser.add_argument("--sides", nargs="+", default=["official", "jaxrec"], choices=["official", "jaxrec"])
    parser.add_argument("--threads", type=int, default=1, help="--vs-official: cores per job (CPU affinity) and torch threads, both sides")
    parser.add_argument("--rebuild-cells", action="store_true",
                        help="--vs-official: rebuild the JSON's finished cells from their raw outputs, train nothing")
    parser.add_argument("--speed", action="store_true",
                        help="--vs-official: time 20 epochs of every variant on both sides (seconds per epoch and "
                             "the speed-up) instead of training the accuracy cells")
    parser.add_argument("--remeasure-speed", action="store_true",
                        help="--speed: time every variant again, replacing the entries and raw outputs already there")
    parser.add_argument("--jaxrec-vs-cell", nargs=4, metavar=("BACKBONE", "METHOD", "SEED", "RAW_OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--vs-mode", choices=list(VS_BUDGETS), default="official", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.jaxrec_vs_cell:
        backbone, method, seed, raw_out = args.jaxrec_vs_cell
        jaxrec_vs_cell(backbone, method, int(seed), Path(raw_out), Path(args.runs_dir), args.vs_mode)
        return 0
    if args.vs_official:
        if args.seeds == DEFAULT_SEEDS:
            args.seeds = [100, 101, 102]
        return vs_official(args)
    from jaxrec.bench import machine_info, write_json

    out = Path(args.out or REPO / "results" / ("local/bench_caseq_quick.json" if args.quick else "bench_caseq.json"))
    report = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    if args.table:
        print(tables(report["cells"], report.get("cost")))
        return 0
    report.pop("environment", None)   # older files: the same facts, now under "machine" as in every benchmark
    report.update(machine=machine_info(), budgets={k: v["label"] for k, v in BUDGETS.items()},
                  protocols={"full": "full ranking, history included",
                             "sampled": "target + 100 negatives avoiding target and history, seed 1234"},
                  model_selection="best validation NDCG@10 under full ranking; both protocols read that checkpoint")
    for dataset in args.datasets:
        for backbone in args.backbones:
            for loss in args.cost_losses:
                key = "/".join([dataset, backbone] + ([] if loss == "bce" else [loss])
                               + (["official"] if args.official else []))
                cost = report.setdefault("cost", {})
                if args.cost_rounds and (key not in cost or args.remeasure_cost):
                    print(f"== cost {key}", flush=True)
                    cost[key] = step_costs(dataset, backbone, args.cost_rounds, args.quick, loss, args.official)
                    write_json(out, report)
        for seed in ([] if args.cost_only else args.seeds):
            for backbone in args.backbones:
                for method in args.methods:
                    key = cell_key(dataset, backbone, method, seed)
                    if key in report["cells"] and "error" not in report["cells"][key]:
                        continue
                    print(f"== {key}", flush=True)
                    try:
                        cell = run_cell(dataset, backbone, method, seed, Path(args.runs_dir), args.quick,
                                        args.official)
                    except Exception as e:   # one failed cell must not lose the others
                        cell = {"error": f"{type(e).__name__}: {e}"}
                        print(f"   failed: {cell['error']}", flush=True)
                    report["cells"][key] = cell
                    report["date"] = time.strftime("%Y-%m-%d")
                    report["summary"] = summarise(report["cells"])
                    write_json(out, report)
    print(tables(report["cells"], report.get("cost")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
