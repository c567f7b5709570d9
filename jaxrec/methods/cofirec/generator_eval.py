"""Evaluation of a generator: trie-constrained beam search over all users of a split.

One jitted program per (layout, exclusion setting) searches a global batch of users,
sharded over the data axes (the beam state is constrained to `batch`); the trie's
transition tables are traced arguments, so a new table of the same shape reuses it.
History exclusion is the last level's mask: at the last step, a code whose trie child is
an item the user has seen gets log-prob -inf, so it ranks after every unseen item and is
dropped from the returned list (it only fills a slot when fewer than W unseen items
remain). Metrics are computed on the host from the returned item lists:

- ranking: rank = 1 + the target's position in the beam (a miss beyond the beam);
  Recall@K = HR@K under leave-one-out (one target), NDCG@K, MRR@K;
- `valid_ratio`: returned (live) beams that name an existing item (the trie makes it 1);
- `duplicate_rate`: returned beams repeating an item earlier in the same user's list (0);
- `beam_exact_disagreement@k`: on the first `exact_users` users, how often the beam's
  top-k set differs from the exact top-k (teacher-forced log-likelihood of every item);
  `beam_exact_overlap@k`: the mean share of the exact top-k that the beam's top-k holds;
- `beam_users_per_s`: users searched per second over the batches whose shape was compiled
  already (over all batches, compiles included, when each shape had one batch); with `data.length_buckets` > 1 the users are
  searched in length-bucket order, each batch cut to its bucket's width.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.eval.beam_search import constrained_beam_search, exact_item_scores, topk_differs, topk_overlap
from jaxrec.eval.metrics import ranking_metrics
from jaxrec.methods.cofirec import generator_models as gm
from jaxrec.methods.cofirec.generator_records import Subset

MISS = np.iinfo(np.int32).max


def _seen_mask(history: jax.Array, n_rows: int) -> jax.Array:
    """[B, n_items + 1] bool: items in each user's history (index 0, the pad, never)."""
    B = history.shape[0]
    seen = jnp.zeros((B, n_rows), bool).at[jnp.arange(B)[:, None], history].set(True)
    return seen.at[:, 0].set(False)


def _excluding_seen(fn, transitions, n_levels: int):
    """`fn` with the last level's codes that lead to a seen item set to -inf (`fn` may be
    incremental: then it takes and returns the beam state, passed through)."""
    def wrapped(context, prefix_codes, *state):
        out = fn(context["model"], prefix_codes, *state)
        logp, new_state = out if state else (out, None)
        logp = _mask_seen(logp, context["seen"], prefix_codes, transitions, n_levels)
        return (logp, new_state) if state else logp
    return wrapped


def _mask_seen(logp, seen_mask, prefix_codes, transitions, n_levels: int):
    """At the last level, -inf for every code whose trie child is an item in `seen_mask`."""
    k = prefix_codes.shape[-1]
    if k < n_levels - 1:
        return logp
    B = prefix_codes.shape[0]
    pid = jnp.zeros(prefix_codes.shape[:2], jnp.int32)
    for j in range(k):                       # walk the trie to the prefix's id
        pid = jnp.maximum(transitions[j][pid, prefix_codes[..., j]], 0)
    child = transitions[k][pid]              # [B, W, V] trie item ids, -1 = none
    seen = jnp.take_along_axis(seen_mask, (child + 1).reshape(B, -1), axis=1).reshape(child.shape)
    return jnp.where(seen & (child >= 0), -jnp.inf, logp)


def _model_only(fn):
    """`fn` reading the model's part of a search context (`{"model": ...}`)."""
    return lambda context, prefix_codes, *state: fn(context["model"], prefix_codes, *state)


def _functions(task, layout):
    """(search, exact) jitted for this layout; cached on the task (functions, not arrays)."""
    cache = task.__dict__.setdefault("_eval_fn_cache", {})
    key = id(layout.mesh)
    if key in cache:
        return cache[key]
    n_rows, n_levels, beam = task.ids.n_items + 1, task.ids.n_levels, task.m.beam

    def exact_scorer(params, transitions, batch, exclude):
        context = {"model": task.beam_context(params, batch["history_tokens"])}
        fn = task.logprob_fn(params)
        if exclude:
            context["seen"] = _seen_mask(batch["history"], n_rows)
            return _excluding_seen(fn, transitions, n_levels), context
        return _model_only(fn), context

    def search(params, tables, batch, exclude):
        fn, model_context, state = gm.beam_scorer(task.model, task.m.backbone, params, batch["history_tokens"],
                                                  beam)
        context = {"model": model_context}
        if exclude:
            context["seen"] = _seen_mask(batch["history"], n_rows)
            fn = _excluding_seen(fn, tables.transitions, n_levels)
        else:
            fn = _model_only(fn)
        items, scores = constrained_beam_search(fn, context, tables, beam, state)
        if exclude:                              # seen items (score -inf) are not returned
            items = jnp.where(jnp.isneginf(scores), -1, items)
        return items, scores

    def exact(params, trie, batch, exclude):
        fn, context = exact_scorer(params, trie.transitions, batch, exclude)
        scores = exact_item_scores(fn, context, trie, task.m.exact_chunk)
        if exclude:
            scores = jnp.where(context["seen"][:, 1:], -jnp.inf, scores)
        return scores

    out = layout.replicated()
    cache[key] = (jax.jit(search, static_argnums=3, out_shardings=(out, out)),
                  jax.jit(exact, static_argnums=3, out_shardings=out))
    return cache[key]


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))     # replicated: every process holds the whole array


