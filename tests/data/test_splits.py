"""Splits on hand-made sequences, checked against the protocol written out per user in Python."""
import numpy as np
import pytest

from jaxrec.data.splits import gap_split, leave_one_out, temporal_split
from jaxrec.data.store import InteractionStore

SEQUENCES = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [3, 3, 4], [5, 6, 7, 8, 9, 1, 2, 3, 4, 5], [2, 4, 6, 8, 10, 1]]
STORE = InteractionStore.from_sequences(SEQUENCES)


def examples_as_lists(store, examples):
    """[(user, input items, target)] from an EvalExamples."""
    out = []
    for u, end, target in zip(examples.users, examples.history_end, examples.targets):
        out.append((int(u), store.item_ids[store.user_offsets[u]:end].tolist(), int(target)))
    return out


def train_as_lists(store, split):
    return [store.item_ids[store.user_offsets[u]:split.train_end[u]].tolist() for u in range(store.n_users)]


@pytest.mark.parametrize("min_length", [3, 4, 7])
def test_leave_one_out(min_length):
    split = leave_one_out(STORE, min_length=min_length)
    evaluated = [u for u, s in enumerate(SEQUENCES) if len(s) >= min_length]
    assert examples_as_lists(STORE, split.valid) == [(u, SEQUENCES[u][:-2], SEQUENCES[u][-2]) for u in evaluated]
    assert examples_as_lists(STORE, split.tests["test"]) == [(u, SEQUENCES[u][:-1], SEQUENCES[u][-1]) for u in evaluated]
    # short users are train-only: their whole sequence is training data
    assert train_as_lists(STORE, split) == [s[:-2] if len(s) >= min_length else s for s in SEQUENCES]
    assert split.protocol == f"leave-one-out(min_length={min_length})"
    assert split.tests["test"].targets.dtype == np.int32 and split.valid.users.dtype == np.int64


def test_short_users_can_be_dropped():
    split = leave_one_out(STORE, min_length=4, short_users="drop")
    assert train_as_lists(STORE, split) == [s[:-2] if len(s) >= 4 else [] for s in SEQUENCES]
    with pytest.raises(ValueError, match="short_users"):
        leave_one_out(STORE, short_users="keep")
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out(STORE, min_length=2)


@pytest.mark.parametrize("lapse", [0, 1, 3, 4])
def test_gap_split_follows_caseq(lapse):
    split = gap_split(STORE, lapse=lapse)
    evaluated = [u for u, s in enumerate(SEQUENCES) if len(s) >= 3 + lapse]
    n = {u: len(SEQUENCES[u]) for u in evaluated}
    s = SEQUENCES
    assert train_as_lists(STORE, split) == [
        seq[:len(seq) - (2 + lapse)] if u in n else seq for u, seq in enumerate(s)]
    assert examples_as_lists(STORE, split.valid) == [(u, s[u][:n[u] - 2 - lapse], s[u][n[u] - 2 - lapse])
                                                     for u in evaluated]
    assert examples_as_lists(STORE, split.tests["test"]) == [(u, s[u][:n[u] - 1 - lapse], s[u][n[u] - 1 - lapse])
                                                             for u in evaluated]
    assert examples_as_lists(STORE, split.tests["test_gap"]) == [(u, s[u][:-1], s[u][-1]) for u in evaluated]
    assert split.protocol == f"gap(lapse={lapse})"


def test_gap_split_lapse_zero_equals_leave_one_out():
    gap, loo = gap_split(STORE, lapse=0), leave_one_out(STORE)
    np.testing.assert_array_equal(gap.train_end, loo.train_end)
    np.testing.assert_array_equal(gap.tests["test"].history_end, loo.tests["test"].history_end)
    np.testing.assert_array_equal(gap.tests["test_gap"].history_end, loo.tests["test"].history_end)


TIMES = [[1, 2, 5, 6, 8, 9, 10], [7, 8], [1, 5, 5], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 10, 11, 12]]
TIMED = InteractionStore.from_sequences(SEQUENCES, timestamps=TIMES)


@pytest.mark.parametrize("targets", ["first", "all"])
@pytest.mark.parametrize("min_history", [1, 2])
def test_temporal_split(targets, min_history):
    valid_start, test_start = 5, 8
    split = temporal_split(TIMED, valid_start, test_start, min_history=min_history, targets=targets)
    expected_train, expected = [], {"valid": [], "test": []}
    for u, (items, times) in enumerate(zip(SEQUENCES, TIMES)):
        expected_train.append([i for i, t in zip(items, times) if t < valid_start])
        for name, lo, hi in (("valid", valid_start, test_start), ("test", test_start, np.inf)):
            window = [k for k, t in enumerate(times) if lo <= t < hi]
            for k in window[:1] if targets == "first" else window:
                if k >= min_history:
                    expected[name].append((u, items[:k], items[k]))
    assert train_as_lists(TIMED, split) == expected_train
    assert examples_as_lists(TIMED, split.valid) == expected["valid"]
    assert examples_as_lists(TIMED, split.tests["test"]) == expected["test"]


def test_temporal_split_hand_checked():
    split = temporal_split(TIMED, 5, 8)
    # users 1 and 4 have no event before 5: their first validation event has no history
    assert examples_as_lists(TIMED, split.valid) == [(0, [1, 2], 3), (2, [3], 3), (3, [5, 6, 7], 8)]
    assert examples_as_lists(TIMED, split.tests["test"]) == [
        (0, [1, 2, 3, 4], 5), (1, [8], 9), (3, [5, 6, 7, 8, 9, 1], 2), (4, [2, 4, 6], 8)]


def test_temporal_split_errors():
    with pytest.raises(ValueError, match="needs timestamps"):
        temporal_split(STORE, 1, 2)
    with pytest.raises(ValueError, match="must not be after"):
        temporal_split(TIMED, 9, 8)
