"""The synthetic data set: determinism, the planted structure, and the oracles against brute force."""
import dataclasses
import itertools

import numpy as np
import pytest

from jaxrec.data.splits import EvalExamples, gap_split, leave_one_out
from jaxrec.data.synthetic import SyntheticConfig, context_probs, make_synthetic, synthetic_world
from jaxrec.data.synthetic_reference import hit_ndcg, oracle_scores, reference_metrics

TINY = SyntheticConfig.tiny()


def test_deterministic_in_the_seed():
    fresh = synthetic_world.__wrapped__  # bypass the cache: two independent generations
    a, b, c = fresh(TINY).store, fresh(TINY).store, fresh(dataclasses.replace(TINY, seed=1)).store
    for name in ("user_offsets", "item_ids", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.item_ids[:50], c.item_ids[:50])


def test_store_shape_and_columns():
    store = make_synthetic(TINY)
    assert store.n_users == TINY.n_users and store.n_items == TINY.n_items
    assert store.lengths().min() >= TINY.min_length and store.lengths().max() <= TINY.max_length
    assert store.timestamps.min() >= 0 and store.timestamps.max() < TINY.time_units
    world = synthetic_world(TINY)
    assert store.item_columns["title"][7] == f"item 7 (topic {world.item_topic[7]})"
    np.testing.assert_array_equal(store.item_columns["topic"], world.item_topic)
    with pytest.raises(ValueError):  # cached and shared, so read-only
        store.item_ids[0] = 1


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="rule_strength=1.5"):
        make_synthetic(dataclasses.replace(TINY, rule_strength=1.5))


@pytest.fixture(scope="module")
def world():
    return synthetic_world(SyntheticConfig.default())


def test_successor_maps_are_cycles_within_topics(world):
    for c in range(world.config.n_contexts):
        succ = world.successor[c, 1:]
        assert sorted(succ.tolist()) == list(range(1, world.config.n_items + 1))   # a permutation
        assert np.all(succ != np.arange(1, world.config.n_items + 1))                # no fixed point
        np.testing.assert_array_equal(world.item_topic[succ], world.item_topic[1:])  # stays in topic


def test_planted_rule_and_topics(world):
    store, cfg = world.store, world.config
    not_first = np.ones(store.n_interactions, dtype=bool)
    not_first[store.user_offsets[:-1]] = False
    idx = np.flatnonzero(not_first)
    follows_map = store.item_ids[idx] == world.successor[world.context[idx], store.item_ids[idx - 1]]
    flagged = world.followed_rule[idx]
    assert follows_map[flagged].all()
    rate, sigma = flagged.mean(), np.sqrt(cfg.rule_strength * (1 - cfg.rule_strength) / idx.size)
    assert abs(rate - cfg.rule_strength) < 4 * sigma
    # From the data alone: the rule explains rule_strength of the transitions, plus chance hits
    assert cfg.rule_strength - 4 * sigma < follows_map.mean() < cfg.rule_strength + 0.05
    free = ~world.followed_rule
    np.testing.assert_array_equal(world.item_topic[store.item_ids[free]], world.topic[free])
    moved = (world.topic[idx] != world.topic[idx - 1]).mean()
    assert abs(moved - cfg.topic_drift) < 4 * np.sqrt(cfg.topic_drift * (1 - cfg.topic_drift) / idx.size)


def test_context_mix_shifts_with_time(world):
    bins = np.minimum((world.time * 5).astype(int), 4)
    observed = np.stack([np.bincount(world.context[bins == b], minlength=world.config.n_contexts)
                         / (bins == b).sum() for b in range(5)])
    expected = np.stack([context_probs(world.config, world.time[bins == b]).mean(axis=0) for b in range(5)])
    assert np.abs(observed - expected).sum(axis=1).max() < 0.03   # matches p_τ(c)
    assert np.abs(observed[0] - observed[-1]).sum() > 1.2         # early and late mixes differ
    assert observed[0].argmax() == 0 and observed[-1].argmax() == world.config.n_contexts - 1


def test_oracle_probabilities_are_distributions(world):
    examples = gap_split(world.store).tests["test_gap"]
    for kind in ("bayes", "history_time", "history"):
        probs = oracle_scores(world, examples, kind)
        assert probs.shape == (len(examples), world.config.n_items + 1)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
        assert np.all(probs[:, 0] == 0)


