"""Hugging Face tensor names ↔ jaxrec Llama parameter paths: one table, two directions.

`leaf_sources` is the table. Reading (`jaxrec.weights.loading`) assembles each jaxrec leaf
from its HF tensors; writing (`hf_tensors`, `peft_tensors`) splits each leaf back into
them. Torch linear weights are [out, in]; jaxrec kernels are [in, out], so they are
transposed. Per-layer tensors stack into one leaf with a leading `layers` axis (the
decoder is an `nn.scan`). jaxrec parameters are always in the Hugging Face rotary
convention (the GGUF reader undoes llama.cpp's q/k row permutation on the way in), so
nothing is permuted on the way out.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
from flax import traverse_util

from jaxrec.models.llama_config import LlamaConfig

_PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # buffers some old checkpoints saved


@dataclasses.dataclass(frozen=True)
class LeafSource:
    """Where one jaxrec parameter leaf comes from: one HF tensor, or one per layer."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    stacked: bool
    transpose: bool


def leaf_sources(config: LlamaConfig) -> list[LeafSource]:
    """The HF tensors making up every base (non-adapter) parameter of `config`."""
    layers = range(config.num_layers)
    out = [LeafSource(("embed_tokens",), ("model.embed_tokens.weight",), False, False),
           LeafSource(("norm", "scale"), ("model.norm.weight",), False, False)]
    if not config.tie_word_embeddings:
        out.append(LeafSource(("lm_head", "kernel"), ("lm_head.weight",), False, True))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out.append(LeafSource(("layers", norm, "scale"),
                              tuple(f"model.layers.{i}.{norm}.weight" for i in layers), True, False))
    for proj, block in _PROJECTIONS.items():
        stem = tuple(f"model.layers.{i}.{block}.{proj}" for i in layers)
        out.append(LeafSource(("layers", block, proj, "kernel"), tuple(s + ".weight" for s in stem), True, True))
        if _has_bias(config, proj):
            out.append(LeafSource(("layers", block, proj, "bias"), tuple(s + ".bias" for s in stem), True, False))
    return out


def _has_bias(config: LlamaConfig, proj: str) -> bool:
    if proj in ("q_proj", "k_proj", "v_proj"):
        return config.qkv_bias
    if proj == "o_proj":
        return config.o_bias
    return config.mlp_bias


def hf_tensors(params: Any, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) for every base parameter of `config` in `params` (a jaxrec tree;
    adapter leaves are ignored): the loader's table read backwards."""
    flat = traverse_util.flatten_dict(params)
    for src in leaf_sources(config):
        if src.path not in flat:
            raise KeyError(f"parameter {'/'.join(src.path)} (for {src.names[0]}) is missing")
        leaf = np.asarray(flat[src.path])
        for name, w in zip(src.names, leaf if src.stacked else [leaf]):
            yield name, np.ascontiguousarray(w.T if src.transpose else w)


def peft_tensors(params: Any, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, tensor) of every LoRA adapter in `params`, in the layout
    `peft.PeftModel` saves for a causal LM: `base_model.model.<module>.lora_A.weight`
    [r, in] and `.lora_B.weight` [out, r] (torch layout: jaxrec's A [in, r] and B [r, out]
    transposed), one pair per layer of each adapted projection."""
    flat = traverse_util.flatten_dict(params)
    for src in leaf_sources(config):
        parent = src.path[:-1]
        if src.path[-1] != "kernel" or parent + ("lora_a",) not in flat:
            continue
        a, b = np.asarray(flat[parent + ("lora_a",)]), np.asarray(flat[parent + ("lora_b",)])
        stems = [n[:-len(".weight")] for n in src.names]
        for i, stem in enumerate(stems):
            a_i, b_i = (a[i], b[i]) if src.stacked else (a, b)
            yield f"base_model.model.{stem}.lora_A.weight", np.ascontiguousarray(a_i.T)
            yield f"base_model.model.{stem}.lora_B.weight", np.ascontiguousarray(b_i.T)


def adapted_modules(config: LlamaConfig) -> list[str]:
    """The projection names (`q_proj`, …) that carry an adapter under `config.lora`, as
    PEFT's `target_modules` lists them."""
    if config.lora is None:
        return []
    return [proj for proj in _PROJECTIONS if config.lora.applies_to(proj)]
