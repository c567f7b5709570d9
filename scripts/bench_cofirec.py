"""Generative retrieval: CoFiRec vs TIGER (and ablations) on the planted hierarchy; beam-search throughput on Beauty.

Stages (each writes its entry of results/bench_cofirec.json):

  synthetic   the generator (configs/{cofirec,tiger}/synthetic.yaml) on the tokenizer runs of
              scripts/bench_semantic_ids.py (run its `synthetic` stage first), per seed, under one
              CPU budget: CoFiRec, TIGER and CoFiRec ablations (reversed level order, no level
              embedding, no position embedding, decoder-only backbone). R@5/10, N@5/10, ValidRatio,
              duplicate rate, beam-vs-exact disagreement, popularity, seconds per epoch. The "flat"
              ablation is TIGER's row (one residual codebook stack over one embedding); the planted
              hierarchy has no CF level to drop (model.drop_levels=[cf] is a Beauty ablation).
              Cells already in the JSON are kept; --jobs N runs N cells at once, one core each.
  beauty      Beauty (leave-one-out, full ranking, history <= 20) under one CPU budget per run
              (~25 core-minutes of training: --t5-epochs / --decoder-epochs, batch --beauty-batch): TIGER and
              CoFiRec on the tokenizer runs of `bench_semantic_ids.py beauty`, each with the T5 and the
              decoder-only backbone, per seed, and both backbones on LETTER's released codes. Cells
              already in the JSON are kept; --jobs N runs N cells at once, one core each. SASRec's row
              is read from results/bench_sasrec_beauty_default.json (same split and full ranking).
  step        Beauty, LETTER's released codes: seconds per training step of each backbone (LETTER's
              sizes, batch --beauty-batch) at the full history width and with --length-buckets widths
              (records of similar length batched together, padding cut to the bucket's width).
  overlap     beam_exact_overlap@10 for Beauty cells measured before it was reported (from their checkpoints).
  beam        Beauty, LETTER's released codes, the T5 generator at LETTER's sizes: all test users in
              batched jitted passes vs a per-user loop of the same search (users/s). Weights are the
              initialisation: the search's cost does not depend on them.

    python scripts/bench_semantic_ids.py synthetic      # the tokenizer runs the synthetic stage reads
    python scripts/bench_cofirec.py synthetic --seeds 0 1 2 --jobs 2
    python scripts/bench_semantic_ids.py beauty         # the Beauty tokenizer runs the beauty stage reads
    python scripts/bench_cofirec.py beauty --seeds 0 1 --jobs 2 --exact-users 32
    python scripts/bench_cofirec.py beam --data ../shared/data/amazon/Beauty
    python scripts/bench_cofirec.py --table
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "results" / "bench_cofirec.json"
TOKENIZER_RUNS = "runs/bench_semantic_ids/synthetic/{mode}-{seed}"     # written by bench_semantic_ids.py
VARIANTS = {
    "cofirec": ("configs/cofirec/synthetic.yaml", "cofirec", []),
    "tiger": ("configs/tiger/synthetic.yaml", "tiger", []),
    "cofirec_reversed_levels": ("configs/cofirec/synthetic.yaml", "cofirec", ["model.reverse_levels=true"]),
    "cofirec_no_level_embedding": ("configs/cofirec/synthetic.yaml", "cofirec", ["model.level_embedding=false"]),
    "cofirec_no_position_embedding": ("configs/cofirec/synthetic.yaml", "cofirec",
                                      ["model.position_embedding=false"]),
    "cofirec_decoder": ("configs/cofirec/synthetic.yaml", "cofirec", ["model.backbone=decoder"]),
}
BEAUTY_VARIANTS = {
    "tiger_t5": ("configs/tiger/beauty.yaml", "runs/tiger-tokenizer-beauty", []),
    "cofirec_t5": ("configs/cofirec/beauty.yaml", "runs/cofirec-tokenizer-beauty", []),
    "tiger_decoder": ("configs/tiger/beauty.yaml", "runs/tiger-tokenizer-beauty", ["model.backbone=decoder"]),
    "cofirec_decoder": ("configs/cofirec/beauty.yaml", "runs/cofirec-tokenizer-beauty", ["model.backbone=decoder"]),
    "letter_codes_t5": ("configs/tiger/beauty_letter_codes.yaml", "{data}/letter_Beauty.index.json", []),
    "letter_codes_decoder": ("configs/tiger/beauty_letter_codes.yaml", "{data}/letter_Beauty.index.json",
                             ["model.backbone=decoder"]),
}
REPORTED = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "valid_ratio", "duplicate_rate",
            "beam_exact_disagreement@10", "beam_exact_overlap@10", "exact_users", "beam_users_per_s", "history_excluded/recall@10",
            "history_excluded/ndcg@10")


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def _save(key: str, value) -> None:
    from jaxrec.bench import update_json
    update_json(OUT, "bench_cofirec", key, value)


def _in_subprocess(args: list[str], core: int | None = None) -> dict:
    """One cell in its own process; with `core`, the child confines itself to that CPU before
    importing JAX (XLA:CPU sizes its thread pool from the affinity mask, so parallel cells do
    not contend for each other's core; no preexec_fn, which is unsafe in a threaded parent)."""
    pin = ["--core", str(core)] if core is not None else []
    out = subprocess.run([sys.executable, __file__, *pin, "--one", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train_one(config_path: str, overrides: list[str]) -> dict:
    from jaxrec.bench import peak_rss_mib
    from jaxrec.config import load_config
    from jaxrec.train.trainer import train
    config = load_config(REPO / config_path, overrides)
    started = time.time()
    result = train(config)
    wall = time.time() - started
    test = result.tests["test"]
    n_records = _records(config)
    epochs = result.steps * config.train.batch_size / n_records
    return {"config": config_path, "overrides": overrides, "steps": result.steps, "epochs": round(epochs, 3),
            "train_seconds": round(result.train_seconds, 1), "wall_seconds": round(wall, 1),
            "seconds_per_epoch": round(result.train_seconds / max(epochs, 1e-9), 1),
            "peak_rss_mib": round(peak_rss_mib(), 1), "best_step": result.best_step,
            "test": {k: test[k] for k in REPORTED if k in test},
            "popularity": {k: v for k, v in result.baselines.get("popularity", {}).get("test", {}).items()
                           if k in REPORTED},
            "protocol": result.protocols.get("test")}


def _records(config) -> int:
    from jaxrec.train.runs import start_session
    return len(start_session(config, load_frozen=False).task.train_records())


def stage_synthetic(args) -> None:
    """Every (variant, seed) cell not yet in the JSON under this budget, `--jobs` at a time, one
    core each; a finished cell is saved at once, so an interrupted stage resumes where it stopped."""
    rows = _load().get("synthetic", {"budget": None, "runs": {}})
    budget = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.eval_every={args.steps}",
              "train.log_every=50",
              f"model.exact_users={args.exact_users}", "train.progress=false"]
    if rows["runs"] and rows["budget"] != budget:
        raise SystemExit(f"{OUT}: its synthetic cells ran under another budget {rows['budget']}; "
                         "move the file aside to start over")
    rows["budget"] = budget
    todo = []
    for name in args.variants:
        config, mode, extra = VARIANTS[name]
        for seed in args.seeds:
            if str(seed) in rows["runs"].get(name, {}):
                print(f"{name} seed {seed}: done already", flush=True)
                continue
            tokenizer = REPO / TOKENIZER_RUNS.format(mode=mode, seed=seed)
            if not (tokenizer / "checkpoints").is_dir():
                raise SystemExit(f"{tokenizer}: missing; run `python scripts/bench_semantic_ids.py synthetic` first")
            todo.append((name, seed, [config, f"model.semantic_ids={tokenizer.relative_to(REPO)}", f"run.seed={seed}",
                                      f"run.dir=runs/bench_cofirec/synthetic/{name}-{seed}", *budget, *extra]))
    def done(name, seed, result):
        rows["runs"].setdefault(name, {})[str(seed)] = result
        rows["summary"] = _summarise(rows["runs"])
        _save("synthetic", rows)
        print(f"{name} seed {seed}: {json.dumps(result['test'])}", flush=True)

    _run_cells(todo, args.jobs, done)
    rows["summary"] = _summarise(rows["runs"])
    _save("synthetic", rows)


def _run_cells(todo: list, jobs: int, done) -> None:
    """Run (name, seed, args) cells `jobs` at a time, one core each (pinned), calling
    `done(name, seed, result)` under a lock as each finishes."""
    cores = sorted(os.sched_getaffinity(0))
    jobs = max(1, min(jobs, len(cores)))
    free, lock = list(cores[:jobs]), threading.Lock()

    def run(cell):
        name, seed, cell_args = cell
        with lock:
            core = free.pop()
        try:
            result = _in_subprocess(cell_args, core if jobs > 1 else None)
        finally:
            with lock:
                free.append(core)
        with lock:
            done(name, seed, result)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run, todo))


