"""Run the official CaseQ code (a checkout of chr26195/Caseq, not part of jaxrec) unmodified,
with three things changed from outside, and write what it measured as one JSON.

    python scripts/caseq_official_run.py OFFICIAL_DIR DATA_FILE OUT_JSON [--verify-eval] -- <main.py arguments>

--verify-eval also runs the official one-user-at-a-time evaluation from the same RNG state
on the first 120 users at every evaluation and stops with an error unless both give the
same metrics and leave `np.random` in the same state (a check of the batched replacement;
the run's own metrics are then those of the 120 users).

What is changed, without editing the checkout:
- the data path: its `utils` reads a file under the authors' home directory; the module's
  `open` is redirected to DATA_FILE (the same ML-100K file, byte for byte);
- evaluation speed: its `evaluate`/`evaluate_valid` score one user per forward pass; the
  replacements draw every user's 100 negatives with the same `np.random` calls in the same
  order, then score all users in batches under `torch.no_grad()`, and rank each row with the
  same torch `argsort().argsort()` (ties included), so the metrics are the official ones;
- the context report: the same batched pass also returns the gates, so every evaluation
  records the mean path distribution q(c|S) at the prediction position, its entropy, the
  mean per-sequence entropy and their difference (the sequence-context mutual information).

Model selection is read back as `main.py` does it: the first evaluation with the highest
validation NDCG@10 gives the reported test numbers. Torch runs with one thread (set
OMP_NUM_THREADS as well so its three sampler processes do not spread further).
"""
from __future__ import annotations

import builtins
import json
import os
import runpy
import sys
import time

VERIFY_USERS = 120                                        # --verify-eval compares on the first users only