def list_metrics(items: np.ndarray, targets: np.ndarray, n_items: int, ks) -> dict[str, np.ndarray]:
    """Per-user metrics of returned item lists [N, W] (item indices 1..n_items; <= 0 = none)."""
    live = items > 0
    hit = (items == targets[:, None]) & live
    ranks = np.where(hit.any(1), hit.argmax(1) + 1, MISS)
    out = {k: np.asarray(v) for k, v in ranking_metrics(ranks, ks).items()}
    exists = live & (items <= n_items)
    n_live = np.maximum(live.sum(1), 1)
    out["valid_ratio"] = exists.sum(1) / n_live
    ordered = np.sort(np.where(live, items, -np.arange(1, items.shape[1] + 1)), axis=1)
    out["duplicate_rate"] = (ordered[:, 1:] == ordered[:, :-1]).sum(1) / n_live
    return out


def _search_batches(task, records, evaluator):
    """(global batch, record indices of its real rows): in length-bucket order, each batch cut
    to its width, when `data.length_buckets` > 1 (the search sees only the history slots it
    needs; results are the same); else in record order at the full width."""
    buckets = task.length_buckets(records)
    if buckets is not None:
        yield from evaluator.bucketed_batches(records, buckets)
        return
    start = 0
    for batch, real in evaluator.batches(records):
        yield batch, np.arange(start, start + real)
        start += real


def run_search(task, records, params, tables, evaluator, exclude: bool) -> tuple[np.ndarray, float]:
    """Item lists [N, W] (item indices, 0 = none) of every record, and users per second
    (the first batch of each shape, which compiles, is not timed when others are)."""
    search, _ = _functions(task, evaluator.layout)
    out = np.zeros((len(records), task.m.beam), np.int64)
    timed = {True: [0.0, 0], False: [0.0, 0]}   # warm (shape seen before) / cold: seconds, users
    shapes = set()
    for batch, rows in _search_batches(task, records, evaluator):
        batch.pop("valid", None)
        shape = batch["history_tokens"].shape
        start = time.perf_counter()
        items = _host(search(params, tables, batch, exclude)[0])
        entry = timed[shape in shapes]
        entry[0] += time.perf_counter() - start
        entry[1] += rows.size
        shapes.add(shape)
        out[rows] = items[:rows.size]
    items = np.where(out >= 0, out + 1, 0)       # trie ids are item index - 1
    seconds, users = timed[True] if timed[True][1] else timed[False]
    return items, float(users / max(seconds, 1e-9))


def disagreement(task, records, beam_items, params, trie, evaluator, exclude: bool,
                 k: int) -> tuple[float, float, int]:
    """Fraction of the first `exact_users` users whose beam top-k set differs from the exact
    one; `beam_items` [N, W] are the search's lists of these records (item indices)."""
    subset = Subset(records, task.m.exact_users)
    if len(subset) == 0:
        return float("nan"), float("nan"), 0
    _, exact = _functions(task, evaluator.layout)
    scores = []
    for batch, real in evaluator.batches(subset):
        batch.pop("valid", None)
        scores.append(_host(exact(params, trie, batch, exclude))[:real])
    beam, exact = beam_items[:len(subset)] - 1, np.concatenate(scores)
    differs, overlap = _topk_differs(beam, exact, k), _topk_overlap(beam, exact, k)
    return float(np.mean(differs)), float(np.mean(overlap)), len(subset)


_topk_differs = jax.jit(topk_differs, static_argnums=2)
_topk_overlap = jax.jit(topk_overlap, static_argnums=2)


def evaluate_split(task, eval_set, params, evaluator) -> dict[str, Any]:
    """The metrics of one split. The other history-exclusion setting and the exact scorer
    run on test splits only (not at every validation)."""
    ks, n_items = task.config.eval.ks, task.ids.n_items
    exclude = task.config.eval.exclude_history
    final = eval_set.name != "valid"
    trie = jax.device_put(task.trie, evaluator.layout.replicated())
    result: dict[str, Any] = {}
    settings = [exclude] + ([not exclude] if task.m.both_exclusions and final else [])
    targets = np.asarray([eval_set.records[i]["target"] for i in range(len(eval_set.records))])
    with evaluator.layout.activate():
        for setting in settings:
            items, speed = run_search(task, eval_set.records, params, trie.tables, evaluator, setting)
            per_user = list_metrics(items, targets, n_items, ks)
            means = {key: float(np.mean(v)) for key, v in per_user.items()}
            if setting == exclude:
                result.update(means)
                result["beam_users_per_s"] = speed
                beam_items = items
            else:
                other = "history_excluded" if setting else "history_included"
                result.update({f"{other}/{key}": v for key, v in means.items()
                               if key.split("@")[0] in ("recall", "ndcg")})
        if task.m.exact_users > 0 and final:
            k = min(10, task.m.beam)
            value, overlap, n = disagreement(task, eval_set.records, beam_items, params, trie, evaluator, exclude, k)
            result[f"beam_exact_disagreement@{k}"] = value
            result[f"beam_exact_overlap@{k}"] = overlap
            result["exact_users"] = n
    result["examples"] = len(eval_set.records)
    return result
