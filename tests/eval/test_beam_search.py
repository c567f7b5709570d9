"""Trie-constrained beam search and exact item scores against a numpy brute force.

The toy generator hashes the prefix codes into a fixed random logit table and adds a
per-user vector (the context), so log-probs depend on user, level and the whole prefix.
The brute force enumerates every item's path log-prob in float64.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.eval import beam_search
from jaxrec.eval.beam_search import constrained_beam_search, exact_item_scores
from jaxrec.eval.trie import build_trie
from jaxrec.sharding import Layout

N_CODES = (3, 4, 5)             # level 0 has 3 codes: beam 4 exceeds the valid codes there
WIDTH, LEVELS, N_ITEMS, N_BUCKETS, B = max(N_CODES), len(N_CODES), 26, 37, 8
EPS32 = float(np.finfo(np.float32).eps)
# Jitted once per shape: eager dispatch compiles every small op separately (slow on CPU).
topk_differs = jax.jit(beam_search.topk_differs, static_argnums=2)
topk_disagreement = jax.jit(beam_search.topk_disagreement, static_argnums=2)


def _codes(seed=0, n_items=N_ITEMS):
    """n_items distinct code paths drawn from the 3 x 4 x 5 grid."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in N_CODES], indexing="ij"), -1).reshape(-1, LEVELS)
    rs = np.random.RandomState(seed)
    return grid[rs.choice(len(grid), n_items, replace=False)]


def _bucket(xp, prefix):
    """Hash of (level, prefix codes) into the logit table; identical in numpy and jnp."""
    level = prefix.shape[-1]
    h = xp.full(prefix.shape[:-1], 7 * level + 3, dtype=np.int32)
    for j in range(level):
        h = (h * 31 + prefix[..., j] + 1) % N_BUCKETS
    return h


def _logits(xp, table, user, prefix, forbid):
    level = prefix.shape[-1]
    logits = table[_bucket(xp, prefix)] + user[:, None, :]
    live = np.arange(WIDTH) < N_CODES[level]
    if forbid and level == 1:
        live = live & (np.arange(WIDTH) != 1)             # code 1 at level 1 has probability 0
    return xp.where(live, logits, -np.inf)


def toy_logprob_fn(table, forbid=False):
    """logprob_fn(context [B, V], prefix [B, W, k]) -> [B, W, V]; context used once per user."""
    def fn(context, prefix):
        assert context.shape == (prefix.shape[0], WIDTH), "the context was tiled over beams"
        return jax.nn.log_softmax(_logits(jnp, table, context, prefix, forbid), axis=-1)
    return fn


