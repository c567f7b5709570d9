"""Hugging Face tensor names ↔ jaxrec Llama parameter paths.

Torch linear weights are [out, in]; jaxrec kernels are [in, out], so they are
transposed. Per-layer tensors stack into one leaf with a leading `layers` axis
(the decoder is an `nn.scan`).
"""
from __future__ import annotations

import dataclasses

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
