"""Lazy reading of Hugging Face safetensors checkpoints (one file or an indexed set).

The header is parsed here rather than through `safetensors.numpy`, which cannot return
bfloat16: tensors come back as read-only numpy views of a memory map (bfloat16 via
ml_dtypes), so nothing is read until a tensor is used and nothing is copied twice.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxrec.weights.errors import CheckpointFormatError, CheckpointNotFoundError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: `shapes` from the header, `read(name)` a memory-mapped view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(f"{self.path}: safetensors file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointFormatError(f"{self.path}: header length {n} exceeds the file size {size}")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointFormatError(f"{self.path}: unreadable safetensors header ({e})") from None
        self._data_start = 8 + n
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._mmap = None
        for name, entry in self._entries.items():
            if entry.get("dtype") not in _DTYPES:
                raise CheckpointFormatError(f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            if end > size - self._data_start:
                raise CheckpointFormatError(f"{self.path}: tensor {name} extends past the end of the file")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self._entries.items()}

    def read(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory, by name, read on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointFormatError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointNotFoundError(
                    f"{self.directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file "
                    "(PyTorch .bin checkpoints are not read: convert them to safetensors)")
        self._files = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointNotFoundError(f"{path}: shard listed in {INDEX_FILE} is missing")
            f = SafetensorsFile(path)
            self._files[name] = f
            for tensor in f.shapes:
                self._owner[tensor] = f

    @property
    def source(self) -> str:
        return str(self.directory)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: f.shapes[name] for name, f in self._owner.items()}

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)