def brute_scores(table, context, codes, forbid=False):
    """[B, n_items] float64 path log-probs by enumeration."""
    table, context = np.asarray(table, np.float64), np.asarray(context, np.float64)
    out = np.zeros((len(context), len(codes)))
    for i, path in enumerate(codes):
        for k in range(LEVELS):
            logits = _logits(np, table, context, np.broadcast_to(path[:k], (len(context), 1, k)), forbid)[:, 0]
            top = logits.max(axis=1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
            out[:, i] += logp[:, path[k]]
    return out


def _problem(seed=0):
    rs = np.random.RandomState(seed + 100)
    table = rs.normal(0, 2, (N_BUCKETS, WIDTH)).astype(np.float32)
    context = rs.normal(0, 1, (B, WIDTH)).astype(np.float32)
    return table, context


def _tol(scores):
    # Each of the L log-probs comes from log_softmax (x - max - log sum exp), a few float32
    # roundings of magnitude <= |logp|; the L-term path sum adds one rounding of the
    # partial sum (<= L * max|logp|) per level. So |error| <~ L * (4 + L) * eps32 * max|logp|.
    finite = np.abs(scores[np.isfinite(scores)])
    return LEVELS * (4 + LEVELS) * EPS32 * max(1.0, finite.max() if finite.size else 1.0)


@functools.lru_cache(maxsize=None)
def _search(beam, forbid=False, table_seed=0):
    table, _ = _problem(table_seed)
    return jax.jit(functools.partial(constrained_beam_search, toy_logprob_fn(jnp.asarray(table), forbid),
                                     beam=beam))


def _check_beams(items, scores, codes, brute):
    """Only existing items, no duplicates, scores = their path sums, sorted, dead beams last, no NaN."""
    items, scores = np.asarray(items), np.asarray(scores)
    assert items.dtype == np.int32 and scores.dtype == np.float32
    assert not np.isnan(scores).any()
    for b in range(len(items)):
        live = items[b] >= 0
        n_live = int(live.sum())
        assert live[:n_live].all() and not live[n_live:].any(), "dead beams must come last"
        assert np.all(items[b, n_live:] == -1) and np.all(scores[b, n_live:] == -np.inf)
        got = items[b, :n_live]
        assert np.all(got < len(codes)) and len(set(got.tolist())) == n_live
        assert n_live == min(items.shape[1], len(codes))
        np.testing.assert_allclose(scores[b, :n_live], brute[b, got], rtol=0, atol=_tol(brute))
        s = scores[b, :n_live]
        assert np.all(s[:-1] >= s[1:]), "beams are not sorted best first"


@pytest.mark.parametrize("forbid", [False, True])
def test_wide_beam_equals_exact_ranking(forbid):
    table, context = _problem()
    codes = _codes()
    brute = brute_scores(table, context, codes, forbid)
    items, scores = _search(N_ITEMS + 4, forbid)(jnp.asarray(context), build_trie(codes).tables)
    _check_beams(items, scores, codes, brute)
    items = np.asarray(items)[:, :N_ITEMS]
    tol = _tol(brute)
    for b in range(B):
        assert sorted(items[b].tolist()) == list(range(N_ITEMS))
        # Exact ranking up to float32 error: the brute scores, read in beam order, never rise.
        ranked = brute[b, items[b]]
        finite = np.isfinite(ranked)
        assert np.all(np.diff(ranked[finite]) <= tol) and np.all(finite[:finite.sum()])
    if forbid:
        assert np.isneginf(brute).any()


def test_exact_scores_match_brute_force_path_sums():
    table, context = _problem(1)
    codes = _codes(1)
    brute = brute_scores(table, context, codes)
    trie = build_trie(codes)
    for chunk in (1, 4, 1000):                              # 4 does not divide the prefix counts
        fn = jax.jit(functools.partial(exact_item_scores, toy_logprob_fn(jnp.asarray(table)), chunk=chunk))
        exact = np.asarray(fn(jnp.asarray(context), trie))
        assert exact.shape == (B, N_ITEMS) and exact.dtype == np.float32
        np.testing.assert_allclose(exact, brute, rtol=0, atol=_tol(brute))


@pytest.mark.parametrize("forbid", [False, True])
@pytest.mark.parametrize("beam", [1, 3, 4, 7, N_ITEMS + 9])   # 4 > 3 level-0 codes; 7 > some branchings
def test_any_beam_width_returns_distinct_existing_items(beam, forbid):
    table, context = _problem()
    codes = _codes()
    brute = brute_scores(table, context, codes, forbid)
    trie = build_trie(codes)
    items, scores = _search(beam, forbid)(jnp.asarray(context), trie.tables)
    assert items.shape == scores.shape == (B, beam)
    _check_beams(items, scores, codes, brute)
    if beam == 1:       # greedy: follows the argmax code at every level
        for b in range(B):
            node, path = 0, []
            for k in range(LEVELS):
                logits = _logits(np, table, context[b:b + 1], np.array(path, np.int32)[None, None], forbid)[0, 0]
                allowed = np.where(trie.transitions[k][node] >= 0, logits, -np.inf)
                path.append(int(np.argmax(allowed)))
                node = trie.transitions[k][node, path[-1]]
            assert items[b, 0] == node


def test_topk_disagreement_against_exact_scores():
    table, context = _problem()
    codes = _codes()
    trie = build_trie(codes)
    fn = toy_logprob_fn(jnp.asarray(table))
    exact = jax.jit(functools.partial(exact_item_scores, fn))(jnp.asarray(context), trie)
    wide, _ = _search(N_ITEMS)(jnp.asarray(context), trie.tables)
    assert float(topk_disagreement(wide, exact, 10)) == 0.0
    greedy, _ = _search(1)(jnp.asarray(context), trie.tables)
    assert float(topk_disagreement(greedy, exact, 1)) == pytest.approx(
        np.mean(np.asarray(greedy)[:, 0] != np.argmax(np.asarray(exact), axis=1)))

    scores = jnp.array([[3.0, 2.0, 2.0, 1.0]] * 6 + [[3.0, np.nan, 2.0, 1.0]])
    beams = jnp.array([[0, 2, 1, 3],      # tie at 2nd place broken the other way: a top-2 set
                       [0, 1, 2, 3],      # the other top-2 set
                       [0, 3, 1, 2],      # misses a top-2 item
                       [0, -1, -1, -1],   # dead beam inside the top 2
                       [1, 2, 0, 3],      # both tied items, but not the best one
                       [0, 0, 1, 2],      # a duplicate (never produced by the search)
                       [0, 2, 1, 3]])     # a NaN elsewhere does not outrank
    np.testing.assert_array_equal(topk_differs(beams, scores, 2), [False, False, True, True, True, True, False])
    np.testing.assert_array_equal(topk_differs(beams, scores, 3)[:2], [False, False])
    assert float(topk_disagreement(beams, scores, 1)) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="k must be"):
        topk_differs(beams, scores, 5)


def test_topk_overlap_is_the_share_of_the_exact_top_k_in_the_beam_top_k():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 30)).astype(np.float32)
    scores[0, 5] = np.nan                                   # NaN ranks last
    beams = np.stack([rng.permutation(30)[:8] for _ in range(50)]).astype(np.int32)
    beams[1, 2:] = -1                                       # dead beams never count
    got = np.asarray(jax.jit(beam_search.topk_overlap, static_argnums=2)(jnp.asarray(beams), jnp.asarray(scores), 4))
    for b in range(50):                                     # brute force: sets of item ids
        exact = set(np.argsort(-np.nan_to_num(scores[b], nan=-np.inf), kind="stable")[:4].tolist())
        beam = {int(i) for i in beams[b, :4] if i >= 0}
        assert got[b] == pytest.approx(len(exact & beam) / 4)


