"""Quantizer building blocks: numpy brute force, closed-form gradients, k-means, Sinkhorn,
dead-code restarts, code-table statistics, and 8-device sharding parity."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.codebook_stats import (codebook_perplexity, codebook_utilisation, collision_rate,
                                          collision_rate_letter, dedup_position)
from jaxrec.models.kmeans import (code_usage, kmeans, kmeans_plusplus_seeds, random_sample_seeds,
                                  restart_dead_codes, restart_dead_level_codes, sinkhorn_codes, sinkhorn_log_plan,
                                  squared_distances)
from jaxrec.models.quantizers import (MLP, LevelQuantizer, ResidualQuantizer, VectorQuantizer, assign_codes,
                                      kmeans_level_codebooks, kmeans_residual_codebooks, reconstruction_loss,
                                      valid_code_mask)
from jaxrec.sharding import Layout

KEY = jax.random.key(0)
BETA = 0.25


def _unboxed_init(module, *args):
    return nn.unbox(module.init(KEY, *args))


def _with_codebook(variables, name, value):
    params = dict(variables["params"])
    params[name] = jnp.asarray(value, jnp.float32)
    return {"params": params}


def _np_nearest(x, codebook, valid=None):
    """Brute force in float64: ||x_b - c_j||^2 by explicit differences."""
    d = ((np.asarray(x, np.float64)[:, None, :] - np.asarray(codebook, np.float64)[None]) ** 2).sum(-1)
    if valid is not None:
        d = np.where(valid[None], d, np.inf)
    return d.argmin(-1)


# ------------------------------------------------------------------------------ nearest codes

def test_vector_quantizer_codes_match_numpy_brute_force():
    rs = np.random.RandomState(0)
    h, codebook = rs.randn(64, 6).astype(np.float32), rs.randn(20, 6).astype(np.float32)
    vq = VectorQuantizer(codebook_size=20, embed_dim=6)
    out = vq.apply(_with_codebook(_unboxed_init(vq, h), "codebook", codebook), h)
    np.testing.assert_array_equal(out.codes, _np_nearest(h, codebook))
    np.testing.assert_allclose(out.quantized, codebook[out.codes], atol=1e-6)
    assert out.codes.dtype == jnp.int32


def test_residual_codes_match_numpy_brute_force():
    rs = np.random.RandomState(1)
    sizes, e = (8, 6, 5), 4
    h = rs.randn(50, e).astype(np.float32)
    books = np.zeros((3, 8, e), np.float32)
    for k, n in enumerate(sizes):
        books[k, :n] = rs.randn(n, e) * (0.5 ** k)
    rq = ResidualQuantizer(codebook_sizes=sizes, embed_dim=e)
    out = rq.apply(_with_codebook(_unboxed_init(rq, h), "codebooks", books), h)
    residual, expected = h.astype(np.float64), []
    for k, n in enumerate(sizes):
        s = _np_nearest(residual, books[k, :n])
        expected.append(s)
        residual = residual - books[k, s]
    np.testing.assert_array_equal(out.codes, np.stack(expected, 1))
    np.testing.assert_allclose(out.quantized, h - residual, atol=1e-5)


def test_level_quantizer_matches_numpy_and_never_picks_padding():
    rs = np.random.RandomState(2)
    sizes, e, b = (3, 16, 7), 5, 40
    h = rs.randn(b, 3, e).astype(np.float32)
    books = rs.randn(3, 16, e).astype(np.float32)
    # Plant a padded code exactly on every input of level 0: unmasked it would always win.
    books[0, 3:3 + 13] = 0.0
    books[0, 5] = h[0, 0]
    lq = LevelQuantizer(codebook_sizes=sizes, embed_dim=e, sinkhorn_epsilons=(0.0, 0.0, 0.003))
    variables = _with_codebook(_unboxed_init(lq, h), "codebooks", books)
    valid = valid_code_mask(sizes)
    for use_sinkhorn in (False, True):
        codes = np.asarray(lq.apply(variables, h, use_sinkhorn=use_sinkhorn).codes)
        assert codes.shape == (b, 3)
        assert np.all(codes < np.asarray(sizes)[None]), "a padded code was chosen"
    codes = np.asarray(lq.apply(variables, h).codes)
    for k in range(3):
        np.testing.assert_array_equal(codes[:, k], _np_nearest(h[:, k], books[k], valid[k]))


# ------------------------------------------------------------------------------ gradients

def test_vector_quantizer_gradients_match_closed_form():
    rs = np.random.RandomState(3)
    b, n, e = 16, 5, 3
    h, codebook, g = rs.randn(b, e), rs.randn(n, e), rs.randn(b, e)
    h, codebook, g = (jnp.asarray(a, jnp.float32) for a in (h, codebook, g))
    vq = VectorQuantizer(codebook_size=n, embed_dim=e, beta=BETA)

    def f(codebook, h):
        out = vq.apply({"params": {"codebook": codebook}}, h)
        return out.loss, out

    (_, out), (d_codebook, d_h) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(codebook, h)
    s = np.asarray(out.codes)
    chosen = np.asarray(codebook)[s]
    # loss = mean_b ||sg(h) - C[s]||^2 + beta mean_b ||h - sg(C[s])||^2
    expect_dc = np.zeros((n, e))
    np.add.at(expect_dc, s, 2.0 / b * (chosen - np.asarray(h)))
    np.testing.assert_allclose(d_codebook, expect_dc, atol=1e-6)
    np.testing.assert_allclose(d_h, 2.0 * BETA / b * (np.asarray(h) - chosen), atol=1e-6)
    # straight-through: d <q, g> / d h = g exactly, and no gradient reaches the codebook through q.
    st_h, st_c = jax.grad(lambda h, c: jnp.sum(f(c, h)[1].quantized * g), argnums=(0, 1))(h, codebook)
    np.testing.assert_array_equal(st_h, g)
    np.testing.assert_array_equal(st_c, np.zeros((n, e)))


def test_level_quantizer_gradients_match_closed_form():
    rs = np.random.RandomState(4)
    b, sizes, e = 12, (4, 6), 3
    h = jnp.asarray(rs.randn(b, 2, e), jnp.float32)
    books = jnp.asarray(rs.randn(2, 6, e), jnp.float32)
    g = jnp.asarray(rs.randn(b, 2, e), jnp.float32)
    lq = LevelQuantizer(codebook_sizes=sizes, embed_dim=e, beta=BETA)
    apply = lambda c, h: lq.apply({"params": {"codebooks": c}}, h)
    d_books, d_h = jax.grad(lambda c, h: apply(c, h).loss, argnums=(0, 1))(books, h)
    s = np.asarray(apply(books, h).codes)
    chosen = np.asarray(books)[np.arange(2)[None], s]
    expect = np.zeros((2, 6, e))
    for k in range(2):
        np.add.at(expect[k], s[:, k], 2.0 / b * (chosen[:, k] - np.asarray(h)[:, k]))
    np.testing.assert_allclose(d_books, expect, atol=1e-6)
    assert not np.any(np.asarray(d_books)[0, 4:]), "padded codes received a gradient"
    np.testing.assert_allclose(d_h, 2.0 * BETA / b * (np.asarray(h) - chosen), atol=1e-6)
    st_h = jax.grad(lambda h: jnp.sum(apply(books, h).quantized * g))(h)
    np.testing.assert_array_equal(st_h, g)


@pytest.mark.parametrize("stop_residual_gradient", [True, False])
def test_residual_gradients_match_closed_form(stop_residual_gradient):
    rs = np.random.RandomState(5)
    b, sizes, e = 10, (5, 4, 3), 3
    h = jnp.asarray(rs.randn(b, e), jnp.float32)
    books = jnp.asarray(rs.randn(3, 5, e), jnp.float32)
    g = jnp.asarray(rs.randn(b, e), jnp.float32)
    rq = ResidualQuantizer(codebook_sizes=sizes, embed_dim=e, beta=BETA, stop_residual_gradient=stop_residual_gradient)
    apply = lambda c, h: rq.apply({"params": {"codebooks": c}}, h)
    d_books, d_h = jax.grad(lambda c, h: apply(c, h).loss, argnums=(0, 1))(books, h)
    s = np.asarray(apply(books, h).codes)
    residual, expect_dc, expect_dh = np.asarray(h, np.float64), np.zeros((3, 5, e)), np.zeros((b, e))
    for k in range(3):
        chosen = np.asarray(books, np.float64)[k, s[:, k]]
        np.add.at(expect_dc[k], s[:, k], 2.0 / b * (chosen - residual))
        if k == 0 or not stop_residual_gradient:     # LETTER: residuals past level 0 carry no gradient
            expect_dh += 2.0 * BETA / b * (residual - chosen)
        residual = residual - chosen
    np.testing.assert_allclose(d_books, expect_dc, atol=1e-5)
    np.testing.assert_allclose(d_h, expect_dh, atol=1e-5)
    np.testing.assert_array_equal(jax.grad(lambda h: jnp.sum(apply(books, h).quantized * g))(h), g)


# ------------------------------------------------------------------------------ k-means

def _np_lloyd(points, centroids, iters):
    points, centroids = np.asarray(points, np.float64), np.asarray(centroids, np.float64).copy()
    for _ in range(iters):
        a = _np_nearest(points, centroids)
        for j in range(len(centroids)):
            if np.any(a == j):
                centroids[j] = points[a == j].mean(0)
    return centroids, _np_nearest(points, centroids)


def _planted(rs, n_clusters=6, per=25, e=4, spread=0.05):
    centres = rs.randn(n_clusters, e) * 10.0
    labels = np.repeat(np.arange(n_clusters), per)
    return (centres[labels] + spread * rs.randn(len(labels), e)).astype(np.float32), labels


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_matches_numpy_lloyd_and_recovers_planted_clusters(init):
    rs = np.random.RandomState(6)
    points, labels = _planted(rs)
    key = jax.random.key(7)
    result = kmeans(points, 6, key, iters=10, init=init)
    seeds = (kmeans_plusplus_seeds if init == "kmeans++" else random_sample_seeds)(jnp.asarray(points), 6, key)
    ref_centroids, ref_assignment = _np_lloyd(points, seeds, 10)
    np.testing.assert_allclose(result.centroids, ref_centroids, atol=1e-4)
    np.testing.assert_array_equal(result.assignment, ref_assignment)
    if init == "kmeans++":   # D^2 seeding of 6 clusters 10 sd apart puts one seed in each
        purity = sum(np.bincount(labels[result.assignment == j]).max()
                     for j in range(6) if np.any(result.assignment == j)) / len(labels)
        assert purity == 1.0 and len(np.unique(result.assignment)) == 6


def test_kmeans_codebook_helpers_shapes_and_padding():
    rs = np.random.RandomState(8)
    points = jnp.asarray(rs.randn(60, 2, 3), jnp.float32)
    books = kmeans_level_codebooks(points, (4, 7), KEY, iters=5)
    assert books.shape == (2, 7, 3) and not np.any(np.asarray(books)[0, 4:])
    books = kmeans_residual_codebooks(points[:, 0], (5, 3), KEY, iters=5)
    assert books.shape == (2, 5, 3) and not np.any(np.asarray(books)[1, 3:])


def test_kmeans_rejects_bad_input():
    points = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)    # 12 rows, 3 distinct
    with pytest.raises(ValueError, match=r"k=5 clusters.*only 3 distinct points"):
        kmeans(points, 5, KEY)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(points[None], 2, KEY)
    with pytest.raises(ValueError, match="init"):
        kmeans(points, 2, KEY, init="furthest")
    assert kmeans(points, 3, KEY, iters=3).centroids.shape == (3, 3)


# ------------------------------------------------------------------------------ dead codes, Sinkhorn

def test_restart_dead_codes_replaces_exactly_the_unused_codes():
    rs = np.random.RandomState(9)
    codebook = jnp.asarray(rs.randn(8, 3), jnp.float32)
    usage = code_usage(jnp.asarray([0, 0, 2, 5, 5, 7]), 8)
    np.testing.assert_array_equal(usage, [2, 0, 1, 0, 0, 2, 0, 1])
    candidates = jnp.asarray(rs.randn(10, 3) + 100.0, jnp.float32)
    valid = jnp.arange(8) < 6                     # rows 6, 7 are padding: row 6 unused yet kept
    new = np.asarray(restart_dead_codes(codebook, usage, candidates, KEY, valid))
    dead = np.asarray([False, True, False, True, True, False, False, False])
    np.testing.assert_array_equal(new[~dead], np.asarray(codebook)[~dead])
    cand = np.asarray(candidates)
    rows = [np.flatnonzero((cand == r).all(1)) for r in new[dead]]
    assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 3   # distinct candidates
    # Levels: each level restarts from its own inputs.
    books = jnp.stack([codebook, codebook])
    usage2 = jnp.stack([usage, jnp.ones(8, jnp.int32)])
    new2 = np.asarray(restart_dead_level_codes(books, usage2, jnp.stack([candidates, -candidates], 1), KEY))
    np.testing.assert_array_equal(new2[1], np.asarray(codebook))
    unused = np.asarray(usage) == 0                # no valid mask here: row 6 restarts too
    assert np.all(new2[0][unused] > 50) and np.all(new2[0][~unused] == np.asarray(codebook)[~unused])


def _letter_sinkhorn_float64(d, eps, iters):
    """LETTER code's sinkhorn_algorithm (exp domain, float64) on centred distances."""
    d = np.asarray(d, np.float64)
    mid = (d.max() + d.min()) / 2
    d = (d - mid) / (d.max() - mid + 1e-5)
    q = np.exp(-d / eps)
    q /= q.sum()
    b, k = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdims=True) * b
        q /= q.sum(0, keepdims=True) * k
    return q * b


