"""A Llama-family causal LM in Flax linen (Llama 2/3, SmolLM2, Mistral-, Qwen2-style).

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, optional q/k/v biases,
tied or untied output embeddings, per-layer sliding windows. Layers are one `nn.scan`
(stacked parameters with a leading `layers` axis), so compile time does not grow with
depth. Every parameter carries logical axis names (`vocab, embed, heads, kv_heads, mlp,
lora_rank`), so data-parallel, FSDP or tensor-parallel is a mesh/rules choice only.

The call (see `Llama.__call__`) takes token ids *or* input embeddings (hybrid prompts
splice projected item embeddings into the sequence), an attention mask for padded
batches, an optional MoE-LoRA gate per example, and optionally a KV cache to extend or a
read-only shared prefix cache. Positions come from the mask (cumsum - 1), so left- and
right-padded rows give the same outputs as unpadded ones.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.models.llama_attention import KVCache, allowed_keys, apply_rope, attend  # noqa: F401 (KVCache re-export)
from jaxrec.models.llama_config import LlamaConfig, UnsupportedModelError  # noqa: F401  (re-export)
from jaxrec.models.lora import LoRADense, merge_trainable, split_trainable
from jaxrec.sharding import Layout, constrain


class LlamaOutput(struct.PyTreeNode):
    logits: jax.Array            # [B, T, vocab] float32, or [B, vocab] with logit_index
    hidden: jax.Array | None     # [B, T, d] final-normed hidden states (return_hidden=True)
    cache: KVCache | None        # the updated cache when one was passed


class _Context(struct.PyTreeNode):
    """Per-call attention bookkeeping shared (broadcast) by all layers."""

    q_positions: jax.Array          # [B, T]
    q_slots: jax.Array              # [T] slot of each query among the keys
    key_valid: jax.Array            # [B, S]
    key_positions: jax.Array        # [B, S]
    write_index: jax.Array | None   # cache slot of the first new token
    prefix_valid: jax.Array | None  # [Bp, P]
    prefix_positions: jax.Array | None


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _proj(cfg: LlamaConfig, name: str, features: int, axes, bias: bool, deterministic: bool) -> LoRADense:
    lora = cfg.lora if cfg.lora is not None and cfg.lora.applies_to(name) else None
    return LoRADense(features, axes, bias, lora, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                     deterministic, name=name)


class Attention(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, ctx: _Context, gates, cache_k, cache_v, prefix_k, prefix_v, window):
        cfg, det = self.config, self.deterministic
        B, T, _ = x.shape
        H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        tokens = _token_rows(x)
        q = _proj(cfg, "q_proj", H * hd, ("embed", "heads"), cfg.qkv_bias, det)(tokens, gates).reshape(B, T, H, hd)
        k = _proj(cfg, "k_proj", Hkv * hd, ("embed", "kv_heads"), cfg.qkv_bias, det)(tokens, gates)
        v = _proj(cfg, "v_proj", Hkv * hd, ("embed", "kv_heads"), cfg.qkv_bias, det)(tokens, gates)
        k, v = k.reshape(B, T, Hkv, hd), v.reshape(B, T, Hkv, hd)
        q = constrain(q, ("batch", "seq", "heads", "kv"))
        k = constrain(k, ("batch", "seq", "kv_heads", "kv"))
        v = constrain(v, ("batch", "seq", "kv_heads", "kv"))
        longest = ctx.key_valid.shape[1] + (0 if ctx.prefix_valid is None else ctx.prefix_valid.shape[1])
        inv_freq, factor = cfg.rope_frequencies(longest)
        q = apply_rope(q, ctx.q_positions, inv_freq, factor) * jnp.asarray(hd ** -0.5, q.dtype)
        k = apply_rope(k, ctx.q_positions, inv_freq, factor)

        new_kv = None
        if cache_k is not None:
            start = (0, ctx.write_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_kv = (k, v)
        key_slots = jnp.arange(ctx.key_valid.shape[1])
        mask = allowed_keys(ctx.q_positions, ctx.q_slots, ctx.key_valid, ctx.key_positions, key_slots, window)
        prefix = None
        if prefix_k is not None:
            rows = B // prefix_k.shape[0]
            p_valid = jnp.repeat(ctx.prefix_valid, rows, axis=0)
            p_pos = jnp.repeat(ctx.prefix_positions, rows, axis=0)
            p_slots = jnp.full((p_valid.shape[1],), -1)
            pmask = allowed_keys(ctx.q_positions, ctx.q_slots, p_valid, p_pos, p_slots, window)
            prefix = (prefix_k.astype(q.dtype), prefix_v.astype(q.dtype), pmask)
        # Without a cache or prefix, queries and keys are the same slots: causal by construction.
        block = cfg.attention_query_block if cache_k is None and prefix is None else 0
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, prefix, causal_block=block)
        out = constrain(out, ("batch", "seq", "heads", "kv")).reshape(B, T, H * hd)
        return _proj(cfg, "o_proj", cfg.hidden_size, ("heads", "embed"), cfg.o_bias, det)(out, gates), new_kv


class MLP(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, gates):
        cfg, det = self.config, self.deterministic
        tokens = _token_rows(x)
        gate = _proj(cfg, "gate_proj", cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, det)(tokens, gates)
        up = _proj(cfg, "up_proj", cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, det)(tokens, gates)
        h = constrain(_swiglu(gate, up).reshape(*x.shape[:-1], -1), ("batch", "seq", "mlp"))
        return _proj(cfg, "down_proj", cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, det)(h, gates)


def _token_rows(x):
    """[B, T, d] → [B·T, d] once for all projections that read x: each flattening its own copy
    made the backward pass keep (and the layer scan stack) one copy per projection."""
    return x.reshape(-1, x.shape[-1])


# Recomputed in the backward pass from its two inputs: autodiff would otherwise keep
# sigmoid(gate) and silu(gate) as well, two more [tokens, intermediate] arrays per layer that
# the layer scan stacks and XLA:CPU zero-fills (docs/llm.md, "Profile").
@partial(jax.checkpoint, prevent_cse=False)
def _swiglu(gate, up):
    return nn.silu(gate) * up


class DecoderLayer(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, layer_xs, ctx: _Context, gates):
        cfg = self.config
        cache_k, cache_v, prefix_k, prefix_v, window = layer_xs
        norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = RMSNorm(**norm, name="input_layernorm")(h)
        attn, new_kv = Attention(cfg, self.deterministic, name="self_attn")(
            x, ctx, gates, cache_k, cache_v, prefix_k, prefix_v, window)
        h = h + attn
        h = h + MLP(cfg, self.deterministic, name="mlp")(RMSNorm(**norm, name="post_attention_layernorm")(h), gates)
        return constrain(h, ("batch", "seq", "embed")), new_kv


class Llama(nn.Module):
    """Llama-family causal LM. Parameters: `embed_tokens` [vocab, d],
    `layers/...` stacked over layers, `norm/scale`, and `lm_head/kernel` [d, vocab] unless tied."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None,
                 lora_gates: jax.Array | None = None, cache: KVCache | None = None,
                 prefix: KVCache | None = None, logit_index: jax.Array | None = None,
                 return_hidden: bool = False, deterministic: bool = True) -> LlamaOutput:
        """Run the decoder.

        input_ids [B,T] int, or inputs_embeds [B,T,d] (exactly one).
        attention_mask [B,T]: 1 = real token, 0 = padding (left or right); default all ones.
        positions [B,T]: rotary positions; default = tokens already in `cache`/`prefix` +
            cumsum(attention_mask) - 1, which makes padding invisible.
        lora_gates [B,E]: MoE-LoRA expert weights per example (required iff the model's
            LoRA has E > 1 experts; None otherwise). Shared by every token and layer.
        cache: a `KVCache` to extend: the T new tokens are written at slots
            cache.index … cache.index+T-1 and attend to everything valid before them;
            the updated cache is returned in `.cache`.
        prefix: a read-only `KVCache` of Bp rows shared by B = Bp·R query rows
            (row b·R+j continues prefix row b): scores R continuations of each prompt
            without copying the prompt's keys/values. With `cache` too, each row's cache
            holds its own continuation after the shared prefix (beams decoding one token
            at a time after one shared prompt).
        logit_index [B]: compute logits only at this time index per row → [B, vocab].
        return_hidden: also return the final-normed hidden states [B,T,d].
        deterministic: False enables LoRA dropout (needs rngs={'dropout': key}).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B,T] or inputs_embeds [B,T,d]")
        table = self.param("embed_tokens", _embedding_init, (cfg.vocab_size, cfg.hidden_size),
                           jnp.dtype(cfg.param_dtype))
        if inputs_embeds is None:
            h = jnp.take(table, input_ids, axis=0).astype(dtype)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds must be [B,T,{cfg.hidden_size}], got {tuple(inputs_embeds.shape)}")
            h = inputs_embeds.astype(dtype)
        B, T = h.shape[:2]
        h = constrain(h, ("batch", "seq", "embed"))
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        gates = _check_gates(cfg, lora_gates, B)

        base = jnp.zeros((B,), jnp.int32)
        if prefix is not None:
            if B % prefix.batch_size:
                raise ValueError(f"batch {B} is not a multiple of the prefix batch {prefix.batch_size}")
            base = jnp.repeat(prefix.lengths(), B // prefix.batch_size)
        if cache is not None:
            base = base + cache.lengths()
        if positions is None:
            positions = jnp.maximum(base[:, None] + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        positions = positions.astype(jnp.int32)
        if cache is not None:
            idx = cache.index
            ctx = _Context(q_positions=positions, q_slots=idx + jnp.arange(T),
                           key_valid=jax.lax.dynamic_update_slice(cache.valid, mask, (0, idx)),
                           key_positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, idx)),
                           write_index=idx, prefix_valid=None if prefix is None else prefix.valid,
                           prefix_positions=None if prefix is None else prefix.positions)
        else:
            ctx = _Context(q_positions=positions, q_slots=jnp.arange(T), key_valid=mask, key_positions=positions,
                           write_index=None, prefix_valid=None if prefix is None else prefix.valid,
                           prefix_positions=None if prefix is None else prefix.positions)

        windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)
        layer_xs = (None if cache is None else cache.k, None if cache is None else cache.v,
                    None if prefix is None else prefix.k, None if prefix is None else prefix.v, windows)
        layer = nn.remat(DecoderLayer, prevent_cse=False) if cfg.remat else DecoderLayer
        if cfg.scan_layers:
            stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            h, new_kv = stack(cfg, deterministic, name="layers")(h, layer_xs, ctx, gates)
        else:
            kvs = []
            for i in range(cfg.num_layers):
                xs = tuple(None if x is None else x[i] for x in layer_xs)
                h, kv = layer(cfg, deterministic, name=f"layers_{i}")(h, xs, ctx, gates)
                kvs.append(kv)
            new_kv = None if cache is None else tuple(jnp.stack(parts) for parts in zip(*kvs))
        h = RMSNorm(cfg.rms_norm_eps, dtype, jnp.dtype(cfg.param_dtype), name="norm")(h)

        out_h = h
        if logit_index is not None:
            out_h = jnp.take_along_axis(h, logit_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
        if cfg.tie_word_embeddings:
            logits = jnp.dot(out_h, table.astype(dtype).T)
        else:
            logits = LoRADense(cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                               param_dtype=jnp.dtype(cfg.param_dtype), name="lm_head")(out_h)
        logits = logits.astype(jnp.float32)
        if logit_index is None:
            logits = constrain(logits, ("batch", "seq", "vocab"))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=ctx.key_valid, positions=ctx.key_positions,
                                index=cache.index + T)
        return LlamaOutput(logits=logits, hidden=h if return_hidden else None, cache=new_cache)


_embedding_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))


def _check_gates(cfg: LlamaConfig, gates, batch: int):
    experts = cfg.lora.num_experts if cfg.lora is not None else 0
    if experts > 1:
        if gates is None:
            raise ValueError(f"the model's MoE-LoRA has {experts} experts: pass lora_gates [batch, {experts}]")
        if gates.shape != (batch, experts):
            raise ValueError(f"lora_gates must have shape [{batch}, {experts}], got {tuple(gates.shape)}")
        return gates
    if gates is not None:
        raise ValueError("lora_gates given, but the model has no MoE-LoRA adapter (num_experts > 1)")
    return None


# ---------------------------------------------------------------------------------------
# Parameter helpers (pure; params are plain unboxed pytrees)
# ---------------------------------------------------------------------------------------
def embed_tokens(params: Any, input_ids: jax.Array, dtype: Any = None) -> jax.Array:
    """Look token ids up in the (frozen) embedding table: [B,T] → [B,T,d].

    Used to build hybrid prompts: embed the text, then splice projected item embeddings
    in at the placeholder positions and call the model with `inputs_embeds`.
    """
    table = nn.unbox(params["embed_tokens"])
    out = jnp.take(table, input_ids, axis=0)
    return out if dtype is None else out.astype(dtype)


def unstack_layers(model: Llama, params: Any) -> tuple[Llama, dict]:
    """The same model with one module per layer (`layers_0` … `layers_{L-1}`, `scan_layers=False`)
    and its parameters, each layer's weights a buffer of its own.

    Generation's decode loop uses it: in the scanned model every step slices each layer's
    weights out of the stacked arrays, and XLA:CPU copies each slice (over half of a decode
    step; docs/llm.md). Inside a jitted function the slicing here happens once per call."""
    params = nn.unbox(params)
    layers = params["layers"]
    flat = {k: v for k, v in params.items() if k != "layers"}
    for i in range(model.config.num_layers):
        flat[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    return Llama(dataclasses.replace(model.config, scan_layers=False)), flat


def output_table(params: Any, config: LlamaConfig) -> jax.Array:
    """The output embedding [vocab, d] (logits = hidden · tableᵀ): the input table when tied,
    the LM head's kernel transposed otherwise. For losses that never form the logits
    (`jaxrec.models.losses.lm_cross_entropy`)."""
    if config.tie_word_embeddings:
        return nn.unbox(params["embed_tokens"])
    return nn.unbox(params["lm_head"]["kernel"]).T


@partial(jax.jit, static_argnames=("model", "return_hidden", "deterministic"))
def forward(model: Llama, params: Any, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
            *, inputs_embeds: jax.Array | None = None, lora_gates: jax.Array | None = None,
            return_hidden: bool = False, deterministic: bool = True,
            dropout_rng: jax.Array | None = None) -> LlamaOutput:
    """Jitted full-sequence call of `model` (see `Llama.__call__` for the arguments).

    For training, call `model.apply` inside your own jitted step instead; this is the
    convenience entry point for inference, scoring and embedding extraction.
    """
    rngs = None if deterministic else {"dropout": dropout_rng}
    return model.apply({"params": params}, input_ids, attention_mask, inputs_embeds=inputs_embeds,
                       lora_gates=lora_gates, return_hidden=return_hidden, deterministic=deterministic, rngs=rngs)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the hidden states [B,T,d] over real tokens → [B,d] (e.g. item-text embeddings)."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)


def _dummy_call_kwargs(config: LlamaConfig) -> dict:
    kw = {"input_ids": jnp.zeros((1, 1), jnp.int32)}
    if config.lora is not None and config.lora.num_experts > 1:
        kw["lora_gates"] = jnp.ones((1, config.lora.num_experts), jnp.float32) / config.lora.num_experts
    return kw


def abstract_params(model: Llama) -> Any:
    """Shapes/dtypes of the parameters, with their logical-axis boxes (no allocation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_call_kwargs(model.config))["params"])


