"""Working with finished (or interrupted) runs: evaluate and export from a checkpoint alone.

Everything needed is read from the checkpoint: the resolved config (so the task, data
source, split and model are rebuilt exactly) and the train state, restored onto the
*current* devices whatever mesh it was saved from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax

from jaxrec.config import ConfigError, apply_overrides, build_config
from jaxrec.train import mesh as mesh_lib
from jaxrec.train.checkpoint import CheckpointNotFound, RunCheckpoints, find_run_checkpoints
from jaxrec.train.evaluation import Evaluator
from jaxrec.train.session import Session
from jaxrec.train.state import schedule, unboxed_abstract, with_clipping
from jaxrec.train.trainer import format_report

log = logging.getLogger("jaxrec")

# Overrides that change how a checkpoint is *read* are fine; ones that change what was
# trained would silently evaluate a different model.
_EVALUATE_OVERRIDABLE = ("eval.", "mesh.", "data.num_threads", "data.prefetch", "run.dir")


def _mesh_fits(mesh: dict) -> bool:
    sizes = [mesh.get(axis, default) for axis, default in (("data", -1), ("fsdp", 1), ("tensor", 1))]
    try:
        mesh_lib.resolve_mesh_shape(sizes, jax.device_count())
        return True
    except mesh_lib.MeshError:
        return False


def open_run(run_dir: str | Path, step: str = "best", overrides: Sequence[str] = ()):
    run_dir = find_run_checkpoints(run_dir)
    ckpts = RunCheckpoints(run_dir, read_only=True)
    steps = ckpts.steps()
    if not steps:
        raise CheckpointNotFound(f"{run_dir}/checkpoints: no complete checkpoint")
    latest = steps[-1]
    meta = ckpts.read_json(latest, "meta")
    if step == "latest":
        chosen = latest
    elif step == "best":
        chosen = meta.get("best_step") or latest
        if chosen not in steps:
            chosen = latest
    elif step.isdigit() and int(step) in steps:
        chosen = int(step)
    else:
        raise CheckpointNotFound(f"{run_dir}: step {step!r} not found (available: {steps}, best, latest)")
    raw = ckpts.read_json(chosen, "config")
    for text in overrides:
        if not text.startswith(_EVALUATE_OVERRIDABLE):
            raise ConfigError(f"command line: {text.split('=')[0]}: cannot be changed when evaluating a checkpoint "
                              f"(allowed: {', '.join(_EVALUATE_OVERRIDABLE)})")
    apply_overrides(raw, overrides)
    # A run directory can be moved or copied: it is where it was found, not where it was trained.
    raw.setdefault("run", {})["dir"] = str(run_dir)
    if not any(o.startswith("mesh.") for o in overrides) and not _mesh_fits(raw.get("mesh", {})):
        log.info("the run's mesh %s does not fit the %d devices here; evaluating data-parallel instead",
                 raw.get("mesh"), jax.device_count())
        raw["mesh"] = {**raw.get("mesh", {}), "data": -1, "fsdp": 1, "tensor": 1}
    config = build_config(raw, f"{run_dir}/checkpoints/{chosen}/config", {o.split('=')[0]: "cli" for o in overrides})
    session = Session(config)
    check = getattr(session.task, "check_checkpoint", None)
    if check is not None:   # a task with frozen inputs (e.g. a base LLM) refuses a checkpoint made with others
        check(ckpts.read_json(chosen, "vocab"))
    tx = with_clipping(session.task.optimizer(schedule(config.train, max(config.train.steps, 1))),
                       config.train.grad_clip)
    _, boxed, shardings = session.state_layout(tx)
    state = ckpts.restore(chosen, unboxed_abstract(boxed, shardings))["state"]
    return session, state, chosen, ckpts


def evaluate_run(run_dir: str | Path, step: str = "best", split: str = "test",
                 overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    session, state, chosen, ckpts = open_run(run_dir, step, overrides)
    task = session.task
    evaluator = Evaluator(task, session.mesh, session.config.eval.batch_size, session.rules)
    stages = ("valid", "test") if split == "all" else (split,)
    results, protocols, baselines = {}, {}, {}
    for stage in stages:
        for eval_set in task.eval_sets(stage):
            results[eval_set.name] = task.evaluate(eval_set, state.params, session.frozen, state.model_state,
                                                   evaluator)
            protocols[eval_set.name] = eval_set.protocol
        baselines.update({name: {**baselines.get(name, {}), **rows}
                          for name, rows in task.baselines(stage).items()})
    ckpts.close()
    if jax.process_index() == 0:
        print(format_report(task.name, results, baselines, protocols, chosen))
        out = Path(ckpts.run_dir) / f"evaluate-step{chosen}.json"
        out.write_text(json.dumps({"step": chosen, "results": results, "protocols": protocols,
                                   "baselines": baselines}, indent=2))
    return results


def export_run(run_dir: str | Path, out_dir: str | Path, step: str = "best") -> list[str]:
    session, state, chosen, ckpts = open_run(run_dir, step)
    ckpts.close()
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    return session.task.export(state.params, session.frozen, state.model_state, out_dir)
