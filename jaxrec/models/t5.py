"""A T5 encoder–decoder (v1.0 / v1.1) in Flax linen, logit-equal to transformers' T5.

Architecture, as transformers' `T5ForConditionalGeneration` computes it:

- one shared token embedding `shared` [vocab, d] for encoder and decoder inputs;
- per stack: embedding dropout, N pre-norm blocks, a final T5 layer norm, dropout;
- blocks: self-attention (+ cross-attention in the decoder) and a ReLU or gated-GELU
  feed-forward, each sub-layer `h + dropout(f(norm(h)))` (layers in `t5_layers`);
- attention logits are not scaled by d_kv^-1/2; a bucketed relative position bias
  (a table [32 buckets, heads] per stack, bidirectional in the encoder, causal in the
  decoder) is computed once per stack and added in every layer; cross-attention has
  none;
- output: tied embeddings with the decoder output rescaled by d_model^-1/2 (T5 v1.0,
  LETTER/TIGER), or an untied `lm_head` without rescaling (T5 v1.1).

Layers are one `nn.scan` per stack (parameters stacked on a leading `layers` axis). All
parameters carry logical axis names (`vocab, embed, heads, kv, mlp`) and the large
activations are constrained with `jaxrec.sharding.constrain`, so a `Layout` decides the
data/FSDP/tensor parallelism.

Calls (`model.apply(variables, ..., method=...)`):
- `encode(input_ids | inputs_embeds, attention_mask)` → encoder states [B, T, d];
- `decode(encoder_hidden, encoder_mask, decoder_input_ids | decoder_inputs_embeds)` →
  logits [B·W, S, vocab] by teacher forcing (causal). Decoder row b·W+j reads encoder
  row b, so W beams per user share one encoder output, whose cross-attention
  keys/values are computed once per user; with `past` (a self-attention cache,
  `empty_cache` to start) it decodes incrementally: only the new positions are computed;
- `__call__` = encode + decode; `embed(ids)` = the shared table lookup.

transformers-5 quirk: its `T5Config` forces `tie_word_embeddings=True` and keeps the
checkpoint's value as `scale_decoder_outputs`; `T5Config.from_hf` reads the latter.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models.t5_layers import T5Stack, activation_name
from jaxrec.sharding import constrain


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes and switches of a T5 model (names as in transformers' `T5Config`).

    `tie_word_embeddings`: True = logits from the shared table with the decoder output
    scaled by d_model^-1/2; False = a separate `lm_head`, no scaling. `dtype` is the
    compute dtype; parameters are float32.
    """

    vocab_size: int
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 8
    num_layers: int = 6
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_decoder_layers is None:      # transformers' default: symmetric stacks
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        activation_name(self.feed_forward_proj)  # validates
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4")

    @classmethod
    def letter(cls, vocab_size: int, **overrides) -> "T5Config":
        """LETTER's (TIGER-style) generator: d_model 128, 4 + 4 layers, 6 heads × d_kv 64,
        d_ff 1024, dropout 0.1, ReLU, tied embeddings (its config.json leaves
        `tie_word_embeddings` at transformers' default, True). CoFiRec's own sizes are
        not published; jaxrec uses these."""
        kw = dict(vocab_size=vocab_size, d_model=128, d_kv=64, d_ff=1024, num_heads=6, num_layers=4,
                  num_decoder_layers=4, dropout_rate=0.1, feed_forward_proj="relu", tie_word_embeddings=True)
        return cls(**{**kw, **overrides})

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "T5Config":
        """From a transformers `T5Config` object or a `config.json` dict."""
        get = hf.get if isinstance(hf, Mapping) else lambda k, d=None: getattr(hf, k, d)
        tie = get("scale_decoder_outputs", None)   # transformers >= 5 keeps the real flag here
        if tie is None:
            tie = get("tie_word_embeddings", True)
        kw = dict(vocab_size=get("vocab_size"), d_model=get("d_model"), d_kv=get("d_kv"), d_ff=get("d_ff"),
                  num_heads=get("num_heads"), num_layers=get("num_layers"),
                  num_decoder_layers=get("num_decoder_layers"),
                  relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
                  relative_attention_max_distance=get("relative_attention_max_distance", 128),
                  dropout_rate=get("dropout_rate", 0.1), layer_norm_epsilon=get("layer_norm_epsilon", 1e-6),
                  feed_forward_proj=get("feed_forward_proj", "relu"), tie_word_embeddings=bool(tie))
        return cls(**{**kw, **overrides})


