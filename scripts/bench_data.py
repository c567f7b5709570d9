"""Data-layer timings → JSON: reading each benchmark file, the synthetic data set, store save/load.

    python scripts/bench_data.py                       # all files, best of 3, results/local/bench_data.json
    python scripts/bench_data.py --quick               # smoke run: small files, one repeat

The data folder defaults to ../shared/data next to the checkout (override with --data-root).
Goal: ML-1M (1,000,209 pair lines) reads in under 3 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxrec.data.llara import read_llara  # noqa: E402
from jaxrec.data.readers import read_interactions  # noqa: E402
from jaxrec.data.store import InteractionStore  # noqa: E402
from jaxrec.data.synthetic import SyntheticConfig, synthetic_world  # noqa: E402
from jaxrec.data.synthetic_reference import reference_metrics  # noqa: E402

FILES = [  # (relative path, included in --quick)
    ("ml-1m/ml-1m.txt", False),
    ("ml-100k/ml-100k.txt", True),
    ("ml-100k/ml-100k.inter", True),
    ("amazon/Beauty/Beauty.txt", False),
    ("amazon/Sports_and_Outdoors/Sports_and_Outdoors.txt", False),
    ("amazon/Toys_and_Games/Toys_and_Games.txt", False),
    ("amazon/Beauty/user_sequence_asin.txt", False),
    ("lastfm-s3rec/LastFM.txt", True),
    ("lastfm-llara", True),
]


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "local" / "bench_data.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small files only, one repeat")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat

    reads = {}
    for relative, small in FILES:
        path = args.data_root / relative
        if (args.quick and not small) or not path.exists():
            continue
        reader = (lambda p=path: read_llara(p)["train"]) if path.is_dir() else (lambda p=path: read_interactions(p))
        seconds, store = best_of(repeat, reader)
        reads[relative] = {"seconds": round(seconds, 4), "users": store.n_users, "items": store.n_items,
                           "interactions": store.n_interactions, "bytes": _size(path)}
        print(f"{relative:55s} {seconds:7.3f} s  {store}")

    config = SyntheticConfig.tiny() if args.quick else SyntheticConfig.default()
    generate_s, world = best_of(repeat, lambda: synthetic_world.__wrapped__(config))
    reference_s, _ = best_of(1, lambda: reference_metrics(config, lapse=5 if args.quick else 30))
    with tempfile.TemporaryDirectory() as tmp:
        save_s, path = best_of(repeat, lambda: world.store.save(Path(tmp) / "store.npz"))
        load_s, _ = best_of(repeat, lambda: InteractionStore.load(path))
    print(f"synthetic generate {generate_s:.3f} s, reference metrics {reference_s:.3f} s, "
          f"save {save_s:.3f} s, load {load_s:.3f} s")

    result = {
        "benchmark": "data",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": {"numpy": np.__version__},
        "config": {"repeat": repeat, "quick": args.quick, "statistic": "min seconds over repeats",
                   "synthetic": config.__dict__},
        "read": reads,
        "synthetic": {"generate_seconds": round(generate_s, 4), "reference_metrics_seconds": round(reference_s, 4),
                      "interactions": world.store.n_interactions,
                      "save_seconds": round(save_s, 4), "load_seconds": round(load_s, 4)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


if __name__ == "__main__":
    sys.exit(main())
