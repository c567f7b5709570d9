import dataclasses

import pytest

import tests.train.toy_task  # noqa: F401  (registers the toy task)
from jaxrec.config import ConfigError, load_config, save_config, to_dict


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_frozen_typed_config(tmp_path):
    path = write(tmp_path, "task: toy\ntrain:\n  lr: 1e-3\n  batch_size: 64\neval:\n  ks: [5, 10]\n")
    cfg = load_config(path, ["train.steps=7", "model.dim=3"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)   # YAML reads "1e-3" as a string
    assert cfg.train.steps == 7 and cfg.model.dim == 3 and cfg.eval.ks == (5, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


@pytest.mark.parametrize("text, overrides, message", [
    ("task: toy\ntrain:\n  lrr: 0.1\n", [], r"c.yaml: train.lrr: unknown key \(did you mean 'lr'\?\)"),
    ("task: toy\ntrain:\n  batch_size: many\n", [], r"c.yaml: train.batch_size: expected an integer, got 'many'"),
    ("task: toy\n", ["train.batch_size=0"], r"c.yaml \(\+ command-line overrides\): train.batch_size: must be positive"),
    ("task: toy\n", ["model.dims=3"], r"model.dims: unknown key \(did you mean 'dim'\?\)"),
    ("task: toy\neval:\n  metric: ndcg@50\n", [], r"eval.metric: 'ndcg@50' must be .* with K in eval.ks"),
    ("task: toy\ndata:\n  split: random\n", [], r"data.split: 'random' is not one of leave_one_out, gap, temporal"),
    ("task: nope\n", [], r"c.yaml: task: unknown task 'nope'"),
    ("task: toy\ntrainn: {}\n", [], r"c.yaml: trainn: unknown section \(did you mean 'train'\?\)"),
    ("task: toy\neval:\n  candidates: sampled:x\n", [], r"eval.candidates: must be 'full' or 'sampled:N'"),
    ("task: toy\ntrain: [1, 2]\n", [], r"c.yaml: train: expected a mapping"),
    ("task: toy\n  bad: indentation\n", [], r"c.yaml:\d+: not valid YAML"),
])
def test_errors_name_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(write(tmp_path, "task: toy\n"), ["train.lr"])
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_base_file_is_merged_and_saved_config_round_trips(tmp_path):
    write(tmp_path, "task: toy\ntrain:\n  lr: 0.5\n  steps: 3\n", "base.yaml")
    cfg = load_config(write(tmp_path, "base: base.yaml\ntrain:\n  steps: 9\n"))
    assert (cfg.train.lr, cfg.train.steps) == (0.5, 9)
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert to_dict(again) | {"source": None} == to_dict(cfg) | {"source": None}