def test_sinkhorn_balances_planted_imbalance():
    rs = np.random.RandomState(10)
    n_codes, b = 8, 256
    codebook = rs.randn(n_codes, 4).astype(np.float32) * 3
    # 75% of the points sit next to code 0, the rest spread over the others.
    near = np.where(rs.rand(b) < 0.75, 0, rs.randint(1, n_codes, b))
    x = (codebook[near] + 0.3 * rs.randn(b, 4)).astype(np.float32)
    d = squared_distances(jnp.asarray(x), jnp.asarray(codebook))
    greedy_load = np.bincount(np.asarray(jnp.argmin(d, -1)), minlength=n_codes)
    assert greedy_load.max() > 0.7 * b
    # At LETTER's setting (eps 0.003, 50 rounds) the plan is far from converged (convergence
    # slows as eps shrinks): it cuts the worst load from > 0.7 b to under 2x the balanced b/n.
    codes = np.asarray(sinkhorn_codes(d, 0.003, 50))
    assert np.bincount(codes, minlength=n_codes).max() <= 2 * b / n_codes
    # Converged (1000 rounds) the argmax of the plan is balanced to within 10%.
    assert np.bincount(np.asarray(sinkhorn_codes(d, 0.003, 1000)), minlength=n_codes).max() <= 1.1 * b / n_codes
    # Same codes and plan as LETTER's float64 exp-domain iteration. Plan tolerance: log Q
    # reaches 2 / eps ~ 667, where a float32 ulp is 6e-5, so Q is good to ~1e-4 relative.
    ref = _letter_sinkhorn_float64(d, 0.003, 50)
    np.testing.assert_array_equal(codes, ref.argmax(1))
    np.testing.assert_allclose(np.exp(sinkhorn_log_plan(d, 0.003, 50)), ref, atol=2e-4)
    # Invalid codes are never chosen and excluded from the balance.
    valid = jnp.arange(n_codes) < 6
    masked = np.asarray(sinkhorn_codes(d, 0.003, 1000, valid))
    assert masked.max() < 6 and np.bincount(masked).max() <= 1.1 * b / 6


