"""The frozen inputs of an iLoRA run: the base LLM and the SASRec guide, with fingerprints.

Neither is checkpointed with the run: a checkpoint holds only the trainable parameters
plus a pointer to each frozen input and its SHA-256, and a run refuses to resume or be
evaluated against a base or guide whose fingerprint differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

_CHUNK = 1 << 22
_CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.gguf")


def checkpoint_files(path: Path) -> list[Path]:
    """The files that define a base checkpoint's weights (a GGUF file, or an HF directory's
    config and safetensors); tokenizer files do not change the weights and are left out."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted({f for pattern in _CHECKPOINT_FILES for f in path.glob(pattern) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"{path}: no config.json, safetensors or GGUF files to fingerprint")
    return files


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 over the names and bytes of the checkpoint's weight files."""
    digest = hashlib.sha256()
    for f in checkpoint_files(Path(path)):
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def params_sha256(params: Any) -> str:
    """SHA-256 over a parameter tree's paths, dtypes, shapes and bytes (order-independent of dict order)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(nn.unbox(params)).items()):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{'/'.join(path)}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class Guide:
    """A trained `task: seqrec` run used read-only: its encoder and parameters (on the host)."""
    run_dir: str
    step: int
    model: Any                 # SequenceEncoder (static)
    params: dict               # numpy leaves
    item_vocab: np.ndarray
    hidden: int
    sha256: str
    similarity: str = "dot"    # how the guide scores items (seqrec `model.similarity`)
    temperature: float = 1.0


def load_guide(run_dir: str | Path) -> Guide:
    """Open a finished SASRec (or GRU4Rec) run at its best checkpoint."""
    from jaxrec.train.runs import open_run
    session, state, step, ckpts = open_run(run_dir)
    ckpts.close()
    task = session.task
    if task.name != "seqrec":
        raise ValueError(f"{run_dir}: the guide must be a `task: seqrec` run, got task {task.name!r}")
    params = jax.device_get(nn.unbox(state.params))
    return Guide(run_dir=str(Path(run_dir)), step=int(step), model=task.model, params=params,
                 item_vocab=task.store.item_vocab, hidden=int(params["item_embedding"].shape[1]),
                 sha256=params_sha256(params), similarity=task.config.model.similarity,
                 temperature=task.config.model.temperature)
