"""Losses and their gradients against NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkd.training import distillation_loss, kd_loss, softmax_cross_entropy


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 5)) * 2, rng.normal(size=(7, 5)) * 3, rng.integers(0, 5, 7)


def test_cross_entropy_labels_and_probs(logits):
    zs, _, y = logits
    expected = -np.mean(np.log(np_softmax(zs))[np.arange(7), y])
    with jax.enable_x64(True):
        np.testing.assert_allclose(softmax_cross_entropy(zs, y), expected, rtol=1e-12)
        np.testing.assert_allclose(softmax_cross_entropy(zs, np.eye(5)[y]), expected, rtol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_loss_value_and_gradient(logits, tau):
    zs, zt, _ = logits
    pt, ps = np_softmax(zt / tau), np_softmax(zs / tau)
    expected = tau**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    with jax.enable_x64(True):
        np.testing.assert_allclose(kd_loss(zs, zt, tau), expected, rtol=1e-12)
        grad = jax.grad(kd_loss)(jnp.asarray(zs), jnp.asarray(zt), tau)
        np.testing.assert_allclose(grad, tau * (ps - pt) / len(zs), rtol=1e-10, atol=1e-14)
        # the teacher receives no gradient
        np.testing.assert_array_equal(
            jax.grad(kd_loss, argnums=1)(jnp.asarray(zs), jnp.asarray(zt), tau), 0.0
        )


def test_kd_loss_zero_when_student_equals_teacher(logits):
    _, zt, _ = logits
    assert abs(float(kd_loss(zt, zt, 2.0))) < 1e-6


def test_distillation_loss_mixes_terms(logits):
    zs, zt, y = logits
    with jax.enable_x64(True):
        mixed = distillation_loss(zs, y, zt, temperature=4.0, alpha=0.3)
        expected = 0.3 * kd_loss(zs, zt, 4.0) + 0.7 * softmax_cross_entropy(zs, y)
        np.testing.assert_allclose(mixed, expected, rtol=1e-12)
        np.testing.assert_allclose(
            distillation_loss(zs, y), softmax_cross_entropy(zs, y), rtol=1e-12
        )


def test_cross_entropy_rejects_bad_targets(logits):
    zs, _, _ = logits
    with pytest.raises(ValueError, match="targets"):
        softmax_cross_entropy(zs, np.ones((7, 3)))
