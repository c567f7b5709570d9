"""Nothing lost, nothing silently wrong: a rerun with a changed config, divergence, damaged
checkpoints, evaluation from elsewhere or on other data, environment errors, the run lock,
SIGTERM. Each test reproduces a case that used to misbehave (see docs/training.md)."""
import dataclasses
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tests.train.toy_task  # noqa: F401  (registers the toy task)
from jaxrec.cli import EXIT_PREEMPTED, environment_error, main
from jaxrec.config import build_config
from jaxrec.train.run_identity import config_drift
from jaxrec.train.run_lock import RunLock
from jaxrec.train.trainer import good_checkpoint, train
from tests.helpers import REPO, cli_env, results, run_cli, write_config

def steps_of(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def damage(run: Path, step: int) -> None:
    for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")


def best_before_newest(tmp_path: Path, name: str = "run"):
    """A toy run whose validation score drops after step 20: best 20, newest 40."""
    cfg = build_config({"task": "toy", "run": {"dir": str(tmp_path / name)},
                        "model": {"worse_after_step": 20},
                        "train": {"batch_size": 32, "steps": 40, "lr": 0.1, "warmup_steps": 0, "eval_every": 20,
                                  "progress": False},
                        "eval": {"metric": "ndcg@10", "ks": [10]},
                        "checkpoint": {"every": 20, "keep": 1, "async_save": False}}, "toy.yaml")
    result = train(cfg)
    assert result.best_step == 20 and steps_of(tmp_path / name) == [20, 40]
    return cfg, tmp_path / name


def test_config_drift_splits_defining_from_schedule_keys():
    saved = {"task": "seqrec", "model": {"hidden": 64}, "train": {"lr": 0.01, "batch_size": 128},
             "data": {"source": "a.txt", "split": "leave_one_out"}, "source": "x.yaml"}
    now = {"task": "seqrec", "model": {"hidden": 32}, "train": {"lr": 0.001, "batch_size": 128},
           "data": {"source": "/elsewhere/a.txt", "split": "leave_one_out"}, "source": "y.yaml"}
    drift = config_drift(saved, now)
    assert [str(c) for c in drift.defining] == ["model.hidden: 64 -> 32"]
    assert [c.key for c in drift.schedule] == ["train.lr"]


def test_changed_model_is_refused_and_nothing_is_quarantined(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 20, "eval_every": 20})
    assert main(["train", str(cfg)]) == 0
    before = steps_of(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(cfg), "model.hidden=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.hidden: 16 -> 32" in err and "--restart" in err
    assert steps_of(tmp_path / "run") == before and not (tmp_path / "run" / "quarantine").exists()

    # --restart keeps the old checkpoints (set aside) and trains the new model from step 0.
    assert main(["train", str(cfg), "model.hidden=32", "--restart"]) == 0
    aside = list((tmp_path / "run" / "set_aside").iterdir())
    assert len(aside) == 1 and sorted(int(p.name) for p in aside[0].iterdir() if p.name.isdigit()) == before
    assert (aside[0] / "metrics.jsonl").is_file()


def test_changed_schedule_is_applied_with_a_notice(tmp_path, caplog):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 20, "eval_every": 20})
    assert main(["train", str(cfg)]) == 0
    with caplog.at_level(logging.INFO, logger="jaxrec"):
        assert main(["train", str(cfg), "train.steps=30", "train.lr=0.005"]) == 0
    assert "changed schedule: train.lr: 0.01 -> 0.005" in caplog.text
    assert "changed schedule: train.steps: 20 -> 30" in caplog.text
    assert results(tmp_path / "run")["steps"] == 30


