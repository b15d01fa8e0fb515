"""Tests for ntkd.theory.variance (Safaryan, Peste & Alistarh 2023)."""

import jax
import numpy as np
import pytest

from ntkd.theory import variance as V


def _problem(seed=0, n=60, d=6, k=4):
    rng = np.random.default_rng(seed)
    a = np.concatenate([rng.standard_normal((n, d - 1)), np.ones((n, 1))], axis=1)
    y = rng.integers(0, k, n).astype(np.int32)
    return rng, a, y, k


def test_per_sample_grads_match_numpy_closed_form():
    rng, a, y, k = _problem()
    theta = rng.standard_normal((a.shape[1], k))
    with jax.enable_x64(True):
        g = np.asarray(V.per_sample_grads(theta, a, y, 0.1))
    z = a @ theta
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = a[:, :, None] * (p - np.eye(k)[y])[:, None, :] + 0.1 * theta
    np.testing.assert_allclose(g, expected, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_kd_gradient_is_control_variate(lam):
    rng, a, y, k = _problem(1)
    theta, theta_t = rng.standard_normal((2, a.shape[1], k))
    with jax.enable_x64(True):
        kd = np.asarray(V.kd_per_sample_grads(theta, theta_t, a, y, lam))
        cv = np.asarray(V.control_variate_grads(theta, theta_t, a, y, lam))
    assert np.max(np.abs(kd - cv)) < 1e-12


def test_identity_fails_away_from_temperature_one():
    rng, a, y, k = _problem(2)
    theta, theta_t = rng.standard_normal((2, a.shape[1], k))
    with jax.enable_x64(True):
        kd = np.asarray(V.kd_per_sample_grads(theta, theta_t, a, y, 0.7, 3.0))
        cv = np.asarray(V.control_variate_grads(theta, theta_t, a, y, 0.7))
    assert np.max(np.abs(kd - cv)) > 1e-3


def test_variance_formula_matches_empirical_and_lam_star_minimises():
    rng, a, y, k = _problem(3)
    with jax.enable_x64(True):
        theta_star = V.minimise(a, y, k, l2=0.05)
        theta_t = theta_star + 0.3 * rng.standard_normal(theta_star.shape)
        stats = V.noise_statistics(theta_star, theta_t, a, y, l2=0.05)
        lams = np.linspace(-0.5, 2.0, 11)
        for lam, formula in zip(lams, V.variance_curve(stats, lams)):
            g = np.asarray(V.kd_per_sample_grads(theta_star, theta_t, a, y, float(lam))).reshape(
                len(y), -1
            )
            assert formula == pytest.approx(np.mean(np.sum((g - g.mean(0)) ** 2, 1)), rel=1e-10)
    fine = np.linspace(-1, 3, 4001)
    assert np.all(V.variance_curve(stats, fine) >= stats["variance_at_lam_star"] - 1e-12)
    assert V.variance_curve(stats, [stats["lam_star_var"]])[0] == pytest.approx(
        stats["variance_at_lam_star"]
    )


def test_perfect_teacher_gives_zero_variance_at_lam_one():
    _, a, y, k = _problem(4)
    with jax.enable_x64(True):
        theta_star = V.minimise(a, y, k, l2=0.05)
        stats = V.noise_statistics(theta_star, theta_star, a, y, l2=0.05)
    assert stats["lam_star_var"] == pytest.approx(1.0)
    assert stats["variance_at_lam_star"] == pytest.approx(0.0, abs=1e-10)
    assert stats["bias_norm"] < 1e-6


def test_minimise_reaches_stationary_point():
    _, a, y, k = _problem(5)
    with jax.enable_x64(True):
        theta_star = V.minimise(a, y, k, l2=0.05)
        g = np.asarray(V.per_sample_grads(theta_star, a, y, 0.05)).mean(0)
    assert np.linalg.norm(g) < 1e-8


def test_sgd_variants_behave_as_theory_predicts():
    _, a, y, k = _problem(6, n=200)
    with jax.enable_x64(True):
        theta_star = V.minimise(a, y, k, l2=0.05)
        f_star = float(V.full_loss(theta_star, a, y, 0.05))
        run = lambda method, lam, teacher: (
            V.run_sgd(
                a,
                y,
                teacher,
                method=method,
                lam=lam,
                learning_rate=0.05,
                epochs=30,
                batch_size=5,
                l2=0.05,
            )
            - f_star
        )
        sgd = run("sgd", 0.0, theta_star)
        kd_perfect = run("kd", 1.0, theta_star)
        svrg = run("svrg", 1.0, theta_star)
    # A perfect teacher at lam = 1 removes all noise: linear convergence to f*.
    assert kd_perfect[-1] < 1e-10 < sgd[-1]
    assert svrg[-1] < 1e-8
    with pytest.raises(ValueError, match="method"):
        V.run_sgd(a, y, theta_star, method="adam", learning_rate=0.1, epochs=1)


@pytest.mark.slow
def test_quick_experiment_runs():
    r = V.run_experiment(quick=True)
    assert r["identity"]["max_abs_diff_lam0.7"] < 1e-12
    ds = r["datasets"]["mnist1d"]
    np.testing.assert_allclose(ds["variance"]["formula"], ds["variance"]["empirical"], rtol=1e-8)
