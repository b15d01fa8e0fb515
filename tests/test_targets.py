"""Tests for ntkd.targets against NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkd import targets


def test_one_hot_matches_numpy():
    labels = np.array([2, 0, 1, 2])
    got = targets.one_hot(labels, 3)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, np.eye(3)[labels])


@pytest.mark.parametrize(
    "labels, k, match",
    [
        (np.array([0, 3]), 3, "label 3 is outside \\[0, 3\\)"),
        (np.array([-1, 0]), 3, "label -1 is outside"),
        (np.array([0.5, 1.0]), 3, "must be integers, got dtype float64"),
        (np.zeros((2, 2), int), 3, r"shape \(n,\), got \(2, 2\)"),
    ],
)
def test_one_hot_rejects_bad_labels(labels, k, match):
    with pytest.raises(ValueError, match=match):
        targets.one_hot(labels, k)


def test_random_labels_are_uniform_one_hot():
    Y = np.asarray(targets.random_labels(jax.random.key(0), 5000, 10))
    assert Y.shape == (5000, 10)
    np.testing.assert_array_equal(Y.sum(axis=1), 1.0)
    counts = Y.sum(axis=0)
    assert np.all(np.abs(counts - 500) < 5 * np.sqrt(500))  # binomial, ~5 sd
    assert not np.array_equal(Y, np.asarray(targets.random_labels(jax.random.key(1), 5000, 10)))


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_softmax_targets_match_numpy(tau):
    z = np.random.default_rng(0).normal(size=(6, 5)) * 3
    e = np.exp(z / tau - (z / tau).max(axis=1, keepdims=True))
    expected = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(targets.softmax_targets(z, tau), expected, rtol=1e-5, atol=1e-7)
    centred = targets.softmax_targets(z, tau, center=True)
    np.testing.assert_allclose(centred, expected - 0.2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(centred).sum(axis=1), 0.0, atol=1e-6)


def test_softmax_targets_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        targets.softmax_targets(np.zeros((2, 2)), 0)
    with pytest.raises(ValueError, match=r"shape \(n, k\), got \(3,\)"):
        targets.softmax_targets(np.zeros(3), 1.0)
