"""Tests for ntkd.theory.knowledge (Tang et al. 2020)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkd.theory import knowledge as K
from ntkd.training import kd_loss, softmax_cross_entropy


def _probs(rng, n, k, scale=2.0):
    z = scale * rng.standard_normal((n, k))
    return np.exp(z) / np.exp(z).sum(1, keepdims=True), z


@pytest.mark.parametrize("lam", [0.3, 0.7, 1.0])
def test_rescaling_factor_matches_autodiff(lam):
    rng = np.random.default_rng(0)
    n, k = 16, 5
    _, z_s = _probs(rng, n, k)
    p_t, z_t = _probs(rng, n, k)
    labels = rng.integers(0, k, n)

    def kd(z):
        return (1 - lam) * softmax_cross_entropy(z, labels) + lam * kd_loss(
            z, jnp.asarray(z_t), 1.0
        )

    with jax.enable_x64(True):
        z = jnp.asarray(z_s, jnp.float64)
        g_kd = np.asarray(jax.grad(kd)(z))[np.arange(n), labels]
        g_ce = np.asarray(jax.grad(lambda z: softmax_cross_entropy(z, labels))(z))[
            np.arange(n), labels
        ]
    p_s = np.exp(z_s) / np.exp(z_s).sum(1, keepdims=True)
    np.testing.assert_allclose(K.rescaling_factors(p_s, p_t, labels, lam), g_kd / g_ce, rtol=1e-10)


def test_kd_pt_target_is_label_smoothing_with_effective_eps():
    rng = np.random.default_rng(1)
    p_t, _ = _probs(rng, 20, 6)
    labels = rng.integers(0, 6, 20)
    q = K.ladder_targets("kd_pt", labels, p_t, lam=0.6)
    eps = K.effective_smoothing(p_t, labels, 0.6)
    np.testing.assert_allclose(
        q, (1 - eps)[:, None] * np.eye(6)[labels] + eps[:, None] / 6, atol=1e-6
    )
    # LS uses the mean eps, so its targets are the mean of KD-pt's over the data.
    ls = K.ladder_targets("ls", labels, p_t, lam=0.6)
    assert ls[0, labels[0]] == pytest.approx(1 - eps.mean() + eps.mean() / 6, abs=1e-6)


def test_ladder_targets_are_distributions():
    rng = np.random.default_rng(2)
    p_t, _ = _probs(rng, 10, 4)
    labels = rng.integers(0, 4, 10)
    sim = K.sim_distributions(rng.standard_normal((8, 4)), 0.5)
    for v in K.LADDER:
        q = K.ladder_targets(v, labels, p_t, lam=0.5, sim=sim)
        np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-6)
        assert q.min() >= 0
    np.testing.assert_allclose(K.ladder_targets("kd", labels, p_t, lam=0.0), np.eye(4)[labels])
    with pytest.raises(ValueError, match="sim="):
        K.ladder_targets("kd_sim", labels, p_t, lam=0.5)
    with pytest.raises(ValueError, match="unknown variant 'kd_x'"):
        K.ladder_targets("kd_x", labels, p_t, lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        K.ladder_targets("kd", labels, p_t, lam=1.5)


def test_sim_temperature_calibration_hits_target():
    head = np.random.default_rng(3).standard_normal((16, 6))
    alpha = K.calibrate_sim_temperature(head, 0.6)
    assert np.mean(np.diag(K.sim_distributions(head, alpha))) == pytest.approx(0.6, abs=1e-6)


def test_class_similarity_and_geometry_helpers():
    k = 4
    labels = np.repeat(np.arange(k), 3)
    probs = np.full((12, k), 0.1)
    probs[np.arange(12), labels] = 0.5
    probs[labels == 0, 1] = 0.3  # class 0 confused with 1
    probs[labels == 0, 2:] = 0.1
    probs /= probs.sum(1, keepdims=True)
    s = K.teacher_class_similarity(probs, labels, k)
    np.testing.assert_allclose(s, s.T)
    assert np.all(np.diag(s) == 0) and s[0, 1] == s.max()
    head = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.1, 1.0, 1.0]])
    c = K.class_cosine(head)
    np.testing.assert_allclose(np.diag(c), 1.0)
    contrast = K.superclass_contrast(c, np.array([0, 0, 1, 1]))
    assert contrast["within"] > 0.9 and contrast["difference"] > 0.8
    assert K.offdiag_correlation(c, c) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="classes \\[3\\]"):
        K.teacher_class_similarity(probs[:9], labels[:9], k)


def test_ece_of_perfectly_calibrated_and_overconfident():
    labels = np.array([0, 0, 1, 1])
    assert K.expected_calibration_error(np.eye(2)[labels], labels) == pytest.approx(0.0)
    wrong = np.eye(2)[1 - labels] * 0.99 + 0.005
    assert K.expected_calibration_error(wrong, labels) == pytest.approx(0.995)


@pytest.mark.slow
def test_quick_experiment_runs():
    r = K.run_experiment(quick=True)
    g = r["datasets"]["gaussian"]
    assert set(g["ladder"]) == set(K.LADDER)
    assert g["instance"][0]["spearman_w_vs_teacher_conf"] > 0
