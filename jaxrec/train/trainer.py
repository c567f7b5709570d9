"""The one training loop: every task, every mesh, every number of hosts.

big_vision-style: the update is a pure `(state, batch, rng) -> (state, metrics)` jitted
once with the state's shardings and donated; the loop around it only moves batches,
logs, evaluates, checkpoints and decides when to stop.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxrec.config import Config, ConfigError, save_config, to_dict
from jaxrec.train import mesh as mesh_lib
from jaxrec.train import pipeline
from jaxrec.train.checkpoint import RunCheckpoints
from jaxrec.train.evaluation import Evaluator
from jaxrec.train.reporting import MetricsWriter, column_order, metrics_table
from jaxrec.train.state import TrainState, schedule, unboxed_abstract, with_clipping
from jaxrec.train.task import Task, task_class

log = logging.getLogger("jaxrec")


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_step: int | None
    valid: dict[str, float]
    tests: dict[str, dict[str, Any]]
    baselines: dict[str, dict[str, dict[str, float]]]
    protocols: dict[str, str]
    seconds: float
    stopped_early: bool = False
    train_seconds: float = 0.0     # time in training steps only (evaluations excluded)


def build_mesh(config: Config):
    m = config.mesh
    try:
        return mesh_lib.make_mesh((m.data, m.fsdp, m.tensor))
    except mesh_lib.MeshError as e:
        raise ConfigError(f"{config.source}: mesh: {e}") from None


def rules_of(config: Config):
    return tuple(tuple(r) for r in config.mesh.rules) or mesh_lib.DEFAULT_RULES


class Session:
    """A task bound to a mesh, with its sharded state layout; shared by train/evaluate/export."""

    def __init__(self, config: Config, task: Task | None = None):
        self.config = config
        self.task = task or task_class(config.task)(config)
        self.mesh = build_mesh(config)
        self.rules = rules_of(config)
        self.frozen = self.task.load_frozen(self.mesh, self.rules)

    def make_state_fn(self, tx: optax.GradientTransformation):
        def make_state():
            variables = self.task.init(jax.random.key(self.config.run.seed))
            params = variables.trainable
            return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                              model_state=variables.state)
        return make_state

    def state_layout(self, tx: optax.GradientTransformation):
        make_state = self.make_state_fn(tx)
        boxed = jax.eval_shape(make_state)
        shardings = mesh_lib.logical_shardings(boxed, self.mesh, self.rules)
        return make_state, boxed, shardings

    def init_state(self, tx) -> tuple[TrainState, Any]:
        make_state, boxed, shardings = self.state_layout(tx)
        with jax.set_mesh(self.mesh):
            state = jax.jit(lambda: nn.unbox(make_state()), out_shardings=shardings)()
        return state, shardings


def total_steps(config: Config, n_records: int) -> int:
    if config.train.steps > 0:
        return config.train.steps
    per_epoch = max(1, n_records // config.train.batch_size)
    return max(1, math.ceil(config.train.epochs * per_epoch))


def _finite(metrics: dict) -> bool:
    return all(np.all(np.isfinite(v)) for v in metrics.values())


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def train(config: Config, stop_at_step: int | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`; returns the final report.

    `stop_at_step` ends the loop early as if interrupted (tests of resumption use it).
    """
    started = time.time()
    session = Session(config)
    task, mesh, rules, cfg = session.task, session.mesh, session.rules, config
    run_dir = cfg.run_dir.absolute()
    is_main = jax.process_index() == 0
    if is_main:
        save_config(cfg, run_dir / "config.yaml")

    records = task.train_records()
    n_steps = total_steps(cfg, len(records))
    sched = schedule(cfg.train, n_steps)
    tx = with_clipping(task.optimizer(sched), cfg.train.grad_clip)
    make_state, boxed, state_shardings = session.state_layout(tx)
    try:
        data_iter = pipeline.train_stream(records, cfg.train.batch_size, cfg.run.seed, task.train_transform(),
                                          cfg.data.num_threads, cfg.data.prefetch)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: train.batch_size: {e}") from None

    ckpts = RunCheckpoints(run_dir, keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                           async_save=cfg.checkpoint.async_save, metric=cfg.eval.metric)
    meta = {"best_step": None, "best_metric": None, "bad_evals": 0, "last_valid": {}, "stopped_early": False,
            "train_seconds": 0.0}
    if not cfg.checkpoint.resume and ckpts.steps():
        raise ConfigError(f"{cfg.source}: checkpoint.resume: false, but {ckpts.directory} already holds "
                          f"checkpoints {ckpts.steps()}; choose another run.dir or remove them")
    restored = ckpts.restore_latest(unboxed_abstract(boxed, state_shardings), data_iter) \
        if cfg.checkpoint.resume else None
    with jax.set_mesh(mesh):
        if restored is None:
            state = jax.jit(lambda: nn.unbox(make_state()), out_shardings=state_shardings)()
        else:
            state, meta = restored[1]["state"], {**meta, **restored[1]["meta"]}
            log.info("resumed from %s at step %d", ckpts.directory, restored[0])
    start_step = int(jax.device_get(state.step))

    writer = MetricsWriter(run_dir)
    evaluator = Evaluator(task, mesh, cfg.eval.batch_size, rules)
    vocab = dict(task.vocabulary())
    config_json = to_dict(cfg)
    frozen = session.frozen
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    base_key = jax.random.key(cfg.run.seed + 1)

    def train_step(state: TrainState, frozen, batch, key):
        rng = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            return task.loss(params, frozen, state.model_state, batch, rng)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state, model_state=model_state)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": sched(state.step)}
        return new_state, metrics

    step_fn = None
    replicated = mesh_lib.replicated(mesh)

    valid_sets = task.eval_sets("valid")

    test_sets = task.eval_sets("test") if cfg.eval.track_test else []

    def evaluate_valid(state, step):
        values = {}
        for eval_set in valid_sets:
            result = task.evaluate(eval_set, state.params, frozen, state.model_state, evaluator)
            values.update(result if len(valid_sets) == 1 else
                          {f"{eval_set.name}/{k}": v for k, v in result.items()})
        writer.write("valid", step, {**values, "train_seconds": round(meta["train_seconds"], 3)})
        for eval_set in test_sets:   # learning curves only; selection never looks at them
            result = task.evaluate(eval_set, state.params, frozen, state.model_state, evaluator)
            writer.write("test_curve", step, {"split": eval_set.name, **result,
                                              "train_seconds": round(meta["train_seconds"], 3)})
        return values

    def save(state, step, metrics=None):
        ckpts.save(step, state, data_iter, meta=dict(meta, step=step), config=config_json, vocab=vocab,
                   metrics=metrics)

    stop_requested = {"signal": None}

    def on_signal(signum, _frame):
        stop_requested["signal"] = signum

    try:  # preemption notice (SIGTERM): save and exit cleanly; only possible on the main thread
        previous_handler = signal.signal(signal.SIGTERM, on_signal)
    except ValueError:
        previous_handler = None
    interactive = sys.stderr.isatty()
    progress = tqdm(total=n_steps, initial=start_step, disable=not (cfg.train.progress and is_main),
                    desc=f"train {cfg.task}", unit="step", dynamic_ncols=True,
                    mininterval=0.5 if interactive else 30.0)
    pending: tuple[int, Any] | None = None          # (step, metrics) of the last dispatched step
    window_start, window_steps, last_loss = time.time(), 0, float("nan")
    stopped_early = bool(meta.get("stopped_early"))
    step = start_step
    mark = time.time()          # training time excludes evaluation, so curves compare across eval schedules
    try:
        with jax.set_mesh(mesh):
            while step < n_steps and not stopped_early:
                if stop_at_step is not None and step >= stop_at_step:
                    break
                batch = pipeline.to_global(next(data_iter), mesh, rules)
                if step_fn is None:
                    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
                    step_fn = jax.jit(train_step, donate_argnums=0,
                                      in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated),
                                      out_shardings=(state_shardings, replicated))
                state, metrics = step_fn(state, frozen, batch, base_key)
                # Check the previous step while this one runs: one step of lag keeps the
                # device busy, and a NaN is still caught before any checkpoint of it.
                if pending is not None:
                    last_loss = _check(pending, writer, ckpts)
                pending = (step + 1, metrics)
                step += 1
                window_steps += 1
                progress.update(1)
                at_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == n_steps
                at_save = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
                at_log = step % cfg.train.log_every == 0
                if at_log or at_eval or at_save or step == n_steps or stop_requested["signal"]:
                    last_loss = _check(pending, writer, ckpts, log_it=at_log)
                    pending = None
                    elapsed = time.time() - window_start
                    rate = window_steps * cfg.train.batch_size / max(elapsed, 1e-9)
                    progress.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:,.0f}")
                    if at_log:
                        writer.write("throughput", step, {"samples_per_s": rate})
                        window_start, window_steps = time.time(), 0
                if at_eval:
                    jax.block_until_ready(state)
                    meta["train_seconds"] += time.time() - mark
                    values = evaluate_valid(state, step)
                    current = values.get(cfg.eval.metric)
                    if current is not None and (meta["best_metric"] is None or current > meta["best_metric"]):
                        meta.update(best_step=step, best_metric=current, bad_evals=0)
                    else:
                        meta["bad_evals"] += 1
                    meta["last_valid"] = values
                    if cfg.train.patience and meta["bad_evals"] >= cfg.train.patience:
                        stopped_early = meta["stopped_early"] = True
                        log.info("early stop at step %d: %s did not improve for %d evaluations",
                                 step, cfg.eval.metric, cfg.train.patience)
                    progress.write(f"step {step}: valid " + ", ".join(
                        f"{k}={values[k]:.4f}" for k in column_order(list(values))
                        if k.startswith(("hr@", "ndcg@"))))
                    save(state, step, metrics=_scalars(values))
                elif at_save:
                    save(state, step)
                if at_eval:
                    mark = time.time()
                if stop_requested["signal"]:
                    save(state, step)
                    ckpts.wait()
                    raise SystemExit(f"stopped by signal {stop_requested['signal']} at step {step}; "
                                     f"checkpoint saved, rerun the same command to resume")
            if pending is not None:
                _check(pending, writer, ckpts)
            if stop_at_step is not None and step < n_steps and not stopped_early:
                ckpts.wait()
                return TrainResult(run_dir, step, meta["best_step"], meta["last_valid"], {}, {}, {},
                                   time.time() - started)
            ckpts.wait()
    finally:
        progress.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    report_state = state
    best_step = meta["best_step"]
    if best_step is not None and best_step != step:
        restored = ckpts.restore(best_step, unboxed_abstract(boxed, state_shardings))
        report_state = restored["state"]
    result = final_report(session, report_state, evaluator, writer, best_step if best_step is not None else step)
    ckpts.close()
    writer.close()
    result = dataclasses.replace(result, run_dir=run_dir, steps=step, valid=meta["last_valid"]
                                 if best_step is None else _best_valid(run_dir, best_step, meta),
                                 seconds=time.time() - started, stopped_early=stopped_early,
                                 train_seconds=meta["train_seconds"])
    if is_main:
        (run_dir / "results.json").write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return result


