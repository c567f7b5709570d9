"""Crash safety: SIGKILL mid-run + rerun == uninterrupted; damaged checkpoints are skipped."""
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxrec.cli import main
from tests.helpers import REPO, cli_env, results, run_cli, write_config

STEPS = {"train": {"steps": 100, "eval_every": 50}, "checkpoint": {"every": 10, "keep": 2}}


def checkpoint_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.mark.slow
def test_sigkill_then_rerun_reaches_the_same_metrics(tmp_path):
    straight = write_config(tmp_path / "a.yaml", tmp_path / "straight", **STEPS)
    out = run_cli(["train", str(straight)], devices=2)
    assert out.returncode == 0, out.stderr

    crashed = write_config(tmp_path / "b.yaml", tmp_path / "crashed", **STEPS)
    proc = subprocess.Popen([sys.executable, "-m", "jaxrec.cli", "train", str(crashed)], env=cli_env(2), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not [s for s in checkpoint_steps(tmp_path / "crashed")
                                                                   if s >= 30]:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_steps(tmp_path / "crashed")[-1]
    assert 30 <= killed_at < 100

    out = run_cli(["train", str(crashed)], devices=2)
    assert out.returncode == 0, out.stderr
    assert results(tmp_path / "crashed")["tests"] == results(tmp_path / "straight")["tests"]


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 40, "eval_every": 20},
                       checkpoint={"every": 10, "keep": 2, "async_save": False})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert checkpoint_steps(run) == [30, 40]
    for f in (run / "checkpoints" / "40" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    with caplog.at_level(logging.WARNING, logger="jaxrec"):
        assert main(["train", str(cfg), "train.steps=50"]) == 0
    assert "checkpoint" in caplog.text and "40 could not be restored" in caplog.text
    assert [p.name.split("-")[0] for p in (run / "quarantine").iterdir()] == ["40"]
    assert 50 in checkpoint_steps(run)
