"""Small building blocks shared by the sequential models.

Initialisation follows PyTorch, because the reference implementations (SASRec.pytorch,
CaseQ) call `xavier_normal_` on every parameter with at least two dimensions and keep
torch's defaults for the rest. Torch and Flax disagree on fans for packed or >2-D
weights, so every initializer here takes its fans explicitly:
std = sqrt(2 / (fan_in + fan_out)) with torch's fans for the *torch-shaped* weight.

Dropout uses a counter-based hash instead of `jax.random.bernoulli`. On CPU, threefry
(and XLA's RngBitGenerator behind "rbg"/"unsafe_rbg") generates bits slower than the
layer's matmuls consume them; hashing the element index with a per-call seed is a few
integer ops fused into the consumer (`scripts/bench_step.py --dropout-mask jax`
measures the difference). Because the mask depends on the *global* element index, a
sharded activation draws exactly the mask it would draw on one device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]


def torch_xavier_normal(fan_in: int, fan_out: int) -> Initializer:
    """`torch.nn.init.xavier_normal_` for a weight whose torch fans are given."""
    return nn.initializers.normal(stddev=math.sqrt(2.0 / (fan_in + fan_out)))


def torch_uniform(fan_in: int) -> Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default init of Linear/Conv/GRU biases, and of
    Linear weights (kaiming-uniform with a=sqrt(5) reduces to the same bound)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def logical(init: Initializer, names: Sequence[str | None]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(names))


def dense_weights(module: nn.Module, in_shape: tuple[int, ...], features: tuple[int, ...],
                  axes: Sequence[str | None], kernel_init: Initializer | None, bias_init: Initializer,
                  use_bias: bool, param_dtype: Dtype) -> tuple[jax.Array, jax.Array | None]:
    """Declare `kernel` [*in_shape, *features] and `bias` [*features] on `module`.

    `axes` names the kernel's axes (inputs first); the bias takes the output names.
    `kernel_init` defaults to torch's xavier-normal of the equivalent [out, in] weight.
    """
    fan_in, fan_out = math.prod(in_shape), math.prod(features)
    init = kernel_init or torch_xavier_normal(fan_in, fan_out)
    kernel = module.param("kernel", logical(init, axes), tuple(in_shape) + tuple(features), param_dtype)
    bias = None
    if use_bias:
        bias = module.param("bias", logical(bias_init, axes[len(in_shape):]), tuple(features), param_dtype)
    return kernel, bias


class LinearWeights(nn.Module):
    """Just the (kernel, bias) of a dense layer, cast to `dtype`, for layers that slice
    their weights (per-head attention) instead of applying them whole."""
    in_shape: tuple[int, ...]
    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel, bias = dense_weights(self, tuple(self.in_shape), tuple(self.features), self.axes, self.kernel_init,
                                     self.bias_init, self.use_bias, self.param_dtype)
        return kernel.astype(self.dtype), None if bias is None else bias.astype(self.dtype)


class Linear(nn.Module):
    """y = x @ W + b, contracting the last axis of x into `features`."""
    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        kernel, bias = dense_weights(self, x.shape[-1:], features, self.axes, self.kernel_init, self.bias_init,
                                     self.use_bias, self.param_dtype)
        y = matmul_rows(x.astype(self.dtype), kernel.reshape(x.shape[-1], -1).astype(self.dtype),
                        None if bias is None else bias.reshape(-1).astype(self.dtype))
        return y.reshape(x.shape[:-1] + features)


def matmul_rows(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., K] @ w [K, N] (+ b [N]) as one 2-D matmul over the flattened rows.

    With [B, L, K] operands XLA:CPU canonicalises the weight-gradient dot (contracting
    B and L) by physically transposing the activation, which cost more than the
    matmul itself; on [B*L, K] it contracts the rows in place. The bias is added
    before the reshape so its gradient is a 1-axis column sum (a 2-axis reduction
    of the 3-D array ran ~5x slower).
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w)
    if b is not None:
        y = y + b
    return y.reshape(x.shape[:-1] + w.shape[1:])


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the hidden axis; statistics in float32 whatever the compute dtype."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=logical(nn.initializers.ones_init(), ("embed",)),
                        bias_init=logical(nn.initializers.zeros_init(), ("embed",)))


# ---------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------

def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(seed: jax.Array, shape: Sequence[int], within: Sequence[int] | None = None,
              start: Sequence[int] | None = None) -> jax.Array:
    """uint32 pseudo-random bits, a pure function of (seed[2], element index).

    Two finaliser rounds keyed by the two seed words: elements of one call are
    independent-looking; calls with different seeds are decorrelated even where their
    index ranges overlap (the second key enters after the first mix). Not a
    cryptographic generator; good enough for dropout masks, not for sampling data.

    With `within` (a larger shape) and `start` (an offset into it), the bits are those of
    the window `shape` at `start` of a call on the whole `within`, so a computation done in
    blocks draws exactly the mask of the unblocked one.
    """
    within = tuple(shape) if within is None else tuple(within)
    size = math.prod(within)
    if size >= 2**32:
        raise ValueError(f"hash_bits: {size} elements exceed the 32-bit counter")
    seed = seed.astype(jnp.uint32)
    start = (0,) * len(within) if start is None else tuple(start)
    if within == tuple(shape) and not any(start):      # the whole array: one counter
        idx = lax.iota(jnp.uint32, size).reshape(tuple(shape))
    else:
        idx = jnp.zeros(tuple(shape), jnp.uint32)
        for axis, (offset, extent) in enumerate(zip(start, within)):   # row-major flat index
            idx = idx * jnp.uint32(extent) + (lax.broadcasted_iota(jnp.uint32, tuple(shape), axis)
                                              + jnp.uint32(offset))
    return _fmix32(_fmix32(idx ^ seed[0]) + seed[1])


def hash_dropout(x: jax.Array, rate: float, seed: jax.Array, within: Sequence[int] | None = None,
                 start: Sequence[int] | None = None) -> jax.Array:
    """Inverted dropout with a `hash_bits` mask: keep probability 1 - rate (to 2^-32).
    `within`/`start`: x is a window of a larger array (see `hash_bits`)."""
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    # XLA re-hashes inside each consumer fusion (forward and backward) instead of storing
    # the mask (XLA:CPU drops optimization barriers before fusion); a few integer ops.
    keep = hash_bits(seed, x.shape, within, start) >= threshold
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def key_seed(key: jax.Array) -> jax.Array:
    """Two uint32 words from a JAX key's raw data (any PRNG impl).

    flax's `make_rng` already hashes the module path and call count into the key, so
    its raw words serve as the seed directly; drawing bits from it would add one more
    threefry per dropout site to every train step (and to its compile time).
    """
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    seed = words[:2]
    for i in range(2, words.shape[0], 2):
        # rbg keys repeat their words, so mix rather than xor them in.
        seed = _fmix32(seed ^ _fmix32(words[i:i + 2] + jnp.uint32(i)))
    return seed


class Dropout(nn.Module):
    """Dropout drawing its mask from `hash_bits`, seeded from the 'dropout' RNG stream,
    so masks are reproducible from the key passed to `apply(..., rngs={"dropout": key})`."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return hash_dropout(x, self.rate, self.seed())

    def seed(self) -> jax.Array:
        """The mask seed one `__call__` would use (and advances the stream as it would), for
        callers that apply one mask in windows (`hash_dropout(..., within, start)`)."""
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")
        return key_seed(self.make_rng("dropout"))


def zero_pads(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Zero the positions where `valid` [B, L] is False (x is [B, L, H])."""
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def query_blocks(n_queries: int, block: int) -> list[tuple[int, int]]:
    """[q0, q1) query ranges of at most `block` (0: one range). Causal attention over blocks
    skips the future keys of each block (SASRec, the Llama decoder): at L = 200 and blocks of
    64 the score work (dots, masking, softmax, dropout and their backward) is 65% of the full
    square; at 512 tokens and blocks of 128, 5/8."""
    if block <= 0 or n_queries <= block:
        return [(0, n_queries)]
    return [(q0, min(q0 + block, n_queries)) for q0 in range(0, n_queries, block)]
