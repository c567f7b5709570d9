"""Reference numbers on the synthetic data set: oracles, a Markov chain and popularity.

Every scorer returns scores [n_examples, n_items+1] (column 0 = padding, never ranked)
for full-catalogue ranking without history exclusion (items do repeat in the synthetic
sequences). Oracles, from strongest to weakest:
  bayes         knows the target event's latent topic and context.
  history_time  exact filter over (topic, context) given the history and the true context
                mix at the target's time: the best any model reading history and clock can do.
  history       the same filter with a time-agnostic context mix fitted on the training
                events: what an ideal sequential model (no clock) trained on the split
                learns. It is hurt when the context mix shifts, as on the gap test.
Learned baselines, from the training events only: `markov` (first-order transition counts,
backed off to popularity) and `popularity`.
"""
from __future__ import annotations

import numpy as np

from jaxrec.data.splits import EvalExamples, Split, gap_split, leave_one_out, train_mask
from jaxrec.data.synthetic import SyntheticConfig, SyntheticWorld, synthetic_world
from jaxrec.data.windows import popularity_counts

ORACLES = ("bayes", "history_time", "history")
METHODS = ("bayes", "history_time", "history", "markov", "popularity")


def oracle_scores(world: SyntheticWorld, examples: EvalExamples, kind: str,
                  context_prior: np.ndarray | None = None) -> np.ndarray:
    """True next-item probabilities under an oracle (see module doc).

    `context_prior` [K] is the time-agnostic context mix of kind "history" (default: the
    mix over all events); ignored by the other kinds.
    """
    if kind not in ORACLES:
        raise ValueError(f"kind must be one of {ORACLES}, got {kind!r}")
    cfg, store = world.config, world.store
    rho = cfg.rule_strength
    last = store.item_ids[examples.history_end - 1]
    rows = np.arange(len(examples))
    if kind == "bayes":
        c, z = world.context[examples.history_end], world.topic[examples.history_end]
        probs = (1 - rho) * world.item_probs[c, z]
        probs[rows, world.successor[c, last]] += rho
        return probs
    if kind == "history":
        prior = np.bincount(world.context, minlength=cfg.n_contexts) if context_prior is None else context_prior
        prior = np.asarray(prior, dtype=np.float64) / np.sum(prior)
        mix = lambda tau: np.broadcast_to(prior, (np.size(tau), cfg.n_contexts))  # noqa: E731
    else:
        mix = world.context_probs
    state = _filter(world, examples, mix)                                 # P(z, c | history) [n, T, K]
    state = _step(state, mix(world.time[examples.history_end]), world)    # → at the target event
    q = world.item_probs.transpose(1, 0, 2).reshape(-1, cfg.n_items + 1)  # [T*K, items]
    probs = (1 - rho) * state.reshape(len(examples), -1) @ q
    context_weight = state.sum(axis=1)                                    # [n, K]
    for c in range(cfg.n_contexts):
        probs[rows, world.successor[c, last]] += rho * context_weight[:, c]
    return probs


def _transition_probs(world: SyntheticWorld) -> np.ndarray:
    T, drift = world.config.n_topics, world.config.topic_drift
    moves = np.eye(T) * (1 - drift)
    for z in range(T):
        moves[z, (z - 1) % T] += drift / 2
        moves[z, (z + 1) % T] += drift / 2
    return moves


def _step(state: np.ndarray, context_mix: np.ndarray, world: SyntheticWorld) -> np.ndarray:
    """One prediction step of the latent chain: topic drift and context re-draw."""
    kappa = world.config.context_persistence
    contexts = kappa * state + (1 - kappa) * state.sum(axis=2, keepdims=True) * context_mix[:, None, :]
    return np.einsum("ntk,ts->nsk", contexts, _transition_probs(world))


