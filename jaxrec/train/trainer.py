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

from jaxrec.config import Config, ConfigError, build_config, save_config, to_dict
from jaxrec.train import pipeline
from jaxrec.train.checkpoint import CheckpointNotFound, RunCheckpoints
from jaxrec.train.evaluation import Evaluator
from jaxrec.train.reporting import MetricsWriter, column_order, format_report, read_metrics
from jaxrec.train.run_identity import config_drift, flatten, portable_config
from jaxrec.train.run_lock import RunLock
from jaxrec.train.runs import start_session
from jaxrec.train.session import Session, make_train_step, total_steps
from jaxrec.train.state import schedule, unboxed_abstract, with_clipping

log = logging.getLogger("jaxrec")


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the run stopped and the last good checkpoint is named."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved. The CLI exits with `EXIT_PREEMPTED`."""


class CheckpointsDamaged(RuntimeError):
    """Every checkpoint of a run failed to restore (all quarantined); `--restart` starts over."""


# How far above its lowest a loss may go before the run counts as diverging (`good_checkpoint`).
DIVERGENCE_FACTOR = 2.0


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
        improved = current is not None and (self.best_metric is None or current > self.best_metric)
        # A tie moves the best to the later step: the checkpoint Orbax's BestN keeps on ties
        # (it sorts stably and keeps the last), so the best step always exists on disk.
        if improved or (current is not None and current == self.best_metric):
            self.best_step, self.best_metric = step, current
        self.bad_evals = 0 if improved else self.bad_evals + 1
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
        self.losses: dict[int, float] = {}     # every step's loss this process has seen

    def push(self, step: int, metrics: Any) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self, log_it: bool = False) -> float:
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            values = jax.device_get(metrics)
            self.losses[step] = float(values["loss"])
            bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
            if bad:
                self.writer.write("error", step, {"non_finite": ", ".join(bad)})
                self.ckpts.wait()
                raise NonFiniteLoss(f"non-finite {', '.join(bad)} at step {step}; stopped. "
                                    f"{self.last_good(step)}")
            if log_it:
                self.writer.write("train", step, _scalars(values))
            self.last_loss = float(values["loss"])
        return self.last_loss

    def last_good(self, bad_step: int) -> str:
        """Which checkpoint to resume from, by the rule of `good_checkpoint`."""
        kept = [s for s in self.ckpts.steps() if s < bad_step]
        for step in reversed(kept):
            if good_checkpoint(step, self.losses):
                return (f"Last good checkpoint: {step} (the loss after it, {self.losses[step + 1]:.4g}, is finite "
                        f"and not diverging); resume from it with a smaller train.lr: "
                        f"rerun with --from-step {step} (later checkpoints are set aside, not deleted)")
        unchecked = [s for s in kept if s + 1 not in self.losses]
        if unchecked:
            return (f"No checkpoint of this session passes the divergence check; checkpoint {unchecked[-1]} was "
                    f"saved before it and is unchecked: rerun with --from-step {unchecked[-1]} and a smaller "
                    f"train.lr, or --restart")
        return "No good checkpoint to resume from: rerun with --restart and a smaller train.lr"


def good_checkpoint(step: int, losses: dict[int, float]) -> bool:
    """A checkpoint saved after `step` updates is good when the next step's loss (computed
    with its parameters, so NaN/inf parameters show up there) is finite and exceeds the
    lowest loss before it by at most (DIVERGENCE_FACTOR - 1) x the loss scale, the larger of
    |lowest| and |first loss seen| (sign-safe: losses may be negative). Unknown: not good."""
    after = losses.get(step + 1)
    if after is None or not np.isfinite(after):
        return False
    before = [losses[s] for s in sorted(losses) if s <= step and np.isfinite(losses[s])]
    if not before:
        return True
    lowest = min(before)
    return after <= lowest + (DIVERGENCE_FACTOR - 1.0) * max(abs(lowest), abs(before[0]))


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


