"""Recommending from an export: load time and histories/s by batch size; writes JSON.

    python scripts/bench_recommend.py EXPORT                       # e.g. out/ from `jaxrec export runs/sasrec_ml1m out/`
    python scripts/bench_recommend.py EXPORT --histories 20000 --batch-sizes 1,64,256,1024

The histories are random item tokens of the export's catalogue, 1 to 2 x max_len long, fixed
by --seed. Each figure goes through `jaxrec recommend`'s own path (`recommend_lines`: checks,
fixed-size batches, JSON lines) with history exclusion on. A batch size is timed on its second
pass over the same histories: the first compiles its programs (one per exclusion-width bucket).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--histories", type=int, default=10_000)
    ap.add_argument("--batch-sizes", default="1,64,256,1024")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_recommend.json")
    args = ap.parse_args()

    start = time.perf_counter()
    from jaxrec.export.histories import recommend_lines
    from jaxrec.export.recommend import load_recommender
    rec = load_recommender(args.export_dir)
    load_s = time.perf_counter() - start          # imports, hash checks, deserialization

    rng = np.random.default_rng(args.seed)
    spec = getattr(rec, "spec", {})              # model.json of scoring and generative exports
    max_len = int(spec.get("max_len") or spec.get("max_history") or 50)
    items = rec.items[1:]
    histories = [[items[i] for i in rng.integers(0, len(items), rng.integers(1, 2 * max_len + 1))]
                 for _ in range(args.histories)]
    rows = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        n = min(args.histories, max(200, 20 * batch))
        for _ in range(2):
            t = time.perf_counter()
            lines, _ = recommend_lines(rec, histories[:n], args.k, True, batch, False)
            for _ in lines:
                pass
            seconds = time.perf_counter() - t
        rows[str(batch)] = {"histories": n, "seconds": seconds, "histories_per_s": n / seconds}
        print(f"batch {batch:5d}: {n / seconds:10.0f} histories/s ({n} histories)")

    from jaxrec.bench import machine_info, write_json
    manifest = rec.manifest
    payload = {"benchmark": "recommend", "machine": machine_info(),
               "export": {"dir": str(Path(args.export_dir).absolute()), "task": manifest["task"],
                          "kind": manifest["kind"], "n_items": len(items), "max_len": max_len,
                          "details": manifest.get("details", {})},
               "config": {"histories": args.histories, "k": args.k, "seed": args.seed, "exclude_history": True},
               "load_seconds": load_s, "throughput": rows}
    print(f"load (imports + checks + deserialization): {load_s:.2f} s")
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