class T5(nn.Module):
    """T5ForConditionalGeneration. Parameters: `shared` [vocab, d], `encoder/...`,
    `decoder/...` (see `T5Stack`), and `lm_head/kernel` [d, vocab] when untied."""

    config: T5Config

    def setup(self):
        cfg = self.config
        # transformers' init: shared and lm_head ~ N(0, 1) (factor 1).
        self.shared = self.param("shared", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                        ("vocab", "embed")),
                                 (cfg.vocab_size, cfg.d_model), jnp.float32)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                                    param_dtype=jnp.float32,
                                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                             ("embed", "vocab")))

    def embed(self, ids: jax.Array) -> jax.Array:
        """Rows of the shared table: [...] int → [..., d] (to build custom input embeddings)."""
        return jnp.take(self.shared, ids, axis=0).astype(jnp.dtype(self.config.dtype))

    def _inputs(self, ids, embeds, what: str) -> jax.Array:
        if (ids is None) == (embeds is None):
            raise ValueError(f"pass exactly one of {what}_ids [B,T] or {what}s_embeds [B,T,d]")
        if embeds is None:
            return self.embed(ids)
        if embeds.ndim != 3 or embeds.shape[-1] != self.config.d_model:
            raise ValueError(f"{what}s_embeds must be [B,T,{self.config.d_model}], got {tuple(embeds.shape)}")
        return embeds.astype(jnp.dtype(self.config.dtype))

    def encode(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """input_ids [B, T] or inputs_embeds [B, T, d]; attention_mask [B, T] (1 = real,
        0 = padding; default all real). Returns the encoder states [B, T, d] (padded rows
        hold values that `decode` masks out)."""
        h = self._inputs(input_ids, inputs_embeds, "input")
        return self.encoder(h, attention_mask, deterministic=deterministic)

    def decode(self, encoder_hidden: jax.Array, encoder_mask: jax.Array | None = None,
               decoder_input_ids: jax.Array | None = None, *, decoder_inputs_embeds: jax.Array | None = None,
               past: tuple[jax.Array, jax.Array] | None = None, deterministic: bool = True):
        """Teacher-forced decoder logits.

        encoder_hidden [B, T, d] and encoder_mask [B, T] from `encode`;
        decoder_input_ids [B·W, S] (or decoder_inputs_embeds [B·W, S, d]), already shifted
        right (start token first). Row b·W+j attends to encoder row b; W = 1 is ordinary
        teacher forcing. The decoder's self-attention is causal only, so right-padded
        targets need no mask. Returns float32 logits [B·W, S, vocab].

        `past` = (keys, values) [decoder layers, B·W, t, heads, d_kv], the self-attention
        cache of t positions decoded before (`empty_cache` for t = 0): the inputs continue
        them at positions t .. t+S-1 and the call returns (logits, the cache extended by S).
        """
        cfg = self.config
        h = self._inputs(decoder_input_ids, decoder_inputs_embeds, "decoder_input")
        if h.shape[0] % encoder_hidden.shape[0]:
            raise ValueError(f"decoder batch {h.shape[0]} is not a multiple of the encoder batch "
                             f"{encoder_hidden.shape[0]}")
        h = self.decoder(h, None, encoder_hidden.astype(h.dtype), encoder_mask, past=past,
                         deterministic=deterministic)
        if past is not None:
            h, present = h
        if cfg.tie_word_embeddings:
            h = h * jnp.asarray(cfg.d_model ** -0.5, h.dtype)   # T5 v1.0 rescale before the tied head
            logits = jnp.einsum("bsd,vd->bsv", h, self.shared.astype(h.dtype))
        else:
            logits = self.lm_head(h)
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits if past is None else (logits, present)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 decoder_input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 decoder_inputs_embeds: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """encode + decode: logits [B·W, S, vocab] (see `decode`)."""
        enc = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds, deterministic=deterministic)
        return self.decode(enc, attention_mask, decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds,
                           deterministic=deterministic)