def test_trie_tables_are_traced_arguments():
    """Two tries of the same shape through one compiled search: no recompile, both right."""
    table, context = _problem()
    codes_a = _codes()
    # Relabel level-0 codes and permute items: same prefix counts per level, other tables.
    codes_b = codes_a.copy()
    codes_b[:, 0] = np.array([2, 0, 1])[codes_b[:, 0]]
    codes_b = codes_b[np.random.RandomState(5).permutation(N_ITEMS)]
    trie_a, trie_b = build_trie(codes_a), build_trie(codes_b)
    assert [t.shape for t in trie_a.transitions] == [t.shape for t in trie_b.transitions]
    assert not all(np.array_equal(x, y) for x, y in zip(trie_a.transitions, trie_b.transitions))

    search = jax.jit(functools.partial(constrained_beam_search, toy_logprob_fn(jnp.asarray(table)), beam=N_ITEMS))
    for codes, trie in ((codes_a, trie_a), (codes_b, trie_b)):
        items, scores = search(jnp.asarray(context), trie.tables)
        _check_beams(items, scores, codes, brute_scores(table, context, codes))
    assert search._cache_size() == 1
    # The tables are inputs of the traced program (context + one per level), not constants.
    invars = jax.make_jaxpr(search)(jnp.asarray(context), trie_a.tables).jaxpr.invars
    assert [v.aval.shape for v in invars] == [context.shape] + [t.shape for t in trie_a.transitions]


def test_sharded_search_matches_single_device():
    table, context = _problem()
    codes = _codes()
    trie = build_trie(codes)
    fn = toy_logprob_fn(jnp.asarray(table))
    search = _search(7)
    exact_fn = jax.jit(functools.partial(exact_item_scores, fn, chunk=4))
    want_items, want_scores = search(jnp.asarray(context), trie.tables)
    want_exact = exact_fn(jnp.asarray(context), trie)

    layout = Layout.build((8, 1, 1))
    with layout.activate():
        ctx = jax.device_put(context, layout.batch(context.shape))
        items, scores = search(ctx, trie.tables)
        exact = exact_fn(ctx, trie)
        compiled = search.lower(ctx, trie.tables).compile().as_text()
    assert "all-gather" not in compiled, "users' beams are gathered across devices"
    assert len(items.sharding.device_set) == 8
    assert items.sharding.spec[0] is not None, "the beam state is not sharded over the batch"
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(exact, want_exact, rtol=0, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    table, context = _problem()
    trie = build_trie(_codes())
    with pytest.raises(ValueError, match="beam must be >= 1"):
        constrained_beam_search(toy_logprob_fn(jnp.asarray(table)), jnp.asarray(context), trie.tables, 0)
    with pytest.raises(ValueError, match=r"items 1 and 3 share the code path \[0, 2\]"):
        build_trie(np.array([[0, 1], [0, 2], [1, 1], [0, 2], [0, 1]]))
    with pytest.raises(ValueError, match="non-negative: item 1 has code -2 at level 0"):
        build_trie(np.array([[0, 1], [-2, 2]]))
    with pytest.raises(ValueError, match="2-D integer array"):
        build_trie(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D integer array"):
        build_trie(np.array([0, 1]))
    with pytest.raises(ValueError, match="at least one item"):
        build_trie(np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="uses code 4"):
        build_trie(np.array([[0, 4]]), n_codes=(2, 3))
    with pytest.raises(ValueError, match="expected"):       # generator width != trie width
        constrained_beam_search(lambda c, p: jnp.zeros(p.shape[:2] + (WIDTH + 1,)),
                                jnp.asarray(context), trie.tables, 2)


def test_trie_layout():
    codes = np.array([[1, 0, 2], [0, 1, 1], [1, 0, 0], [0, 1, 0]])
    trie = build_trie(codes, n_codes=(2, 2, 4))
    assert trie.width == 4 and trie.n_codes == (2, 2, 4) and trie.n_items == 4
    np.testing.assert_array_equal(trie.prefixes[1], [[0], [1]])
    np.testing.assert_array_equal(trie.prefixes[2], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(trie.transitions[0], [[0, 1, -1, -1]])
    np.testing.assert_array_equal(trie.transitions[1], [[-1, 0, -1, -1], [1, -1, -1, -1]])
    np.testing.assert_array_equal(trie.transitions[2], [[3, 1, -1, -1], [2, -1, 0, -1]])
    np.testing.assert_array_equal(trie.item_prefix_ids, [[0, 1, 1], [0, 0, 0], [0, 1, 1], [0, 0, 0]])
    for i, path in enumerate(codes):            # walking the tables reaches the item
        node = 0
        for k, c in enumerate(path):
            assert trie.item_prefix_ids[i, k] == node
            node = trie.transitions[k][node, c]
        assert node == i
