"""Methods are found by name: a task that lives only in tests/ trains through the one
trainer and CLI without any edit to jaxrec/train or jaxrec/registry."""
import dataclasses
import json

import pytest
import yaml

from jaxrec import registry
from jaxrec.cli import main
from jaxrec.config import ConfigError, build_config
from jaxrec.train.trainer import train
from tests.train.toy_task import ToyModelConfig, ToyTask

TOY_RUN = {"train": {"batch_size": 32, "steps": 20, "lr": 0.1, "warmup_steps": 0, "eval_every": 10,
                     "log_every": 10, "progress": False},
           "eval": {"metric": "ndcg@10", "ks": [10]}, "checkpoint": {"every": 10, "async_save": False}}


@dataclasses.dataclass(frozen=True)
class ShiftedConfig(ToyModelConfig):
    shift: float = 0.0


class ShiftedToy(ToyTask):
    """Registered in-process under a name nothing in jaxrec knows."""
    name = "shifted_toy_only_in_tests"
    model_config = ShiftedConfig


def test_a_task_registered_in_a_test_trains_by_name(tmp_path):
    registry.register(ShiftedToy)
    assert registry.task_class(ShiftedToy.name) is ShiftedToy
    config = build_config({"task": ShiftedToy.name, "run": {"dir": str(tmp_path / "run")},
                           "model": {"shift": 0.5}, **TOY_RUN}, "shifted.yaml")
    assert config.model.shift == 0.5                      # the task's own model schema was used
    result = train(config)
    assert result.steps == 20 and result.tests["test"]["examples"] > 0


def test_cli_resolves_module_path_class_names(tmp_path, capsys):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"task": "tests.train.toy_task:ToyTask", "run": {"dir": str(tmp_path / "run")},
                                    **TOY_RUN}))
    assert main(["train", str(path)]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["task"] == "tests.train.toy_task:ToyTask"
    assert main(["evaluate", str(tmp_path / "run")]) == 0


def test_methods_are_found_by_package_convention():
    cls = registry.task_class("seqrec")
    assert cls.__module__ == "jaxrec.methods.seqrec.task"
    assert {"seqrec", "caseq", "ilora"} <= set(registry.known_tasks())


@pytest.mark.parametrize("name, message", [
    ("nope", r"unknown task 'nope' \(known: .*seqrec"),
    ("tests.train.toy_task:Missing", "has no class 'Missing'"),
    ("no.such.module:Task", "module 'no.such.module' not found"),
])
def test_unknown_tasks_are_one_line_config_errors(tmp_path, capsys, name, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"task": name}, "t.yaml")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"task": name}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_made_with_other_frozen_inputs_is_refused(tmp_path, capsys):
    frozen = tmp_path / "frozen.gguf"
    frozen.write_bytes(b"weights v1")
    raw = {"task": "toy", "run": {"dir": str(tmp_path / "run")}, "model": {"frozen_file": str(frozen)}, **TOY_RUN}
    train(build_config(json.loads(json.dumps(raw)), "toy.yaml"))
    frozen.write_bytes(b"weights v2")
    with pytest.raises(ConfigError, match=r"frozen_file sha256 .* point the config at the original files"):
        train(build_config(json.loads(json.dumps(raw)), "toy.yaml"))
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    assert "frozen_file sha256" in capsys.readouterr().err
    frozen.write_bytes(b"weights v1")                      # the original input: accepted again
    assert main(["evaluate", str(tmp_path / "run")]) == 0
