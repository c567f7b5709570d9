import numpy as np
import pytest

from jaxrec.data.store import InteractionStore


def _store(**changes):
    fields = dict(user_offsets=np.array([0, 3, 5]), item_ids=np.array([1, 2, 3, 3, 1]),
                  timestamps=np.array([10, 20, 20, 5, 6]), item_vocab=np.array(["<pad>", "a", "b", "c"]),
                  user_vocab=np.array(["u1", "u2"]), item_columns={"title": np.array(["", "A", "B", "C"])},
                  source="hand-made")
    fields.update(changes)
    return InteractionStore(**fields)


def test_sizes_and_views():
    s = _store()
    assert (s.n_users, s.n_items, s.n_interactions) == (2, 3, 5)
    np.testing.assert_array_equal(s.lengths(), [3, 2])
    np.testing.assert_array_equal(s.sequence(1), [3, 1])
    np.testing.assert_array_equal(s.user_of_interaction(), [0, 0, 0, 1, 1])
    assert s.item_ids.dtype == np.int32 and s.user_offsets.dtype == np.int64 and s.timestamps.dtype == np.int64


@pytest.mark.parametrize("changes, message", [
    (dict(user_offsets=np.array([0, 3, 4])), "ends at 4 but item_ids holds 5"),
    (dict(user_offsets=np.array([1, 3, 5])), "starting at 0"),
    (dict(user_offsets=np.array([0, 4, 3, 5]), user_vocab=np.array(["a", "b", "c"])), "decreases at user 1"),
    (dict(item_ids=np.array([1, 2, 0, 3, 1])), "found 0 at interaction 2"),
    (dict(item_ids=np.array([1, 2, 4, 3, 1])), "must lie in 1..3"),
    (dict(item_ids=np.array([1.0, 2, 3, 3, 1])), "integer array"),
    (dict(item_vocab=np.array(["a", "b", "c", "d"])), "item_vocab[0] must be '<pad>'"),
    (dict(user_vocab=np.array(["u1"])), "user_vocab has shape"),
    (dict(timestamps=np.array([10, 9, 20, 5, 6])), "user 0 ('u1') decrease at interaction 1"),
    (dict(timestamps=np.array([1.0, 2.0, np.nan, 5, 6])), "finite"),
    (dict(timestamps=np.array([1, 2, 3])), "timestamps has shape"),
    (dict(item_columns={"title": np.array(["", "A"])}), "item column 'title' has length 2"),
    (dict(item_columns={"x": np.array([None, 1, 2, 3], dtype=object)}), "not objects"),
])
def test_validation_names_the_problem(changes, message):
    with pytest.raises(ValueError) as e:
        _store(**changes)
    assert message in str(e.value)


def test_timestamps_may_fall_between_users():
    assert _store(timestamps=np.array([10, 20, 30, 1, 2])).timestamps[3] == 1


def test_save_load_round_trip_without_pickles(tmp_path):
    s = _store(item_columns={"title": np.array(["", "A", "Bé", "C"]), "year": np.array([0.0, 1995, np.nan, 2001])})
    path = s.save(tmp_path / "store")
    assert path.name == "store.npz"
    with np.load(path, allow_pickle=False) as npz:  # must not need pickles
        assert all(npz[k].dtype.kind != "O" for k in npz.files)
    t = InteractionStore.load(path)
    for name in ("user_offsets", "item_ids", "timestamps", "item_vocab", "user_vocab"):
        np.testing.assert_array_equal(getattr(t, name), getattr(s, name))
        assert getattr(t, name).dtype == getattr(s, name).dtype
    np.testing.assert_array_equal(t.item_columns["title"], s.item_columns["title"])
    np.testing.assert_array_equal(t.item_columns["year"], s.item_columns["year"])
    assert t.source == "hand-made"
    no_time = _store(timestamps=None)
    assert InteractionStore.load(no_time.save(tmp_path / "b.npz")).timestamps is None


def test_load_rejects_other_npz(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="not an InteractionStore file"):
        InteractionStore.load(tmp_path / "other.npz")


def test_select_users_matches_brute_force():
    s = _store()
    t = s.select_users([1, 0, 1])
    np.testing.assert_array_equal(t.item_ids, [3, 1, 1, 2, 3, 3, 1])
    np.testing.assert_array_equal(t.timestamps, [5, 6, 10, 20, 20, 5, 6])
    np.testing.assert_array_equal(t.user_vocab, ["u2", "u1", "u2"])
    np.testing.assert_array_equal(t.item_vocab, s.item_vocab)


def test_from_sequences():
    s = InteractionStore.from_sequences([[1, 2], [3]], timestamps=[[0, 1], [2]], n_items=4)
    assert s.n_items == 4 and list(s.item_vocab) == ["<pad>", "1", "2", "3", "4"]
    np.testing.assert_array_equal(s.user_offsets, [0, 2, 3])
