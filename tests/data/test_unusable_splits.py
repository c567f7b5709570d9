"""Data too short for its split stops before training with one line (issue 15, point 7).

Before: no user long enough to evaluate trained, printed an empty `valid` line and exited
0; no training record was reported as a train.batch_size problem.
"""
import pytest

from jaxrec.cli import main
from jaxrec.config import ConfigError, DataConfig
from jaxrec.data.from_config import load_store, make_split
from tests.helpers import write_config


def pairs_file(tmp_path, lengths, name="short.txt", timestamps=False):
    """A pairs file where user u has lengths[u] events (items 1, 2, ...; time = position)."""
    lines = [f"{u} {i + 1}" + (f" {i}" if timestamps else "") for u, n in enumerate(lengths) for i in range(n)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def split_error(path, **data) -> str:
    config = DataConfig(source=str(path), **data)
    with pytest.raises(ConfigError) as e:
        make_split(load_store(config, "run.yaml"), config, "run.yaml")
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_no_user_long_enough_for_leave_one_out(tmp_path):
    path = pairs_file(tmp_path, [2, 2, 1])
    assert split_error(path) == (f"run.yaml: data.source: {path} (3 users, longest 2 events): no validation or test "
                                 "example: no user has the >= 3 events leave-one-out needs (train, valid, test)")


def test_min_length_above_the_longest_user_names_min_length(tmp_path):
    message = split_error(pairs_file(tmp_path, [4, 3]), min_length=5)
    assert message.startswith("run.yaml: data.min_length: ")
    assert "no user has the >= 5 events leave-one-out needs; lower data.min_length to at most 4" in message


def test_lapse_longer_than_every_user_names_lapse(tmp_path):
    message = split_error(pairs_file(tmp_path, [10, 4]), split="gap", lapse=30)
    assert message.startswith("run.yaml: data.lapse: ") and "lower data.lapse to at most 7" in message


def test_temporal_cut_points_after_every_event(tmp_path):
    message = split_error(pairs_file(tmp_path, [5, 5], timestamps=True), split="temporal", valid_start=100,
                          test_start=200)
    assert message.startswith("run.yaml: data.valid_start: ") and "run from 0 to 4" in message


def test_no_training_record(tmp_path):
    path = pairs_file(tmp_path, [3, 3, 1])     # leave-one-out keeps one training event per user
    assert split_error(path).endswith("no training record: no user keeps the >= 2 training events a next-item "
                                      "record needs once leave-one-out(min_length=3) holds back its evaluation events")


def test_enough_data_passes(tmp_path):
    config = DataConfig(source=str(pairs_file(tmp_path, [4, 2])))
    split = make_split(load_store(config), config)
    assert len(split.valid) == 1 and split.train_lengths(load_store(config)).tolist() == [2, 2]


@pytest.mark.parametrize("lengths, blamed", [
    ([2, 2, 1], "no user has the >= 3 events leave-one-out needs"),
    ([3, 3, 1], "no training record"),
])
def test_train_stops_before_training_with_one_line_and_exit_2(tmp_path, capsys, lengths, blamed):
    data = pairs_file(tmp_path, lengths)
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", data={"source": str(data), "max_len": 5})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(data) in err and blamed in err and "batch_size" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
