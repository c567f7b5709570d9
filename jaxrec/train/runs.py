"""Working with runs: start a session with its upstream runs, and evaluate or export a
finished (or interrupted) run from its checkpoint alone.

Everything needed is read from the checkpoint: the resolved config (so the task, data
source, split and model are rebuilt exactly), the train state, restored onto the
*current* devices whatever mesh it was saved from, and the fingerprints of the frozen
inputs it was made with (a checkpoint made with other inputs is refused).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax

from jaxrec.config import Config, ConfigError, apply_overrides, build_config
from jaxrec.export.manifest import MANIFEST, prepare_out_dir, write_manifest
from jaxrec.sharding import MESH_AXES, MeshError, resolve_mesh_shape
from jaxrec.train.checkpoint import CheckpointNotFound, RunCheckpoints, find_run_checkpoints
from jaxrec.train.evaluation import Evaluator
from jaxrec.weights.fingerprint import params_sha256
from jaxrec.train.reporting import format_report
from jaxrec.train.session import Session
from jaxrec.train.state import TrainState, schedule, unboxed_abstract, with_clipping
from jaxrec.train.task import ExportOptions

log = logging.getLogger("jaxrec")

# Overrides that change how a checkpoint is *read* are fine; ones that change what was
# trained would silently evaluate a different model.
# `data.source` may point elsewhere (a moved file): the data's hash is still checked.
_EVALUATE_OVERRIDABLE = ("eval.", "mesh.", "data.num_threads", "data.prefetch", "data.source", "run.dir")


@dataclasses.dataclass
class OpenedRun:
    """A run read back from one of its checkpoints."""
    run_dir: Path
    step: int
    session: Session
    state: TrainState
    artifacts: dict
    sha256: str                # of the trainable parameters: the run's identity as a frozen input

    @property
    def task(self):
        return self.session.task

    @property
    def config(self) -> Config:
        return self.session.config

    def host_params(self) -> Any:
        """The parameters as numpy arrays (for use as a frozen input on any mesh)."""
        return jax.device_get(nn.unbox(self.state.params))


def start_session(config: Config, load_frozen: bool = True) -> Session:
    """Open the task's declared upstream runs (once each), then bind the task to the mesh."""
    from jaxrec import registry
    upstream = {}
    for name, spec in registry.task_class(config.task).upstream(config).items():
        hint = f"; make it first: {spec.how}" if spec.how else ""
        if not spec.run_dir:
            raise ConfigError(f"{config.source}: {spec.key}: required (a finished {' or '.join(spec.tasks)} run "
                              f"directory){hint}")
        try:
            run = open_run(spec.run_dir, load_frozen=False)
        except CheckpointNotFound as e:
            raise ConfigError(f"{config.source}: {spec.key}: {e}{hint}") from None
        if run.task.name not in spec.tasks:
            raise ConfigError(f"{config.source}: {spec.key}: {spec.run_dir} is a `task: {run.task.name}` run; "
                              f"expected {' or '.join(spec.tasks)}")
        upstream[name] = run
    return Session(config, upstream, load_frozen=load_frozen)


def _mesh_fits(mesh: dict) -> bool:
    sizes = [mesh.get(axis, default) for axis, default in zip(MESH_AXES, (-1, 1, 1))]
    try:
        resolve_mesh_shape(sizes, jax.device_count())
        return True
    except MeshError:
        return False


def _step_order(run_dir: Path, ckpts: RunCheckpoints, step: str) -> list[int]:
    """The checkpoints to try, the requested one first, then the others newest first (the
    fallback when the requested one turns out to be damaged)."""
    steps = ckpts.steps()
    if not steps:
        raise CheckpointNotFound(f"{run_dir}/checkpoints: no complete checkpoint")
    if step == "latest":
        first = steps[-1]
    elif step == "best":
        newest = ckpts.newest_readable_json("meta")
        best = newest[1].get("best_step") if newest else None
        first = best if best in ckpts.steps() else (ckpts.steps() or [None])[-1]
    elif step.isdigit() and int(step) in steps:
        first = int(step)
    else:
        raise CheckpointNotFound(f"{run_dir}: step {step!r} not found (available: {steps}, best, latest)")
    if first is None:
        raise CheckpointNotFound(f"{run_dir}/checkpoints: every checkpoint is damaged (see the warnings above)")
    return [first] + [s for s in reversed(ckpts.steps()) if s != first]