def test_good_checkpoint_rule():
    losses = {1: 6.0, 2: 5.0, 3: 5.5, 4: 40.0, 5: float("nan")}
    assert good_checkpoint(1, losses)            # loss after it 5.0 <= lowest 6.0 + 6.0
    assert good_checkpoint(2, losses)            # 5.5 <= 5.0 + 6.0
    assert not good_checkpoint(3, losses)        # 40 > 5.0 + 6.0: diverging
    assert not good_checkpoint(4, losses)        # NaN after it
    assert not good_checkpoint(5, losses)        # unknown
    negative = {1: -2.0, 2: -3.0, 3: -2.5}      # sign-safe: -2.5 <= -3 + 3
    assert good_checkpoint(2, negative)


def test_divergence_names_a_good_checkpoint_and_resumes_from_it(tmp_path, capsys):
    """The issue's reproduction: lr 1e6 with a checkpoint at every step."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"lr": 1e6, "steps": 30},
                       checkpoint={"every": 1, "keep": 5, "async_save": False})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Last good checkpoint: " in err, err
    good = int(err.split("Last good checkpoint: ")[1].split()[0])
    assert f"--from-step {good}" in err
    assert main(["train", str(cfg), "--from-step", str(good), "train.lr=0.01"]) == 0
    assert results(tmp_path / "run")["steps"] == 30


def test_damaged_best_checkpoint_falls_back_in_training_and_evaluate(tmp_path, caplog, capsys):
    config, run = best_before_newest(tmp_path)
    damage(run, 20)                              # the best, not the newest
    with caplog.at_level(logging.WARNING, logger="jaxrec"):
        result = train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=60)))
    assert "best checkpoint (step 20) is damaged" in caplog.text
    assert [p.name.split("-")[0] for p in (run / "quarantine").iterdir()] == ["20"]
    assert result.best_step == 60 and result.tests["test"]

    _, other = best_before_newest(tmp_path, "other")
    damage(other, 20)
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="jaxrec"):
        assert main(["evaluate", str(other)]) == 0
    assert "using checkpoint 40 instead of best (20)" in caplog.text
    assert "toy (step 40)" in capsys.readouterr().out


def test_every_checkpoint_damaged_stops_unless_restart(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 20, "eval_every": 20},
                       checkpoint={"every": 10, "keep": 2, "async_save": False})
    assert main(["train", str(cfg)]) == 0
    for step in steps_of(tmp_path / "run"):
        damage(tmp_path / "run", step)
    capsys.readouterr()
    assert main(["train", str(cfg), "train.steps=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every checkpoint is damaged" in err and "--restart" in err
    assert main(["train", str(cfg), "train.steps=30", "--restart"]) == 0


def test_evaluate_is_self_contained_and_checks_the_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lines = [" ".join(str(x) for x in [u, *rng.integers(1, 40, size=rng.integers(4, 12))]) for u in range(1, 200)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "seqs.txt").write_text("\n".join(lines) + "\n")
    cfg = write_config(work / "c.yaml", Path("run"), data={"source": "seqs.txt", "format": "sequences"},
                       train={"steps": 20, "eval_every": 20})
    env = cli_env(1)
    out = subprocess.run([sys.executable, "-m", "jaxrec.cli", "train", "c.yaml"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    run = work / "run"

    # From another directory: the stored data.source is absolute.
    out = subprocess.run([sys.executable, "-m", "jaxrec.cli", "evaluate", str(run)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "seqrec (step 20)" in out.stdout

    # The data file moved: data.source= points at it; its hash matches.
    moved = tmp_path / "moved.txt"
    (work / "seqs.txt").rename(moved)
    capsys.readouterr()
    assert main(["evaluate", str(run), f"data.source={moved}"]) == 0

    # Other interactions over the same items: refused by hash unless --other-data.
    other = tmp_path / "other.txt"
    swapped = lines[1:] + lines[:1]
    other.write_text("\n".join(line.split(" ", 1)[0] + " " + " ".join(reversed(line.split(" ")[1:]))
                               for line in swapped) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), f"data.source={other}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other interactions" in err and "--other-data" in err
    assert main(["evaluate", str(run), f"data.source={other}", "--other-data"]) == 0

    # Another item vocabulary: always refused, in one line.
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(" ".join(x for x in line.split(" ") if x != "7") for line in lines) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), f"data.source={fewer}", "--other-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "item vocabulary" in err


def test_evaluate_prints_its_table_when_the_report_cannot_be_written(tmp_path, monkeypatch, capsys, caplog):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 20, "eval_every": 20})
    assert main(["train", str(cfg)]) == 0
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.name.startswith("evaluate-step"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="jaxrec"):
        assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert "seqrec (step 20)" in capsys.readouterr().out
    assert "could not write the report" in caplog.text


def test_environment_errors_are_one_line(tmp_path, monkeypatch, capsys):
    # As Orbax reports a failed asynchronous write: the OSError two links down the chain.
    try:
        try:
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "checkpoints"))
            except OSError as e:
                raise ValueError("commit failed") from e
        except ValueError:
            raise RuntimeError("async save failed")
    except RuntimeError as e:
        chained = e
    line = environment_error(chained)
    assert line and "no space left on the device" in line and str(tmp_path / "run") in line
    assert environment_error(RuntimeError("unrelated")) is None

    from jaxrec.train import reporting

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(reporting.MetricsWriter, "write", full_disk)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 10, "eval_every": 10})
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl: no space left on the device" in err


def test_a_second_training_on_the_same_run_directory_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 10})
    with RunLock(tmp_path / "run"):
        assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err and "already being trained" in err
    assert main(["train", str(cfg)]) == 0       # the lock is released with its holder


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_preemption_code(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 100000, "eval_every": 0},
                       checkpoint={"every": 50, "keep": 2})
    proc = subprocess.Popen([sys.executable, "-m", "jaxrec.cli", "train", str(cfg)], env=cli_env(1), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not steps_of(tmp_path / "run"):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 143, err
    assert "checkpoint saved" in err and "Traceback" not in err
    assert steps_of(tmp_path / "run")[-1] > 50          # the save on SIGTERM, after the periodic one


def test_truncated_checkpoint_is_one_warning_not_a_wall_of_tracebacks(tmp_path):
    """A truncated array file fails inside TensorStore while other reads are in flight; their
    callbacks used to print dozens of "Event loop is closed" tracebacks."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 20, "eval_every": 20},
                       checkpoint={"every": 10, "keep": 2})
    assert run_cli(["train", str(cfg)]).returncode == 0
    for f in (tmp_path / "run" / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as handle:
                handle.truncate(100)
    out = run_cli(["train", str(cfg), "train.steps=30"])
    assert out.returncode == 0, out.stderr
    assert "checkpoint" in out.stderr and "20 could not be restored" in out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr


def test_late_callbacks_into_a_closed_loop_are_dropped_and_nothing_else(monkeypatch, capsys):
    """The damaged-checkpoint hooks drop only asyncio's own "Event loop is closed" errors, on
    every channel a late TensorStore callback can take; they are installed before any read."""
    import asyncio
    import sys
    import threading

    from jaxrec.train.checkpoint import _quiet_reads_of_abandoned_restores

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: printed.append(("unraisable", u.exc_value)))
    monkeypatch.setattr(threading, "excepthook", lambda a: printed.append(("thread", a.exc_value)))
    monkeypatch.setattr(sys, "excepthook", lambda t, v, tb: printed.append(("main", v)))
    _quiet_reads_of_abandoned_restores()

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    own = RuntimeError("Event loop is closed")            # raised by a program, not by asyncio
    other = ValueError("a real error")
    sys.excepthook(type(late), late, late.__traceback__)
    threading.excepthook(threading.ExceptHookArgs((type(late), late, late.__traceback__, None)))
    sys.excepthook(RuntimeError, own, None)
    threading.excepthook(threading.ExceptHookArgs((ValueError, other, None, None)))
    assert printed == [("main", own), ("thread", other)]
