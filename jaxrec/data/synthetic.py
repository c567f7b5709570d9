"""The embedded default data set: a seeded generator with planted sequential structure.

Generative story (per user u, events t = 1..n_u, all times in [0, 1)):
  time      τ_t: n_u sorted uniform draws, so every user spans the whole timeline and
            later events come from a later context mix. Timestamps = ⌊τ·time_units⌋.
  context   c_t ∈ {0..K-1}: with probability `context_persistence` the previous event's
            context, else drawn from p_τ(c) ∝ exp(shift_strength · a_c · (τ - ½)),
            a = linspace(-1, 1, K): early events mostly context 0, late ones context K-1.
  topic     z_t on a ring of n_topics: stays with probability 1 - topic_drift, else moves
            to a neighbouring topic (z_1 uniform).
  item      y_t: with probability rule_strength the successor succ_{c_t}(y_{t-1}) (one
            successor map per context: a random cycle through the items of each topic),
            otherwise a draw from q(y | z_t, c_t): Zipf(popularity_skew) popularity within
            topic z_t, re-weighted per context by exp(context_popularity · g_{c,y}),
            g ~ N(0, 1). y_1 always comes from q.
So the context drives the next item (C→Y: successor map and popularity) and the history
(C→S), the history drives the next item (S→Y), and the context mix drifts with time.
`jaxrec.data.synthetic_reference` computes oracle and popularity numbers on it.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxrec.data.store import InteractionStore, make_item_vocab


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 2000
    n_items: int = 500
    n_topics: int = 10
    n_contexts: int = 4
    mean_length: float = 50.0
    length_spread: float = 0.5        # σ of the log-normal sequence length
    min_length: int = 5
    max_length: int = 200
    rule_strength: float = 0.5        # P(next item = successor of the previous item)
    topic_drift: float = 0.1          # P(topic moves to a neighbour) per event
    popularity_skew: float = 1.0      # Zipf exponent of popularity within a topic
    context_popularity: float = 1.0   # how strongly the context re-weights popularity
    shift_strength: float = 6.0       # 0 = the context mix never changes over time
    context_persistence: float = 0.0  # P(context_t = context_{t-1})
    time_units: int = 1_000_000       # timestamps are integers in [0, time_units)
    seed: int = 0

    @classmethod
    def default(cls) -> "SyntheticConfig":
        """The README's data set: 2,000 users, 500 items, ~50 events per user."""
        return cls()

    @classmethod
    def tiny(cls) -> "SyntheticConfig":
        """For unit tests: 100 users, 60 items, ~20 events per user."""
        return cls(n_users=100, n_items=60, n_topics=3, n_contexts=2, mean_length=20.0, max_length=60)

    def validate(self) -> None:
        checks = {
            "n_users": self.n_users >= 1, "n_topics": 1 <= self.n_topics <= self.n_items,
            "n_items": self.n_items >= 2 * self.n_topics, "n_contexts": self.n_contexts >= 1,
            "min_length": 1 <= self.min_length <= self.max_length,
            "mean_length": self.mean_length > 0, "length_spread": self.length_spread >= 0,
            "rule_strength": 0 <= self.rule_strength <= 1, "topic_drift": 0 <= self.topic_drift <= 1,
            "context_persistence": 0 <= self.context_persistence <= 1, "time_units": self.time_units >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SyntheticConfig: invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)} "
                             "(each topic needs at least 2 items; probabilities lie in [0, 1])")


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticWorld:
    """The generated store with its latent structure (per-event arrays align with store.item_ids)."""
    config: SyntheticConfig
    store: InteractionStore
    item_topic: np.ndarray    # int64 [n_items+1] (row 0: -1)
    successor: np.ndarray     # int32 [K, n_items+1]: successor[c, y] (row y=0 unused)
    item_probs: np.ndarray    # float64 [K, n_topics, n_items+1]: q(y | z, c)
    time: np.ndarray          # float64 [n_interactions]: τ in [0, 1)
    context: np.ndarray       # int64 [n_interactions]
    topic: np.ndarray         # int64 [n_interactions]
    followed_rule: np.ndarray  # bool [n_interactions]

    def context_probs(self, tau) -> np.ndarray:
        """p_τ(c): [..., K] context distribution at time(s) τ."""
        return context_probs(self.config, tau)


def context_probs(config: SyntheticConfig, tau) -> np.ndarray:
    a = np.linspace(-1.0, 1.0, config.n_contexts) if config.n_contexts > 1 else np.zeros(1)
    logits = config.shift_strength * (np.asarray(tau, dtype=np.float64)[..., None] - 0.5) * a
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def make_synthetic(config: SyntheticConfig | None = None) -> InteractionStore:
    """The synthetic store (deterministic in `config.seed`)."""
    return synthetic_world(config or SyntheticConfig.default()).store