# ------------------------------------------------------------------------------ statistics

def test_code_table_statistics_closed_forms():
    codes = np.asarray([[0, 1, 2],
                        [0, 1, 2],
                        [1, 1, 3],
                        [0, 1, 2],
                        [2, 0, 3],
                        [1, 1, 3]])
    # level 0 uses {0,1,2} of 4; level 1 {0,1} of 2; level 2 {2,3} of 8
    np.testing.assert_allclose(codebook_utilisation(codes, (4, 2, 8)), [3 / 4, 1.0, 2 / 8])
    # level 0 usage (3,2,1)/6; level 1 (1,5)/6; level 2 (3,3)/6 -> exp(entropy)
    p0, p1 = np.asarray([3, 2, 1]) / 6, np.asarray([1, 5]) / 6
    np.testing.assert_allclose(codebook_perplexity(codes),
                               [np.exp(-(p0 * np.log(p0)).sum()), np.exp(-(p1 * np.log(p1)).sum()), 2.0])
    assert collision_rate(codes) == 5 / 6                  # rows 0,1,3 and 2,5 share; row 4 is alone
    assert collision_rate_letter(codes) == (6 - 3) / 6
    np.testing.assert_array_equal(dedup_position(codes)[:, -1], [0, 1, 0, 2, 0, 1])
    assert collision_rate(dedup_position(codes)) == 0.0
    assert collision_rate(np.arange(5)[:, None]) == 0.0
    np.testing.assert_allclose(codebook_perplexity(np.zeros((4, 1), int)), [1.0])
    with pytest.raises(ValueError, match="integer table"):
        collision_rate(np.zeros(3, int))
    with pytest.raises(ValueError, match="outside"):
        codebook_utilisation(codes, 2)


