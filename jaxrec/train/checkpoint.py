"""Orbax checkpoints of a run: train state, data-iterator state, config, vocabulary.

Layout: `<run>/checkpoints/<step>/{state, data, meta, config, vocab, inputs[, artifacts]}`:
`inputs` holds the fingerprints of the run's frozen inputs, `artifacts` the task's
JSON-able results (e.g. a semantic-ID table) for runs built on this one. Saves are
async and atomic (Orbax commits a step only when every item is written). The newest N
checkpoints are kept plus the best one by the selection metric. A checkpoint that
fails to restore is moved to `<run>/quarantine/` with a one-line warning and the next one
is tried (`restore_first`, the one path every read takes), so a crash mid-write or a
damaged file never blocks a resume or an evaluation, and nothing is deleted.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger("jaxrec")


class _DropUntrackedSaveWarning(logging.Filter):
    """Orbax warns at every save without metrics once `best_fn` is set; periodic saves
    between evaluations are meant to carry none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUntrackedSaveWarning())


def _is_closed_loop_callback(exc: BaseException | None, in_asyncio: bool = False) -> bool:
    """The RuntimeError a late callback gets from a closed asyncio loop; with `in_asyncio`, only
    when raised inside asyncio itself (so a program's own uncaught error is never hidden)."""
    if not (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)):
        return False
    if not in_asyncio:
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.join("asyncio", "") in tb.tb_frame.f_code.co_filename


