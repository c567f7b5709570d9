"""Requests/s and latency of `jaxrec serve` on an ML-1M SASRec export, and the export's load time.

    nice python scripts/bench_serve.py                      # trains a short SASRec on ML-1M if needed
    nice python scripts/bench_serve.py --export out/        # an existing seqrec export
    python scripts/bench_serve.py --smoke                   # the tiny synthetic run: checks the script runs

Without --export, the run `runs/bench_serve_sasrec_ml1m` is trained (configs/sasrec_ml1m.yaml with a
`--train-steps` budget: serving speed does not depend on how well the model ranks) unless it already
holds results.json, then exported next to it.

Measured, each in its own fresh process where it matters:
  load        `load_recommender(EXPORT)` (manifest, SHA-256 of every file, weights, model set-up) and
              the first answer (its compilation), in new Python processes; importing jax and the
              task's code is timed apart (import_s)
  start       `jaxrec serve` from process start to the first 200 on /health
  served      one client, one keep-alive HTTP connection, requests sent back to back: p50 / p99 latency
              and requests/s for batch 1 and batch 64 (each request: k = 10, the run's history
              exclusion, histories = users' last max_len items, users taken in turn; at most
              --requests timed requests or --budget-s timed seconds, after 5 untimed ones)
  in_process  the same batches through `recommend()` in this process: what the server adds is the
              difference (HTTP, JSON, validation, one hop to the model thread)
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOAD_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import jax
from jaxrec import registry
from jaxrec.export.manifest import read_manifest
from jaxrec.export.recommend import load_recommender
registry.task_class(read_manifest(sys.argv[1], verify=False)["task"])   # the task's code (flax, models)
t1 = time.perf_counter()
rec = load_recommender(sys.argv[1])
t2 = time.perf_counter()
rec.recommend([[rec.items[1]]], k=10)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_answer_s": t3 - t2}))
"""

def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", help="a seqrec export directory (default: train and export the ML-1M run)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-1m" / "ml-1m.txt"))
    p.add_argument("--run", default=str(REPO / "runs" / "bench_serve_sasrec_ml1m"))
    p.add_argument("--train-steps", type=int, default=282, help="training budget when the run is made (6 epochs)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, nargs="+", default=[1000, 200],
                   help="timed requests per batch size (at most; see --budget-s)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="stop a measurement after this many timed seconds even if fewer requests were sent")
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic run, few requests (checks the script)")
    p.add_argument("--out", default=str(REPO / "results" / "bench_serve.json"))
    return p.parse_args()


def _jaxrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "jaxrec.cli", *args], cwd=REPO, check=True)


def prepare_export(args) -> Path:
    run = Path(args.run)
    if not (run / "results.json").is_file():
        if args.smoke:
            _jaxrec("train", "configs/sasrec_synthetic.yaml", f"run.dir={run}", "train.steps=20",
                    "train.eval_every=20", "train.progress=false")
        else:
            _jaxrec("train", "configs/sasrec_ml1m.yaml", f"data.source={args.data}", f"run.dir={run}",
                    f"train.steps={args.train_steps}", f"train.eval_every={args.train_steps // 2}",
                    f"checkpoint.every={args.train_steps // 2}", "train.progress=false")
    export = run.parent / (run.name + "_export")
    _jaxrec("export", str(run), str(export), "--force")
    return export


def measure_load(export: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(export)], cwd=REPO, check=True,
                             capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: {"min": min(r[key] for r in runs), "median": statistics.median(r[key] for r in runs),
                  "runs": [r[key] for r in runs]} for key in runs[0]}


def histories_for(export: Path, data: str | None, smoke: bool) -> list[list[str]]:
    """Users' last max_len items as raw tokens (the model's window)."""
    max_len = json.loads((export / "model.json").read_text())["max_len"]
    if smoke:
        from jaxrec.data.synthetic import SyntheticConfig, make_synthetic
        store = make_synthetic(SyntheticConfig.default())
    else:
        from jaxrec.data.readers import read_interactions
        store = read_interactions(Path(data), format="pairs")
    vocab = store.item_vocab
    return [[str(t) for t in vocab[store.sequence(u)[-max_len:]]] for u in range(store.n_users)]


class Server:
    """`jaxrec serve EXPORT --port 0` in a subprocess; its address is the first line it prints."""

    def __init__(self, export: Path, max_batch: int):
        self.logs = tempfile.TemporaryDirectory()
        self.stdout = open(Path(self.logs.name) / "stdout", "w+")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxrec.cli", "serve", str(export), "--port", "0",
                                      "--max-batch", str(max_batch)], cwd=REPO, stdout=self.stdout,
                                     stderr=subprocess.DEVNULL)
        self.host, self.port = self._wait()
        self.ready_s = time.perf_counter() - self.started

    def _wait(self, timeout: float = 600.0) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"jaxrec serve exited with {self.proc.returncode}")
            first = (Path(self.logs.name) / "stdout").read_text().partition("\n")[0]
            if " on http://" in first:
                host, port = first.split(" on http://", 1)[1].split()[0].rsplit(":", 1)
                try:
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        return host, int(port)
                except OSError:
                    pass
            time.sleep(0.05)
        sys.exit("jaxrec serve: no /health answer")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.stdout.close()
        self.logs.cleanup()