@functools.lru_cache(maxsize=4)
def synthetic_world(config: SyntheticConfig) -> SyntheticWorld:
    config.validate()
    rng = np.random.default_rng(config.seed)
    T, n_items = config.n_topics, config.n_items
    item_topic, successor, item_probs = _structure(config, rng)

    mu = np.log(config.mean_length) - config.length_spread ** 2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, config.length_spread, config.n_users)),
                      config.min_length, config.max_length).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_events = int(offsets[-1])
    user = np.repeat(np.arange(config.n_users), lengths)
    # Sorted uniforms per user: sort (user + u) keeps users apart and orders within a user.
    time = np.sort(user + rng.random(n_events)) - user

    context = np.empty(n_events, dtype=np.int64)
    topic = np.empty(n_events, dtype=np.int64)
    items = np.empty(n_events, dtype=np.int64)
    followed = np.zeros(n_events, dtype=bool)
    cum_probs = np.cumsum(item_probs, axis=-1)
    max_len = int(lengths.max())
    at = offsets[:-1].copy()  # absolute index of step t for every still-active user
    for t in range(max_len):
        active = np.flatnonzero(lengths > t)
        idx = at[active]
        fresh = _sample_rows(context_probs(config, time[idx]), rng)
        if t == 0:
            context[idx] = fresh
            topic[idx] = rng.integers(0, T, active.size)
        else:
            keep = rng.random(active.size) < config.context_persistence
            context[idx] = np.where(keep, context[idx - 1], fresh)
            move = rng.random(active.size) < config.topic_drift
            step = np.where(rng.random(active.size) < 0.5, -1, 1)
            topic[idx] = (topic[idx - 1] + move * step) % T
        draws = (cum_probs[context[idx], topic[idx]] < rng.random(active.size)[:, None]).sum(axis=1)
        draws = np.minimum(draws, n_items)  # guards the float round-off of the last cumsum entry
        if t > 0:
            followed[idx] = rng.random(active.size) < config.rule_strength
            rule_item = successor[context[idx], items[idx - 1]]
            draws = np.where(followed[idx], rule_item, draws)
        items[idx] = draws
        at[active] += 1

    timestamps = np.minimum((time * config.time_units).astype(np.int64), config.time_units - 1)
    titles = np.array([""] + [f"item {i} (topic {item_topic[i]})" for i in range(1, n_items + 1)])
    store = InteractionStore(
        user_offsets=offsets, item_ids=items.astype(np.int32), timestamps=timestamps,
        item_vocab=make_item_vocab(np.arange(1, n_items + 1).astype(str)),
        user_vocab=np.arange(config.n_users).astype(str),
        item_columns={"topic": item_topic.copy(), "title": titles},
        source=f"synthetic(seed={config.seed})")
    world = SyntheticWorld(config, store, item_topic, successor.astype(np.int32), item_probs,
                           time, context, topic, followed)
    # The world is cached and shared: freeze every array so no caller can alter it for the next.
    latents = [getattr(world, f.name) for f in dataclasses.fields(world)[2:]]
    for array in (*latents, store.user_offsets, store.item_ids, store.timestamps,
                  *store.item_columns.values()):
        array.setflags(write=False)
    return world


def _structure(config: SyntheticConfig, rng: np.random.Generator):
    """Item topics, one successor cycle per (context, topic), and q(y | z, c)."""
    K, T, n_items = config.n_contexts, config.n_topics, config.n_items
    item_topic = np.full(n_items + 1, -1, dtype=np.int64)
    item_topic[1:] = rng.permutation(np.arange(n_items) % T)
    successor = np.zeros((K, n_items + 1), dtype=np.int64)
    item_probs = np.zeros((K, T, n_items + 1))
    for z in range(T):
        members = np.flatnonzero(item_topic == z)
        ranks = rng.permutation(members.size) + 1
        base = ranks.astype(np.float64) ** -config.popularity_skew
        for c in range(K):
            cycle = rng.permutation(members)
            successor[c, cycle] = np.roll(cycle, -1)
            weights = base * np.exp(config.context_popularity * rng.standard_normal(members.size))
            item_probs[c, z, members] = weights / weights.sum()
    return item_topic, successor, item_probs


def _sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of `probs` [n, k]."""
    return (np.cumsum(probs, axis=1) < rng.random(probs.shape[0])[:, None]).sum(axis=1).clip(max=probs.shape[1] - 1)
