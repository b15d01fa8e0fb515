"""Tests for ntkd.kernels: alignment, CKA, spectrum, and matrix-free estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import ntk_oracle

from ntkd import kernels


def random_psd(rng, n, *, decay=None):
    U, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = rng.uniform(0.1, 1.0, n) if decay is None else decay ** np.arange(n)
    return U @ np.diag(eig) @ U.T


def numpy_alignment(K1, K2, centered=False):
    if centered:
        H = np.eye(len(K1)) - 1.0 / len(K1)
        K1, K2 = H @ K1 @ H, H @ K2 @ H
    return np.sum(K1 * K2) / (np.linalg.norm(K1) * np.linalg.norm(K2))


# --- dense alignment ----------------------------------------------------------


@pytest.mark.parametrize("centered", [False, True])
def test_alignment_matches_numpy_and_invariances(centered):
    rng = np.random.default_rng(0)
    K1, K2 = random_psd(rng, 15), random_psd(rng, 15)
    got = kernels.kernel_alignment(K1, K2, centered=centered)
    assert got == pytest.approx(numpy_alignment(K1, K2, centered), rel=1e-12)
    assert kernels.kernel_alignment(K1, K1, centered=centered) == pytest.approx(1, abs=1e-12)
    assert kernels.kernel_alignment(3.0 * K1, 0.01 * K2, centered=centered) == pytest.approx(
        got, rel=1e-12
    )
    shifted = kernels.kernel_alignment(K1 + 5.0, K2, centered=centered)
    if centered:
        assert shifted == pytest.approx(got, rel=1e-10)
    else:
        assert abs(shifted - got) > 1e-3


def test_centered_full_kernel_centres_over_examples():
    rng = np.random.default_rng(1)
    n, k = 6, 2
    mats = [random_psd(rng, n * k) for _ in range(2)]
    K4 = [m.reshape(n, k, n, k).transpose(0, 2, 1, 3) for m in mats]
    H = np.kron(np.eye(n) - 1.0 / n, np.eye(k))
    c1, c2 = H @ mats[0] @ H, H @ mats[1] @ H
    expected = np.sum(c1 * c2) / (np.linalg.norm(c1) * np.linalg.norm(c2))
    assert kernels.kernel_alignment(*K4, centered=True) == pytest.approx(expected, rel=1e-12)


def test_alignment_errors():
    with pytest.raises(ValueError, match=r"same shape, got \(3, 3\) and \(4, 4\)"):
        kernels.kernel_alignment(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="zero centred Frobenius norm"):
        kernels.kernel_alignment(np.ones((3, 3)), np.eye(3), centered=True)
    with pytest.raises(ValueError, match=r"K2 has a non-finite entry K2\[0, 0\] = nan"):
        kernels.kernel_alignment(np.eye(2), np.diag([np.nan, 1.0]))


def test_alignment_spectrum_matches_eigh():
    rng = np.random.default_rng(2)
    K, Y = random_psd(rng, 20), rng.normal(size=(20, 3))
    curve = kernels.alignment_spectrum(K, Y)
    w, V = np.linalg.eigh(K)
    order = np.argsort(w)[::-1]
    expected = np.cumsum(np.sum((V[:, order].T @ Y) ** 2, axis=1)) / np.sum(Y**2)
    np.testing.assert_allclose(curve, expected, rtol=1e-10)
    assert curve.shape == (20,)
    assert np.all(np.diff(curve) >= -1e-15) and curve[-1] == pytest.approx(1, abs=1e-12)
    top = V[:, order[0]]
    np.testing.assert_allclose(kernels.alignment_spectrum(K, top)[0], 1.0, rtol=1e-10)


# --- matrix-free estimators --------------------------------------------------


def matvec_of(K):
    K_j = jnp.asarray(K, jnp.float32)
    return jax.jit(lambda v: K_j @ v)


def test_trace_estimators_fall_within_error_bars():
    rng = np.random.default_rng(3)
    K = random_psd(rng, 60, decay=0.9)
    f = lambda v: K @ v  # noqa: E731
    for est in (
        kernels.hutchinson_trace(f, 60, num_probes=30, key=jax.random.key(0)),
        kernels.hutchpp_trace(f, 60, num_matvecs=30, key=jax.random.key(0)),
    ):
        assert est.stderr > 0
        assert abs(est.value - np.trace(K)) <= 4 * est.stderr
    fast = random_psd(rng, 60, decay=0.6)  # eNTK-like fast decay: Hutch++ wins
    g = lambda v: fast @ v  # noqa: E731
    assert (
        kernels.hutchpp_trace(g, 60, num_matvecs=30).stderr
        < 0.1 * kernels.hutchinson_trace(g, 60, num_probes=30).stderr
    )


@pytest.mark.parametrize(
    "estimator, kwargs",
    [
        (kernels.hutchinson_trace, {"num_probes": 20}),
        (kernels.hutchpp_trace, {"num_matvecs": 30}),
    ],
)
def test_trace_error_bars_have_reasonable_coverage(estimator, kwargs):
    rng = np.random.default_rng(4)
    K = random_psd(rng, 40, decay=0.85)
    f = lambda v: K @ v  # noqa: E731
    hits = 0
    for seed in range(40):
        lo, hi = estimator(f, 40, key=jax.random.key(seed), **kwargs).interval(1.96)
        hits += lo <= np.trace(K) <= hi
    assert hits >= 32  # nominal 95%: 38 of 40 expected


def test_full_shape_trace_estimate():
    rng = np.random.default_rng(5)
    n, k = 10, 3
    mat = random_psd(rng, n * k)
    K4 = mat.reshape(n, k, n, k).transpose(0, 2, 1, 3)
    matvec = lambda v: np.einsum("ijab,jb->ia", K4, v)  # noqa: E731
    est = kernels.hutchpp_trace(matvec, (n, k), num_matvecs=90)
    assert est.value == pytest.approx(np.einsum("iiaa->", K4), rel=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
@pytest.mark.parametrize("centered", [False, True])
def test_alignment_estimate_within_error_bars(method, centered):
    rng = np.random.default_rng(6)
    K1 = random_psd(rng, 50, decay=0.8)
    K2 = K1 + 0.5 * random_psd(rng, 50, decay=0.9)
    exact = numpy_alignment(K1, K2, centered)
    hits = 0
    for seed in range(20):
        est = kernels.estimate_alignment(
            K1.__matmul__,
            K2.__matmul__,
            50,
            centered=centered,
            method=method,
            num_probes=20,
            key=jax.random.key(seed),
        )
        assert abs(est.value - exact) <= 4 * est.stderr + 1e-6
        hits += abs(est.value - exact) <= 1.96 * est.stderr + 1e-6
    assert hits >= 15


def test_alignment_estimate_with_jax_float32_matvecs():
    rng = np.random.default_rng(7)
    K1, K2 = random_psd(rng, 30, decay=0.7), random_psd(rng, 30, decay=0.7)
    est = kernels.estimate_alignment(matvec_of(K1), matvec_of(K2), 30, num_probes=16)
    assert abs(est.value - numpy_alignment(K1, K2)) <= 4 * est.stderr + 1e-5
    assert est.num_matvecs == 16 + 8 + 16


def test_estimators_with_ntk_vector_products():
    from ntkd import models, ntk

    model = models.get_model("mlp", 3, widths=(32,))
    apply_fn, params = ntk.flax_apply_fn(
        model, models.init_variables(model, jax.random.key(0), (5,))
    )
    moved = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    x = jax.random.normal(jax.random.key(1), (30, 5))
    K0, K1 = (np.asarray(ntk_oracle(apply_fn, p, x), np.float64) for p in (params, moved))
    mv0, mv1 = ntk.ntk_vp_fn(apply_fn, params, x), ntk.ntk_vp_fn(apply_fn, moved, x)
    tr = kernels.hutchpp_trace(mv0, 30, num_matvecs=24)
    assert abs(tr.value - np.trace(K0)) <= 4 * tr.stderr + 1e-4 * np.trace(K0)
    for centered in (False, True):
        est = kernels.estimate_alignment(mv0, mv1, 30, centered=centered, num_probes=16)
        exact = kernels.kernel_alignment(K0, K1, centered=centered)
        assert abs(est.value - exact) <= 4 * est.stderr + 1e-4


def test_estimator_argument_errors():
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        kernels.hutchinson_trace(lambda v: v, 3, num_probes=1)
    with pytest.raises(ValueError, match="num_matvecs must be >= 6, got 3"):
        kernels.hutchpp_trace(lambda v: v, 3, num_matvecs=3)
    with pytest.raises(ValueError, match="method must be 'hutchpp' or 'hutchinson'"):
        kernels.estimate_alignment(lambda v: v, lambda v: v, 3, method="exact")