def _filter(world: SyntheticWorld, examples: EvalExamples, mix) -> np.ndarray:
    """Forward filter P(z_t, c_t | y_1..t) at each example's last history event."""
    cfg, store = world.config, world.store
    items, rho = store.item_ids, cfg.rule_strength
    start = store.user_offsets[examples.users]
    lengths = examples.history_end - start
    n = len(examples)
    state = np.zeros((n, cfg.n_topics, cfg.n_contexts))
    for j in range(int(lengths.max(initial=0))):
        live = np.flatnonzero(lengths > j)
        at = start[live] + j
        y = items[at]
        emission = world.item_probs[:, :, y].transpose(2, 1, 0)          # q(y | z, c) [m, T, K]
        if j == 0:
            prior = np.full((live.size, cfg.n_topics, 1), 1 / cfg.n_topics) * mix(world.time[at])[:, None, :]
        else:
            prior = _step(state[live], mix(world.time[at]), world)
            follows = world.successor[:, items[at - 1]].T == y[:, None]   # [m, K]
            emission = (1 - rho) * emission + rho * follows[:, None, :]
        joint = prior * emission
        state[live] = joint / joint.sum(axis=(1, 2), keepdims=True)
    return state


def markov_scores(store, train_end: np.ndarray, examples: EvalExamples) -> np.ndarray:
    """First-order transition counts among training events, plus popularity as back-off."""
    has_previous = np.ones(store.n_interactions, dtype=bool)
    has_previous[store.user_offsets[:-1][store.lengths() > 0]] = False
    nxt = np.flatnonzero(has_previous & train_mask(store, train_end))
    counts = np.zeros((store.n_items + 1, store.n_items + 1))
    np.add.at(counts, (store.item_ids[nxt - 1], store.item_ids[nxt]), 1.0)
    popularity = popularity_counts(store, train_end).astype(np.float64)
    return counts[store.item_ids[examples.history_end - 1]] + popularity / popularity.sum()


def popularity_scores(store, train_end: np.ndarray, examples: EvalExamples) -> np.ndarray:
    counts = popularity_counts(store, train_end).astype(np.float64)
    return np.broadcast_to(counts, (len(examples), counts.size))


def hit_ndcg(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k over items 1..n (column 0 ignored); ties count against the target."""
    scores = np.asarray(scores)[:, 1:]
    target_scores = scores[np.arange(len(targets)), targets - 1][:, None]
    rank = (scores > target_scores).sum(axis=1) + (scores == target_scores).sum(axis=1) - 1
    hit = rank < k
    return float(hit.mean()), float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())


def split_metrics(world: SyntheticWorld, split: Split, k: int = 10) -> dict:
    """{test name: {"examples": n, method: {"HR@k", "NDCG@k"}}} for one split."""
    store = world.store
    train_mix = np.bincount(world.context[split.train_mask(store)], minlength=world.config.n_contexts)
    out = {}
    for name, examples in split.tests.items():
        scorers = {
            "bayes": lambda: oracle_scores(world, examples, "bayes"),
            "history_time": lambda: oracle_scores(world, examples, "history_time"),
            "history": lambda: oracle_scores(world, examples, "history", context_prior=train_mix),
            "markov": lambda: markov_scores(store, split.train_end, examples),
            "popularity": lambda: popularity_scores(store, split.train_end, examples),
        }
        row = {"examples": len(examples)}
        for method in METHODS:
            hr, ndcg = hit_ndcg(scorers[method](), examples.targets, k)
            row[method] = {f"HR@{k}": hr, f"NDCG@{k}": ndcg}
        out[name] = row
    return out


def reference_metrics(config: SyntheticConfig | None = None, lapse: int = 30, k: int = 10) -> dict:
    """Oracle / Markov / popularity HR@k and NDCG@k on leave-one-out and gap splits."""
    world = synthetic_world(config or SyntheticConfig.default())
    loo, gap = leave_one_out(world.store), gap_split(world.store, lapse=lapse)
    return {loo.protocol: split_metrics(world, loo, k), gap.protocol: split_metrics(world, gap, k)}
