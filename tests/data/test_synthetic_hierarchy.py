"""The planted-hierarchy data set: determinism, hierarchy consistency, users' transitions against
the planted probabilities (binomial standard errors), feature clusters and the oracle."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from jaxrec.data.synthetic_hierarchy import (LEVEL_NAMES, HierarchyConfig, hierarchy_world, make_synthetic_hierarchy,
                                             reference_metrics)

DEFAULT = HierarchyConfig.default()
TINY = HierarchyConfig.tiny()
# Per-cell tolerance in binomial standard errors. The data are seeded (the outcome never
# changes); 5 SE keeps a family of a few hundred cells far from a chance failure (p ≈ 6e-7 each).
Z = 5.0


@pytest.fixture(scope="module")
def world():
    return hierarchy_world(DEFAULT)


def _pairs(store):
    """(previous, next) item of every consecutive pair of events within a user."""
    same_user = np.ones(store.n_interactions, bool)
    same_user[store.user_offsets[:-1]] = False
    nxt = np.flatnonzero(same_user)
    return store.item_ids[nxt - 1].astype(np.int64), store.item_ids[nxt].astype(np.int64)


def _assert_binomial(successes, trials, p, what):
    """Each cell's count against Binomial(trials, p), in standard errors. Cells expecting
    fewer than 10 successes (or failures), where the normal approximation fails, are pooled
    into one sum tested the same way."""
    successes, p = np.asarray(successes, dtype=np.float64), np.asarray(p, dtype=np.float64)
    trials = np.broadcast_to(np.asarray(trials, dtype=np.float64), successes.shape)
    p = np.broadcast_to(p, successes.shape)
    mean, var = trials * p, trials * p * (1 - p)
    large = (mean >= 10) & (trials - mean >= 10)
    z = np.abs(successes - mean)[large] / np.sqrt(var[large])
    if (~large).any():
        z = np.append(z, abs(successes[~large].sum() - mean[~large].sum()) / np.sqrt(var[~large].sum()))
    assert large.any() and z.max() < Z, (f"{what}: an empirical count lies {z.max():.1f} standard errors "
                                         "from the planted probability")


def test_deterministic_in_the_seed():
    fresh = hierarchy_world.__wrapped__    # bypass the cache: independent generations
    a, b, c = fresh(TINY), fresh(TINY), fresh(dataclasses.replace(TINY, seed=1))
    for name in ("user_offsets", "item_ids", "timestamps"):
        np.testing.assert_array_equal(getattr(a.store, name), getattr(b.store, name))
    for name in ("item_subtopic", "level_features"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.store.item_columns["title"], b.store.item_columns["title"])
    assert not np.array_equal(a.store.item_ids[:50], c.store.item_ids[:50])
    assert not np.array_equal(a.store.item_columns["title"], c.store.item_columns["title"])


def test_default_is_fast_and_sized_as_documented():
    start = time.perf_counter()
    world = hierarchy_world.__wrapped__(DEFAULT)
    elapsed = time.perf_counter() - start
    store = world.store
    assert elapsed < 2.0, f"default generation took {elapsed:.2f} s"   # ~0.1 s on 2 cores
    assert (store.n_users, store.n_items) == (2000, 512)
    assert 25 < store.lengths().mean() < 35
    assert store.lengths().min() >= DEFAULT.min_length and store.lengths().max() <= DEFAULT.max_length
    assert store.timestamps.min() >= 0 and store.timestamps.max() < DEFAULT.time_units
    assert (np.diff(store.timestamps)[np.diff(store.user_of_interaction()) == 0] >= 0).all()
    with pytest.raises(ValueError):   # cached and shared, so read-only
        hierarchy_world(TINY).store.item_ids[0] = 1


def test_hierarchy_is_consistent(world):
    cfg, store = world.config, world.store
    S = cfg.subtopics_per_topic
    # Every item has one sub-topic, and that sub-topic belongs to the item's topic.
    assert world.item_topic[0] == world.item_subtopic[0] == -1
    np.testing.assert_array_equal(world.item_topic[1:], world.item_subtopic[1:] // S)
    assert np.array_equal(np.sort(world.subtopic_items.ravel()), np.arange(1, cfg.n_items + 1))
    for g, items in enumerate(world.subtopic_items):
        assert (world.item_subtopic[items] == g).all()
    np.testing.assert_array_equal(store.item_columns["topic"], world.item_topic)
    np.testing.assert_array_equal(store.item_columns["subtopic"], world.item_subtopic)
    np.testing.assert_array_equal(world.event_subtopic, world.item_subtopic[store.item_ids])
    # Ids are shuffled: consecutive ids do not share a sub-topic more often than chance.
    assert np.mean(np.diff(world.item_subtopic[1:]) == 0) < 0.2


def test_text_levels_nest(world):
    cols = world.store.item_columns
    topic, sub, title = (cols[c][1:] for c in ("topic_name", "subtopic_name", "title"))
    assert all(s.startswith(t + " ") for t, s in zip(topic, sub))              # topic word → sub-topic name
    assert all(x.split(" ")[0] == s.split(" ")[1] for s, x in zip(sub, title))  # sub-topic word → title
    assert np.unique(world.topic_names).size == DEFAULT.n_topics
    assert np.unique(world.subtopic_names).size == DEFAULT.n_subtopics
    assert np.unique(title).size == DEFAULT.n_items
    assert cols["title"][0] == cols["topic_name"][0] == ""


def test_topic_and_subtopic_moves_follow_the_planted_probabilities(world):
    cfg = world.config
    prev, nxt = _pairs(world.store)
    z0, z1 = world.item_topic[prev], world.item_topic[nxt]
    g0, g1 = world.item_subtopic[prev], world.item_subtopic[nxt]
    stay = z0 == z1
    _assert_binomial(stay.sum(), stay.size, cfg.topic_stay, "P(topic stays)")
    _assert_binomial((g0 == g1)[stay].sum(), stay.sum(), cfg.subtopic_stay, "P(sub-topic stays | topic stays)")
    # A jump lands on each other topic with probability 1/(T-1), and on each of its sub-topics 1/S.
    jumps = ~stay
    counts = np.zeros((cfg.n_topics, cfg.n_topics))
    np.add.at(counts, (z0[jumps], z1[jumps]), 1)
    off = ~np.eye(cfg.n_topics, dtype=bool)
    _assert_binomial(counts[off], np.repeat(counts.sum(axis=1), cfg.n_topics - 1), 1 / (cfg.n_topics - 1),
                     "jump target topic")
    local = np.bincount(g1[jumps] % cfg.subtopics_per_topic, minlength=cfg.subtopics_per_topic)
    _assert_binomial(local, jumps.sum(), 1 / cfg.subtopics_per_topic, "sub-topic after a jump")
    # The whole sub-topic transition matrix, cell by cell.
    trans = np.zeros((cfg.n_subtopics, cfg.n_subtopics))
    np.add.at(trans, (g0, g1), 1)
    _assert_binomial(trans, trans.sum(axis=1, keepdims=True), world.subtopic_transitions(), "sub-topic transitions")


def test_first_events_and_item_choice_follow_the_planted_probabilities(world):
    cfg, store = world.config, world.store
    first = store.item_ids[store.user_offsets[:-1]]
    _assert_binomial(np.bincount(world.item_topic[first], minlength=cfg.n_topics), first.size,
                     1 / cfg.n_topics, "first event's topic")
    # Within its sub-topic, each item is chosen with its popularity.
    counts = np.bincount(store.item_ids, minlength=cfg.n_items + 1)
    per_subtopic = np.bincount(world.event_subtopic, minlength=cfg.n_subtopics)
    _assert_binomial(counts[world.subtopic_items], per_subtopic[:, None], world.subtopic_popularity,
                     "item within its sub-topic")
    assert (np.diff(world.subtopic_popularity, axis=1) < 0).all()   # most popular first


def _purity(features, labels, centroids):
    nearest = np.argmin(((features[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == labels))


def test_level_features_cluster_by_the_planted_hierarchy(world):
    cfg, feats = world.config, world.level_features
    assert feats.shape == (cfg.n_items + 1, len(LEVEL_NAMES), cfg.feature_dim) and feats.dtype == np.float32
    assert not feats[0].any()
    z, g = world.item_topic[1:], world.item_subtopic[1:]
    # Against the planted centroids and against centroids estimated from the features themselves.
    assert _purity(feats[1:, 0], z, world.topic_centroids) == 1.0
    assert _purity(feats[1:, 1], g, world.subtopic_centroids) == 1.0
    assert _purity(feats[1:, 2], z, world.topic_centroids) == 1.0
    topic_means = np.stack([feats[1:, 0][z == t].mean(0) for t in range(cfg.n_topics)])
    assert _purity(feats[1:, 0], z, topic_means) == 1.0
    # Level 3 is item-specific: no two items share a vector, unlike a centroid.
    assert np.unique(feats[1:, 2], axis=0).shape[0] == cfg.n_items
    # With noise far above the centroid spread, topics are no longer recoverable.
    noisy = hierarchy_world.__wrapped__(dataclasses.replace(DEFAULT, topic_noise=3.0))
    assert _purity(noisy.level_features[1:, 0], z, noisy.topic_centroids) < 0.9


def test_oracle_is_the_exact_next_item_distribution(world):
    cfg = world.config
    probs = world.next_item_probs(np.arange(cfg.n_items + 1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs[:, 0] == 0).all()
    np.testing.assert_allclose(probs[0, 1:], world.item_popularity[1:] / cfg.n_subtopics)
    # Empirical next-item frequencies from the data agree with the oracle (aggregated per
    # previous item's sub-topic, where counts are large).
    prev, nxt = _pairs(world.store)
    counts = np.zeros((cfg.n_subtopics, cfg.n_items + 1))
    np.add.at(counts, (world.item_subtopic[prev], nxt), 1)
    one_per_subtopic = world.subtopic_items[:, 0]
    expected = world.next_item_probs(one_per_subtopic)
    _assert_binomial(counts[:, 1:], counts.sum(axis=1, keepdims=True), expected[:, 1:], "next item")
    metrics = reference_metrics(world)
    assert metrics["oracle"]["hr@10"] > 2 * metrics["popularity"]["hr@10"]
    assert 0 < metrics["oracle"]["ndcg@10"] <= metrics["oracle"]["hr@10"] <= 1


def test_store_roundtrip_and_invalid_config(tmp_path):
    store = make_synthetic_hierarchy(TINY)
    loaded = type(store).load(store.save(tmp_path / "h.npz"))
    np.testing.assert_array_equal(loaded.item_columns["subtopic_name"], store.item_columns["subtopic_name"])
    with pytest.raises(ValueError, match="topic_stay=1.5"):
        make_synthetic_hierarchy(dataclasses.replace(TINY, topic_stay=1.5))
    with pytest.raises(ValueError, match="subtopics_per_topic=1"):
        make_synthetic_hierarchy(dataclasses.replace(TINY, subtopics_per_topic=1))
