"""Training windows and evaluation records against a plain-Python construction."""
import numpy as np
import pytest

from jaxrec.data.splits import gap_split, leave_one_out
from jaxrec.data.store import InteractionStore
from jaxrec.data.windows import EvalRecords, TrainWindows, popularity_counts

rng = np.random.default_rng(0)
SEQUENCES = [list(rng.integers(1, 20, n)) for n in (1, 2, 3, 5, 9, 12, 30)]
STORE = InteractionStore.from_sequences(SEQUENCES, n_items=20)


def pad_left(values, length):
    return [0] * (length - len(values)) + list(values)


def brute_force_windows(train_sequences, max_len, mode):
    records = []
    for u, seq in enumerate(train_sequences):
        n = len(seq)
        if n < 2:
            continue
        if mode == "last":
            w = seq[-(max_len + 1):]
            records.append((pad_left(w[:-1], max_len), pad_left(w[1:], max_len), u))
        elif mode == "chunks":
            positions = list(range(1, n))
            groups = [positions[max(0, stop - max_len):stop] for stop in range(len(positions), 0, -max_len)]
            for group in reversed(groups):
                first, last = group[0], group[-1]
                records.append((pad_left(seq[first - 1:last], max_len), pad_left(seq[first:last + 1], max_len), u))
        else:
            for t in range(1, n):
                records.append((pad_left(seq[max(0, t - max_len):t], max_len), [0] * (max_len - 1) + [seq[t]], u))
    return records


@pytest.mark.parametrize("mode", ["last", "chunks", "prefix"])
@pytest.mark.parametrize("max_len", [1, 3, 4, 50])
def test_train_windows_match_brute_force(mode, max_len):
    split = leave_one_out(STORE)
    train = [STORE.item_ids[STORE.user_offsets[u]:split.train_end[u]].tolist() for u in range(STORE.n_users)]
    windows = TrainWindows(STORE, split.train_end, max_len, mode)
    expected = brute_force_windows(train, max_len, mode)
    assert len(windows) == len(expected)
    for i, (inputs, targets, user) in enumerate(expected):
        record = windows[i]
        assert record["inputs"].dtype == np.int32 and record["inputs"].shape == (max_len,)
        assert record["targets"].dtype == np.int32 and record["targets"].shape == (max_len,)
        assert record["inputs"].tolist() == inputs and record["targets"].tolist() == targets
        assert int(record["user"]) == user


def test_chunks_use_every_training_target_exactly_once():
    split = gap_split(STORE, lapse=2)
    windows = TrainWindows(STORE, split.train_end, 4, "chunks")
    n_targets = sum(max(n - 1, 0) for n in split.train_lengths(STORE))
    assert sum(int((windows[i]["targets"] > 0).sum()) for i in range(len(windows))) == n_targets


def test_train_windows_validate_arguments():
    split = leave_one_out(STORE)
    with pytest.raises(ValueError, match="mode"):
        TrainWindows(STORE, split.train_end, 4, "random")
    with pytest.raises(ValueError, match="train_end"):
        TrainWindows(STORE, split.train_end[:-1], 4)
    with pytest.raises(IndexError):
        TrainWindows(STORE, split.train_end, 4)[10_000]


@pytest.mark.parametrize("history_len", [None, 3])
def test_eval_records_match_brute_force(history_len):
    split = gap_split(STORE, lapse=1)
    examples = split.tests["test_gap"]
    records = EvalRecords(STORE, examples, max_len=4, history_len=history_len)
    longest = max(int(e - STORE.user_offsets[u]) for u, e in zip(examples.users, examples.history_end))
    width = longest if history_len is None else history_len
    assert len(records) == len(examples) > 0
    for i, (u, target) in enumerate(zip(examples.users, examples.targets)):
        history = SEQUENCES[u][:-1]
        record = records[i]
        assert record["inputs"].tolist() == pad_left(history[-4:], 4)
        assert record["history"].tolist() == history[-width:] + [0] * (width - len(history[-width:]))
        assert int(record["target"]) == SEQUENCES[u][-1] == target
        assert int(record["example"]) == i and int(record["user"]) == u
        assert record["history"].dtype == np.int32 and record["target"].shape == ()


def test_popularity_counts_are_training_counts():
    split = leave_one_out(STORE)
    expected = np.zeros(21, dtype=np.int64)
    for u, seq in enumerate(SEQUENCES):
        for item in seq[:split.train_end[u] - STORE.user_offsets[u]]:
            expected[item] += 1
    np.testing.assert_array_equal(popularity_counts(STORE, split.train_end), expected)


def test_records_feed_grain():
    grain = pytest.importorskip("grain")
    windows = TrainWindows(STORE, leave_one_out(STORE).train_end, 5, "chunks")
    batch = next(iter(grain.MapDataset.source(windows).seed(0).shuffle().batch(4)))
    assert batch["inputs"].shape == (4, 5) and batch["targets"].dtype == np.int32
