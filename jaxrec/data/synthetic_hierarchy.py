"""A seeded data set with a planted coarse → fine hierarchy: topics → sub-topics → items.

The sibling of `jaxrec.data.synthetic`, made for hierarchical item tokenizers (CoFiRec,
TIGER): the truth a tokenizer should recover is known, and so is the best next-item
prediction any model can make.

Catalogue: n_topics topics, each with subtopics_per_topic sub-topics, each with
items_per_subtopic items (default 8 × 4 × 16 = 512 items). Item ids are a random
permutation of the slots, so an id says nothing about its place in the hierarchy.
Within a sub-topic, item popularity is Zipf(popularity_skew) over a random ranking.

Generative story (per user, events t = 1..n_u; n_u log-normal around mean_length):
  t = 1     topic uniform, sub-topic uniform within it.
  t > 1     with probability topic_stay the topic stays; then, with probability
            subtopic_stay, the sub-topic stays too, else it moves to one of the topic's
            other sub-topics (uniform). Otherwise (1 - topic_stay) the user jumps to one
            of the other topics (uniform) and a sub-topic of it (uniform).
  item      drawn from the current sub-topic by popularity.
Every item belongs to exactly one sub-topic, so the latent path is readable from the items
and P(y_t | y_{t-1}) is known exactly (`next_item_probs`): the oracle of `reference_metrics`.

Item text levels (store item columns, read by `jaxrec.data.item_text.hierarchy_text_levels`),
built from seeded pseudo-words:
  topic_name     one word                         "Velora"
  subtopic_name  topic word + sub-topic word      "Velora Kimu"
  title          sub-topic word + item word       "Kimu Tasopen"
Level features (`HierarchyWorld.level_features`, float32 [n_items+1, 3, feature_dim], row 0
zeros) stand in for text embeddings, so a tokenizer runs without an LLM:
  topic centroids      μ_z ~ N(0, I)
  sub-topic centroids  μ_zs = μ_z + subtopic_spread · N(0, I)
  level 1 (topic)      μ_z  + topic_noise    · ε   (fresh ε per item)
  level 2 (sub-topic)  μ_zs + subtopic_noise · ε
  level 3 (item)       μ_zs + item_spread    · ε   (item-specific: no two items share it)
At the defaults (d = 32; noise 0.3 / 0.2, spreads 0.5 / 0.5) topic centroids lie ≈ 8 apart
and sibling sub-topic centroids ≈ 4 apart, while the level-1/level-2 noise has norm ≈ 1.7 /
1.1, so nearest-centroid assignment recovers topics (level 1) and sub-topics (level 2)
without error.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxrec.data.store import InteractionStore, make_item_vocab

LEVEL_NAMES = ("topic", "subtopic", "title")
_CONSONANTS = np.array(list("bdfgklmnprstvz"))
_VOWELS = np.array(list("aeiou"))
_CODAS = np.array(["", "", "", "n", "r", "l", "s"])   # some closed final syllables for variety


@dataclasses.dataclass(frozen=True)
class HierarchyConfig:
    n_users: int = 2000
    n_topics: int = 8
    subtopics_per_topic: int = 4
    items_per_subtopic: int = 16
    mean_length: float = 30.0
    length_spread: float = 0.5        # σ of the log-normal sequence length
    min_length: int = 5
    max_length: int = 100
    topic_stay: float = 0.9           # P(the next event stays in the current topic)
    subtopic_stay: float = 0.6        # P(the sub-topic stays | the topic stays)
    popularity_skew: float = 1.0      # Zipf exponent of popularity within a sub-topic
    feature_dim: int = 32
    topic_noise: float = 0.3          # σ of the level-1 feature noise (topic centroids ~ N(0, I))
    subtopic_spread: float = 0.5      # σ of sub-topic centroids around their topic centroid
    subtopic_noise: float = 0.2       # σ of the level-2 feature noise
    item_spread: float = 0.5          # σ of level-3 (item) features around their sub-topic centroid
    time_units: int = 1_000_000       # timestamps are integers in [0, time_units)
    seed: int = 0

    @classmethod
    def default(cls) -> "HierarchyConfig":
        """2,000 users, 8 topics × 4 sub-topics × 16 items = 512 items, ~30 events per user."""
        return cls()

    @classmethod
    def tiny(cls) -> "HierarchyConfig":
        """For unit tests: 100 users, 3 × 2 × 5 = 30 items, ~15 events per user."""
        return cls(n_users=100, n_topics=3, subtopics_per_topic=2, items_per_subtopic=5, mean_length=15.0,
                   max_length=40, feature_dim=8)

    @property
    def n_subtopics(self) -> int:
        return self.n_topics * self.subtopics_per_topic

    @property
    def n_items(self) -> int:
        return self.n_subtopics * self.items_per_subtopic

    def validate(self) -> None:
        checks = {
            "n_users": self.n_users >= 1, "n_topics": self.n_topics >= 2,
            "subtopics_per_topic": self.subtopics_per_topic >= 2, "items_per_subtopic": self.items_per_subtopic >= 1,
            "min_length": 1 <= self.min_length <= self.max_length, "mean_length": self.mean_length > 0,
            "length_spread": self.length_spread >= 0, "topic_stay": 0 <= self.topic_stay <= 1,
            "subtopic_stay": 0 <= self.subtopic_stay <= 1, "feature_dim": self.feature_dim >= 1,
            "topic_noise": self.topic_noise >= 0, "subtopic_spread": self.subtopic_spread >= 0,
            "subtopic_noise": self.subtopic_noise >= 0, "item_spread": self.item_spread >= 0,
            "time_units": self.time_units >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"HierarchyConfig: invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)} "
                             "(at least 2 topics and 2 sub-topics per topic; probabilities lie in [0, 1]; "
                             "noise levels are non-negative)")


@dataclasses.dataclass(frozen=True, eq=False)
class HierarchyWorld:
    """The generated store with its planted structure. Sub-topics are numbered globally:
    sub-topic g belongs to topic g // subtopics_per_topic. Per-event arrays align with
    store.item_ids."""
    config: HierarchyConfig
    store: InteractionStore
    item_topic: np.ndarray          # int64 [n_items+1] (row 0: -1)
    item_subtopic: np.ndarray       # int64 [n_items+1], global sub-topic id (row 0: -1)
    subtopic_items: np.ndarray      # int64 [n_subtopics, items_per_subtopic], most popular first
    subtopic_popularity: np.ndarray  # float64 [n_subtopics, items_per_subtopic], rows sum to 1
    topic_names: np.ndarray         # str [n_topics]
    subtopic_names: np.ndarray      # str [n_subtopics]
    topic_centroids: np.ndarray     # float32 [n_topics, d]
    subtopic_centroids: np.ndarray  # float32 [n_subtopics, d]
    level_features: np.ndarray      # float32 [n_items+1, 3, d] (row 0: zeros)
    event_subtopic: np.ndarray      # int64 [n_interactions]

    @property
    def item_popularity(self) -> np.ndarray:
        """float64 [n_items+1]: P(item | its sub-topic) (row 0: 0)."""
        p = np.zeros(self.config.n_items + 1)
        p[self.subtopic_items] = self.subtopic_popularity
        return p

    def subtopic_transitions(self) -> np.ndarray:
        """float64 [n_subtopics, n_subtopics]: P(sub-topic_t | sub-topic_{t-1})."""
        cfg = self.config
        T, S = cfg.n_topics, cfg.subtopics_per_topic
        within = np.full((S, S), (1 - cfg.subtopic_stay) / (S - 1))
        np.fill_diagonal(within, cfg.subtopic_stay)
        across = np.full((T, T), (1 - cfg.topic_stay) / (T - 1))
        np.fill_diagonal(across, 0.0)
        return np.kron(cfg.topic_stay * np.eye(T), within) + np.kron(across, np.full((S, S), 1 / S))

    def next_item_probs(self, last_items) -> np.ndarray:
        """float64 [n, n_items+1]: the true P(y_t = · | y_{t-1} = last_items) (item 0 = no
        history: the first-event distribution). Column 0 is 0."""
        cfg = self.config
        last = np.asarray(last_items, dtype=np.int64)
        state = np.empty((last.size, cfg.n_subtopics))
        first = last == 0
        state[first] = 1.0 / cfg.n_subtopics
        state[~first] = self.subtopic_transitions()[self.item_subtopic[last[~first]]]
        return state[:, self.item_subtopic.clip(min=0)] * self.item_popularity * (np.arange(cfg.n_items + 1) > 0)


def make_synthetic_hierarchy(config: HierarchyConfig | None = None) -> InteractionStore:
    """The planted-hierarchy store (deterministic in `config.seed`)."""
    return hierarchy_world(config or HierarchyConfig.default()).store


@functools.lru_cache(maxsize=4)
def hierarchy_world(config: HierarchyConfig) -> HierarchyWorld:
    config.validate()
    rng = np.random.default_rng(config.seed)
    T, S, m, n_items = config.n_topics, config.subtopics_per_topic, config.items_per_subtopic, config.n_items

    # Catalogue: slot (g, k) = k-th most popular item of sub-topic g; ids shuffled over slots.
    subtopic_items = (rng.permutation(n_items) + 1).reshape(config.n_subtopics, m)
    item_subtopic = np.full(n_items + 1, -1, dtype=np.int64)
    item_subtopic[subtopic_items] = np.arange(config.n_subtopics)[:, None]
    item_topic = np.where(item_subtopic >= 0, item_subtopic // S, -1)
    popularity = np.arange(1, m + 1, dtype=np.float64) ** -config.popularity_skew
    popularity = np.broadcast_to(popularity / popularity.sum(), (config.n_subtopics, m)).copy()

    # Users. Latent (topic, local sub-topic) walks as cumulative offsets modulo T and S:
    # a jump adds 1..T-1 to the topic (uniform over the other topics) and 0..S-1 to the
    # sub-topic (uniform over the new topic's sub-topics); a move within the topic adds
    # 1..S-1 to the sub-topic. A user's first event sets both offsets uniformly.
    mu = np.log(config.mean_length) - config.length_spread ** 2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, config.length_spread, config.n_users)),
                      config.min_length, config.max_length).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_events = int(offsets[-1])
    starts = offsets[:-1]
    jump = rng.random(n_events) >= config.topic_stay
    move = ~jump & (rng.random(n_events) >= config.subtopic_stay)
    topic_step = np.where(jump, rng.integers(1, T, n_events), 0)
    sub_step = np.where(jump, rng.integers(0, S, n_events), np.where(move, rng.integers(1, S, n_events), 0))
    topic_step[starts] = rng.integers(0, T, config.n_users)
    sub_step[starts] = rng.integers(0, S, config.n_users)
    topic = _per_user_cumsum(topic_step, starts, lengths) % T
    event_subtopic = topic * S + _per_user_cumsum(sub_step, starts, lengths) % S
    cum = np.cumsum(popularity, axis=1)
    rank = (cum[event_subtopic] < rng.random(n_events)[:, None]).sum(axis=1).clip(max=m - 1)
    items = subtopic_items[event_subtopic, rank]
    user = np.repeat(np.arange(config.n_users), lengths)
    time = np.sort(user + rng.random(n_events)) - user   # sorted uniforms within each user
    timestamps = np.minimum((time * config.time_units).astype(np.int64), config.time_units - 1)

    # Text: unique pseudo-words for topics, sub-topics and items.
    words = _pseudo_words(T + config.n_subtopics + n_items, rng)
    topic_words, sub_words, item_words = words[:T], words[T:T + config.n_subtopics], words[T + config.n_subtopics:]
    subtopic_names = np.char.add(np.char.add(topic_words[np.arange(config.n_subtopics) // S], " "), sub_words)
    titles = np.char.add(np.char.add(sub_words[item_subtopic[1:]], " "), item_words)
    topic_name_col = np.concatenate([[""], topic_words[item_topic[1:]]])
    subtopic_name_col = np.concatenate([[""], subtopic_names[item_subtopic[1:]]])
    title_col = np.concatenate([[""], titles])

    # Level features (see module doc for the noise levels).
    d = config.feature_dim
    topic_centroids = rng.standard_normal((T, d))
    subtopic_centroids = (np.repeat(topic_centroids, S, axis=0)
                          + config.subtopic_spread * rng.standard_normal((config.n_subtopics, d)))
    features = np.zeros((n_items + 1, 3, d))
    g, z = item_subtopic[1:], item_topic[1:]
    features[1:, 0] = topic_centroids[z] + config.topic_noise * rng.standard_normal((n_items, d))
    features[1:, 1] = subtopic_centroids[g] + config.subtopic_noise * rng.standard_normal((n_items, d))
    features[1:, 2] = subtopic_centroids[g] + config.item_spread * rng.standard_normal((n_items, d))

    store = InteractionStore(
        user_offsets=offsets, item_ids=items.astype(np.int32), timestamps=timestamps,
        item_vocab=make_item_vocab(np.arange(1, n_items + 1).astype(str)),
        user_vocab=np.arange(config.n_users).astype(str),
        item_columns={"topic": item_topic.copy(), "subtopic": item_subtopic.copy(),
                      "topic_name": topic_name_col, "subtopic_name": subtopic_name_col, "title": title_col},
        source=f"synthetic-hierarchy(seed={config.seed})")
    world = HierarchyWorld(config, store, item_topic, item_subtopic, subtopic_items, popularity,
                           topic_words, subtopic_names, topic_centroids.astype(np.float32),
                           subtopic_centroids.astype(np.float32), features.astype(np.float32), event_subtopic)
    # The world is cached and shared: freeze every array so no caller can alter it for the next.
    arrays = [getattr(world, f.name) for f in dataclasses.fields(world)[2:]]
    for array in (*arrays, store.user_offsets, store.item_ids, store.timestamps, *store.item_columns.values()):
        array.setflags(write=False)
    return world


def _per_user_cumsum(steps: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sum of `steps` restarting at every user's first event."""
    total = np.cumsum(steps)
    before = total[starts] - steps[starts]
    return total - np.repeat(before, lengths)