def time_requests(host: str, port: int, bodies: list[bytes], warmup: int, budget_s: float) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=300)
    latencies = []
    for i, body in enumerate(bodies):
        if sum(latencies) > budget_s:
            break
        start = time.perf_counter()
        conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            sys.exit(f"/recommend answered {response.status}: {payload[:300]!r}")
        if i >= warmup:
            latencies.append(elapsed)
    conn.close()
    return summarise(latencies)


def summarise(latencies: list[float]) -> dict:
    ordered = sorted(latencies)

    def pct(q: float) -> float:   # nearest rank: an observed latency, not an interpolation
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
    return {"requests": len(ordered), "requests_per_s": len(ordered) / sum(ordered),
            "p50_ms": 1e3 * pct(0.50), "p99_ms": 1e3 * pct(0.99), "mean_ms": 1e3 * statistics.fmean(ordered),
            "max_ms": 1e3 * ordered[-1]}


def _commit() -> str | None:
    """The checkout's commit (+ "-dirty"): which server and recommender code was measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main() -> None:
    args = _parse()
    if args.smoke:
        args.run = str(REPO / "runs" / "bench_serve_smoke")
        args.requests, args.load_repeats = [20] * len(args.batches), 1
        args.out = str(REPO / "results" / "local" / "bench_serve_smoke.json")
    if len(args.requests) != len(args.batches):
        sys.exit("--requests needs one count per --batches entry")
    from importlib.metadata import version

    from jaxrec.bench import machine_info, write_json
    load_before = os.getloadavg()
    export = Path(args.export) if args.export else prepare_export(args)
    manifest = json.loads((export / "manifest.json").read_text())
    histories = histories_for(export, args.data, args.smoke)
    warmup = 5

    def batches(size: int, count: int) -> list[list[list[str]]]:
        return [[histories[(i * size + j) % len(histories)] for j in range(size)] for i in range(count + warmup)]

    load = measure_load(export, args.load_repeats)
    print("load:", json.dumps(load))
    server = Server(export, max_batch=max(args.batches))
    try:
        served = {}
        for size, count in zip(args.batches, args.requests):
            bodies = [json.dumps({"histories": b, "k": args.k}).encode() for b in batches(size, count)]
            served[f"batch_{size}"] = {"batch": size, **time_requests(server.host, server.port, bodies, warmup,
                                                                      args.budget_s)}
            served[f"batch_{size}"]["histories_per_s"] = served[f"batch_{size}"]["requests_per_s"] * size
            print(f"served batch {size}:", json.dumps(served[f"batch_{size}"]))
    finally:
        server.close()

    from jaxrec.export.recommend import load_recommender
    rec = load_recommender(export)
    in_process = {}
    for size, count in zip(args.batches, args.requests):
        latencies = []
        for i, batch in enumerate(batches(size, count)):
            if sum(latencies) > args.budget_s:
                break
            start = time.perf_counter()
            rec.recommend(batch, k=args.k)
            if i >= warmup:
                latencies.append(time.perf_counter() - start)
        in_process[f"batch_{size}"] = {"batch": size, **summarise(latencies)}
        print(f"in-process batch {size}:", json.dumps(in_process[f"batch_{size}"]))

    report = {
        "benchmark": "bench_serve",
        "commit": _commit(),
        "machine": machine_info(),
        "conditions": {"niceness": os.nice(0), "load_average_1_5_15_before": load_before,
                       "load_average_1_5_15_after": os.getloadavg(),
                       "note": "shared machine: other jobs ran on the same cores during the measurement, so "
                               "latencies are pessimistic and p99 includes their interference"},
        "versions": {name: version(name) for name in ("fastapi", "uvicorn", "starlette", "pydantic")},
        "config": {"export": {"task": manifest.get("task"), "kind": manifest.get("kind"),
                              "recommender": f"{type(rec).__module__}.{type(rec).__name__}",
                              "run_step": manifest.get("run", {}).get("step"), "protocol": manifest.get("protocol"),
                              "test_metrics": manifest.get("metrics", {}).get("test"),
                              "items": len(rec.items) - 1, "max_len": rec.spec.get("max_len"),
                              "hidden": rec.spec.get("hidden"), "layers": rec.spec.get("layers")},
                   "train_steps": None if args.export else args.train_steps, "k": args.k,
                   "exclude_history": rec.spec.get("exclude_history"), "clients": 1, "connection": "keep-alive",
                   "warmup_requests": warmup, "budget_s_per_measurement": args.budget_s,
                   "server": f"jaxrec serve --max-batch {max(args.batches)}",
                   "histories": "users' last max_len items, users in turn", "smoke": args.smoke},
        "load": load,
        "server_ready_s": server.ready_s,
        "served": served,
        "in_process": in_process,
    }
    print("wrote", write_json(args.out, report))


if __name__ == "__main__":
    main()
