"""The scale-free complexity Â and the kernel-student margin bound (oracles: NumPy solves, closed forms, invariances)."""

import math

import numpy as np
import pytest

from ntkd import complexity as cx
from ntkd import targets


def _psd(rng, n, rank=None):
    X = rng.normal(size=(n, rank or 2 * n))
    return X @ X.T / X.shape[1]


@pytest.mark.parametrize("seed", range(5))
def test_normalised_complexity_is_one_for_kernels_proportional_to_identity(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(5, 40), rng.integers(1, 12)
    Y = rng.normal(size=(n, k))
    c = float(rng.uniform(0.01, 100))
    assert cx.normalized_adjusted_complexity(c * np.eye(n), Y) == pytest.approx(1.0, abs=1e-12)


def test_normalised_complexity_matches_numpy_formula():
    rng = np.random.default_rng(0)
    K, Y = _psd(rng, 30), rng.normal(size=(30, 4))
    C = np.trace(Y.T @ np.linalg.solve(K, Y))
    expected = math.sqrt(C * np.trace(K) / (30 * np.sum(Y**2)))
    assert cx.normalized_adjusted_complexity(K, Y) == pytest.approx(expected, rel=1e-10)
    # Â = A(Y; K) / A(Y; I)
    A, A_I = (
        cx.adjusted_supervision_complexity(K, Y),
        cx.adjusted_supervision_complexity(np.eye(30), Y),
    )
    assert cx.normalized_adjusted_complexity(K, Y) == pytest.approx(A / A_I, rel=1e-10)


def test_normalised_complexity_is_invariant_to_scaling_targets_and_kernel():
    rng = np.random.default_rng(1)
    K, Y = _psd(rng, 25), rng.normal(size=(25, 3))
    base = cx.normalized_adjusted_complexity(K, Y)
    for cY, cK in ((7.0, 1.0), (1.0, 1e-3), (0.01, 250.0)):
        assert cx.normalized_adjusted_complexity(cK * K, cY * Y) == pytest.approx(base, rel=1e-10)
    # A is not invariant to Y → cY: that is the point of Â
    assert cx.adjusted_supervision_complexity(K, 3 * Y) == pytest.approx(
        3 * cx.adjusted_supervision_complexity(K, Y)
    )


def test_normalised_complexity_of_full_kernel_and_zero_targets():
    rng = np.random.default_rng(2)
    n, k = 6, 3
    assert cx.normalized_adjusted_complexity(
        2.0 * np.eye(n * k).reshape(n, k, n, k).transpose(0, 2, 1, 3), rng.normal(size=(n, k))
    ) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all-zero"):
        cx.normalized_adjusted_complexity(np.eye(4), np.zeros((4, 2)))


def test_matched_label_smoothing_has_the_requested_norm():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, size=200)
    for s in (1.0, 0.7, 0.3, 0.1):
        Y, eps = targets.matched_label_smoothing(labels, 10, math.sqrt(200 * s))
        assert np.linalg.norm(Y) == pytest.approx(math.sqrt(200 * s), rel=1e-12)
        np.testing.assert_allclose(Y, targets.label_smoothing(labels, 10, eps))
        assert np.all(Y.argmax(1) == labels) or s == pytest.approx(0.1)
    with pytest.raises(ValueError, match="label smoothing"):
        targets.matched_label_smoothing(labels, 10, 100.0)


def _targets(rng, n, k):
    z = rng.normal(size=(n, k)) * 3
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_bound_interpolant_margins_are_the_targets_margins_and_norm_is_C():
    rng = np.random.default_rng(4)
    n, k = 40, 5
    K, Y, y = _psd(rng, n), _targets(rng, n, k), rng.integers(0, k, n)
    b = cx.kernel_margin_bound(K, Y, y, gammas=[0.1, 0.3])
    C = cx.supervision_complexity(K, Y)
    assert b.rkhs_norm_sq == pytest.approx(C, rel=1e-8)
    per_class = [Y[:, c] @ np.linalg.solve(K, Y[:, c]) for c in range(k)]
    assert b.rkhs_norm_max == pytest.approx(math.sqrt(max(per_class)), rel=1e-8)
    rho = np.array([Y[i, y[i]] - np.max(np.delete(Y[i], y[i])) for i in range(n)])
    assert b.margin_error == pytest.approx(np.mean(rho <= b.gamma))
    assert b.teacher_error == pytest.approx(np.mean(Y.argmax(1) != y))
    # hand computation of the terms at the reported γ
    radius = 2.0 ** math.ceil(math.log2(b.rkhs_norm_max / b.gamma))
    assert b.radius == radius
    assert b.complexity_term == pytest.approx(4 * k * radius * math.sqrt(np.trace(K)) / n)
    assert b.confidence_term == pytest.approx(3 * math.sqrt(math.log(2 * 61 / 0.05) / (2 * n)))
    assert b.total == pytest.approx(b.margin_error + b.complexity_term + b.confidence_term)
    assert b.vacuous == (b.total >= 1)


def test_bound_with_ridge_uses_the_ridge_function():
    rng = np.random.default_rng(5)
    n, k, lam = 30, 4, 0.1
    K, Y, y = _psd(rng, n), _targets(rng, n, k), rng.integers(0, k, n)
    rho = lam * np.trace(K) / n
    alpha = np.linalg.solve(K + rho * np.eye(n), Y)
    f = K @ alpha
    b = cx.kernel_margin_bound(K, Y, y, gammas=[0.05, 0.2], ridge=lam)
    assert b.rkhs_norm_sq == pytest.approx(np.einsum("nc,nc->", alpha, f), rel=1e-8)
    margins = np.array([f[i, y[i]] - np.max(np.delete(f[i], y[i])) for i in range(n)])
    assert b.margin_error == pytest.approx(np.mean(margins <= b.gamma))


def test_bound_is_invariant_to_scaling_targets_with_gammas():
    rng = np.random.default_rng(6)
    n, k = 50, 10
    K, Y, y = _psd(rng, n), _targets(rng, n, k), rng.integers(0, k, n)
    gammas = [0.05, 0.1, 0.2, 0.4, 0.8]
    for ridge in (0.0, 0.01):
        base = cx.kernel_margin_bound(K, Y, y, gammas=gammas, ridge=ridge)
        for c in (3.0, 0.01, 123.4):
            other = cx.kernel_margin_bound(K, c * Y, y, gammas=[c * g for g in gammas], ridge=ridge)
            assert other.total == pytest.approx(base.total, rel=1e-10)
            assert other.gamma == pytest.approx(c * base.gamma)
            assert other.margin_error == base.margin_error


def test_bound_rejects_bad_input():
    K, Y, y = np.eye(4), np.eye(4), np.arange(4)
    with pytest.raises(ValueError, match="gammas"):
        cx.kernel_margin_bound(K, Y, y, gammas=[0.0])
    with pytest.raises(ValueError, match="labels"):
        cx.kernel_margin_bound(K, Y, y[:3], gammas=[0.5])
    with pytest.raises(ValueError, match="delta"):
        cx.kernel_margin_bound(K, Y, y, gammas=[0.5], delta=1.5)
    with pytest.raises(ValueError, match=r"targets \(n, k\)"):
        cx.kernel_margin_bound(K, Y[:, 0], y, gammas=[0.5])
