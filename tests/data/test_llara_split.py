"""`data.split: llara`: a LLaRA directory's own rows, each with the role of its file."""
import numpy as np
import pytest

from jaxrec.config import ConfigError, DataConfig
from jaxrec.data.from_config import load_store, make_split
from jaxrec.data.splits import llara_split
from jaxrec.data.store import InteractionStore


def _write(directory, name, text):
    (directory / name).write_text(text)


@pytest.fixture()
def llara_dir(tmp_path):
    _write(tmp_path, "train.tsv", "seq\tnext\n3\t0\n0\t1\n0 1\t2\n")      # 3 = LLaRA padding (empty history)
    _write(tmp_path, "val.tsv", "seq\tnext\n2 0\t1\n")
    _write(tmp_path, "test.tsv", "seq\tnext\n1 0 2\t0\n0 1\t2\n")
    _write(tmp_path, "id2name.txt", "0::Matrix, The\n1::B\n2::C\n")
    return tmp_path


def test_rows_keep_the_role_of_their_file(llara_dir):
    config = DataConfig(source=str(llara_dir), split="llara")
    store = load_store(config)
    split = make_split(store, config)
    rows = [store.sequence(u).tolist() for u in range(store.n_users)]
    assert rows == [[1], [1, 2], [1, 2, 3], [3, 1, 2], [2, 1, 3, 1], [1, 2, 3]]   # items 1..3 = ids 0..2
    assert list(store.user_vocab) == ["train:0", "train:1", "train:2", "valid:0", "test:0", "test:1"]
    assert list(store.item_columns["title"]) == ["", "The Matrix", "B", "C"]
    trained = [store.item_ids[store.user_offsets[u]:split.train_end[u]].tolist() for u in range(store.n_users)]
    assert trained == [[1], [1, 2], [1, 2, 3], [], [], []]          # valid/test rows are never trained on
    as_list = lambda ex: [(int(u), store.item_ids[store.user_offsets[u]:e].tolist(), int(t))
                          for u, e, t in zip(ex.users, ex.history_end, ex.targets)]
    assert as_list(split.valid) == [(3, [3, 1], 2)]
    assert as_list(split.tests["test"]) == [(4, [2, 1, 3], 1), (5, [1, 2], 3)]


def test_rows_without_history_are_not_evaluated():
    store = InteractionStore.from_sequences([[1, 2], [3], [2, 3]])
    split = llara_split(store, np.array(["train", "valid", "test"]))
    assert len(split.valid) == 0 and split.tests["test"].users.tolist() == [2]
    with pytest.raises(ValueError, match="unknown row roles"):
        llara_split(store, np.array(["train", "dev", "test"]))


def test_llara_split_needs_a_llara_directory(tmp_path, llara_dir):
    with pytest.raises(ConfigError, match="data.split: 'llara' needs"):
        load_store(DataConfig(source=str(llara_dir / "train.tsv"), split="llara"))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\n1 2\n")
    store = load_store(DataConfig(source=str(pairs), format="pairs"))
    with pytest.raises(ConfigError, match="unknown row roles"):
        make_split(store, DataConfig(source=str(pairs), split="llara"))
