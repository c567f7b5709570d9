"""Training losses against numpy closed forms (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.losses import lm_cross_entropy, make_loss, sampled_softmax, sasrec_bce, softmax_cross_entropy
from jaxrec.sharding import Layout

V, D = 13, 6   # 12 items + pad row


def _data(seed=0, shape=(3, 5)):
    rs = np.random.RandomState(seed)
    h = rs.randn(*shape, D).astype(np.float32)
    table = rs.randn(V, D).astype(np.float32)
    targets = rs.randint(1, V, shape)
    targets[0, :2] = 0                        # padding positions carry no loss
    return h, table, targets


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ce_numpy(h, table, targets, weights):
    logp = _log_softmax(h.astype(np.float64) @ table[1:].astype(np.float64).T)   # pad column excluded
    picked = np.take_along_axis(logp, np.maximum(targets - 1, 0)[..., None], -1)[..., 0]
    w = weights * (targets > 0)
    return -(w * picked).sum() / w.sum()


def _ce_grads_numpy(h, table, targets, weights):
    """d(loss)/dh and d(loss)/dtable of the weighted-mean CE, closed form."""
    h64, items = h.astype(np.float64), table[1:].astype(np.float64)
    p = np.exp(_log_softmax(h64 @ items.T))
    w = (weights * (targets > 0)) / (weights * (targets > 0)).sum()
    onehot = np.eye(V - 1)[np.maximum(targets - 1, 0)]
    g = w[..., None] * (p - onehot)                                   # d/dlogits
    d_table = np.zeros(table.shape)
    d_table[1:] = g.reshape(-1, V - 1).T @ h64.reshape(-1, D)
    return g @ items, d_table


@pytest.mark.parametrize("chunk", [None, 4, 15])   # 15 rows: 4 does not divide, 15 = all
def test_cross_entropy_value_and_gradients(chunk):
    h, table, targets = _data()
    weights = np.random.RandomState(1).rand(*targets.shape).astype(np.float32) + 0.5
    f = jax.jit(jax.value_and_grad(lambda h, t: softmax_cross_entropy(h, t, jnp.asarray(targets),
                                                                     jnp.asarray(weights), chunk=chunk)[0], (0, 1)))
    loss, (d_h, d_table) = f(jnp.asarray(h), jnp.asarray(table))
    assert float(loss) == pytest.approx(_ce_numpy(h, table, targets, weights), rel=1e-5)
    ref_h, ref_table = _ce_grads_numpy(h, table, targets, weights)
    np.testing.assert_allclose(d_h, ref_h, atol=1e-6)
    np.testing.assert_allclose(d_table, ref_table, atol=1e-6)
    assert np.all(np.asarray(d_table[0]) == 0)


def test_cross_entropy_defaults_and_metrics():
    h, table, targets = _data(2)
    loss, metrics = jax.jit(softmax_cross_entropy)(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets))
    assert float(loss) == pytest.approx(_ce_numpy(h, table, targets, np.ones(targets.shape)), rel=1e-5)
    assert float(metrics["weight"]) == (targets > 0).sum()
    # bf16 activations: same loss to bf16 precision, gradient in the activation dtype.
    hb = jnp.asarray(h, jnp.bfloat16)
    lb, gb = jax.jit(jax.value_and_grad(lambda x: softmax_cross_entropy(x, jnp.asarray(table),
                                                                        jnp.asarray(targets))[0]))(hb)
    assert gb.dtype == jnp.bfloat16 and float(lb) == pytest.approx(float(loss), rel=0.03)


@pytest.mark.parametrize("chunk", [None, 4, 15])
def test_lm_cross_entropy_every_token_is_a_class_and_negative_labels_carry_no_loss(chunk):
    h, table, _ = _data(3)
    labels = np.random.RandomState(4).randint(0, V, (3, 5))
    labels[0, 0], labels[1, :2] = 0, -100                # token 0 is a real class; -100: no target
    valid = labels >= 0
    logp = _log_softmax(h.astype(np.float64) @ table.astype(np.float64).T)
    picked = np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
    expected = -(picked * valid).sum() / valid.sum()
    p, onehot = np.exp(logp), np.eye(V)[np.maximum(labels, 0)]
    g = (valid / valid.sum())[..., None] * (p - onehot)   # d(loss)/d(logits)

    def loss(h, t, table_grad):
        return lm_cross_entropy(h, t, jnp.asarray(labels), chunk=chunk, table_grad=table_grad)[0]

    value, (d_h, d_table) = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(
        jnp.asarray(h), jnp.asarray(table), True)
    # float32 over O(1) logits of V = 13 classes: a relative 1e-5 is ~100 ulps.
    assert float(value) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(d_h, g @ table.astype(np.float64), atol=1e-6)
    np.testing.assert_allclose(d_table, g.reshape(-1, V).T @ h.reshape(-1, D).astype(np.float64), atol=1e-6)
    frozen = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(jnp.asarray(h), jnp.asarray(table), False)
    np.testing.assert_array_equal(frozen[0], d_h)
    assert not np.any(np.asarray(frozen[1]))           # a frozen output layer gets no gradient


def test_lm_cross_entropy_rejects_mismatched_shapes():
    h, table, _ = _data()
    with pytest.raises(ValueError, match="labels"):
        lm_cross_entropy(jnp.asarray(h), jnp.asarray(table), jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="table"):
        lm_cross_entropy(jnp.asarray(h), jnp.asarray(table[:, :4]), jnp.zeros((3, 5), jnp.int32))


def test_sampled_softmax_matches_numpy_and_masks_accidental_hits():
    h, table, targets = _data(3, shape=(4, 6))
    rng = jax.random.key(7)
    n = 20                                      # > 12 items: accidental hits are certain
    loss, _ = jax.jit(lambda h, t: sampled_softmax(h, t, jnp.asarray(targets), rng=rng, n_negatives=n))(
        jnp.asarray(h), jnp.asarray(table))
    negs = np.asarray(jax.random.randint(rng, (n,), 1, V))  # the documented draw
    h64, t64 = h.reshape(-1, D).astype(np.float64), table.astype(np.float64)
    tg = targets.reshape(-1)
    total, hits = 0.0, 0
    for row, t in zip(h64, tg):
        if t == 0:
            continue
        s_neg = [row @ t64[j] for j in negs if j != t]   # accidental hits removed
        s_pos = row @ t64[t]
        hits += n - len(s_neg)
        total += np.logaddexp.reduce([s_pos] + s_neg) - s_pos
    assert hits > 0
    assert float(loss) == pytest.approx(total / (tg > 0).sum(), rel=1e-5)


def test_bce_matches_numpy_and_draws_valid_negatives():
    h, table, targets = _data(4)
    negatives = np.random.RandomState(5).randint(1, V, targets.shape)
    loss, _ = sasrec_bce(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets), negatives=jnp.asarray(negatives))
    h64, t64 = h.astype(np.float64), table.astype(np.float64)
    s_pos = np.einsum("...d,...d->...", h64, t64[targets])
    s_neg = np.einsum("...d,...d->...", h64, t64[negatives])
    softplus = lambda z: np.log1p(np.exp(z))
    m = targets > 0
    assert float(loss) == pytest.approx((softplus(-s_pos)[m].mean() + softplus(s_neg)[m].mean()), rel=1e-5)



def test_bce_draws_uniform_negatives_other_than_the_positive():
    """The rng path scores the negatives r + (r >= t), r ~ U{1..n-1}: uniform over items != t."""
    h, table, targets = _data(8)
    rng = jax.random.key(3)
    r = np.asarray(jax.random.randint(rng, (targets.size,), 1, V - 1)).reshape(targets.shape)
    expected = sasrec_bce(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets),
                          negatives=jnp.asarray(r + (r >= targets)))[0]
    got = sasrec_bce(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets), rng=rng)[0]
    assert float(got) == pytest.approx(float(expected), rel=1e-6)

    t = np.random.RandomState(6).randint(1, V, 60000)
    r = np.asarray(jax.random.randint(jax.random.key(1), t.shape, 1, V - 1))
    neg = r + (r >= t)
    assert np.all(neg != t) and neg.min() == 1 and neg.max() == V - 1
    for item in (1, 6, V - 1):   # P(neg = item) = P(t != item) / (n - 1)
        expected = (t != item).sum() / (V - 2)
        assert abs((neg == item).sum() - expected) < 4 * np.sqrt(expected)


def test_make_loss_selects_and_rejects():
    h, table, targets = _data()
    ce = make_loss("ce", chunk=4)
    assert float(ce(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets))[0]) == pytest.approx(
        _ce_numpy(h, table, targets, np.ones(targets.shape)), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'xent'"):
        make_loss("xent")
    with pytest.raises(ValueError, match="no option 'chunks'"):
        make_loss("ce", chunks=4)
    with pytest.raises(ValueError, match="needs an rng"):
        make_loss("sampled_softmax")(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets))


def test_chunked_cross_entropy_sharded_over_rows_equals_one_device():
    rs = np.random.RandomState(9)
    h, table = rs.randn(16, 5, D).astype(np.float32), rs.randn(V + 3, D).astype(np.float32)   # 16 table rows
    targets = rs.randint(0, V + 3, (16, 5))
    grad = jax.value_and_grad(lambda h, t: softmax_cross_entropy(h, t, jnp.asarray(targets), chunk=24)[0], (0, 1))
    ref = jax.jit(grad)(h, table)
    layout = Layout.build((4, 1, 2))
    mesh = layout.mesh
    P = jax.sharding.PartitionSpec
    with layout.activate():
        got = jax.jit(grad)(jax.device_put(h, jax.NamedSharding(mesh, P(("data", "fsdp")))),
                            jax.device_put(table, jax.NamedSharding(mesh, P("tensor"))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
