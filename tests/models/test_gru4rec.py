"""GRU unit and GRU4Rec encoder against torch.nn.GRU run the reference (CaseQ) way."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.encoder import build_sequence_model, item_table
from jaxrec.models.gru4rec import GRULayer

H, L = 8, 10
KEY = jax.random.key(0, impl="rbg")


def _torch_rolled_gru(p, x, valid):
    """CaseQ's GRUInferenceLayer: roll valid items to the front, GRU from 0, roll back."""
    torch = pytest.importorskip("torch")
    gru = torch.nn.GRU(H, H, batch_first=True).double()
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(t(np.asarray(p["kernel_ih"]).transpose(1, 2, 0).reshape(3 * H, H)))
        gru.weight_hh_l0.copy_(t(np.asarray(p["kernel_hh"]).transpose(1, 2, 0).reshape(3 * H, H)))
        gru.bias_ih_l0.copy_(t(np.asarray(p["bias_ih"]).reshape(-1)))
        gru.bias_hh_l0.copy_(t(np.asarray(p["bias_hh"]).reshape(-1)))
        n_valid = np.asarray(valid).sum(1)
        rolled = torch.stack([torch.roll(t(row), int(n), 0) for row, n in zip(np.asarray(x), n_valid)])
        out, _ = gru(rolled)
        back = torch.stack([torch.roll(row, int(L - n), 0) for row, n in zip(out, n_valid)])
        back = back.masked_fill(torch.tensor(~np.asarray(valid))[..., None], 0.0)
    return back.numpy()


def test_gru_matches_torch_with_carry_held_through_left_pads():
    rs = np.random.RandomState(0)
    n_pads = np.array([0, 2, 5, 9, 10])
    valid = jnp.asarray(np.arange(L)[None, :] >= n_pads[:, None])
    x = jnp.asarray(rs.randn(5, L, H).astype(np.float32)) * valid[..., None]
    layer = GRULayer(hidden=H)
    params = nn.unbox(jax.jit(layer.init)(KEY, x, valid))["params"]
    out = jax.jit(layer.apply)({"params": params}, x, valid)
    np.testing.assert_allclose(out, _torch_rolled_gru(params, x, valid), atol=1e-5)
    # A fully padded row stays zero; the first valid step starts from h0 = 0.
    assert np.all(np.asarray(out[4]) == 0)
    last = jax.jit(lambda p, x, v: layer.apply({"params": p}, x, v, last_only=True))(params, x, valid)
    np.testing.assert_allclose(last[:, 0], out[:, -1], atol=1e-6)

    std = np.std(np.asarray(params["kernel_ih"]))
    assert std == pytest.approx(math.sqrt(1 / (2 * H)), rel=0.25)   # 192 samples
    assert np.abs(np.asarray(params["bias_hh"])).max() <= 1 / math.sqrt(H)


def test_gru4rec_encoder_causal_padding_invariant_and_last_only():
    rs = np.random.RandomState(1)
    model = build_sequence_model("gru4rec", n_items=30, max_len=L, hidden=H, n_layers=2, dropout=0.2)
    x = rs.randint(1, 31, (3, L))
    x[1, :4] = 0
    x[2, :9] = 0
    x = jnp.asarray(x)
    params = jax.jit(model.init)(KEY, x)
    assert "position_embedding" not in params["params"] and item_table(params).shape == (31, H)
    apply = jax.jit(model.apply, static_argnames="last_only")
    h = apply(params, x)
    h_future = apply(params, x.at[:, 7].set(x[:, 7] % 30 + 1))
    np.testing.assert_array_equal(h[:, :7], h_future[:, :7])
    assert not np.allclose(h[:, 7:], h_future[:, 7:])
    np.testing.assert_allclose(apply(params, x[1:, 4:]), h[1:, 4:], atol=1e-6)   # less left padding
    np.testing.assert_allclose(apply(params, x, last_only=True), h[:, -1], atol=1e-6)