def empty_cache(config: T5Config, rows: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """The decoder's self-attention cache before the first position: (keys, values), each
    [decoder layers, rows, 0, heads, d_kv] (see `T5.decode`'s `past`)."""
    shape = (config.num_decoder_layers, rows, 0, config.num_heads, config.d_kv)
    dtype = jnp.dtype(dtype or config.dtype)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------
def _init(model: T5, rng: jax.Array) -> Any:
    ids = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, ids, None, ids)["params"]


def abstract_params(model: T5) -> Any:
    """Shapes/dtypes of the parameters with their logical-axis boxes (for `Layout.shardings`)."""
    return jax.eval_shape(lambda: _init(model, jax.random.key(0)))


def init_params(model: T5, rng: jax.Array, shardings: Any = None) -> Any:
    """Random (unboxed) parameters, created directly with `shardings` when given."""
    return nn.unbox(jax.jit(lambda key: nn.unbox(_init(model, key)), out_shardings=shardings)(rng))


def _torch_linear(w: np.ndarray) -> np.ndarray:
    return np.asarray(w, np.float32).T        # torch Linear [out, in] → flax kernel [in, out]


def params_from_torch_state(state: Mapping[str, np.ndarray], config: T5Config) -> dict:
    """Map a transformers T5ForConditionalGeneration state dict (names → numpy arrays, e.g.
    from `safetensors.numpy.load_file` or `{k: v.numpy() for k, v in model.state_dict()}`)
    to this module's (unboxed, float32) parameters.

    Known aliases are ignored: `encoder/decoder.embed_tokens.weight` (copies of
    `shared.weight`), `lm_head.weight` when the config is tied, and the unused
    `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` of old
    checkpoints. Any other unused or missing key raises (a config/checkpoint mismatch).
    """
    cfg = config
    H, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    _, gated = activation_name(cfg.feed_forward_proj)
    used: set[str] = set()

    def get(name):
        if name not in state:
            raise KeyError(f"{name!r} is missing from the T5 state dict")
        used.add(name)
        return np.asarray(state[name], np.float32)

    def attention(prefix):
        qkv = {n: _torch_linear(get(f"{prefix}.{n}.weight")).reshape(d, H, dk) for n in "qkv"}
        qkv["o"] = _torch_linear(get(f"{prefix}.o.weight")).reshape(H, dk, d)
        return {n: {"kernel": w} for n, w in qkv.items()}

    def feed_forward(prefix):
        names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
        return {n: {"kernel": _torch_linear(get(f"{prefix}.DenseReluDense.{n}.weight"))} for n in names}

    def stack(kind: str, depth: int) -> dict:
        decoder = kind == "decoder"
        layers = []
        for i in range(depth):
            p = f"{kind}.block.{i}.layer"
            ff = 2 if decoder else 1
            layer = {"self_attn_norm": {"scale": get(f"{p}.0.layer_norm.weight")},
                     "self_attn": attention(f"{p}.0.SelfAttention"),
                     "mlp_norm": {"scale": get(f"{p}.{ff}.layer_norm.weight")},
                     "mlp": feed_forward(f"{p}.{ff}")}
            if decoder:
                layer["cross_attn_norm"] = {"scale": get(f"{p}.1.layer_norm.weight")}
                layer["cross_attn"] = attention(f"{p}.1.EncDecAttention")
            layers.append(layer)
        return {"relative_attention_bias": get(f"{kind}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
                "final_layer_norm": {"scale": get(f"{kind}.final_layer_norm.weight")}}

    params = {"shared": get("shared.weight"), "encoder": stack("encoder", cfg.num_layers),
              "decoder": stack("decoder", cfg.num_decoder_layers)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": _torch_linear(get("lm_head.weight"))}
    want = nn.unbox(abstract_params(T5(cfg)))
    if jax.tree.structure(want) != jax.tree.structure(params):
        raise ValueError(f"T5 state dict does not give the parameter tree of {cfg}")
    for (path, w), got in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(params)):
        if tuple(w.shape) != got.shape:   # e.g. d_ff or vocab differs from the config
            raise ValueError(f"{jax.tree_util.keystr(path)}: the state dict gives shape {got.shape}, "
                             f"the config wants {tuple(w.shape)}")
    ignorable = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                 "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
    unused = sorted(set(state) - used - ignorable)
    if unused:
        raise ValueError(f"T5 state dict entries not used by {cfg}: {unused[:8]}{' …' if len(unused) > 8 else ''}")
    return params