# ------------------------------------------------------------------------------ bad input, tables

def test_quantizers_reject_wrong_rank():
    with pytest.raises(ValueError, match=r"VectorQuantizer: input must be \[batch, embed_dim\]"):
        VectorQuantizer(codebook_size=4, embed_dim=3).init(KEY, jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="ResidualQuantizer: input must be"):
        ResidualQuantizer(codebook_sizes=(4, 4), embed_dim=3).init(KEY, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"LevelQuantizer: input must be \[batch, 2 levels, embed_dim\]"):
        LevelQuantizer(codebook_sizes=(4, 4), embed_dim=3).init(KEY, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="input has 3 levels, the quantizer 2"):
        LevelQuantizer(codebook_sizes=(4, 4), embed_dim=3).init(KEY, jnp.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="3 sinkhorn_epsilons for 2 levels"):
        LevelQuantizer(codebook_sizes=(4, 4), embed_dim=3, sinkhorn_epsilons=(0, 0, 1)).init(KEY, jnp.zeros((2, 2, 3)))


def test_assign_codes_in_batches_equals_one_pass():
    rs = np.random.RandomState(11)
    table = rs.randn(37, 2, 3).astype(np.float32)
    lq = LevelQuantizer(codebook_sizes=(5, 9), embed_dim=3)
    variables = _unboxed_init(lq, table[:2])
    codes = assign_codes(lambda x: lq.apply(variables, x).codes, table, batch_size=16)
    assert codes.dtype == np.int32 and codes.shape == (37, 2)
    np.testing.assert_array_equal(codes, lq.apply(variables, table).codes)