def train(config: Config, stop_at_step: int | None = None, restart: bool = False,
          from_step: int | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`; returns the final report.

    `restart`: set the run's checkpoints aside (moved, not deleted) and train from step 0.
    `from_step`: resume from that checkpoint, setting the later ones aside.
    `stop_at_step` ends the loop early as if interrupted (tests of resumption use it).
    """
    run_dir = config.run_dir.absolute()
    with RunLock(run_dir, enabled=jax.process_index() == 0):
        return _train(config, run_dir, stop_at_step, restart, from_step)


def _resume_point(session: Session, ckpts: RunCheckpoints, config_json: dict, restart: bool,
                  from_step: int | None) -> None:
    """Make the newest checkpoint the one to resume from, or refuse: set checkpoints aside
    for --restart / --from-step, then compare the config and the frozen inputs with the
    newest checkpoint's (`run_identity`)."""
    cfg = session.config
    if restart and ckpts.steps():
        where = ckpts.set_aside(ckpts.steps(), "restart")
        metrics = ckpts.run_dir / "metrics.jsonl"
        if metrics.is_file() and jax.process_index() == 0:
            metrics.rename(where / metrics.name)
        log.info("--restart: the previous checkpoints and metrics were moved to %s", where)
    if from_step is not None and from_step not in ckpts.steps():
        raise CheckpointNotFound(f"--from-step {from_step}: no such checkpoint in {ckpts.directory} "
                                 f"(available: {ckpts.steps() or 'none'})")
    if not ckpts.steps():
        return
    if not cfg.checkpoint.resume:
        raise ConfigError(f"{cfg.source}: checkpoint.resume: false, but {ckpts.directory} already holds "
                          f"checkpoints {ckpts.steps()}; choose another run.dir, or rerun with --restart")
    if from_step is not None:
        try:
            reference = (from_step, ckpts.read_json(from_step, "config"))
        except Exception as e:  # unreadable metadata: the checkpoint is damaged
            ckpts.quarantine(from_step, e)
            raise CheckpointNotFound(f"--from-step {from_step}: that checkpoint is damaged (moved to quarantine/); "
                                     f"available: {ckpts.steps() or 'none'}") from None
    else:
        reference = ckpts.newest_readable_json("config")
        if reference is None:
            raise CheckpointsDamaged(f"{ckpts.directory}: every checkpoint is damaged (moved to "
                                     f"{ckpts.run_dir / 'quarantine'}); rerun with --restart to train from step 0")
    step, saved = reference
    paths = _path_keys(session)
    drift = config_drift(portable_config(_with_defaults(saved, cfg.source), paths), config_json)
    if drift.defining:
        raise ConfigError(f"{cfg.source}: this run directory ({ckpts.run_dir}) holds a run made with another "
                          f"model or data config: {'; '.join(map(str, drift.defining))}. Choose another run.dir "
                          f"for the new config, or rerun with --restart to set the old checkpoints aside")
    for change in drift.schedule:
        log.info("resuming with a changed schedule: %s", change)
    session.check_fingerprints(ckpts.read_json(step, "inputs", default={}), f"{ckpts.directory}/{step}")
    if from_step is not None:
        where = ckpts.set_aside([s for s in ckpts.steps() if s > from_step], f"after-{from_step}")
        if where:
            log.info("--from-step %d: the later checkpoints were moved to %s", from_step, where)


def _with_defaults(saved: dict, source: str) -> dict:
    """A stored config with the defaults of keys added since it was written filled in, so a
    new option is not mistaken for a change (as stored when it no longer parses)."""
    try:
        return to_dict(build_config(json.loads(json.dumps(saved)), f"{source} (stored checkpoint config)"))
    except ConfigError:
        return saved


def _path_keys(session: Session) -> list[str]:
    """Config keys holding paths: upstream runs, and model.* strings that name a file or folder."""
    keys = [spec.key for spec in type(session.task).upstream(session.config).values()]
    model = to_dict(session.config).get("model") or {}
    keys += [f"model.{k}" for k, v in flatten(model).items() if isinstance(v, str) and "/" in v]
    return keys


def _train(config: Config, run_dir: Path, stop_at_step: int | None, restart: bool,
           from_step: int | None) -> TrainResult:
    started = time.time()
    session = start_session(config)
    task, layout, cfg = session.task, session.layout, config
    is_main = jax.process_index() == 0

    records = task.train_records()
    n_steps = total_steps(cfg, len(records))
    sched = schedule(cfg.train, n_steps)
    tx = with_clipping(task.optimizer(sched), cfg.train.grad_clip)
    make_state, boxed, state_shardings = session.state_layout(tx)
    try:
        data_iter = pipeline.train_stream(records, cfg.train.batch_size, cfg.run.seed, task.train_transform(),
                                          cfg.data.num_threads, cfg.data.prefetch, task.train_buckets())
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: train.batch_size: {e}") from None

    ckpts = RunCheckpoints(run_dir, keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                           async_save=cfg.checkpoint.async_save, metric=cfg.eval.metric)
    config_json = portable_config(to_dict(cfg), _path_keys(session))
    _resume_point(session, ckpts, config_json, restart, from_step)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    fingerprints = session.fingerprints()
    had_checkpoints = bool(ckpts.steps())
    restored = ckpts.restore_latest(unboxed_abstract(boxed, state_shardings), data_iter) if had_checkpoints else None
    if had_checkpoints and restored is None:
        raise CheckpointsDamaged(f"{ckpts.directory}: every checkpoint is damaged (moved to "
                                 f"{ckpts.run_dir / 'quarantine'}); rerun with --restart to train from step 0")
    if restored is None:
        state, progress = session.init_state(make_state, state_shardings), Progress()
    else:
        state, progress = restored[1]["state"], Progress.from_json(restored[1]["meta"])
        log.info("resumed from %s at step %d", ckpts.directory, restored[0])
    start_step = step = int(jax.device_get(state.step))

    writer = MetricsWriter(run_dir)
    checker = StepChecker(writer, ckpts)
    evaluator = Evaluator(task, layout, cfg.eval.batch_size)
    vocab = dict(task.vocabulary())
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
                raise Preempted(f"stopped by signal {preemption.signal} at step {step}; checkpoint saved, "
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
        best = ckpts.restore_first([best_step], unboxed_abstract(boxed, state_shardings))
        if best is None:
            log.warning("the best checkpoint (step %d) is damaged; reporting the final state (step %d) instead",
                        best_step, step)
            best_step = step
        else:
            state = best[1]["state"]
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