def _quiet_reads_of_abandoned_restores() -> None:
    """After a restore fails, TensorStore completes the reads still in flight and calls back
    into the asyncio loop Orbax has already closed; each callback reports "Event loop is
    closed" (dozens of tracebacks for one damaged file), and asyncio logs the failed read
    tasks. Those are dropped (the quarantine warning says what failed). Installed when a
    manager opens, before any read, not after a failure: under load a read can finish between
    the failure and the quarantine. The callbacks surface through `sys.unraisablehook`, or through
    `threading.excepthook` / `sys.excepthook` when they run on a thread of their own; every
    other exception goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxrec_quiet", False):
        return

    def unraisable_hook(unraisable):
        if not _is_closed_loop_callback(unraisable.exc_value):
            previous(unraisable)

    previous_thread_hook = threading.excepthook

    def thread_hook(args):
        if not _is_closed_loop_callback(args.exc_value, in_asyncio=True):
            previous_thread_hook(args)

    previous_excepthook = sys.excepthook

    def excepthook(exc_type, exc_value, tb):
        if not _is_closed_loop_callback(exc_value, in_asyncio=True):
            previous_excepthook(exc_type, exc_value, tb)

    unraisable_hook._jaxrec_quiet = True
    sys.unraisablehook, threading.excepthook, sys.excepthook = unraisable_hook, thread_hook, excepthook
    # The failed read tasks themselves are reported again when garbage-collected.
    logging.getLogger("asyncio").addFilter(_DropAbandonedReadTasks())


class _DropAbandonedReadTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Task exception was never retrieved" not in record.getMessage()


class CheckpointNotFound(FileNotFoundError):
    pass


class RunCheckpoints:
    def __init__(self, run_dir: Path, keep: int = 2, keep_best: bool = True, async_save: bool = True,
                 metric: str | None = None, read_only: bool = False):
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.metric = metric
        keep_policy, best = policies.LatestN(keep), {}
        if keep_best and metric:
            def selection(metrics):
                return metrics[metric]
            keep_policy = policies.AnyPreservationPolicy([
                keep_policy, policies.BestN(get_metric_fn=selection, n=1, keep_checkpoints_without_metrics=False)])
            # `best_fn` is what makes Orbax write a checkpoint's metrics to disk: without it a
            # resumed run sees the earlier checkpoints without metrics and deletes the best one.
            best = dict(best_fn=selection, best_mode="max")
        self._options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, preservation_policy=keep_policy, **best,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
        self._skipped: set[int] = set()    # damaged steps a read-only reader could not move away
        self._open()

    def _open(self) -> None:
        # Every read goes through this manager: quiet its abandoned reads before the first one.
        _quiet_reads_of_abandoned_restores()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, config: dict, vocab: dict,
             metrics: dict[str, float] | None = None, inputs: dict | None = None,
             artifacts: dict | None = None) -> None:
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                     config=ocp.args.JsonSave(config), vocab=ocp.args.JsonSave(vocab),
                     inputs=ocp.args.JsonSave(inputs or {}))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if artifacts:
            items["artifacts"] = ocp.args.JsonSave(artifacts)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ reading
    def steps(self) -> list[int]:
        return sorted(s for s in self.manager.all_steps() if s not in self._skipped)

    def has_item(self, step: int, item: str) -> bool:
        return (self.directory / str(step) / item).is_dir()

    def read_json(self, step: int, item: str, default: Any = None) -> Any:
        """A JSON item of a checkpoint; `default` when an older checkpoint lacks it."""
        if default is not None and not self.has_item(step, item):
            return default
        out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return out[item]

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> dict[str, Any]:
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {k: out[k] for k in items}

    def restore_first(self, steps: Iterable[int], abstract_state: Any,
                      data_iterator: Any = None) -> tuple[int, dict[str, Any]] | None:
        """The first of `steps` that restores cleanly, or None. Every read of a checkpoint's
        state goes through here: a damaged one is quarantined (skipped, when the run is
        read-only) with a one-line warning, and the next is tried."""
        for step in steps:
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # any failure to read means the files are unusable
                self.quarantine(step, e)
        return None

    def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, dict[str, Any]] | None:
        """Newest checkpoint that restores cleanly; damaged ones are quarantined."""
        return self.restore_first(reversed(self.steps()), abstract_state, data_iterator)

    def newest_readable_json(self, item: str) -> tuple[int, Any] | None:
        """(step, JSON item) of the newest checkpoint whose `item` reads; damaged ones are quarantined."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_json(step, item)
            except Exception as e:  # unreadable metadata: the checkpoint is damaged
                self.quarantine(step, e)
        return None

    def quarantine(self, step: int, error: BaseException) -> None:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        # A reader (evaluate, export) moves it too when it may, but never opens a writable
        # Orbax manager, which would clean up the temporary files of a training writing now.
        if self._options.read_only and not os.access(self.directory, os.W_OK):
            log.warning("checkpoint %s/%d could not be restored (%s: %s); skipped (the run directory is "
                        "read-only, so it stays where it is)", self.directory, step, type(error).__name__, reason)
            self._skipped.add(step)
            return
        target = self.run_dir / "quarantine" / f"{step}-{int(time.time())}"
        log.warning("checkpoint %s/%d could not be restored (%s: %s); moved to %s", self.directory, step,
                    type(error).__name__, reason, target)
        if jax.process_index() == 0 and (self.directory / str(step)).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        self._barrier(f"quarantine-{step}")
        self.manager.close()
        self._open()

    def set_aside(self, steps: Iterable[int], why: str) -> Path | None:
        """Move whole checkpoints out of the way (nothing is deleted): `<run>/set_aside/<why>-<time>/`."""
        steps = [s for s in steps if (self.directory / str(s)).is_dir()]
        if not steps:
            return None
        self.wait()
        target = self.run_dir / "set_aside" / f"{why}-{int(time.time())}"
        if jax.process_index() == 0:
            target.mkdir(parents=True, exist_ok=True)
            for step in steps:
                shutil.move(str(self.directory / str(step)), str(target / str(step)))
        self._barrier(f"set-aside-{why}")
        self.manager.close()
        self._open()
        return target

    @staticmethod
    def _barrier(name: str) -> None:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)


def find_run_checkpoints(path: str | Path) -> Path:
    """Accept a run directory or its `checkpoints/` folder; return the run directory."""
    path = Path(path).absolute()
    if (path / "checkpoints").is_dir():
        return path
    if path.name == "checkpoints" and path.is_dir():
        return path.parent
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent
    raise CheckpointNotFound(f"{path}: no checkpoints found (expected a run directory containing checkpoints/)")
