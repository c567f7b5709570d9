"""2 processes x 2 CPU devices train exactly like 1 process x 4 devices."""
import socket
import subprocess
import sys

import pytest

from jaxrec.train.reporting import read_metrics
from tests.helpers import REPO, cli_env, results, run_cli, write_config

# No dropout: masks are drawn per device shard, so they legitimately differ between
# layouts; everything else (data order, per-record randomness, the loss) must not.
SECTIONS = {"model": {"dropout": 0.0}, "train": {"steps": 12, "eval_every": 6, "log_every": 1},
            "checkpoint": {"every": 6, "async_save": True}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    single = write_config(tmp_path / "single.yaml", tmp_path / "single", **SECTIONS)
    out = run_cli(["train", str(single)], devices=4)
    assert out.returncode == 0, out.stderr

    multi = write_config(tmp_path / "multi.yaml", tmp_path / "multi", **SECTIONS)
    port = free_port()
    procs = [subprocess.Popen(
        ["timeout", "300", sys.executable, "-m", "jaxrec.cli", "train", str(multi),
         f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}"], env=cli_env(2), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=320) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    expected, got = train_losses(tmp_path / "single"), train_losses(tmp_path / "multi")
    assert len(got) == len(expected) == 12
    assert got == pytest.approx(expected, abs=1e-5)
    a, b = results(tmp_path / "single")["tests"]["test"], results(tmp_path / "multi")["tests"]["test"]
    assert {k: pytest.approx(v, abs=1e-5) for k, v in a.items()} == b
    # each process checkpointed its own share of the data iterator
    step_dir = tmp_path / "multi" / "checkpoints" / "12" / "data"
    assert sorted(p.name for p in step_dir.iterdir() if p.name.startswith("process")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
