"""Writing Hugging Face checkpoints back: a merged model directory and a PEFT LoRA adapter.

    save_hf_checkpoint(out/"merged", config, params, tokenizer_from=base)
        config.json, model.safetensors, tokenizer files — `transformers.AutoModelForCausalLM
        .from_pretrained(out/"merged")` loads it.
    save_peft_adapter(out/"adapter", config, params, base_model_name_or_path=base)
        adapter_config.json, adapter_model.safetensors — `peft.PeftModel.from_pretrained(
        base_model, out/"adapter")` loads it on the original base.

Tensor names come from the same table the loader reads (`jaxrec.weights.mapping`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxrec.models.llama_config import LlamaConfig
from jaxrec.weights.errors import UnsupportedModelError
from jaxrec.weights.mapping import adapted_modules, hf_tensors, peft_tensors

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Rope types Hugging Face's config knows; llama.cpp's per-frequency divisors ("freq_factors",
# read from GGUF files) have no config.json form.
_HF_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """config.json of a checkpoint holding `config`'s weights, stored in its param_dtype."""
    if config.rope_type not in _HF_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type={config.rope_type!r} (llama.cpp's per-frequency factors from a GGUF file) has no "
            f"Hugging Face config.json form; export from a Hugging Face base directory instead")
    if config.model_type == "qwen2" and any(config.layer_windows):
        raise UnsupportedModelError("Qwen2 sliding-window layers are not written back to config.json")
    return {**config.to_hf_dict(), "dtype": config.param_dtype}


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, str(path), metadata=metadata)
    # safetensors writes through a private temporary file (0600); exports are meant to be shared.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_hf_checkpoint(directory: str | Path, config: LlamaConfig, params: Any,
                       tokenizer_from: str | Path | None = None) -> list[Path]:
    """A Hugging Face causal-LM directory of `params` (base weights only: merge adapters
    first with `jaxrec.models.lora.merge_lora`). Tied output embeddings write no lm_head.
    `tokenizer_from`: a checkpoint directory or GGUF file whose tokenizer is saved beside
    the weights (transformers converts a GGUF tokenizer to tokenizer.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = hf_config_dict(config)
    dtype = _NUMPY_DTYPES[config.param_dtype]
    tensors = {name: w.astype(dtype, copy=False) for name, w in hf_tensors(params, config)}
    weights = directory / "model.safetensors"
    _save_safetensors(tensors, weights, {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    written = [directory / "config.json", weights]
    if tokenizer_from is not None:
        from jaxrec.weights.tokenizer import load_tokenizer
        before = set(directory.iterdir())
        load_tokenizer(tokenizer_from).save_pretrained(str(directory))
        written += sorted(p for p in set(directory.iterdir()) - before if p.is_file())
    return written


def save_peft_adapter(directory: str | Path, config: LlamaConfig, params: Any,
                      base_model_name_or_path: str) -> list[Path]:
    """A PEFT LoRA adapter directory of the adapter leaves in `params` (the full tree or only
    its adapters; `config.lora` with one expert). PEFT's scale is lora_alpha / r, jaxrec's plain-LoRA scale alpha / r: the same."""
    lora = config.lora
    if lora is None:
        raise ValueError("the model has no LoRA adapter to export")
    if lora.num_experts > 1:
        raise ValueError(f"an MoE-LoRA adapter ({lora.num_experts} experts, gated per example) has no PEFT form")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: w.astype(np.float32, copy=False) for name, w in peft_tensors(params, config)}
    if not tensors:
        raise ValueError("no adapter parameters (lora_a/lora_b) found in the parameters")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": adapted_modules(config), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True,
    }
    weights = directory / "adapter_model.safetensors"
    _save_safetensors(tensors, weights, {"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return [directory / "adapter_config.json", weights]