# ------------------------------------------------------------------------------ sharding parity

class _TinyTokenizer(nn.Module):
    """Shared encoder over levels -> LevelQuantizer -> decoder, plus an RQ path on level 0."""

    @nn.compact
    def __call__(self, x, deterministic=True):
        h = MLP((32, 16), dropout_rate=0.1, name="encoder")(x, deterministic)          # [B, K, 16]
        levels = LevelQuantizer(codebook_sizes=(8, 8, 6), embed_dim=16, sinkhorn_epsilons=(0, 0, 0.003),
                                name="levels")(h, use_sinkhorn=True)
        residual = ResidualQuantizer(codebook_sizes=(8, 4), embed_dim=16, name="residual")(h[:, 0])
        x_hat = MLP((32, x.shape[-1]), name="decoder")(levels.quantized, deterministic)
        loss = reconstruction_loss(x_hat, x) + levels.loss + residual.loss
        return loss, (levels.codes, residual.codes)


def test_sharded_loss_and_grad_match_one_device():
    rs = np.random.RandomState(12)
    x = jnp.asarray(rs.randn(32, 3, 24), jnp.float32)
    model = _TinyTokenizer()
    init = functools.partial(model.init, KEY)
    rngs = {"dropout": jax.random.key(3)}

    def loss_and_grad(params, x):
        f = lambda p: model.apply({"params": p}, x, deterministic=False, rngs=rngs)
        return jax.value_and_grad(f, has_aux=True)(params)

    params = nn.unbox(jax.jit(init)(x))["params"]
    (loss_1, codes_1), grad_1 = jax.jit(loss_and_grad)(params, x)

    layout = Layout.build((2, 4, 1))
    with layout.activate():
        shardings = layout.shardings(jax.eval_shape(init, x))
        sharded = nn.unbox(jax.jit(init, out_shardings=shardings)(x))["params"]
        x_sharded = jax.device_put(x, layout.batch(x.shape))
        (loss_8, codes_8), grad_8 = jax.jit(loss_and_grad)(sharded, x_sharded)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded)), "no parameter was actually sharded"
    # Same assignments first: a flipped argmin would be a discrete, not a rounding, difference.
    for a, b in zip(codes_1, codes_8):
        np.testing.assert_array_equal(a, b)
    # Tolerance: sharding only reassociates float32 sums (the batch mean over 8 shards, the
    # embed contractions over 4 fsdp shards). Reordering a sum of m terms moves it by at most
    # ~m * 2^-24 of the sum of magnitudes; with m <= 64 terms per reduction and a few chained
    # layers that is < 1e-5 relative, far below any real error (a wrong shard or code).
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_8), jax.tree.leaves(grad_1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()) + 1e-12)