def open_run(run_dir: str | Path, step: str = "best", overrides: Sequence[str] = (),
             load_frozen: bool = True, other_data: bool = False) -> OpenedRun:
    """Rebuild a run from one checkpoint (`step`: best | latest | a number). A damaged
    checkpoint is quarantined with a warning and the next one (newest first) is used.
    `other_data`: allow `data.source=` to name other interactions with the same items."""
    run_dir = find_run_checkpoints(run_dir)
    ckpts = RunCheckpoints(run_dir, read_only=True)
    try:
        order = _step_order(run_dir, ckpts, step)
        raw = inputs = None
        for index, candidate in enumerate(order):
            try:
                raw = ckpts.read_json(candidate, "config")
                inputs = ckpts.read_json(candidate, "inputs", default={})
                break
            except Exception as e:  # unreadable metadata: the checkpoint is damaged
                ckpts.quarantine(candidate, e)
        if raw is None:
            raise CheckpointNotFound(f"{run_dir}/checkpoints: every checkpoint is damaged (see the warnings above)")
        for text in overrides:
            if not text.startswith(_EVALUATE_OVERRIDABLE):
                raise ConfigError(f"command line: {text.split('=')[0]}: cannot be changed when evaluating a "
                                  f"checkpoint (allowed: {', '.join(_EVALUATE_OVERRIDABLE)})")
        apply_overrides(raw, overrides)
        # A run directory can be moved or copied: it is where it was found, not where it was trained.
        raw.setdefault("run", {})["dir"] = str(run_dir)
        if not any(o.startswith("mesh.") for o in overrides) and not _mesh_fits(raw.get("mesh", {})):
            log.info("the run's mesh %s does not fit the %d devices here; using it data-parallel instead",
                     raw.get("mesh"), jax.device_count())
            raw["mesh"] = {**raw.get("mesh", {}), "data": -1, "fsdp": 1, "tensor": 1}
        where = f"{run_dir}/checkpoints/{order[index]}"
        config = build_config(raw, f"{where}/config", {o.split('=')[0]: "cli" for o in overrides})
        session = start_session(config, load_frozen=load_frozen)
        session.check_fingerprints(inputs, where, other_data=other_data)
        tx = with_clipping(session.task.optimizer(schedule(config.train, max(config.train.steps, 1))),
                           config.train.grad_clip)
        _, boxed, shardings = session.state_layout(tx)
        restored = ckpts.restore_first(order[index:], unboxed_abstract(boxed, shardings))
        if restored is None:
            raise CheckpointNotFound(f"{run_dir}/checkpoints: every checkpoint is damaged (see the warnings above)")
        chosen, state = restored[0], restored[1]["state"]
        if chosen != order[0]:
            log.warning("using checkpoint %d instead of %s (%d), which is damaged", chosen, step, order[0])
        artifacts = ckpts.read_json(chosen, "artifacts", default={})
    finally:
        ckpts.close()
    return OpenedRun(run_dir, chosen, session, state, artifacts, params_sha256(state.params))


def evaluate_run(run_dir: str | Path, step: str = "best", split: str = "test",
                 overrides: Sequence[str] = (), other_data: bool = False) -> dict[str, dict[str, Any]]:
    run = open_run(run_dir, step, overrides, other_data=other_data)
    session, state, task = run.session, run.state, run.task
    evaluator = Evaluator(task, session.layout, session.config.eval.batch_size)
    stages = ("valid", "test") if split == "all" else (split,)
    results, protocols, baselines = {}, {}, {}
    for stage in stages:
        for eval_set in task.eval_sets(stage):
            results[eval_set.name] = task.evaluate(eval_set, state.params, session.frozen, state.model_state,
                                                   evaluator)
            protocols[eval_set.name] = eval_set.protocol
        baselines.update({name: {**baselines.get(name, {}), **rows}
                          for name, rows in task.baselines(stage, session.frozen, evaluator).items()})
    if jax.process_index() == 0:
        print(format_report(task.name, results, baselines, protocols, run.step))
        out = Path(run.run_dir) / f"evaluate-step{run.step}.json"
        try:
            out.write_text(json.dumps({"step": run.step, "results": results, "protocols": protocols,
                                       "baselines": baselines}, indent=2))
        except OSError as e:   # the table above is the result; a read-only run still gets it
            log.warning("could not write the report %s (%s); the table above is all there is", out,
                        e.strerror or e)
    return results


def export_run(run_dir: str | Path, out_dir: str | Path, step: str = "best", force: bool = False,
               options: ExportOptions | None = None) -> list[str]:
    """Write a checkpoint's deployable files and `manifest.json` into `out_dir`; returns the paths."""
    run = open_run(run_dir, step)
    out_dir = prepare_out_dir(out_dir, run.run_dir, force)
    run.task.export_options = options or ExportOptions()
    with run.session.layout.activate():
        paths = [str(p) for p in run.task.export(run.state.params, run.session.frozen, run.state.model_state,
                                                 out_dir)]
    if jax.process_index() != 0:
        return paths
    metrics, protocols = _test_results_at(run.run_dir, run.step)
    info = dict(run.task.export_manifest())
    manifest = write_manifest(out_dir, task=run.task.name, kind=info.pop("kind", run.task.name),
                              run_dir=run.run_dir, step=run.step, best=step == "best", files=paths,
                              protocols=protocols, metrics=metrics, inputs=run.session.fingerprints(),
                              external=info.pop("external", None), extra=info)
    return [p for p in paths if Path(p).name != MANIFEST] + [str(manifest)]


def _test_results_at(run_dir: Path, step: int) -> tuple[dict, dict]:
    """The test metrics and protocols recorded for `step`, or empty when that step was never
    tested. Training's final report comes first: it used the run's own protocol, while a later
    `jaxrec evaluate` may have overridden it (sampled candidates, another split)."""
    for path in (run_dir / "results.json", run_dir / f"evaluate-step{step}.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("step", data.get("best_step")) == step and data.get("results", data.get("tests")):
            return data.get("results", data.get("tests")), data.get("protocols", {})
    return {}, {}
