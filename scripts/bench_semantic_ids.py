"""Semantic IDs: CoFiRec's per-level codebooks vs TIGER's RQ-VAE, on the planted hierarchy and Amazon Beauty.

Stages (each appends to one JSON, results/bench_semantic_ids.json; rerunning a stage replaces its entry):

  synthetic   both modes on the embedded planted hierarchy, 3 seeds: level-1 purity vs the planted
              topics, level-2 purity vs the sub-topics, utilisation, collisions (seconds each)
  embed       SmolLM2-135M embeddings of Beauty's three text levels (category path, brand + leaf
              category, title): cold (computed) or cached (read back), seconds and peak RSS
  beauty      the CF guide (SASRec, 32-d, training split only), then both tokenizers on Beauty: per-level
              utilisation and perplexity, collision rate before / after dedup, reconstruction error,
              training seconds, peak RSS; and the same statistics of LETTER's released Beauty index

    python scripts/bench_semantic_ids.py synthetic
    python scripts/bench_semantic_ids.py embed beauty --data ../shared/data/amazon/Beauty
    python scripts/bench_semantic_ids.py --table

Every run goes through `jaxrec.train.trainer.train` with the configs in configs/cofirec/ and
configs/tiger/ plus the overrides recorded beside each figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "results" / "bench_semantic_ids.json"
MODES = {"cofirec": "configs/cofirec/tokenizer_{data}.yaml", "tiger": "configs/tiger/tokenizer_{data}.yaml"}
SEEDS = (0, 1, 2)
EMBED_CACHE = "runs/embeddings"


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def _save(key: str, value) -> None:
    from jaxrec.bench import update_json
    update_json(OUT, "bench_semantic_ids", key, value)


def _in_subprocess(stage: str, args: list[str]) -> dict:
    """Each training run in its own process, so peak RSS is the run's own."""
    out = subprocess.run([sys.executable, __file__, "--one", stage, *args], cwd=REPO, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"{stage} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train_one(config_path: str, overrides: list[str]) -> dict:
    from jaxrec.bench import peak_rss_mib
    from jaxrec.config import load_config
    from jaxrec.train.trainer import train
    config = load_config(REPO / config_path, overrides)
    started = time.time()
    result = train(config)
    report = result.tests["test"]
    return {"config": config_path, "overrides": overrides, "steps": result.steps,
            "train_seconds": round(result.train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1), "report": report}


def _summary(report: dict) -> dict:
    keep = ("purity/topic", "purity/subtopic", "unique_ratio", "collision_rate", "collision_rate_letter",
            "collision_rate_dedup", "reconstruction")
    out = {k: report[k] for k in keep if k in report}
    out["utilisation"] = {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("utilisation/")}
    out["perplexity"] = {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("perplexity/")}
    return out


def stage_synthetic(args) -> None:
    rows = {}
    for mode, pattern in MODES.items():
        cells = []
        for seed in args.seeds:
            run = _in_subprocess("train", [pattern.format(data="synthetic"), f"run.seed={seed}",
                                           f"run.dir=runs/bench_semantic_ids/synthetic/{mode}-{seed}",
                                           "train.progress=false"])
            cells.append({"seed": seed, **_summary(run["report"]), "train_seconds": run["train_seconds"],
                          "peak_rss_mib": run["peak_rss_mib"]})
            print(f"synthetic {mode} seed {seed}: purity topic {cells[-1].get('purity/topic'):.3f} "
                  f"subtopic {cells[-1].get('purity/subtopic'):.3f}", flush=True)
        rows[mode] = {"config": pattern.format(data="synthetic"), "seeds": cells,
                      **{f"{k}_mean": statistics.mean(c[k] for c in cells) for k in ("purity/topic", "purity/subtopic",
                                                                                     "unique_ratio")},
                      **{f"{k}_std": statistics.pstdev(c[k] for c in cells) for k in ("purity/topic",
                                                                                      "purity/subtopic")}}
    _save("synthetic", rows)


def _embed_one(data_dir: str) -> dict:
    from jaxrec.bench import peak_rss_mib
    from jaxrec.data.item_text import beauty_text_levels
    from jaxrec.data.readers import read_interactions
    from jaxrec.methods.cofirec.text_embeddings import EmbeddingSettings, item_level_embeddings
    data = Path(data_dir)
    store = read_interactions(data / "Beauty.txt", format="sequences")
    levels = beauty_text_levels(store, data / "item_text.json")
    started = time.time()
    emb = item_level_embeddings(levels, "smollm2", cache_dir=REPO / EMBED_CACHE,
                                settings=EmbeddingSettings(max_tokens=256), progress=False)
    return {"levels": list(levels.names), "items": levels.n_items, "shape": list(emb.array.shape),
            "from_cache": bool(emb.from_cache), "seconds": round(time.time() - started, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def stage_embed(args) -> None:
    run = _in_subprocess("embed", [args.data])
    previous = _load().get("embed", {})
    previous["cached" if run["from_cache"] else "cold"] = run
    _save("embed", previous)
    print(f"embed: {'cached' if run['from_cache'] else 'cold'} {run['seconds']} s", flush=True)


def _letter_stats(path: Path) -> dict:
    import numpy as np
    from jaxrec.models.codebook_stats import (codebook_perplexity, codebook_utilisation, collision_rate,
                                              collision_rate_letter)
    index = json.loads(path.read_text())
    codes = np.asarray([[int(tok.split("_")[1].rstrip(">")) for tok in index[k]] for k in sorted(index, key=int)])
    return {"items": int(codes.shape[0]), "levels": int(codes.shape[1]),
            "utilisation": codebook_utilisation(codes, 256).round(4).tolist(),
            "perplexity": codebook_perplexity(codes).round(2).tolist(),
            "collision_rate": collision_rate(codes), "collision_rate_letter": collision_rate_letter(codes),
            "colliding_items": int(round(collision_rate(codes) * codes.shape[0]))}


def stage_beauty(args) -> None:
    data = Path(args.data)
    common = [f"data.source={data / 'Beauty.txt'}", "train.progress=false"]
    budget = {"guide": [*common, f"train.epochs={args.guide_epochs}"],
              "tokenizer": [*common, f"model.text={data / 'item_text.json'}", f"train.steps={args.steps}"]}
    rows = {"budget": {k: v[1:] for k, v in budget.items()}}
    guide = _in_subprocess("train", ["configs/cofirec/cf_guide_beauty.yaml", *budget["guide"],
                                     "run.dir=runs/cofirec-cf-guide-beauty"])
    rows["cf_guide"] = {"train_seconds": guide["train_seconds"], "test": guide["report"]}
    for mode, pattern in MODES.items():
        run = _in_subprocess("train", [pattern.format(data="beauty"), *budget["tokenizer"],
                                       f"run.dir=runs/{mode}-tokenizer-beauty"])
        rows[mode] = {"config": pattern.format(data="beauty"), **_summary(run["report"]),
                      "train_seconds": run["train_seconds"], "peak_rss_mib": run["peak_rss_mib"]}
        print(f"beauty {mode}: {json.dumps(rows[mode])}", flush=True)
    rows["letter_released_index"] = _letter_stats(data / "letter_Beauty.index.json")
    _save("beauty", rows)


def table() -> str:
    payload = _load()
    lines = []
    for mode, row in payload.get("synthetic", {}).items():
        lines.append(f"synthetic {mode:8s} purity topic {row['purity/topic_mean']:.3f} ± {row['purity/topic_std']:.3f}"
                     f"  subtopic {row['purity/subtopic_mean']:.3f} ± {row['purity/subtopic_std']:.3f}"
                     f"  unique {row['unique_ratio_mean']:.3f}")
    beauty = payload.get("beauty", {})
    for mode in ("cofirec", "tiger"):
        if mode in beauty:
            row = beauty[mode]
            lines.append(f"beauty {mode:8s} util {row['utilisation']} collisions {row.get('collision_rate'):.4f} -> "
                         f"{row.get('collision_rate_dedup')}  recon {row.get('reconstruction'):.4f}  "
                         f"{row['train_seconds']} s")
    if "letter_released_index" in beauty:
        lines.append(f"LETTER index: {beauty['letter_released_index']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="synthetic | embed | beauty")
    parser.add_argument("--data", default=None,
                        help="the Beauty directory (Beauty.txt, item_text.json, letter_Beauty.index.json; "
                             "default: ../shared/data/amazon/Beauty beside the repository)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=3000, help="tokenizer steps on Beauty (CPU budget)")
    parser.add_argument("--guide-epochs", type=int, default=30, help="CF guide epochs on Beauty (CPU budget)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from jaxrec.bench import repo_relative

    # The cells run in the repository and the JSON records this path: relative, it names no machine.
    args.data = repo_relative(args.data, "../shared/data/amazon/Beauty")
    os.chdir(REPO)
    if args.one:
        kind, *rest = args.one
        result = _embed_one(rest[0]) if kind == "embed" else _train_one(rest[0], rest[1:])
        print(json.dumps(result, default=str))
        return
    unknown = [s for s in args.stages if s not in ("synthetic", "embed", "beauty")]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}: choose from synthetic, embed, beauty")
    for stage in args.stages:
        {"synthetic": stage_synthetic, "embed": stage_embed, "beauty": stage_beauty}[stage](args)
    print(table())


if __name__ == "__main__":
    main()
