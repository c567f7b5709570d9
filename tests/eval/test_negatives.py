"""Seeded negative sampling: exclusions, determinism under any batching, uniformity."""
import numpy as np
import pytest

from jaxrec.eval.negatives import sample_negatives


def _history(seed=0, n_ex=300, n_items=60):
    rs = np.random.RandomState(seed)
    lens = rs.randint(0, 45, n_ex)
    hist = [rs.choice(np.arange(1, n_items + 1), l, replace=False) for l in lens]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    targets = np.array([rs.choice(np.setdiff1d(np.arange(1, n_items + 1), h)) for h in hist])
    padded = np.zeros((n_ex, 45), np.int64)
    for i, h in enumerate(hist):
        padded[i, 45 - len(h):] = h                     # left-padded like model inputs
    return hist, (offsets, np.concatenate(hist)), padded, targets


def test_negatives_avoid_target_and_history_and_are_distinct():
    hist, csr, padded, targets = _history()
    neg = sample_negatives(60, targets, csr, n=15, seed=1)
    assert neg.shape == (300, 15) and neg.dtype == np.int32
    for row, h, t in zip(neg, hist, targets):
        assert len(set(row)) == 15 and t not in row and not set(row) & set(h)
        assert row.min() >= 1 and row.max() <= 60
    np.testing.assert_array_equal(neg, sample_negatives(60, targets, padded, n=15, seed=1))   # same from padded
    assert not np.array_equal(neg, sample_negatives(60, targets, csr, n=15, seed=2))


def test_same_example_same_negatives_under_any_batching():
    _, _, padded, targets = _history(1)
    full = sample_negatives(60, targets, padded, n=10, seed=5)
    ids = np.arange(300)
    for lo, hi in ((0, 1), (17, 120), (250, 300)):
        part = sample_negatives(60, targets[lo:hi], padded[lo:hi], n=10, seed=5, example_ids=ids[lo:hi])
        np.testing.assert_array_equal(part, full[lo:hi])
    shuffled = np.random.RandomState(0).permutation(300)
    np.testing.assert_array_equal(
        sample_negatives(60, targets[shuffled], padded[shuffled], n=10, seed=5, example_ids=shuffled), full[shuffled])


def test_uniform_over_the_allowed_items():
    n_items, n_ex = 20, 20000
    history = np.tile(np.array([[1, 2, 3, 0]]), (n_ex, 1))     # items 1-3 excluded, 0 is padding
    targets = np.full(n_ex, 4)
    neg = sample_negatives(n_items, targets, history, n=5, seed=0)
    counts = np.bincount(neg.ravel(), minlength=n_items + 1)
    assert counts[:5].sum() == 0
    expected = n_ex * 5 / 16
    assert np.all(np.abs(counts[5:] - expected) < 5 * np.sqrt(expected))
    # Every allowed item requested: each row is a permutation of the allowed set.
    all_neg = sample_negatives(n_items, targets[:50], history[:50], n=16, seed=0)
    assert all(set(r) == set(range(5, 21)) for r in all_neg)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="example 1 leaves only 0 items"):
        sample_negatives(3, [1, 2], np.array([[0, 0], [1, 3]]), n=2)
    with pytest.raises(ValueError, match="targets must be item ids"):
        sample_negatives(3, [4], None, n=1)
    with pytest.raises(ValueError, match="history holds item 9"):
        sample_negatives(3, [1], np.array([[9]]), n=1)