def _pseudo_words(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct capitalised pseudo-words of 2-3 consonant-vowel syllables (seeded)."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        k = 2 * (n - len(words)) + 8
        syllables = rng.integers(2, 4, k)
        cons = _CONSONANTS[rng.integers(0, _CONSONANTS.size, (k, 3))]
        vows = _VOWELS[rng.integers(0, _VOWELS.size, (k, 3))]
        coda = _CODAS[rng.integers(0, _CODAS.size, k)]
        for j in range(k):
            word = "".join(c + v for c, v in zip(cons[j, :syllables[j]], vows[j, :syllables[j]])) + coda[j]
            if word not in seen:
                seen.add(word)
                words.append(word.capitalize())
    return np.array(words[:n])


# --- references: the exact oracle and popularity ---------------------------------------------
def reference_metrics(world: HierarchyWorld, ks=(5, 10, 20), min_length: int = 3) -> dict[str, dict[str, float]]:
    """HR@K and NDCG@K on the leave-one-out test targets (full ranking, no history exclusion:
    items repeat) for the exact next-item oracle and for training-set popularity.

    The oracle ranks by P(y_t | y_{t-1}), the best any model can do (the chain is first-order
    in the items). Ties are broken by a fixed random order.
    """
    from jaxrec.data.splits import leave_one_out

    store = world.store
    split = leave_one_out(store, min_length=min_length)
    test = split.tests["test"]
    tie_break = np.random.default_rng(0).random(store.n_items + 1) * 1e-9
    counts = np.bincount(store.item_ids[split.train_mask(store)], minlength=store.n_items + 1).astype(np.float64)
    scorers = {"oracle": world.next_item_probs(store.item_ids[test.history_end - 1]),
               "popularity": np.broadcast_to(counts, (len(test), store.n_items + 1))}
    out = {}
    for name, scores in scorers.items():
        scores = scores + tie_break
        scores[:, 0] = -np.inf
        target = scores[np.arange(len(test)), test.targets]
        rank = (scores > target[:, None]).sum(axis=1)      # 0-based
        out[name] = {}
        for k in ks:
            hit = rank < k
            out[name][f"hr@{k}"] = float(hit.mean())
            out[name][f"ndcg@{k}"] = float(np.where(hit, 1 / np.log2(rank + 2), 0).mean())
    return out
