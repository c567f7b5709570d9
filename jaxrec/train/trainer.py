"""The one training loop: every task, every mesh, every number of hosts.

big_vision-style: the update (`session.make_train_step`) is pure, jitted once with the
state's shardings and donated; the loop around it only moves batches, logs, evaluates,
checkpoints and decides when to stop.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxrec.config import Config, ConfigError, save_config, to_dict
from jaxrec.train import pipeline
from jaxrec.train.checkpoint import RunCheckpoints
from jaxrec.train.evaluation import Evaluator
from jaxrec.train.reporting import MetricsWriter, column_order, format_report, read_metrics
from jaxrec.train.runs import start_session
from jaxrec.train.session import Session, make_train_step, total_steps
from jaxrec.train.state import schedule, unboxed_abstract, with_clipping

log = logging.getLogger("jaxrec")


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_step: int | None
    valid: dict[str, Any]
    tests: dict[str, dict[str, Any]]
    baselines: dict[str, dict[str, dict[str, float]]]
    protocols: dict[str, str]
    seconds: float
    stopped_early: bool = False
    train_seconds: float = 0.0     # time in training steps only (evaluations excluded)


@dataclasses.dataclass
class Progress:
    """Model selection and early stopping; saved as JSON in every checkpoint."""
    best_step: int | None = None
    best_metric: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    last_valid: dict = dataclasses.field(default_factory=dict)

    def record(self, step: int, values: dict, metric: str, patience: int) -> None:
        current = values.get(metric)
        if current is not None and (self.best_metric is None or current > self.best_metric):
            self.best_step, self.best_metric, self.bad_evals = step, current, 0
        else:
            self.bad_evals += 1
        self.last_valid = values
        if patience and self.bad_evals >= patience:
            self.stopped_early = True
            log.info("early stop at step %d: %s did not improve for %d evaluations", step, metric, patience)

    @classmethod
    def from_json(cls, data: dict) -> "Progress":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class StepChecker:
    """Fetches a step's metrics one step late (the device stays busy) and stops on NaN/inf.

    The check of step s always happens before any checkpoint of step s is written.
    """

    def __init__(self, writer: MetricsWriter, ckpts: RunCheckpoints):
        self.writer, self.ckpts = writer, ckpts
        self.pending: tuple[int, Any] | None = None
        self.last_loss = float("nan")

    def push(self, step: int, metrics: Any) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self, log_it: bool = False) -> float:
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            values = jax.device_get(metrics)
            bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
            if bad:
                self.writer.write("error", step, {"non_finite": ", ".join(bad)})
                self.ckpts.wait()
                kept = self.ckpts.steps()
                raise NonFiniteLoss(f"non-finite {', '.join(bad)} at step {step}; stopped. Last good checkpoint: "
                                    f"{kept[-1] if kept else 'none'} in {self.ckpts.directory}")
            if log_it:
                self.writer.write("train", step, _scalars(values))
            self.last_loss = float(values["loss"])
        return self.last_loss


class Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:   # not the main thread: leave signals alone
            self._previous = None
        return self

    def _on_signal(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def evaluate_stage(session: Session, stage: str, state, evaluator: Evaluator) -> dict[str, dict[str, Any]]:
    return {s.name: session.task.evaluate(s, state.params, session.frozen, state.model_state, evaluator)
            for s in session.task.eval_sets(stage)}


def train(config: Config, stop_at_step: int | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`; returns the final report.

    `stop_at_step` ends the loop early as if interrupted (tests of resumption use it).
    """
    started = time.time()
    session = start_session(config)
    task, layout, cfg = session.task, session.layout, config
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
    if not cfg.checkpoint.resume and ckpts.steps():
        raise ConfigError(f"{cfg.source}: checkpoint.resume: false, but {ckpts.directory} already holds "
                          f"checkpoints {ckpts.steps()}; choose another run.dir or remove them")
    fingerprints = session.fingerprints()
    if cfg.checkpoint.resume and ckpts.steps():
        latest = ckpts.steps()[-1]
        session.check_fingerprints(ckpts.read_json(latest, "inputs", default={}), f"{ckpts.directory}/{latest}")
    restored = ckpts.restore_latest(unboxed_abstract(boxed, state_shardings), data_iter) \
        if cfg.checkpoint.resume else None
    if restored is None:
        state, progress = session.init_state(make_state, state_shardings), Progress()
    else:
        state, progress = restored[1]["state"], Progress.from_json(restored[1]["meta"])
        log.info("resumed from %s at step %d", ckpts.directory, restored[0])
    start_step = step = int(jax.device_get(state.step))

    writer = MetricsWriter(run_dir)
    checker = StepChecker(writer, ckpts)
    evaluator = Evaluator(task, layout, cfg.eval.batch_size)
    vocab, config_json = dict(task.vocabulary()), to_dict(cfg)
    frozen = session.frozen
    base_key = jax.random.key(cfg.run.seed + 1)
    train_step = make_train_step(task, tx, sched, n_steps, cfg.train.microbatches)
    step_fn = None

    def validate(state, step) -> dict:
        stage = evaluate_stage(session, "valid", state, evaluator)
        values = next(iter(stage.values())) if len(stage) == 1 else \
            {f"{name}/{k}": v for name, result in stage.items() for k, v in result.items()}
        clock = {"train_seconds": round(progress.train_seconds, 3)}
        writer.write("valid", step, {**values, **clock})
        if cfg.eval.track_test:   # learning curves only; selection never looks at them
            for name, result in evaluate_stage(session, "test", state, evaluator).items():
                writer.write("test_curve", step, {"split": name, **result, **clock})
        return values

    def save(state, step, metrics=None):
        ckpts.save(step, state, data_iter, meta=dict(dataclasses.asdict(progress), step=step), config=config_json,
                   vocab=vocab, metrics=metrics, inputs=fingerprints,
                   artifacts=task.artifacts(state.params, frozen, state.model_state))

    bar = tqdm(total=n_steps, initial=start_step, disable=not (cfg.train.progress and is_main),
               desc=f"train {cfg.task}", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    window_start, window_steps = time.time(), 0
    mark = time.time()      # training time excludes evaluation, so curves compare across eval schedules
    with Preemption() as preemption, bar, layout.activate():
        while step < n_steps and not progress.stopped_early and (stop_at_step is None or step < stop_at_step):
            batch = pipeline.to_global(next(data_iter), layout)
            if step_fn is None:
                step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, None),
                                  in_shardings=(state_shardings, jax.tree.map(lambda x: x.sharding, frozen),
                                                jax.tree.map(lambda x: x.sharding, batch),
                                                layout.replicated()))
            state, metrics = step_fn(state, frozen, batch, base_key)
            step += 1
            checker.push(step, metrics)
            window_steps += 1
            bar.update(1)
            at_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == n_steps
            at_save = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
            at_log = step % cfg.train.log_every == 0
            if at_log or at_eval or at_save or preemption.signal:
                loss = checker.flush(log_it=at_log)
                rate = window_steps * cfg.train.batch_size / max(time.time() - window_start, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}")
                if at_log:
                    writer.write("throughput", step, {"samples_per_s": rate})
                    window_start, window_steps = time.time(), 0
            if at_eval:
                jax.block_until_ready(state)
                progress.train_seconds += time.time() - mark
                values = validate(state, step)
                progress.record(step, values, cfg.eval.metric, cfg.train.patience)
                bar.write(f"step {step}: valid " + ", ".join(
                    f"{k}={values[k]:.4f}" for k in column_order(list(values)) if k.startswith(("hr@", "ndcg@"))))
                save(state, step, metrics=_scalars(values))
                mark = time.time()
            elif at_save or preemption.signal:
                save(state, step)
            if preemption.signal:
                ckpts.wait()
                raise SystemExit(f"stopped by signal {preemption.signal} at step {step}; checkpoint saved, "
                                 f"rerun the same command to resume")
        checker.flush()
        ckpts.wait()

    if stop_at_step is not None and step < n_steps and not progress.stopped_early:
        ckpts.close()
        writer.close()
        return TrainResult(run_dir, step, progress.best_step, progress.last_valid, {}, {}, {},
                           time.time() - started, train_seconds=progress.train_seconds)

    best_step = progress.best_step if progress.best_step is not None else step
    if best_step != step:
        state = ckpts.restore(best_step, unboxed_abstract(boxed, state_shardings))["state"]
    tests = evaluate_stage(session, "test", state, evaluator)
    protocols = {s.name: s.protocol for s in task.eval_sets("test")}
    for name, values in tests.items():
        writer.write("test", best_step, {"split": name, **values})
    baselines = task.baselines("test", frozen, evaluator)
    ckpts.close()
    writer.close()
    if is_main:
        print(format_report(task.name, tests, baselines, protocols, best_step))
    result = TrainResult(run_dir, step, best_step, _valid_at(run_dir, best_step, progress), tests, baselines,
                         protocols, time.time() - started, progress.stopped_early, progress.train_seconds)
    if is_main:
        (run_dir / "results.json").write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return result


def _valid_at(run_dir: Path, step: int, progress: Progress) -> dict:
    for record in reversed(read_metrics(run_dir)):
        if record["kind"] == "valid" and record["step"] == step:
            return {k: v for k, v in record.items() if k not in ("kind", "step", "time")}
    return progress.last_valid