def param_shardings(model: Llama, layout: Layout) -> Any:
    """NamedSharding tree matching the (unboxed) parameters, from the layout's rules.

    A mesh axis that does not divide a dimension (3 KV heads on tensor=2, a vocabulary
    of 49152 on 5 devices) is dropped from that dimension (`jaxrec.sharding.fit_spec`).
    """
    return layout.shardings(abstract_params(model))


def init_params(model: Llama, rng: jax.Array) -> Any:
    """Random parameters (unboxed), e.g. for tests; real weights come from jaxrec.weights."""
    kwargs = _dummy_call_kwargs(model.config)
    return nn.unbox(jax.jit(lambda key: model.init(key, **kwargs)["params"])(rng))


def init_adapters(model: Llama, params: Any, rng: jax.Array, shardings: Any = None) -> Any:
    """Add freshly initialised adapter parameters (per `model.config.lora`) to `params`.

    Only the adapter leaves are computed (the base initialisers are dead code that XLA
    drops), so this is cheap even for a 7B base. Existing adapter leaves are replaced.
    `shardings`: optional NamedSharding tree of the full model (see `param_shardings`).
    """
    if model.config.lora is None:
        raise ValueError("model.config.lora is None: set a LoraConfig (config.with_lora(...)) first")

    def adapters(key):
        return split_trainable(init_params(model, key))[0]

    out_shardings = None
    if shardings is not None:
        out_shardings = split_trainable(shardings)[0]
    new = jax.jit(adapters, out_shardings=out_shardings)(rng)
    _, base = split_trainable(params)
    return merge_trainable(new, base)
