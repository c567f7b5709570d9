"""Shared test utilities: tiny run configs and running the CLI in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_RUN = {
    "task": "seqrec",
    "data": {"source": "synthetic", "synthetic": "tiny", "max_len": 20},
    "model": {"hidden": 16, "layers": 1, "dropout": 0.1},
    "train": {"batch_size": 32, "steps": 60, "lr": 0.01, "warmup_steps": 5, "eval_every": 20, "log_every": 5,
              "progress": False},
    "eval": {"ks": [5, 10], "batch_size": 64},
    "checkpoint": {"every": 10, "keep": 3},
}


def write_config(path: Path, run_dir: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY_RUN))
    data["run"] = {"dir": str(run_dir)}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def cli_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], devices: int = 1, timeout: int = 300, env: dict | None = None,
            **popen) -> subprocess.CompletedProcess:
    """`jaxrec ARGS` in a fresh process; `env` adds to the simulated-devices environment."""
    return subprocess.run([sys.executable, "-m", "jaxrec.cli", *args], env={**cli_env(devices), **(env or {})},
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


def results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


# Source of a safetensors reader for child processes that may import only numpy: the format is
# an 8-byte little-endian header length, a JSON header, then raw little-endian data.
PLAIN_SAFETENSORS_READER = r'''
import json, struct
import numpy as np

def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    dtypes = {"F32": np.float32, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]],
                             dtypes[v["dtype"]]).reshape(v["shape"]) for k, v in header.items()}
'''


def torch_logits(model, ids, mask):
    """A transformers causal LM's float32 logits with positions counted over real tokens only
    (left padding invisible), as jaxrec's Llama places them."""
    import numpy as np
    import torch
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions))
    return out.logits.float().numpy()