def _best_valid(run_dir: Path, best_step: int, meta: dict) -> dict:
    from jaxrec.train.reporting import read_metrics
    for record in reversed(read_metrics(run_dir)):
        if record["kind"] == "valid" and record["step"] == best_step:
            return {k: v for k, v in record.items() if k not in ("kind", "step", "time")}
    return meta.get("last_valid", {})


def _check(pending, writer: MetricsWriter, ckpts: RunCheckpoints, log_it: bool = False) -> float:
    step, metrics = pending
    values = jax.device_get(metrics)
    if not _finite(values):
        bad = ", ".join(k for k, v in values.items() if not np.all(np.isfinite(v)))
        writer.write("error", step, {"non_finite": bad})
        ckpts.wait()
        kept = ckpts.steps()
        raise NonFiniteLoss(f"non-finite {bad} at step {step}; stopped. Last good checkpoint: "
                            f"{kept[-1] if kept else 'none'} in {ckpts.directory}")
    if log_it:
        writer.write("train", step, _scalars(values))
    return float(values["loss"])


def final_report(session: Session, state: TrainState, evaluator: Evaluator, writer: MetricsWriter,
                 step: int) -> TrainResult:
    """Evaluate the selected state on the test splits and print the table with baselines."""
    task = session.task
    tests, protocols = {}, {}
    for eval_set in task.eval_sets("test"):
        tests[eval_set.name] = task.evaluate(eval_set, state.params, session.frozen, state.model_state, evaluator)
        protocols[eval_set.name] = eval_set.protocol
        writer.write("test", step, {"split": eval_set.name, **tests[eval_set.name]})
    baselines = task.baselines("test")
    if jax.process_index() == 0:
        print(format_report(task.name, tests, baselines, protocols, step))
    return TrainResult(Path("."), step, step, {}, tests, baselines, protocols, 0.0)


def format_report(model_name: str, tests: dict, baselines: dict, protocols: dict, step: int) -> str:
    blocks = []
    for split, values in tests.items():
        rows = {f"{model_name} (step {step})": values}
        for name, per_split in baselines.items():
            if split in per_split:
                rows[name] = per_split[split]
        blocks.append(metrics_table(rows, title=f"[{split}] {protocols.get(split, '')}"))
    return "\n\n".join(blocks)
