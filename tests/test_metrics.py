"""Metrics against brute-force NumPy loops."""

import numpy as np
import pytest

from ntkd import metrics


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(50, 6)), rng.normal(size=(50, 6)), rng.integers(0, 6, 50)


def test_accuracy_and_fidelity(data):
    zs, zt, y = data
    assert float(metrics.accuracy(zs, y)) == pytest.approx(np.mean(zs.argmax(1) == y))
    assert float(metrics.fidelity(zs, zt)) == pytest.approx(np.mean(zs.argmax(1) == zt.argmax(1)))


def test_mean_kl(data):
    zs, zt, _ = data
    for tau in (1.0, 3.0):
        pt = np.exp(zt / tau) / np.exp(zt / tau).sum(1, keepdims=True)
        ps = np.exp(zs / tau) / np.exp(zs / tau).sum(1, keepdims=True)
        expected = np.mean(np.sum(pt * np.log(pt / ps), 1))
        assert float(metrics.mean_kl(zt, zs, tau)) == pytest.approx(expected, rel=1e-5)


def test_margins_brute_force(data):
    zs, _, y = data
    expected = [zs[i, y[i]] - max(zs[i, c] for c in range(6) if c != y[i]) for i in range(50)]
    np.testing.assert_allclose(metrics.margins(zs, y), expected, rtol=1e-6)
    m = np.asarray(metrics.margins(zs, y))
    # a positive margin is exactly a correct prediction
    np.testing.assert_array_equal(m > 0, zs.argmax(1) == y)
    assert float(metrics.margin_error(m, 0.5)) == pytest.approx(np.mean(m <= 0.5))
    s = metrics.margin_summary(m, gammas=(0.0,))
    assert s["median"] == pytest.approx(np.median(m)) and s["error@0"] == pytest.approx(
        np.mean(m <= 0)
    )


def test_shape_errors(data):
    zs, zt, y = data
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.accuracy(zs, y[:10])
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.fidelity(zs, zt[:, :3])
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        metrics.margins(zs[0], y[:1])
