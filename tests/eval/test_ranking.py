"""Full-ranking kernels against a numpy brute force over every item."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.eval.ranking import NO_RANK, sampled_ranks, target_ranks, top_k
from jaxrec.sharding import Layout

V, D, B = 24, 4, 8   # items 1..23: chunks of 5 and 7 do not divide 23


def _data(seed=0):
    """Small integer embeddings: scores are exact in float32, so ties are real ties."""
    rs = np.random.RandomState(seed)
    query = rs.randint(-2, 3, (B, D)).astype(np.float32)
    table = rs.randint(-2, 3, (V, D)).astype(np.float32)
    table[5] = table[9]                                   # duplicate items tie exactly
    query[3] = 0                                          # every item ties for this row
    targets = rs.randint(1, V, B)
    targets[1] = 9
    exclude = rs.randint(0, V, (B, 6))                    # 0 = padding entries
    exclude[2, 0] = targets[2]                            # the target in its own history
    exclude[4, :3] = 5                                    # repeats
    return query, table, targets, exclude


def _brute_rank(query, table, targets, exclude):
    scores = query.astype(np.float64) @ table.astype(np.float64).T
    ranks = []
    for b in range(len(targets)):
        excluded = set(exclude[b]) - {0} if exclude is not None else set()
        cand = [i for i in range(1, len(table)) if i not in excluded or i == targets[b]]
        # Pessimistic: sort with ties placing the target last among its equals.
        order = sorted(cand, key=lambda i: (-scores[b, i], i == targets[b]))
        ranks.append(order.index(targets[b]) + 1)
    return np.array(ranks)


@pytest.mark.parametrize("chunk", [5, 7, 64])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_target_ranks_equal_brute_force(chunk, use_exclude):
    query, table, targets, exclude = _data()
    ex = exclude if use_exclude else None
    got = jax.jit(functools.partial(target_ranks, chunk=chunk))(query, table, targets, ex)
    np.testing.assert_array_equal(got, _brute_rank(query, table, targets, ex))
    assert got[3] == (V - 1 - len(set(exclude[3]) - {0, targets[3]}) if use_exclude else V - 1)


def test_bad_scores_and_padding_targets_rank_last():
    query, table, targets, _ = _data()
    targets[1:] = np.where(targets[1:] == targets[0], 1 + targets[0] % (V - 1), targets[1:])
    clean = _brute_rank(query, table, targets, None)
    bad_item = targets[0]
    beat_before = (query @ table[bad_item]) >= np.einsum("bd,bd->b", query, table[targets])
    table[bad_item] = np.nan
    ranks = np.asarray(target_ranks(jnp.asarray(query), jnp.asarray(table), jnp.asarray(np.r_[targets[:7], 0]),
                                    chunk=5))
    assert ranks[0] == V - 1 and ranks[7] == NO_RANK       # NaN target: worst; pad target: no rank
    # For the other rows the NaN item counts against the target whatever its score was.
    np.testing.assert_array_equal(ranks[1:7], clean[1:7] + ~beat_before[1:7])


@pytest.mark.parametrize("chunk", [5, 64])
def test_top_k_equals_stable_argsort(chunk):
    query, table, _, exclude = _data(1)
    k = 6
    scores, items = jax.jit(functools.partial(top_k, k=k, chunk=chunk))(query, table, exclude=exclude)
    full = query.astype(np.float64) @ table.astype(np.float64).T
    for b in range(B):
        cand = [i for i in range(1, V) if i not in set(exclude[b])]
        best = sorted(cand, key=lambda i: (-full[b, i], i))[:k]       # ties -> smaller id
        np.testing.assert_array_equal(items[b], best)
        np.testing.assert_allclose(scores[b], full[b, best])
    # Fewer rankable items than k: filled with item 0 at -inf.
    s, i = top_k(jnp.asarray(query[:1]), jnp.asarray(table[:4]), k=5, chunk=2)
    assert list(np.asarray(i[0, 3:])) == [0, 0] and np.all(np.isneginf(np.asarray(s[0, 3:])))


def test_sampled_ranks_count_ties_against_the_target():
    query, table, targets, _ = _data(2)
    rs = np.random.RandomState(3)
    cand = rs.randint(1, V, (B, 10))
    cand[0, :4] = 0                # padding
    cand[1, 0] = targets[1]        # the target among candidates is ignored
    got = np.asarray(sampled_ranks(jnp.asarray(query), jnp.asarray(table), jnp.asarray(targets), jnp.asarray(cand)))
    scores = query.astype(np.float64) @ table.astype(np.float64).T
    want = [1 + sum(scores[b, c] >= scores[b, targets[b]] for c in cand[b] if c not in (0, targets[b]))
            for b in range(B)]
    np.testing.assert_array_equal(got, want)
    assert got[3] == 1 + np.sum(cand[3] != targets[3])


def test_sharded_over_batch_and_items_equals_one_device():
    rs = np.random.RandomState(4)
    Vs = 32                                                  # table rows split 4 ways
    query = rs.randn(8, D).astype(np.float32)
    table = rs.randn(Vs, D).astype(np.float32)
    targets = rs.randint(1, Vs, 8)
    exclude = rs.randint(0, Vs, (8, 5))
    run = lambda q, t: (target_ranks(q, t, targets, exclude, chunk=8), top_k(q, t, 3, exclude, chunk=8))
    ref = jax.jit(run)(query, table)
    layout = Layout.build((2, 1, 4))
    mesh = layout.mesh
    P = jax.sharding.PartitionSpec
    with layout.activate():
        q = jax.device_put(query, jax.NamedSharding(mesh, P(("data", "fsdp"))))
        t = jax.device_put(table, jax.NamedSharding(mesh, P("tensor")))
        got = jax.jit(run)(q, t)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1][1], ref[1][1])
    np.testing.assert_allclose(got[1][0], ref[1][0], rtol=1e-6)   # same scores up to summation order
