"""Configuration of the Llama-family decoder, read from a Hugging Face `config.json` dict.

One frozen, hashable dataclass covers Llama 2/3, SmolLM/SmolLM2, Mistral-style and
Qwen2-style checkpoints; the differences between them are a handful of switches (q/k/v
biases, tied output embeddings, sliding windows, rope scaling). Being hashable matters:
the model (and so this config) is a static argument of every jitted function.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from jaxrec.models.lora import LoraConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# "freq_factors" is llama.cpp's form of Llama 3 scaling: per-frequency divisors stored
# in the GGUF file (`rope_freqs.weight`) instead of the four llama3 parameters.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "freq_factors")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture or options the decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and switches of a Llama-family causal LM.

    `dtype` is the compute dtype (activations, matmul inputs, KV cache); `param_dtype` is
    the dtype of the frozen base weights. LoRA adapters always keep float32 parameters.
    `layer_windows` holds one sliding-window length per layer (0 = full attention), or is
    empty when no layer uses a window. `attention_query_block` > 0 runs full-sequence causal
    attention (training, scoring without a cache) in query blocks of that many rows, each
    scored against the keys it can see; 0 scores the whole square (docs/llm.md, "Profile").
    `scan_layers=False` makes each layer a module of its own (`layers_0`, …) instead of one
    scan over stacked parameters: generation's decode loop runs that way (`unstack_layers`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    layer_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoraConfig | None = None
    remat: bool = False
    attention_query_block: int = 128
    scan_layers: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in FLOAT_DTYPES:
                raise ValueError(f"{key}={getattr(self, key)!r} must be one of {FLOAT_DTYPES}")
        if self.attention_query_block < 0:
            raise ValueError(f"attention_query_block={self.attention_query_block} must be >= 0 (0 = no blocks)")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise UnsupportedModelError(
                f"{len(self.layer_windows)} sliding windows given for {self.num_layers} layers")

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    def with_lora(self, lora: LoraConfig | None) -> "LlamaConfig":
        return dataclasses.replace(self, lora=lora)

    def with_dtypes(self, dtype: str | None = None, param_dtype: str | None = None) -> "LlamaConfig":
        return dataclasses.replace(self, dtype=dtype or self.dtype, param_dtype=param_dtype or self.param_dtype)

    # ----------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json", **overrides) -> "LlamaConfig":
        """Build from a Hugging Face config dict (transformers 4 or 5 layout).

        `source` names the file in error messages; `overrides` replace fields (dtype,
        param_dtype, lora, remat).
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = d.get("architectures")
            raise UnsupportedModelError(
                f"{source}: model_type={model_type!r} (architectures={arch}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

        def need(key):
            if d.get(key) is None:
                raise UnsupportedModelError(f"{source}: missing required key {key!r}")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"{source}: hidden_act={act!r} is not supported (only silu)")
        if d.get("pretraining_tp", 1) not in (None, 1):
            raise UnsupportedModelError(f"{source}: pretraining_tp={d['pretraining_tp']} is not supported")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        head_dim = d.get("head_dim") or hidden // heads

        rope = _rope_parameters(d, source)
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias") or False)
            mlp_bias = bool(d.get("mlp_bias") or False)

        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        fields = dict(
            vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=num_layers,
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(rope.pop("rope_theta")),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            layer_windows=_layer_windows(d, model_type, num_layers, source),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of an equivalent Hugging Face checkpoint (for export)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **dict(self.rope_scaling)}
        d = {
            "architectures": [arch[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.layer_windows and self.model_type == "mistral":
            d["sliding_window"] = self.layer_windows[0]
        return d

    # ----------------------------------------------------------------------------------
    def rope_frequencies(self, max_length: int | None = None) -> tuple[np.ndarray, float]:
        """Inverse frequencies [head_dim/2] and the cos/sin scale ("attention factor").

        Follows the rope types of Hugging Face's rope utilities. `dynamic` (NTK) scaling
        only changes anything past the original context; that regime is refused rather
        than silently approximated.
        """
        p = dict(self.rope_scaling)
        kind = p.get("rope_type", "default")
        dim = self.head_dim
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        base = self.rope_theta
        inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        if kind == "default":
            return inv.astype(np.float32), 1.0
        if kind == "linear":
            return (inv / p["factor"]).astype(np.float32), 1.0
        if kind == "dynamic":
            orig = p.get("original_max_position_embeddings", self.max_position_embeddings)
            if max_length is not None and max_length > orig:
                raise UnsupportedModelError(
                    f"dynamic rope scaling past the original context ({max_length} > {orig}) is not supported")
            return inv.astype(np.float32), 1.0
        if kind == "llama3":
            return _llama3_frequencies(inv, p), 1.0
        if kind == "freq_factors":
            return (inv / np.asarray(p["factors"], np.float64)).astype(np.float32), 1.0
        if kind == "yarn":
            return _yarn_frequencies(dim, base, p, self.max_position_embeddings)
        raise UnsupportedModelError(f"rope_type={kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def _rope_parameters(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    # transformers 5 keeps theta and scaling together in `rope_parameters`; older files
    # have `rope_theta` plus an optional `rope_scaling` dict using "type" or "rope_type".
    rope = dict(d.get("rope_parameters") or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = d.get("rope_theta", 10000.0)
    rope.update(d.get("rope_scaling") or {})
    kind = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or kind or "default"
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope_type={rope['rope_type']!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope["rope_type"] in ("llama3", "yarn") and "original_max_position_embeddings" not in rope:
        rope["original_max_position_embeddings"] = d.get("max_position_embeddings")
    rope = {k: v for k, v in rope.items() if v is not None}
    if rope["rope_type"] == "default":
        rope = {"rope_theta": rope["rope_theta"], "rope_type": "default"}
    return rope


def _layer_windows(d: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> tuple[int, ...]:
    window = d.get("sliding_window")
    if model_type == "mistral":
        return (int(window),) * num_layers if window else ()
    if model_type == "qwen2" and d.get("use_sliding_window"):
        kinds = d.get("layer_types")
        if kinds is None:
            first_full = int(d.get("max_window_layers", num_layers))
            kinds = ["sliding_attention" if i >= first_full else "full_attention" for i in range(num_layers)]
        if len(kinds) != num_layers:
            raise UnsupportedModelError(f"{source}: layer_types has {len(kinds)} entries for {num_layers} layers")
        return tuple(int(window) if k == "sliding_attention" else 0 for k in kinds)
    return ()


def _llama3_frequencies(inv: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_frequencies(dim: int, base: float, p: Mapping[str, Any], max_pos: int) -> tuple[np.ndarray, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    inv = interpolation * (1 - keep) + extrapolation * keep
    return inv.astype(np.float32), float(attention_factor)
