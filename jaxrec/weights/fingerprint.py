"""SHA-256 identities of frozen inputs: checkpoint files and parameter trees.

A run records the fingerprints of everything it read but did not train (a base LLM,
a guide run, a semantic-ID table), and refuses to resume or be evaluated against inputs
whose fingerprint differs.
"""
from __future__ import annotations

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
    """SHA-256 over a parameter tree's paths, dtypes, shapes and bytes (independent of dict order)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(_as_dict(nn.unbox(params))).items()):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{'/'.join(map(str, path))}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _as_dict(tree: Any) -> dict:
    return tree if isinstance(tree, dict) else {"": tree}