def brute_force_predictive(world, start, end, contexts_at):
    """P(y_end | y_start..end-1) by enumerating every latent (topic, context) path."""
    cfg = world.config
    items = world.store.item_ids
    T, K, rho, kappa, drift = cfg.n_topics, cfg.n_contexts, cfg.rule_strength, cfg.context_persistence, cfg.topic_drift
    steps = end - start + 1
    topic_move = np.full((T, T), 0.0)
    for z in range(T):
        topic_move[z, z] += 1 - drift
        topic_move[z, (z - 1) % T] += drift / 2
        topic_move[z, (z + 1) % T] += drift / 2
    numerator = np.zeros(cfg.n_items + 1)
    for path in itertools.product(range(T), range(K), repeat=steps):
        zs, cs = path[0::2], path[1::2]
        p = 1.0 / T * contexts_at(start)[cs[0]] * world.item_probs[cs[0], zs[0], items[start]]
        for j in range(1, steps):
            mix = contexts_at(start + j)
            p *= topic_move[zs[j - 1], zs[j]] * (kappa * (cs[j] == cs[j - 1]) + (1 - kappa) * mix[cs[j]])
            if j < steps - 1:
                y, prev = items[start + j], items[start + j - 1]
                p *= rho * (world.successor[cs[j], prev] == y) + (1 - rho) * world.item_probs[cs[j], zs[j], y]
        predictive = (1 - rho) * world.item_probs[cs[-1], zs[-1]].copy()
        predictive[world.successor[cs[-1], items[end - 1]]] += rho
        numerator += p * predictive
    return numerator / numerator.sum()


@pytest.mark.parametrize("kind", ["history_time", "history"])
def test_filter_matches_enumeration(kind):
    world = synthetic_world(dataclasses.replace(TINY, context_persistence=0.3, seed=3))
    store = world.store
    users = np.array([0, 1, 2, 5])
    examples = EvalExamples(users=users, history_end=store.user_offsets[users] + np.array([1, 2, 3, 3]),
                            targets=np.zeros(4, dtype=np.int32))
    prior = np.array([0.7, 0.3])
    probs = oracle_scores(world, examples, kind, context_prior=prior)
    for row, (u, end) in enumerate(zip(examples.users, examples.history_end)):
        at = (lambda k: world.context_probs(world.time[k])) if kind == "history_time" else (lambda k: prior)
        np.testing.assert_allclose(probs[row], brute_force_predictive(world, store.user_offsets[u], end, at),
                                   rtol=1e-9, atol=1e-12)


def test_bayes_oracle_by_hand(world):
    examples = leave_one_out(world.store).tests["test"]
    probs = oracle_scores(world, examples, "bayes")
    k = examples.history_end[0]
    c, z, last = world.context[k], world.topic[k], world.store.item_ids[k - 1]
    expected = (1 - world.config.rule_strength) * world.item_probs[c, z].copy()
    expected[world.successor[c, last]] += world.config.rule_strength
    np.testing.assert_allclose(probs[0], expected)


def test_hit_ndcg_by_hand():
    scores = np.array([[0, 0.1, 0.5, 0.3, 0.3], [0, 0.9, 0.1, 0.1, 0.0]])
    hr, ndcg = hit_ndcg(scores, np.array([3, 3]), k=2)
    # row 0: item 3 ties with item 4 behind item 2 → rank 2 (ties count against) → miss; row 1: rank 2 → miss
    assert (hr, ndcg) == (0.0, 0.0)
    hr, ndcg = hit_ndcg(scores, np.array([2, 1]), k=2)
    assert (hr, ndcg) == (1.0, 1.0)


def test_reference_numbers_show_order_matters_and_the_shift():
    metrics = reference_metrics()
    loo, gap = metrics["leave-one-out(min_length=3)"]["test"], metrics["gap(lapse=30)"]
    ndcg = lambda row, m: row[m]["NDCG@10"]  # noqa: E731
    for row in (loo, gap["test"], gap["test_gap"]):
        assert ndcg(row, "bayes") >= ndcg(row, "history_time") >= ndcg(row, "history")
        assert ndcg(row, "history") > 2 * ndcg(row, "popularity")
        assert ndcg(row, "markov") > 2 * ndcg(row, "popularity")
    # The gap test comes from a shifted context mix: time-agnostic predictors drop ...
    assert ndcg(gap["test_gap"], "history") < 0.85 * ndcg(gap["test"], "history")
    assert ndcg(gap["test_gap"], "markov") < 0.85 * ndcg(gap["test"], "markov")
    # ... while the oracle that knows the current mix does not: the drop is the shift, not harder data.
    assert ndcg(gap["test_gap"], "history_time") >= ndcg(gap["test"], "history_time")
