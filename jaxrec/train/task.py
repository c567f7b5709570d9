"""The task interface: what a method supplies to the one trainer.

A task owns its data records, model, loss, evaluation and export. The trainer owns
everything else (mesh and sharding, jit, the optimizer loop, checkpoints, logging,
resume, and loading a task's frozen inputs once). Tasks are found by the config's
`task` name through `jaxrec.registry`; adding a method never touches `train/`.
See docs/tasks.md for the contract and a worked minimal task.

Lifecycle, as the trainer (and `jaxrec evaluate` / `export`) drives it:
  1. `Task.upstream(config)`   — classmethod: finished runs this task builds on (a SASRec
     guide, a tokenizer run). The session opens each once, read-only, at its best step.
  2. `Task(config, upstream)`  — host-side set-up (data, model definitions); no JAX state.
  3. `task.load_frozen(layout)` — read-only arrays of the loss placed on the mesh (a base
     LLM); never checkpointed.
  4. `task.fingerprints()`     — identities of frozen inputs that are not runs (file
     hashes); with the upstream runs' parameter hashes they are saved in every checkpoint
     and a checkpoint made with other inputs is refused on resume, evaluate and export.
  5. `init` / `loss` / `eval_step` — pure, jitted by the trainer.
  6. `artifacts`, `export`, `baselines` — host-side reporting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.config import Config
from jaxrec.registry import register  # noqa: F401  (tasks register themselves with it)

if TYPE_CHECKING:
    from jaxrec.data.buckets import LengthBuckets
    from jaxrec.sharding import Layout

# `evaluator` arguments are `jaxrec.train.evaluation.Evaluator`s; that module builds on this
# one, so the name is not imported here (no import cycle, not even for type checking).
Evaluator = Any


class ExportUnsupported(NotImplementedError):
    """`jaxrec export` on a task that has no export: one line, exit 2."""


@dataclass(frozen=True)
class ExportOptions:
    """What `jaxrec export` asks of a task's export (tasks use what applies to them).

    top_k: how many items a compiled scoring artifact ranks (None: the task's default).
    platforms: the platforms compiled artifacts are serialized for (`jax.export` names)."""
    top_k: int | None = None
    platforms: tuple[str, ...] = ("cpu", "cuda")

    def __post_init__(self):
        # Checked before the output directory is touched, so a bad option loses no old export.
        from jaxrec.export.manifest import ExportError
        if self.top_k is not None and self.top_k < 1:
            raise ExportError(f"--top-k: must be >= 1, got {self.top_k}")
        unknown = [p for p in self.platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
        if unknown or not self.platforms:
            raise ExportError(f"--platforms: {','.join(unknown) or 'none given'}: expected a comma-separated "
                              f"subset of cpu, cuda, rocm, tpu")


@dataclass(frozen=True)
class Variables:
    """A task's initial variables, split by how the trainer treats them.

    trainable: optimised; gets optimizer state.
    state: non-gradient variables updated by the loss (e.g. BatchNorm statistics).
    Leaves may be `nn.LogicallyPartitioned` boxes; the trainer derives shardings from them.
    """
    trainable: Any
    state: Any = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split: fixed-shape records plus the label of its protocol."""
    name: str
    records: Any              # random-access source of dicts of numpy arrays
    protocol: str             # printed beside every metric, e.g. "test | full ranking over 3,706 items | ..."


@dataclass(frozen=True)
class Upstream:
    """A finished jaxrec run that a task reads (never trains)."""
    key: str                  # the config key naming it, for error messages (e.g. "model.guide")
    run_dir: str
    tasks: tuple[str, ...]    # task names it may have been trained as
    how: str = ""             # how to make it when it is missing (e.g. "jaxrec train configs/...")


@flax.struct.dataclass
class Clock:
    """Where an update is in the run, for losses that depend on it (curricula, annealing).

    `step` is the global optimizer step being taken (0-based, read from the train state);
    `micro` the micro-batch index within it.
    """
    step: jax.Array
    micro: jax.Array
    total_steps: int = flax.struct.field(pytree_node=False, default=1)
    microbatches: int = flax.struct.field(pytree_node=False, default=1)

    def progress(self) -> jax.Array:
        """Fraction of all micro-batches done once this one is: (1 .. total) / total."""
        done = self.step * self.microbatches + self.micro + 1
        return done.astype(jnp.float32) / (self.total_steps * self.microbatches)

    @classmethod
    def at(cls, step: int, total_steps: int = 1, micro: int = 0, microbatches: int = 1) -> "Clock":
        return cls(jnp.asarray(step, jnp.int32), jnp.asarray(micro, jnp.int32), total_steps, microbatches)


class Task:
    """Base class; subclasses set `name`, `model_config` and implement the hooks."""

    name: ClassVar[str] = ""
    model_config: ClassVar[type]
    # The interactions it trains and evaluates on (`jaxrec.data.store.InteractionStore`), set
    # in `__init__`; its content hash is saved in every checkpoint, so a resume or an
    # evaluation on other data is refused.
    store: Any = None
    # Set by `jaxrec export` before `export` and `export_manifest` are called.
    export_options: ExportOptions = ExportOptions()

    def __init__(self, config: Config, upstream: Mapping[str, Any] | None = None):
        """`upstream` maps the names of `upstream(config)` to opened runs (`jaxrec.train.runs.OpenedRun`)."""
        self.config = config
        self.upstream_runs = dict(upstream or {})

    # --- frozen inputs (declared; loaded by the session, once) --------------------
    @classmethod
    def upstream(cls, config: Config) -> dict[str, Upstream]:
        """Finished runs this task builds on, by name (default: none)."""
        return {}

    def load_frozen(self, layout: "Layout") -> Any:
        """Read-only inputs of the loss, placed on the mesh (default: none)."""
        return {}

    def fingerprints(self) -> dict[str, str]:
        """Identities (e.g. SHA-256) of frozen inputs that are not upstream runs."""
        return {}

    # --- data (host side) -------------------------------------------------------
    def train_records(self) -> Any:
        """Random-access source of training records (dicts of fixed-shape numpy arrays)."""
        raise NotImplementedError

    def train_transform(self) -> Callable[[dict, np.random.Generator], dict] | None:
        """Optional per-record random transform, seeded by the record's global index."""
        return None

    def train_buckets(self) -> "LengthBuckets | None":
        """Optional length buckets of `train_records()` (`jaxrec.data.buckets.LengthBuckets`):
        the trainer then batches records of similar length and cuts each batch's left padding
        to its bucket's width (`data.length_buckets` widths). The loss must give the same value
        on a cut batch as on the full-width one (padding masked, positions right-aligned).
        Default: none (every batch at the records' full shape)."""
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

    def loss(self, params, frozen, state, batch, rng, clock: Clock) -> tuple[jax.Array, tuple[dict, Any]]:
        """Mean loss on a (micro-)batch → (loss, (scalar metrics, new state)).

        A `weight` metric (e.g. the number of targets) makes gradient accumulation
        combine micro-batches by it; without one they are averaged equally."""
        raise NotImplementedError

    def eval_step(self, params, frozen, state, batch) -> dict[str, jax.Array]:
        """Per-example values [B, ...]; the trainer averages them over real examples."""
        raise NotImplementedError

    def evaluate(self, eval_set: EvalSet, params, frozen, state, evaluator: Evaluator) -> dict[str, Any]:
        """Metrics of one split; the default averages `eval_step` over its records.

        Override for evaluations that are not a per-batch jitted function (e.g. text
        generation followed by string matching, or a beam search)."""
        return evaluator.run(eval_set, params, frozen, state)

    def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        """AdamW with the config's betas and weight decay; override for parameter groups."""
        t = self.config.train
        return optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)

    # --- reporting and export (host side) -----------------------------------------
    def baselines(self, stage: str, frozen, evaluator: Evaluator) -> dict[str, dict[str, dict[str, float]]]:
        """Reference rows for the final table: {baseline name: {split: metrics}}."""
        return {}

    def artifacts(self, params, frozen, state) -> dict[str, Any]:
        """JSON-able results saved with every checkpoint and readable by runs built on
        this one (e.g. a semantic-ID table); default none."""
        return {}

    def export(self, params, frozen, state, out_dir) -> list[str]:
        """Write deployable artifacts into `out_dir` (empty, created); returns the written
        paths. `jaxrec export` then writes `manifest.json` over them (`jaxrec.export.manifest`).
        `self.export_options` holds the command's options (top-k, platforms). A task without an
        export raises `ExportUnsupported` naming what to use instead."""
        raise ExportUnsupported(f"task {self.name!r} has no export artifact yet")

    @classmethod
    def load_recommender(cls, export_dir, manifest: dict):
        """The object answering `recommend(histories, k, exclude_history)` from an export
        directory alone (`jaxrec.export.recommend`); default: this task's exports cannot."""
        from jaxrec.export.manifest import ExportError
        raise ExportError(f"{export_dir}: a {manifest.get('kind')!r} export of task {cls.name!r} does not answer "
                          f"recommendations")

    def export_manifest(self) -> dict[str, Any]:
        """Fields the task adds to `manifest.json`: `kind` (what a reader loads: e.g.
        "scoring", "semantic_ids"), `external` ({name: {"path", "sha256"}} for files the
        export needs but does not copy, such as a base LLM), and anything else JSON-able."""
        return {"kind": self.name}