def _tokenizer_stats(run_dir: Path) -> dict | None:
    """The test report of the tokenizer run a Beauty cell read (its codes' statistics)."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    test = json.loads(path.read_text())["tests"]["test"]
    return {k: v for k, v in test.items() if k.startswith(("utilisation/", "perplexity/", "collision_rate",
                                                             "unique_ratio", "reconstruction"))}


def stage_beauty(args) -> None:
    """Every (variant, seed) cell not yet in the JSON under this budget, `--jobs` at a time,
    one core each; a finished cell is saved at once, so an interrupted stage resumes."""
    data = Path(args.data)
    rows = _load().get("beauty", {"budget": None, "runs": {}})
    # One CPU budget, about the same core-minutes of training per cell: the T5 encodes every prefix
    # on its own (513 steps an epoch), the decoder-only model all prefixes of a history in one pass
    # (92), so they get different numbers of epochs for the same time.
    epochs = {"t5": args.t5_epochs, "decoder": args.decoder_epochs}
    budget = [f"epochs per backbone {epochs}", f"train.batch_size={args.beauty_batch}",
              "train.eval_every=0", "checkpoint.every=200", f"model.exact_users={args.exact_users}",
              f"model.valid_users={args.valid_users}", f"model.both_exclusions={str(args.both_exclusions).lower()}",
              f"eval.batch_size={args.eval_batch}", "train.progress=false"]
    if rows["runs"] and rows["budget"] != budget:
        raise SystemExit(f"{OUT}: its Beauty cells ran under another budget {rows['budget']}; "
                         "move the file aside to start over")
    rows["budget"] = budget
    todo, tokenizer_of = [], {}
    for name in args.beauty_variants:
        config, codes, extra = BEAUTY_VARIANTS[name]
        codes = codes.format(data=data)
        if not (REPO / codes).exists():
            raise SystemExit(f"{codes}: missing; run `python scripts/bench_semantic_ids.py beauty` first")
        stats = None if codes.endswith(".json") else _tokenizer_stats(REPO / codes)
        if stats is not None:
            rows.setdefault("tokenizers", {})[codes] = stats
        # A tokenizer run rebuilt between seeds has not repeated bit for bit (a rebuild of the Beauty
        # embeddings and tokenizer gave 245 category codes where the first gave 246), so each cell
        # keeps the statistics of the codes it read.
        tokenizer_of[name] = stats
        for seed in args.seeds:
            if str(seed) in rows["runs"].get(name, {}):
                print(f"beauty {name} seed {seed}: done already", flush=True)
                continue
            backbone = "decoder" if "model.backbone=decoder" in extra else "t5"
            todo.append((name, seed, [config, f"data.source={data / 'Beauty.txt'}", f"model.semantic_ids={codes}",
                                      f"run.seed={seed}", f"run.dir=runs/bench_cofirec/beauty/{name}-{seed}",
                                      f"train.epochs={epochs[backbone]}", *budget[1:], *extra]))

    def done(name, seed, run):
        if tokenizer_of[name] is not None:
            run["tokenizer"] = tokenizer_of[name]
        rows["runs"].setdefault(name, {})[str(seed)] = run
        rows["summary"] = _summarise(rows["runs"])
        _save("beauty", rows)
        print(f"beauty {name} seed {seed}: {json.dumps(run['test'])} {run['seconds_per_epoch']} s/epoch", flush=True)

    _run_cells(todo, args.jobs, done)
    sasrec = REPO / "results" / "bench_sasrec_beauty_default.json"
    if sasrec.is_file():
        ref = json.loads(sasrec.read_text())
        rows["sasrec"] = {"source": "results/bench_sasrec_beauty_default.json", "config": ref.get("config"),
                          "epochs": ref.get("epochs"), "seconds_per_epoch": ref.get("seconds_per_epoch"),
                          "test": {k: v for k, v in ref["test"].items() if k != "examples"},
                          "protocol": ref.get("protocol")}
    rows["summary"] = _summarise(rows["runs"])
    _save("beauty", rows)


def _summarise(runs: dict) -> dict:
    summary = {}
    for name, per_seed in runs.items():
        cells = list(per_seed.values())
        summary[name] = {"seeds": len(cells), **{
            f"{k}_{stat}": (statistics.mean if stat == "mean" else statistics.pstdev)(c["test"][k] for c in cells)
            for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10") for stat in ("mean", "std")}}
        summary[name]["popularity_ndcg@10"] = cells[0]["popularity"].get("ndcg@10")
        summary[name]["seconds_per_epoch"] = statistics.mean(c["seconds_per_epoch"] for c in cells)
        for k in ("beam_exact_disagreement@10", "beam_exact_overlap@10", "beam_users_per_s",
                  "history_excluded/recall@10", "history_excluded/ndcg@10"):
            if all(k in c["test"] for c in cells):
                summary[name][f"{k}_mean"] = statistics.mean(c["test"][k] for c in cells)
    return summary


def _beam_one(data_dir: str, users_loop: int, batch: int) -> dict:
    import jax
    from jaxrec.bench import peak_rss_mib
    from jaxrec.config import load_config
    from jaxrec.methods.cofirec.generator import beam_search_items
    from jaxrec.train.evaluation import Evaluator
    from jaxrec.train.runs import start_session
    data = Path(data_dir)
    config = load_config(REPO / "configs/tiger/beauty_letter_codes.yaml",
                         [f"data.source={data / 'Beauty.txt'}",
                          f"model.semantic_ids={data / 'letter_Beauty.index.json'}",
                          "model.exact_users=0", "model.both_exclusions=false", f"eval.batch_size={batch}",
                          "run.dir=runs/bench_cofirec/beam"])
    session = start_session(config)
    task = session.task
    params = jax.jit(lambda key: task.init(key).trainable)(jax.random.key(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    evaluator = Evaluator(task, session.layout, batch)
    test = task.eval_sets("test")[0]
    started = time.perf_counter()
    result = task.evaluate(test, params, session.frozen, {}, evaluator)
    batched_wall = time.perf_counter() - started
    records = test.records
    buckets = task.length_buckets(records)
    n_loop = min(users_loop, len(records))

    def one_user(i):
        """User i's history cut to its bucket's width, as the batched search sees it."""
        tokens = records[i]["history_tokens"][None]
        if buckets is None:
            return tokens
        return buckets.cut({"history_tokens": tokens}, buckets.widths[buckets.bucket_of[i]])["history_tokens"]

    for width in sorted({one_user(i).shape[1] for i in range(n_loop)}):        # compile each one-user program
        beam_search_items(task, params, next(one_user(i) for i in range(n_loop) if one_user(i).shape[1] == width))
    started = time.perf_counter()
    for i in range(n_loop):
        beam_search_items(task, params, one_user(i))
    loop_rate = n_loop / (time.perf_counter() - started)
    return {"users": len(records), "levels": task.ids.n_levels, "beam": task.m.beam, "batch": batch,
            "length_buckets": config.data.length_buckets, "decoder_cache": True, "backbone": task.m.backbone,
            "devices": jax.device_count(), "batched_users_per_s": round(result["beam_users_per_s"], 1),
            "batched_wall_seconds_incl_compile": round(batched_wall, 1),
            "per_user_loop_users_per_s": round(loop_rate, 2), "loop_users": n_loop,
            "speedup": round(result["beam_users_per_s"] / loop_rate, 1),
            "valid_ratio": result.get("valid_ratio"), "duplicate_rate": result.get("duplicate_rate"),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def _step_one(data_dir: str, backbone: str, length_buckets: int, steps: int, batch: int) -> dict:
    """Seconds per training step of one backbone on Beauty (LETTER's codes, LETTER's sizes), the
    real input pipeline and jitted step; every bucket width is compiled before timing starts."""
    import jax
    from jaxrec.bench import peak_rss_mib
    from jaxrec.config import load_config
    from jaxrec.train import pipeline
    from jaxrec.train.runs import start_session
    from jaxrec.train.session import make_train_step
    from jaxrec.train.state import schedule, with_clipping
    data = Path(data_dir)
    config = load_config(REPO / "configs/tiger/beauty_letter_codes.yaml",
                         [f"data.source={data / 'Beauty.txt'}", f"model.semantic_ids={data / 'letter_Beauty.index.json'}",
                          f"model.backbone={backbone}", f"data.length_buckets={length_buckets}",
                          f"train.batch_size={batch}", "run.dir=runs/bench_cofirec/step"])
    session = start_session(config)
    task, layout = session.task, session.layout
    records, buckets = task.train_records(), task.train_buckets()
    per_epoch = len(records) // batch
    sched = schedule(config.train, per_epoch)
    tx = with_clipping(task.optimizer(sched), config.train.grad_clip)
    make_state, _, shardings = session.state_layout(tx)
    state = session.init_state(make_state, shardings)
    stream = pipeline.train_stream(records, batch, 0, None, config.data.num_threads, config.data.prefetch, buckets)
    step = jax.jit(make_train_step(task, tx, sched, per_epoch), donate_argnums=0)
    key = jax.random.key(1)
    n_shapes = len(buckets.widths) if buckets is not None else 1
    seen, compile_seconds = set(), 0.0
    with layout.activate():
        while len(seen) < n_shapes:                     # compile (and run once) every width
            host = next(stream)
            shape = tuple(sorted((k, v.shape) for k, v in host.items()))
            started = time.perf_counter()
            state, metrics = step(state, session.frozen, pipeline.to_global(host, layout), key)
            jax.block_until_ready(metrics)
            if shape not in seen:
                compile_seconds += time.perf_counter() - started
            seen.add(shape)
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, session.frozen, pipeline.to_global(next(stream), layout), key)
        jax.block_until_ready(metrics)
        per_step = (time.perf_counter() - started) / steps
    return {"backbone": backbone, "length_buckets": length_buckets,
            "widths": list(buckets.widths) if buckets is not None else [task.m.max_history],
            "padded_token_fraction": round(buckets.padded_tokens(), 4) if buckets is not None else 1.0,
            "batch": batch, "records": len(records), "steps_per_epoch": per_epoch, "timed_steps": steps,
            "seconds_per_step": round(per_step, 3), "seconds_per_epoch": round(per_step * per_epoch, 1),
            "compile_seconds": round(compile_seconds, 1), "devices": jax.device_count(),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def _overlap_one(run_dir: str) -> dict:
    """beam_exact_overlap@10 of a finished cell, from its best checkpoint, on the same users and
    history setting its evaluation used (for cells measured before the figure existed)."""
    from jaxrec.methods.cofirec.generator_eval import disagreement, run_search
    from jaxrec.train.evaluation import Evaluator
    from jaxrec.train.runs import open_run
    run = open_run(REPO / run_dir)
    task, layout = run.task, run.session.layout
    test = task.eval_sets("test")[0]
    subset = _first(test.records, task.m.exact_users)
    evaluator = Evaluator(task, layout, task.config.eval.batch_size)
    exclude = task.config.eval.exclude_history
    trie = jax_device_put(task.trie, layout)
    with layout.activate():
        items, _ = run_search(task, subset, run.state.params, trie.tables, evaluator, exclude)
        differs, overlap, n = disagreement(task, subset, items, run.state.params, trie, evaluator, exclude, 10)
    return {"beam_exact_disagreement@10": differs, "beam_exact_overlap@10": overlap, "exact_users": n}


def _first(records, n):
    from jaxrec.methods.cofirec.generator_records import Subset
    subset = Subset(records, n)
    subset.slots, subset.trim = records.slots[:subset.n], records.trim      # bucketed like the full split
    return subset


def jax_device_put(trie, layout):
    import jax
    return jax.device_put(trie, layout.replicated())


def stage_overlap(args) -> None:
    """Add beam_exact_overlap@10 to the Beauty cells that lack it (recomputed from their checkpoints)."""
    rows = _load().get("beauty", {"runs": {}})
    for name, per_seed in rows["runs"].items():
        for seed, cell in per_seed.items():
            if "beam_exact_overlap@10" in cell["test"]:
                continue
            got = _in_subprocess(["overlap", f"runs/bench_cofirec/beauty/{name}-{seed}"])
            if got["beam_exact_disagreement@10"] != cell["test"].get("beam_exact_disagreement@10"):
                raise SystemExit(f"{name} seed {seed}: the recomputed disagreement {got} differs from the cell's")
            cell["test"]["beam_exact_overlap@10"] = got["beam_exact_overlap@10"]
            cell["overlap_recomputed_from_checkpoint"] = True
            print(f"{name} seed {seed}: {got}", flush=True)
    rows["summary"] = _summarise(rows["runs"])
    _save("beauty", rows)


def stage_step(args) -> None:
    """Both backbones, each without and with length buckets; one job at a time."""
    from jaxrec.bench import machine_info
    rows = _load().get("step", {})
    rows["machine"] = machine_info()
    for backbone in ("t5", "decoder"):
        for n in (1, args.length_buckets):
            run = _in_subprocess(["step", args.data, backbone, str(n), str(args.step_steps), str(args.beauty_batch)],
                                 args.core_for_cells)
            rows[f"{backbone}_buckets{n}"] = run
            print(json.dumps(run), flush=True)
            _save("step", rows)


def stage_beam(args) -> None:
    run = _in_subprocess(["beam", args.data, str(args.loop_users), str(args.batch)], args.core_for_cells)
    old = _load().get("beam", {})
    # The figure before length buckets and the decoder caches (2026-12-02) stays beside the new one.
    run["before_buckets_and_cache"] = old.get("before_buckets_and_cache") or (
        {k: v for k, v in old.items() if k != "before_buckets_and_cache"} if old and "length_buckets" not in old
        else None)
    _save("beam", run)
    print(json.dumps(run), flush=True)


def table() -> str:
    payload = _load()
    lines = []
    for stage in ("synthetic", "beauty"):
        summary = payload.get(stage, {}).get("summary", {})
        if not summary:
            continue
        lines.append(f"{stage}:")
        lines.append("| variant | seeds | R@5 | R@10 | N@5 | N@10 | s/epoch |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for name, row in summary.items():
            cells = [f"{row[f'{k}_mean']:.4f} ± {row[f'{k}_std']:.4f}" for k in ("recall@5", "recall@10", "ndcg@5",
                                                                              "ndcg@10")]
            lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells)
                         + f" | {row.get('seconds_per_epoch', float('nan')):.0f} |")
    if "beam" in payload:
        lines.append(json.dumps(payload["beam"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="synthetic | beauty | beam")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=200, help="generator steps per synthetic run (CPU budget)")
    parser.add_argument("--batch-size", type=int, default=128, help="generator batch per synthetic run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="synthetic, beauty: cells run in parallel, one core each (timings stay per core)")
    parser.add_argument("--beauty-variants", nargs="+", default=list(BEAUTY_VARIANTS),
                        help=", ".join(BEAUTY_VARIANTS))
    parser.add_argument("--t5-epochs", type=float, default=0.5,
                        help="Beauty: T5 epochs per run (the CPU budget: ~25 core-minutes of training on this CPU)")
    parser.add_argument("--decoder-epochs", type=float, default=4.0,
                        help="Beauty: decoder-only epochs per run (the same ~25 core-minutes)")
    parser.add_argument("--eval-batch", type=int, default=32, help="Beauty: users per beam-search batch")
    parser.add_argument("--beauty-batch", type=int, default=256, help="generator batch per Beauty run")
    parser.add_argument("--valid-users", type=int, default=2000,
                        help="Beauty: validation users (a fixed random subset; the test split always has all)")
    parser.add_argument("--both-exclusions", action=argparse.BooleanOptionalAction, default=True,
                        help="Beauty: also search the test split with the other history setting (doubles its cost)")
    parser.add_argument("--exact-users", type=int, default=100)
    parser.add_argument("--data", default=None,
                        help="the Beauty directory (default: ../shared/data/amazon/Beauty beside the repository)")
    parser.add_argument("--loop-users", type=int, default=100, help="users timed in the per-user loop")
    parser.add_argument("--batch", type=int, default=512, help="users per batched beam-search pass")
    parser.add_argument("--length-buckets", type=int, default=5, help="step: the bucketed setting's widths")
    parser.add_argument("--step-steps", type=int, default=20, help="step: timed steps per setting")
    parser.add_argument("--core-for-cells", type=int, default=None,
                        help="step, beam: pin the measured process to this CPU (default: every core)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from jaxrec.bench import repo_relative

    # The cells run in the repository and the JSON records this path: relative, it names no machine.
    args.data = repo_relative(args.data, "../shared/data/amazon/Beauty")
    os.chdir(REPO)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    if args.one:
        if args.one[0] == "beam":
            result = _beam_one(args.one[1], int(args.one[2]), int(args.one[3]))
        elif args.one[0] == "overlap":
            result = _overlap_one(args.one[1])
        elif args.one[0] == "step":
            result = _step_one(args.one[1], args.one[2], int(args.one[3]), int(args.one[4]), int(args.one[5]))
        else:
            result = _train_one(args.one[0], args.one[1:])
        print(json.dumps(result, default=str))
        return
    unknown = [s for s in args.stages if s not in ("synthetic", "beauty", "beam", "step", "overlap")]
    bad = [v for v in args.variants if v not in VARIANTS] + [v for v in args.beauty_variants
                                                              if v not in BEAUTY_VARIANTS]
    if unknown or bad:
        parser.error(f"unknown stage(s) {unknown} or variant(s) {bad}")
    for stage in args.stages:
        stages = {"synthetic": stage_synthetic, "beauty": stage_beauty, "beam": stage_beam, "step": stage_step,
                  "overlap": stage_overlap}
        stages[stage](args)
    print(table())


if __name__ == "__main__":
    main()
