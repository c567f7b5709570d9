"""GRU4Rec's recurrent unit: one GRU(H, H) scanned over a left-padded sequence.

Gates follow torch.nn.GRU exactly (order r, z, n; both biases), so torch weights map
one to one: kernel_ih[:, g, :] = weight_ih[g*H:(g+1)*H, :].T (same for hh):

    r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
    z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
    h' = (1 - z) * n + z * h

Padding. The reference (CaseQ) rolls each row so the valid items come first, runs the
GRU from h0 = 0 and rolls back. Since left pads are a contiguous prefix, that equals
scanning in place while *holding the carry* wherever the input is a pad (it stays 0
through the prefix); pad outputs are zeroed. No roll, no per-row gather.

The input projection for all steps is one [B*L, H] x [H, 3H] matmul outside the scan;
the scan body is only the recurrent [B, H] x [H, 3H] product and the gate arithmetic.

Init (torch): both kernels xavier-normal of the [3H, H] weight, std sqrt(1/(2H));
both biases U(+-1/sqrt(H)).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.models.layers import logical, matmul_rows, torch_uniform, torch_xavier_normal


class GRULayer(nn.Module):
    """One GRU unit; call as `(x [B,L,H], valid [B,L], deterministic, last_only)`.

    `deterministic` is accepted for the unit contract (a single GRU has no dropout).
    `last_only=True` returns the final state as [B, 1, H] (the full output's last row).
    """
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, deterministic: bool = True,
                 last_only: bool = False) -> jax.Array:
        H = self.hidden
        w_init = logical(torch_xavier_normal(H, 3 * H), ("embed", None, "mlp"))
        b_init = logical(torch_uniform(H), (None, "mlp"))
        w_ih = self.param("kernel_ih", w_init, (x.shape[-1], 3, H), self.param_dtype).astype(self.dtype)
        w_hh = self.param("kernel_hh", w_init, (H, 3, H), self.param_dtype).astype(self.dtype)
        b_ih = self.param("bias_ih", b_init, (3, H), self.param_dtype).astype(self.dtype)
        b_hh = self.param("bias_hh", b_init, (3, H), self.param_dtype).astype(self.dtype)

        B, L = valid.shape
        # Time-major for the scan ([L, B, 3, H]); transposing the input (not the 3x wider
        # projection) and projecting with one 2-D matmul keeps XLA from adding transposes.
        x_t = jnp.swapaxes(x.astype(self.dtype), 0, 1)
        xi = matmul_rows(x_t, w_ih.reshape(-1, 3 * H), b_ih.reshape(-1)).reshape(L, B, 3, H)
        keep = jnp.swapaxes(valid, 0, 1)[:, :, None]
        w_hh, b_hh = w_hh.reshape(H, 3 * H), b_hh.reshape(3 * H)

        def step(h, inputs):
            xi_t, valid_t = inputs
            hh = (jnp.dot(h, w_hh) + b_hh).reshape(-1, 3, H)
            r = jax.nn.sigmoid(xi_t[:, 0] + hh[:, 0])
            z = jax.nn.sigmoid(xi_t[:, 1] + hh[:, 1])
            n = jnp.tanh(xi_t[:, 2] + r * hh[:, 2])
            h_new = jnp.where(valid_t, (1 - z) * n + z * h, h)
            return h_new, jnp.where(valid_t, h_new, jnp.zeros((), h_new.dtype))

        h0 = jnp.zeros((B, H), self.dtype)
        if last_only:
            h_last, _ = lax.scan(lambda h, inp: (step(h, inp)[0], None), h0, (xi, keep))
            return jnp.where(valid[:, -1:, None], h_last[:, None], jnp.zeros((), h_last.dtype))
        _, out = lax.scan(step, h0, (xi, keep))
        return jnp.swapaxes(out, 0, 1)
