"""The task interface: what a method supplies to the one trainer, and the registry.

A task owns its data records, model, loss, evaluation and export. The trainer owns
everything else (mesh, sharding, jit, optimizer loop, checkpoints, logging, resume).
Tasks are found by the config's `task` name; adding a method never touches the trainer.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import jax
import numpy as np
import optax

from jaxrec.config import Config

_REGISTRY: dict[str, type["Task"]] = {}
# Modules that define tasks; imported lazily so `jaxrec data stats` never pays for them.
_TASK_MODULES = {
    "seqrec": "jaxrec.methods.seqrec",
    "caseq": "jaxrec.methods.caseq",
    "ilora": "jaxrec.methods.ilora",
}


def register(cls: type["Task"]) -> type["Task"]:
    _REGISTRY[cls.name] = cls
    return cls


def task_class(name: str) -> type["Task"]:
    if name not in _REGISTRY and name in _TASK_MODULES:
        importlib.import_module(_TASK_MODULES[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_TASK_MODULES))
        raise KeyError(f"unknown task {name!r} (known: {', '.join(known)})")
    return _REGISTRY[name]


def model_config_class(name: str) -> type:
    return task_class(name).model_config


@dataclass(frozen=True)
class Variables:
    """A task's initial variables, split by how the trainer treats them.

    trainable: optimised; gets optimizer state.
    state: non-gradient variables updated by the loss (e.g. BatchNorm statistics).
    Leaves may be `nn.LogicallyPartitioned` boxes; the trainer derives shardings from them.
    Frozen inputs (a base LLM, a pretrained guide model) are not variables of the run:
    `Task.load_frozen` reads them from their own files and they are never checkpointed.
    """
    trainable: Any
    state: Any = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split: fixed-shape records plus the label of its protocol."""
    name: str
    records: Any              # random-access source of dicts of numpy arrays
    protocol: str             # printed beside every metric, e.g. "test | full ranking over 3,706 items | ..."


class Task:
    """Base class; subclasses set `name`, `model_config` and implement the hooks."""

    name: ClassVar[str] = ""
    model_config: ClassVar[type]

    def __init__(self, config: Config):
        self.config = config

    # --- data (host side) -------------------------------------------------------
    def train_records(self) -> Any:
        """Random-access source of training records (dicts of fixed-shape numpy arrays)."""
        raise NotImplementedError

    def train_transform(self) -> Callable[[dict, np.random.Generator], dict] | None:
        """Optional per-record random transform, seeded by the record's global index."""
        return None

    def eval_sets(self, stage: str) -> list[EvalSet]:
        """`stage` is "valid" (model selection) or "test" (final report)."""
        raise NotImplementedError

    def vocabulary(self) -> Mapping[str, Any]:
        """What `evaluate`/`export` need to name items (saved in every checkpoint)."""
        return {}

    # --- model (pure) -------------------------------------------------------------
    def init(self, rng: jax.Array) -> Variables:
        """Pure: traced under `jax.eval_shape` and jitted with the state's shardings."""
        raise NotImplementedError

    def loss(self, params, frozen, state, batch, rng) -> tuple[jax.Array, tuple[dict, Any]]:
        """Mean loss on a global batch → (loss, (scalar metrics, new state))."""
        raise NotImplementedError

    def eval_step(self, params, frozen, state, batch) -> dict[str, jax.Array]:
        """Per-example values [B, ...]; the trainer averages them over real examples."""
        raise NotImplementedError

    def evaluate(self, eval_set: EvalSet, params, frozen, state, evaluator) -> dict[str, Any]:
        """Metrics of one split; the default averages `eval_step` over its records.

        Override for evaluations that are not a per-batch jitted function (e.g. text
        generation followed by string matching).
        """
        return evaluator.run(eval_set, params, frozen, state)

    def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        """AdamW with the config's betas and weight decay; override for parameter groups."""
        t = self.config.train
        return optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)

    # --- reporting and export (host side) -----------------------------------------
    def baselines(self, stage: str) -> dict[str, dict[str, dict[str, float]]]:
        """Reference rows for the final table: {baseline name: {split: metrics}}."""
        return {}

    def export(self, params, frozen, state, out_dir) -> list[str]:
        """Write deployable artifacts; returns the written paths."""
        raise NotImplementedError(f"task {self.name!r} has no export")

    def load_frozen(self, mesh, rules) -> Any:
        """Read-only inputs of the loss, placed on the mesh (default: none)."""
        return {}
