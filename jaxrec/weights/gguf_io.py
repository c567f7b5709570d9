"""Reading llama.cpp GGUF files as if they were Hugging Face checkpoints.

The file is memory-mapped and its header parsed by `gguf_file.GGUFFile` (`gguf.GGUFReader`
spends seconds on the tokenizer's metadata strings); each tensor is dequantized on demand
(`gguf.quants.dequantize`: Q4_0/Q4_1/Q8_0/K-quants/F16/BF16 …) to float32 in the
Hugging Face layout and name. Two llama.cpp conventions are undone:

- Llama/Mistral q and k rows are permuted so that rotary pairs are interleaved
  (llama.cpp's rope kernel); Hugging Face pairs dimension i with i + head_dim/2.
- Llama 3 rope scaling is stored as per-frequency divisors (`rope_freqs.weight`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.weights.errors import CheckpointFormatError, CheckpointNotFoundError, UnsupportedModelError
from jaxrec.weights.gguf_file import GGUFFile, GGUFFormatError

_ARCHES = ("llama", "mistral", "qwen2")   # qwen2 uses NeoX-style rope: no row permutation
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a llama.cpp tensor name, or None for tensors without one."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER:
        part = _LAYER[m.group(2)]
        suffix = "weight" if part.endswith("layernorm") else m.group(3)
        return f"model.layers.{m.group(1)}.{part}.{suffix}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows (pairs interleaved) →
    (first halves, then second halves). Works on [rows, cols] and on biases [rows]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face → GGUF); used to write test files."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """Tensors of a GGUF file under Hugging Face names, plus an HF-style config dict."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(f"{self.path}: GGUF file not found")
        try:
            self._file = GGUFFile(self.path)
        except (GGUFFormatError, ValueError) as e:
            raise CheckpointFormatError(f"{self.path}: not a readable GGUF file ({e})") from None
        self._dequantize = gguf.quants.dequantize
        self._tensors = self._file.tensors
        self.arch = self._field("general.architecture")
        if self.arch not in _ARCHES:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported; supported: {', '.join(_ARCHES)}")
        self._by_hf = {}
        for name in self._tensors:
            mapped = hf_name(name)
            if mapped is not None:
                self._by_hf[mapped] = name
        self._config = self._build_config()

    @property
    def source(self) -> str:
        return str(self.path)

    def _field(self, key: str, default: Any = None) -> Any:
        return self._file.field(key, default)

    def _build_config(self) -> dict[str, Any]:
        a = self.arch

        def need(key):
            value = self._field(f"{a}.{key}")
            if value is None:
                raise CheckpointFormatError(f"{self.path}: metadata key {a}.{key} is missing")
            return value

        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        kv_heads = self._field(f"{a}.attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            if len(set(kv_heads)) != 1:
                raise UnsupportedModelError(f"{self.path}: per-layer kv head counts {kv_heads} are not supported")
            kv_heads = kv_heads[0]
        vocab = self._field(f"{a}.vocab_size")
        if not vocab and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])   # ggml order: [embed, vocab]
        if not vocab:
            raise CheckpointFormatError(f"{self.path}: no {a}.vocab_size and no token_embd.weight tensor")
        rope: dict[str, Any] = {"rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)), "rope_type": "default"}
        kind = self._field(f"{a}.rope.scaling.type")
        if kind in ("linear", "yarn"):
            rope.update(rope_type=kind, factor=float(self._field(f"{a}.rope.scaling.factor")))
            orig = self._field(f"{a}.rope.scaling.original_context_length")
            if orig:
                rope["original_max_position_embeddings"] = int(orig)
        elif kind not in (None, "none"):
            raise UnsupportedModelError(f"{self.path}: rope scaling type {kind!r} is not supported")
        if "rope_freqs.weight" in self._tensors:
            factors = self._dequantize(self._tensors["rope_freqs.weight"].data,
                                       self._tensors["rope_freqs.weight"].tensor_type)
            rope = {"rope_theta": rope["rope_theta"], "rope_type": "freq_factors",
                    "factors": tuple(float(x) for x in np.ravel(factors))}
        return {
            "model_type": "qwen2" if a == "qwen2" else "llama",
            "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": int(kv_heads),
            "intermediate_size": int(need("feed_forward_length")), "num_hidden_layers": int(need("block_count")),
            "head_dim": int(self._field(f"{a}.attention.key_length") or hidden // heads),
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(self._field(f"{a}.context_length", 2048)),
            "vocab_size": int(vocab), "rope_parameters": rope, "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        # ggml lists dimensions innermost first; Hugging Face/numpy order is the reverse.
        return {hf: tuple(int(d) for d in reversed(self._tensors[g].shape)) for hf, g in self._by_hf.items()}

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[self._by_hf[name]]
        w = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if self.arch in ("llama", "mistral"):
            if ".self_attn.q_proj." in name:
                w = unpermute_rows(w, self._config["num_attention_heads"])
            elif ".self_attn.k_proj." in name:
                w = unpermute_rows(w, self._config["num_key_value_heads"])
        return w
