"""A GGUF file's header, parsed in one pass over a memory map.

`gguf.GGUFReader` builds a numpy view for every part of every metadata field: a Llama
tokenizer's ~100k vocabulary and merge strings cost ~1.2M view constructions, most of a
SmolLM2 load's time. Reading a model needs the scalar hyper-parameters and the tensor
table only, so this parser walks the key/value section with `struct` (string arrays are
skipped by their lengths, materialised only when asked for) and gives each tensor as a
zero-copy numpy view shaped as `GGUFReader` shapes it, so `gguf.quants.dequantize`
applies unchanged.

Layout (GGUF v2/v3, little-endian): "GGUF", version u32, tensor count u64, kv count u64;
kv = key string, value type u32, value (arrays: element type u32, count u64, elements);
tensor info = name, n_dims u32, dims u64 x n (innermost first), ggml type u32, offset u64;
tensor data starts at the next multiple of `general.alignment` (default 32).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class _LazyStrings:
    offset: int
    count: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]          # ggml order: innermost dimension first
    tensor_type: int                # gguf.GGMLQuantizationType value
    data: np.ndarray                # as GGUFReader gives it (bytes per row for quantized types)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as e:
            raise GGUFFormatError(f"truncated or malformed header ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------ primitives
    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._pos + n > len(self._map):
            raise GGUFFormatError(f"a string of {n} bytes runs past the end of the file")
        text = bytes(self._map[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            elem, count = self._unpack("<I"), self._unpack("<Q")
            if elem in _NUMPY:
                size = np.dtype(_NUMPY[elem]).itemsize * count
                values = np.frombuffer(self._map, _NUMPY[elem], count, self._pos).tolist()
                self._pos += size
                return values
            if elem == _STRING:
                start = self._pos
                for _ in range(count):               # skip: read the lengths only
                    self._pos += 8 + struct.unpack_from("<Q", self._map, self._pos)[0]
                return _LazyStrings(start, count)
            return [self._value(elem) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self._pos}")

    # ------------------------------------------------------------------ sections
    def _parse(self) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        if bytes(self._map[:4]) != b"GGUF":
            raise GGUFFormatError("no GGUF magic at the start of the file")
        self._pos = 4
        self.version = self._unpack("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} (this reader knows 2 and 3)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, kind, offset in infos:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims, dtype=np.int64))
            np_shape = tuple(reversed(dims))
            typed = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                     GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                     GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                     GGMLQuantizationType.I64: np.int64}
            if qtype in typed:
                dtype, count, shape = typed[qtype], n_elements, np_shape
            else:
                dtype, count = np.uint8, n_elements // block * type_size
                shape = quant_shape_to_byte_shape(np_shape, qtype)
            begin = start + offset
            if begin + count * np.dtype(dtype).itemsize > len(self._map):
                raise GGUFFormatError(f"tensor {name} runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, dims, int(kind),
                                            np.frombuffer(self._map, dtype, count, begin).reshape(shape))

    # ------------------------------------------------------------------ reading
    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value: a scalar, a string, or a list (string lists are read now)."""
        value = self.fields.get(key, default)
        if isinstance(value, _LazyStrings):
            pos, out = value.offset, []
            for _ in range(value.count):
                n = struct.unpack_from("<Q", self._map, pos)[0]
                out.append(bytes(self._map[pos + 8:pos + 8 + n]).decode("utf-8"))
                pos += 8 + n
            return out
        return value
