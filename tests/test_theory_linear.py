"""Tests for ntkd.theory.linear against closed forms (Phuong & Lampert 2019)."""

import math

import jax
import numpy as np
import pytest

from ntkd.theory import linear as L


def _task(seed=0, n=8, d=30, kappa=1.0):
    rng = np.random.default_rng(seed)
    x = L.polynomial_angle_inputs(rng, n, d, kappa)
    w_star = np.eye(d)[0]
    return rng, x, w_star, 1.0 / (1.0 + np.exp(-x @ w_star))


def test_generator_margin_distribution_is_polynomial():
    rng = np.random.default_rng(0)
    kappa = 2.0
    x = L.polynomial_angle_inputs(rng, 50_000, 5, kappa)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-12)
    phi = np.arcsin(np.abs(x[:, 0]))  # angle to the hyperplane e_1^⊥
    for theta in (0.3, 0.8, 1.2):
        assert abs(np.mean(phi <= theta) - L.angular_margin_cdf(theta, kappa)) < 0.01


@pytest.mark.parametrize("w0_scale", [0.0, 0.5])
def test_gd_converges_to_projection(w0_scale):
    rng, x, w_star, soft = _task()
    with jax.enable_x64(True):
        w0 = w0_scale * rng.standard_normal(x.shape[1])
        w, _ = L.fit_linear_gd(x, soft, w0=w0)
    expected = L.projection_solution(x, w_star, w0=w0)
    assert np.linalg.norm(w - expected) / np.linalg.norm(expected) <= 1e-6
    # The limit interpolates the teacher's logits.
    np.testing.assert_allclose(x @ expected, x @ w_star, atol=1e-10)


def test_deep_linear_small_init_reaches_projection():
    _, x, w_star, soft = _task()
    with jax.enable_x64(True):
        w, losses = L.fit_deep_linear_gd(
            x, soft, depth=2, width=16, init_scale=1e-3, key=jax.random.PRNGKey(0), steps=5000
        )
        best = float(L.distillation_loss(L.projection_solution(x, w_star), x, soft))
    proj = L.projection_solution(x, w_star)
    assert np.linalg.norm(w - proj) / np.linalg.norm(proj) < 1e-2
    assert losses[-1] - best < 1e-8


def test_closed_form_risk_matches_monte_carlo():
    rng = np.random.default_rng(1)
    d, kappa = 10, 1.0
    w_star = np.eye(d)[0]
    x_test = L.polynomial_angle_inputs(rng, 100_000, d, kappa)
    for alpha in (0.2, 0.9, 1.4, 2.2):
        w = math.cos(alpha) * w_star + math.sin(alpha) * np.eye(d)[1]
        r = L.transfer_risk_closed_form(alpha, d, kappa)
        assert abs(L.transfer_risk(w, w_star, x_test) - r) < 4 * math.sqrt(r * (1 - r) / 1e5) + 1e-4


def test_closed_form_risk_special_angles():
    assert L.transfer_risk_closed_form(0.0, 50, 1.0) == 0.0
    assert L.transfer_risk_closed_form(0.5 * np.pi, 50, 1.0) == pytest.approx(0.5, abs=1e-9)
    assert L.transfer_risk_closed_form(2.5, 50, 1.0) == pytest.approx(
        1 - L.transfer_risk_closed_form(np.pi - 2.5, 50, 1.0)
    )


def test_bound_is_above_measured_risk():
    rng = np.random.default_rng(2)
    d = 50
    w_star = np.eye(d)[0]
    for kappa in (0.5, 1.0, 2.0):
        for n in (1, 5, 20):
            risks = [
                L.transfer_risk_closed_form(
                    L.angle(
                        L.projection_solution(L.polynomial_angle_inputs(rng, n, d, kappa), w_star),
                        w_star,
                    ),
                    d,
                    kappa,
                )
                for _ in range(30)
            ]
            assert np.mean(risks) <= L.risk_bound(n, kappa)
    assert L.risk_bound(0, 1.0) == 1.0


def test_other_minimisers_keep_the_loss_and_have_the_requested_angle():
    rng, x, w_star, soft = _task(n=10, d=40)
    w_hat = L.projection_solution(x, w_star)
    with jax.enable_x64(True):
        base = float(L.distillation_loss(w_hat, x, soft))
        for delta in (0.2, 1.0, 1.5):
            w = L.minimiser_at_angle(w_hat, x, delta, rng)
            assert L.angle(w, w_hat) == pytest.approx(delta, abs=1e-9)
            assert float(L.distillation_loss(w, x, soft)) == pytest.approx(base, abs=1e-12)


def test_distillation_angle_is_monotone_in_n():
    _, x, w_star, _ = _task(n=30, d=60)
    angles = [L.angle(L.projection_solution(x[:n], w_star), w_star) for n in range(1, 31)]
    assert L.risk_increases(angles, tol=1e-12) == 0
    assert L.risk_increases([0.3, float("nan"), 0.2, 0.25]) == 1


def test_errors_name_the_bad_value():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kappa"):
        L.polynomial_angle_inputs(rng, 3, 10, 0.0)
    with pytest.raises(ValueError, match="d must be >= 3"):
        L.polynomial_angle_inputs(rng, 3, 2, 1.0)
    with pytest.raises(ValueError, match="delta"):
        L.minimiser_at_angle(np.ones(3), np.ones((1, 3)), 2.0, rng)
    with pytest.raises(ValueError, match="depth"):
        L.fit_deep_linear_gd(
            np.ones((2, 3)), np.ones(2), depth=1, width=2, init_scale=1.0, key=jax.random.PRNGKey(0)
        )


@pytest.mark.slow
def test_quick_experiment_runs():
    r = L.run_experiment(quick=True)
    assert r["gd_check"]["linear_rel_dist_to_projection"] < 1e-6
    assert sum(r["monotonicity"]["increases"]["distillation"]) == 0
    bias = r["optimisation_bias"]
    assert bias["synthetic"]["max_abs_loss_gap"] < 1e-10
    assert bias["synthetic"]["mean_risk"][-1] > bias["synthetic"]["mean_risk"][0]
