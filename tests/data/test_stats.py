import json

import numpy as np

from jaxrec.data.stats import describe, format_stats
from jaxrec.data.store import InteractionStore

SEQUENCES = [[1, 2, 1], [3], [2, 2, 2, 4, 5], [1, 5]]


def test_describe_matches_hand_counts():
    store = InteractionStore.from_sequences(SEQUENCES, n_items=6)
    stats = describe(store)
    json.dumps(stats)  # plain Python values only
    lengths = np.array([3, 1, 5, 2])
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 6, 11)
    assert stats["items_never_seen"] == 1                       # item 6
    assert stats["density"] == 11 / 24
    assert stats["length"]["min"] == 1 and stats["length"]["max"] == 5 and stats["length"]["mean"] == 2.75
    assert stats["length"]["p50"] == np.percentile(lengths, 50)
    assert stats["users_with_at_least"]["3"] == 2
    assert np.isclose(stats["repeat_fraction"], 3 / 11)          # 1 again in user 0, 2 twice again in user 2
    assert stats["timestamps"] is None


def test_format_stats_prints_the_numbers():
    store = InteractionStore.from_sequences(SEQUENCES, timestamps=[[1, 2, 3], [4], [1, 1, 2, 3, 9], [0, 0]])
    text = format_stats(describe(store))
    assert "users         4" in text and "interactions  11" in text
    assert "p50 2.5" in text and "timestamps    0 .. 9" in text
