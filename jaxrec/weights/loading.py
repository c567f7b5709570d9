"""Load a Llama-family checkpoint (HF directory or GGUF file) into sharded jax arrays.

Streaming: one parameter leaf at a time is assembled on the host (a stacked leaf
layer by layer, each tensor read from a memory map or dequantized on the spot, cast to
the target dtype in place), placed on the devices with its target sharding, and
dropped. Peak host memory is the placed model plus one leaf, never two copies of the
checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxrec.models.llama import Llama, abstract_params, init_adapters, param_shardings
from jaxrec.models.llama_config import LlamaConfig
from jaxrec.models.lora import LoraConfig
from jaxrec.sharding import Layout
from jaxrec.weights.errors import CheckpointFormatError, CheckpointNotFoundError, TensorMismatchError
from jaxrec.weights.gguf_io import GGUFCheckpoint
from jaxrec.weights.mapping import IGNORED_SUFFIXES, leaf_sources
from jaxrec.weights.safetensors_io import SafetensorsCheckpoint

log = logging.getLogger(__name__)


def open_checkpoint(path: str | Path) -> tuple[Any, dict, str]:
    """(tensor reader, HF-style config dict, source name) for a directory or GGUF file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory or GGUF file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointFormatError(f"{path}: a checkpoint file must be .gguf (or pass the HF directory)")
        ckpt = GGUFCheckpoint(path)
        return ckpt, ckpt.config_dict(), str(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_checkpoint(ggufs[0])
        raise CheckpointNotFoundError(f"{config_file}: missing (a Hugging Face checkpoint directory needs it)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{config_file}: line {e.lineno}: invalid JSON ({e.msg})") from None
    return SafetensorsCheckpoint(path), config, str(config_file)


def load_config(path: str | Path, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of a checkpoint; overrides: dtype, param_dtype, lora, remat."""
    _, config, source = open_checkpoint(path)
    return LlamaConfig.from_hf_dict(config, source=source, **overrides)


def load_params(ckpt: Any, config: LlamaConfig, *, layout: Layout | None = None) -> dict:
    """Base parameters of `config` read from `ckpt`, placed with their logical shardings
    on `layout` (default: the first device). Adapter leaves are not created here."""
    base = Llama(config.with_lora(None))
    abstract = abstract_params(base)
    flat_abstract = traverse_util.flatten_dict(nn.unbox(abstract))
    flat_shardings = {}
    if layout is not None:
        flat_shardings = traverse_util.flatten_dict(param_shardings(base, layout))

    available = ckpt.shapes()
    sources = leaf_sources(config)
    needed = {n for s in sources for n in s.names}
    missing = sorted(needed - set(available))
    if missing:
        raise TensorMismatchError(
            f"{ckpt.source}: {len(missing)} tensor(s) missing for this config, e.g. {', '.join(missing[:3])}")
    unused = sorted(n for n in set(available) - needed if not n.endswith(IGNORED_SUFFIXES))
    if unused and not (config.tie_word_embeddings and unused == ["lm_head.weight"]):
        log.warning("%s: %d tensor(s) not used, e.g. %s", ckpt.source, len(unused), ", ".join(unused[:3]))

    flat_params = {}
    for src in sources:
        target = flat_abstract[src.path]
        host = _assemble(ckpt, src, target.shape, target.dtype, available)
        sharding = flat_shardings.get(src.path)
        if sharding is None:
            flat_params[src.path] = jax.device_put(host, jax.devices()[0])
        else:
            flat_params[src.path] = jax.make_array_from_callback(target.shape, sharding,
                                                                 lambda idx, host=host: host[idx])
        del host
    return traverse_util.unflatten_dict(flat_params)


def _assemble(ckpt, src, shape, dtype, available) -> np.ndarray:
    per_tensor = shape[1:] if src.stacked else shape
    for name in src.names:
        got = available[name][::-1] if src.transpose else available[name]
        if tuple(got) != tuple(per_tensor):
            want = per_tensor[::-1] if src.transpose else per_tensor
            raise TensorMismatchError(
                f"{ckpt.source}: tensor {name} has shape {tuple(available[name])}, the config needs {tuple(want)}")

    def read(name):
        w = ckpt.read(name)
        return w.T if src.transpose else w

    if not src.stacked:
        return np.asarray(read(src.names[0]), dtype=dtype)
    host = np.empty(shape, dtype=dtype)
    for i, name in enumerate(src.names):
        host[i] = read(name)
    return host


def load_pretrained(path: str | Path, *, dtype: str = "float32", param_dtype: str | None = None,
                    lora: LoraConfig | None = None, layout: Layout | None = None, rng: jax.Array | None = None,
                    remat: bool = False) -> tuple[LlamaConfig, dict]:
    """(config, params) from a Hugging Face directory or a GGUF file.

    dtype: compute dtype; param_dtype: dtype the base weights are stored in (default =
    dtype; "bfloat16" halves memory for a frozen base). With `lora`, adapter parameters
    (float32) are initialised from `rng` (default key 0) and added to the tree.
    """
    ckpt, hf_config, source = open_checkpoint(path)
    config = LlamaConfig.from_hf_dict(hf_config, source=source, dtype=dtype, param_dtype=param_dtype or dtype,
                                      lora=lora, remat=remat)
    params = load_params(ckpt, config, layout=layout)
    if lora is not None:
        shardings = None if layout is None else param_shardings(Llama(config), layout)
        params = init_adapters(Llama(config), params, jax.random.key(0) if rng is None else rng, shardings)
    return config, params