def main(argv: list[str]) -> int:
    verify = "--verify-eval" in argv[:argv.index("--") if "--" in argv else len(argv)]
    if verify:
        argv = [a for a in argv if a != "--verify-eval"]
    if "--" not in argv or argv.index("--") != 3:
        print("usage: caseq_official_run.py OFFICIAL_DIR DATA_FILE OUT_JSON [--verify-eval] -- <main.py arguments>",
              file=sys.stderr)
        return 2
    official_dir, data_file, out_json = (os.path.abspath(a) for a in argv[:3])
    main_args = argv[4:]
    sys.path.insert(0, official_dir)
    os.chdir(official_dir)

    import numpy as np
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import utils

    def open_data(path, mode="r", *args, **kwargs):
        # Only a read of a data set that is not here (the official utils.data_partition reads
        # `<dataset>.txt` from a directory hard-coded to the authors' machine) is redirected;
        # every other open (main.py's `from utils import *` picks this one up too, for its log
        # files) passes through untouched, so nothing can ever be written to DATA_FILE.
        if mode == "r" and str(path).endswith(".txt") and not os.path.exists(path):
            return builtins.open(data_file, "r")
        return builtins.open(path, mode, *args, **kwargs)

    utils.open = open_data
    evaluations: list[dict] = []

    def batched_evaluate(model, item_pop, dataset, users, args, target_of, input_of, kind):
        train, valid, test, _, itemnum = dataset   # read only: no deepcopy needed
        seqs, candidates_rows = [], []
        candidates = np.arange(1, itemnum + 1)
        for u in users:
            if len(train[u]) < 1 or len(target_of(valid, test)[u]) < 1:
                continue
            history = input_of(train, valid, u)
            seq = np.zeros([args.maxlen], dtype=np.int32)
            tail = history[-args.maxlen:]
            seq[args.maxlen - len(tail):] = tail
            rated = set(train[u])
            rated.add(0)
            row = [target_of(valid, test)[u][0]]
            drawn = np.random.choice(candidates, 150, replace=False, p=item_pop)
            samples = [t for t in drawn if t not in rated]
            while len(samples) < 100:
                drawn = np.random.choice(candidates, 150, replace=False, p=item_pop)
                samples.extend([t for t in drawn if t not in rated and t not in samples])
            row.extend(samples[:100])
            seqs.append(seq)
            candidates_rows.append(row)
        seqs_a, cand_a = np.stack(seqs), np.asarray(candidates_rows)
        ndcg = hit = 0.0
        qs = []
        with torch.no_grad():
            for start in range(0, len(seqs_a), 128):
                s, c = seqs_a[start:start + 128], cand_a[start:start + 128]
                feats, weights = model.log2feats(s, np.zeros(len(s), np.int64))
                final = feats[:, -1, :]
                item_embs = model.item_emb(torch.LongTensor(c))
                logits = item_embs.matmul(final.unsqueeze(-1)).squeeze(-1)
                for row in -logits:
                    rank = row.argsort().argsort()[0].item()
                    if rank < 10:
                        ndcg += 1 / np.log2(rank + 2)
                        hit += 1
                q = model.weights_product(weights).flatten(start_dim=2)[:, -1]
                qs.append(q.double().numpy())
        n = len(seqs_a)
        q = np.concatenate(qs)
        mean_q = q.mean(0)
        mix_entropy = float(-(mean_q * np.log(np.maximum(mean_q, 1e-300))).sum())
        entropy = float(np.mean(-(q * np.log(np.maximum(q, 1e-300))).sum(-1)))
        evaluations.append({"kind": kind, "ndcg@10": ndcg / n, "hr@10": hit / n, "examples": n,
                            "context": mean_q.tolist(), "context_entropy": max(0.0, entropy),
                            "context_mix_entropy": max(0.0, mix_entropy),
                            "mutual_information": max(0.0, mix_entropy - entropy), "time": time.time()})
        return ndcg / n, hit / n

    def evaluate(model, item_pop, dataset, users, args):
        # main.py calls evaluate(dataset) (the gap test) before evaluate(dataset2) (no gap).
        kind = "test_gap" if sum(1 for e in evaluations if e["kind"].startswith("test")) % 2 == 0 else "test"
        return batched_evaluate(model, item_pop, dataset, users, args, lambda v, t: t,
                                lambda tr, v, u: list(tr[u]) + [v[u][0]], kind)

    def evaluate_valid(model, item_pop, dataset, users, args):
        return batched_evaluate(model, item_pop, dataset, users, args, lambda v, t: v,
                                lambda tr, v, u: list(tr[u]), "valid")

    def verified(ours, theirs):
        def run(model, item_pop, dataset, users, args):
            users = list(users)[:VERIFY_USERS]   # the check, not the run's metrics: a prefix suffices
            before = np.random.get_state()
            expected = theirs(model, item_pop, dataset, users, args)
            after = np.random.get_state()
            np.random.set_state(before)
            got = ours(model, item_pop, dataset, users, args)
            same_rng = all(np.array_equal(a, b) for a, b in zip(after, np.random.get_state()))
            if not (np.allclose(got, expected, rtol=0, atol=1e-12) and same_rng):
                raise SystemExit(f"batched evaluation differs: {got} vs official {expected} (rng same: {same_rng})")
            print(f"\nverified batched evaluation: {got} == {expected}", flush=True)
            return got
        return run

    if verify:
        evaluate, evaluate_valid = verified(evaluate, utils.evaluate), verified(evaluate_valid, utils.evaluate_valid)
    utils.evaluate, utils.evaluate_valid = evaluate, evaluate_valid
    sys.argv = ["main.py", *main_args]
    started = time.time()
    runpy.run_path(os.path.join(official_dir, "main.py"), run_name="__main__")
    seconds = time.time() - started

    epochs = [evaluations[i:i + 3] for i in range(0, len(evaluations) - 2, 3)]
    best, best_valid = None, 0.0
    for index, group in enumerate(epochs):
        by_kind = {e["kind"]: e for e in group}
        if by_kind["valid"]["ndcg@10"] > best_valid:   # strict: the first maximum wins, as in main.py
            best_valid, best = by_kind["valid"]["ndcg@10"], (index, by_kind)
    num_epochs = next(int(a.split("=")[1]) for a in main_args if a.startswith("--num_epochs="))
    eval_every = next((int(a.split("=")[1]) for a in main_args if a.startswith("--eval_every=")), 10)
    result = {"seconds": seconds, "seconds_per_epoch": seconds / num_epochs, "epochs": num_epochs,
              "best_epoch": None if best is None else (best[0] + 1) * eval_every,
              "tests": {} if best is None else {k: v for k, v in best[1].items()},
              "evaluations": evaluations, "args": main_args}
    with builtins.open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
