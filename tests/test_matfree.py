"""Matrix-free complexity bounds, spectra and eNTK products (ntkd.matfree).

Oracles: NumPy/SciPy dense solves and eigh on random PSD kernels with known
spectra; the brute-force eNTK of tests/oracles.py (``jax.jacrev`` + ``einsum``); the dense
Cholesky path ``ntkd.complexity.factor_kernel``.
"""

import doctest
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import as_matrix, ntk_oracle

from ntkd import complexity, kernels, models, ntk
from ntkd.matfree import (
    MatvecError,
    NotPSDError,
    alignment_curve,
    ntk_matvec,
    nystrom_preconditioner,
    projected_ntk,
    shift_from_ridge,
    supervision_complexity_bounds,
    top_eigenpairs,
)


def psd_with_spectrum(rng, eigenvalues):
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.asarray(eigenvalues)) @ Q.T


def exact_complexity(K, Y, shift):
    return float(np.trace(Y.T @ np.linalg.solve(K + shift * np.eye(len(K)), Y)))


# Spectra (n = 160): well conditioned, power law, log-uniform down to 1e-10,
# and a few large spikes above a flat floor (what eNTKs look like).
SPECTRA = {
    "well": lambda n, rng: np.linspace(1.0, 10.0, n),
    "power": lambda n, rng: 1.0 / np.arange(1, n + 1) ** 2,
    "bad": lambda n, rng: np.logspace(0, -10, n),
    "spiked": lambda n, rng: np.concatenate(
        [rng.uniform(1e2, 1e3, 8), rng.uniform(1e-4, 1e-3, n - 8)]
    ),
}


def _check_bracket(spectrum, shift, n, seeds, rtol=1e-2):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        K = psd_with_spectrum(rng, SPECTRA[spectrum](n, rng))
        Y = rng.standard_normal((n, 1 + seed % 4))
        exact = exact_complexity(K, Y, shift)
        b = supervision_complexity_bounds(lambda V: K @ V, Y, shift=shift, rtol=rtol)
        assert b.upper_certified and b.eig_lower_source in ("shift", "exact")
        assert b.lower <= exact * (1 + 1e-10), (seed, b.lower, exact)
        assert exact <= b.upper * (1 + 1e-10), (seed, exact, b.upper)
        assert b.converged and b.relative_gap <= rtol
        assert abs(b.estimate - exact) <= 0.5 * (b.upper - b.lower) * (1 + 1e-8) + 1e-12 * exact
        # every intermediate interval is a valid bracket
        for _, _, lo, hi in b.history:
            assert lo <= exact * (1 + 1e-10) <= hi * (1 + 2e-10)
        assert b.matvecs <= Y.shape[1] * b.iterations


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("shift", [1e-6, 1e-3, 1e-1])
def test_bounds_bracket_exact_value_over_seeds(spectrum, shift):
    _check_bracket(spectrum, shift, n=120, seeds=range(10))


@pytest.mark.slow
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("shift", [1e-8, 1e-5, 1e-2])
def test_bounds_bracket_exact_value_over_many_seeds_slow(spectrum, shift):
    _check_bracket(spectrum, shift, n=400, seeds=range(100, 160), rtol=1e-3)


def test_nystrom_preconditioner_brackets_and_cuts_iterations():
    n, shift = 300, 1e-6
    iters, total = {}, {}
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        lam = np.concatenate([np.logspace(3, 0, 40), rng.uniform(1e-7, 1e-6, n - 40)])
        K = psd_with_spectrum(rng, lam)
        Y = rng.standard_normal((n, 2))
        exact = exact_complexity(K, Y, shift)
        for rank in (0, 60):
            b = supervision_complexity_bounds(
                lambda V: K @ V, Y, shift=shift, nystrom_rank=rank, key=jax.random.key(seed)
            )
            assert b.lower <= exact * (1 + 1e-10) <= b.upper * (1 + 2e-10)
            assert b.converged and b.upper_certified
            if rank:
                assert b.eig_lower_source == "nystrom" and 0.99 < b.eig_lower <= 1
                assert b.preconditioner == "nystrom(rank=60)" and b.preconditioner_matvecs == 60
            iters.setdefault(rank, []).append(b.iterations)
            total.setdefault(rank, []).append(b.matvecs)
    # Lanczos resolves the 40 outliers by itself in ~20 steps; the sketch
    # halves the steps but costs 60 products, so it pays only when reused.
    assert max(iters[60]) < min(iters[0]), iters


def test_reused_nystrom_preconditioner_saves_products_over_targets():
    n, shift = 300, 1e-7
    rng = np.random.default_rng(11)
    lam = np.concatenate([np.logspace(3, 0, 40), rng.uniform(1e-7, 1e-4, n - 40)])
    K = psd_with_spectrum(rng, lam)
    targets = [rng.standard_normal((n, 3)) for _ in range(4)]
    P = nystrom_preconditioner(lambda V: K @ V, n, 60, shift, key=jax.random.key(0))
    plain = pre = 0
    for Y in targets:
        exact = exact_complexity(K, Y, shift)
        a = supervision_complexity_bounds(lambda V: K @ V, Y, shift=shift)
        b = supervision_complexity_bounds(lambda V: K @ V, Y, shift=shift, preconditioner=P)
        for r in (a, b):
            assert r.converged and r.lower <= exact * (1 + 1e-10) <= r.upper * (1 + 2e-10)
        assert b.preconditioner_matvecs == 0 and b.iterations < a.iterations
        plain, pre = plain + a.matvecs, pre + b.matvecs
    assert pre + P.matvecs < plain, (pre, P.matvecs, plain)


def test_several_targets_share_one_krylov_space():
    rng = np.random.default_rng(12)
    n, shift = 200, 1e-4
    K = psd_with_spectrum(rng, np.logspace(1, -5, n))
    labels = rng.integers(0, 4, n)
    logits = rng.standard_normal((n, 4)) * 3
    targets = {
        "labels": np.eye(4)[labels],
        "soft": np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
        "zero": np.zeros((n, 2)),
    }
    got = supervision_complexity_bounds(lambda V: K @ V, targets, shift=shift)
    assert set(got) == set(targets)
    for name, Y in targets.items():
        exact = exact_complexity(K, Y, shift)
        b = got[name]
        assert b.converged and b.lower <= exact * (1 + 1e-10) <= b.upper * (1 + 2e-10) + 1e-300
        assert b.target_norm2 == pytest.approx(np.sum(Y**2))
    assert got["zero"].lower == got["zero"].upper == 0.0
    assert len({(b.iterations, b.matvecs) for b in got.values()}) == 1


def test_rank_deficient_targets_and_exhausted_krylov_space_are_exact():
    rng = np.random.default_rng(3)
    n = 120
    K = psd_with_spectrum(rng, np.repeat([5.0, 2.0, 0.5, 0.1], n // 4))  # 4 distinct eigenvalues
    y = rng.standard_normal((n, 2))
    Y = np.concatenate([y, y, y[:, :1] * 3.0, np.zeros((n, 1))], axis=1)  # rank 2
    b = supervision_complexity_bounds(lambda V: K @ V, Y, shift=1e-3, rtol=1e-12)
    exact = exact_complexity(K, Y, 1e-3)
    assert b.block_size == 2 and b.exhausted and b.eig_lower_source == "exact"
    assert b.lower == b.upper == pytest.approx(exact, rel=1e-10)
    assert b.iterations <= 5


def test_zero_targets_give_zero():
    b = supervision_complexity_bounds(lambda V: V, np.zeros((5, 2)))
    assert (b.lower, b.upper, b.iterations, b.matvecs) == (0.0, 0.0, 0, 0)


def test_zero_shift_upper_is_flagged_not_certified():
    rng = np.random.default_rng(4)
    K = psd_with_spectrum(rng, np.logspace(0, -3, 100))
    Y = rng.standard_normal((100, 2))
    b = supervision_complexity_bounds(lambda V: K @ V, Y, shift=0.0)
    assert not b.upper_certified and "not certified" in b.eig_lower_source
    assert b.lower <= exact_complexity(K, Y, 0.0) * (1 + 1e-10)


def test_user_eig_lower_certifies_zero_shift_and_is_checked():
    rng = np.random.default_rng(5)
    lam = np.logspace(0, -3, 100)
    K = psd_with_spectrum(rng, lam)
    Y = rng.standard_normal((100, 2))
    b = supervision_complexity_bounds(lambda V: K @ V, Y, eig_lower=0.9e-3)
    exact = exact_complexity(K, Y, 0.0)
    assert b.upper_certified and b.eig_lower_source == "user"
    assert b.lower <= exact * (1 + 1e-10) <= b.upper * (1 + 1e-10)
    with pytest.raises(NotPSDError, match="eig_lower is not a lower bound"):
        supervision_complexity_bounds(lambda V: K @ V, Y, eig_lower=0.5, rtol=1e-9)


def test_scaling_kernel_and_shift_scales_complexity_and_keeps_adjusted():
    rng = np.random.default_rng(6)
    K = psd_with_spectrum(rng, np.logspace(1, -2, 80))
    Y = rng.standard_normal((80, 3))
    shift = shift_from_ridge(1e-2, np.trace(K), 80)
    a = supervision_complexity_bounds(lambda V: K @ V, Y, shift=shift, rtol=1e-6)
    b = supervision_complexity_bounds(lambda V: 7.0 * (K @ V), Y, shift=7.0 * shift, rtol=1e-6)
    assert b.estimate == pytest.approx(a.estimate / 7.0, rel=1e-6)
    lo_a, hi_a = a.adjusted(np.trace(K))
    lo_b, hi_b = b.adjusted(7.0 * np.trace(K))
    assert lo_b == pytest.approx(lo_a, rel=1e-6) and hi_b == pytest.approx(hi_a, rel=1e-6)


@pytest.mark.parametrize("name", ["bounds", "spectra", "plan", "measure"])
def test_docstring_examples_run(name):
    import importlib

    module = importlib.import_module(f"ntkd.matfree.{name}")
    result = doctest.testmod(
        module, extraglobs={"np": np}, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------- bad input


def test_wrong_shape_matvec_is_a_clear_error():
    with pytest.raises(MatvecError, match=r"shape \(10,\) for V of shape \(10, 2\).*wrapped"):
        supervision_complexity_bounds(lambda V: V[:, 0], np.eye(10)[:, :2], shift=1.0)


def test_non_finite_matvec_is_a_clear_error():
    def mv(V):
        out = 2.0 * V
        out[3, 1] = np.nan
        return out

    with pytest.raises(MatvecError, match=r"non-finite value \(K @ V\)\[3, 1\] = nan.*float64"):
        supervision_complexity_bounds(mv, np.eye(10)[:, :2], shift=1.0)


def test_indefinite_operator_is_negative_curvature():
    rng = np.random.default_rng(7)
    K = psd_with_spectrum(rng, np.concatenate([np.linspace(1, 2, 49), [-0.5]]))
    Y = rng.standard_normal((50, 2))
    with pytest.raises(NotPSDError, match="negative curvature.*not positive"):
        supervision_complexity_bounds(lambda V: K @ V, Y, shift=1e-3, rtol=1e-10)
    with pytest.raises(NotPSDError, match="negative curvature"):
        supervision_complexity_bounds(lambda V: K @ V, Y, shift=1e-3, nystrom_rank=20)


def test_nonsymmetric_operator_is_rejected():
    rng = np.random.default_rng(8)
    M = rng.standard_normal((40, 40))
    with pytest.raises(MatvecError, match="not symmetric"):
        supervision_complexity_bounds(
            lambda V: M @ M.T @ V + 0.3 * M @ V, rng.standard_normal((40, 1)), shift=1.0, rtol=1e-12
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="shift must be a finite"):
        supervision_complexity_bounds(lambda V: V, np.ones(3), shift=-1.0)
    with pytest.raises(ValueError, match="needs shift > 0"):
        supervision_complexity_bounds(lambda V: V, np.ones(3), nystrom_rank=2)
    with pytest.raises(ValueError, match=r"Y has a non-finite entry \[1, 0\] = inf"):
        supervision_complexity_bounds(lambda V: V, np.array([1.0, np.inf]), shift=1.0)


def test_choose_path_by_memory_budget():
    from ntkd.matfree import choose_path, dense_kernel_bytes

    assert dense_kernel_bytes(1000) == 20 * 1000**2
    assert dense_kernel_bytes(100, k=10, mode="full") == 20 * 1000**2
    assert choose_path(10_000, memory_budget=4 * 2**30) == "dense"
    assert choose_path(20_000, memory_budget=4 * 2**30) == "matfree"
    assert choose_path(50_000) in ("dense", "matfree")


# ----------------------------------------------------------------- spectra


def test_top_eigenpairs_match_eigh():
    rng = np.random.default_rng(9)
    n = 300
    lam = np.concatenate([[40.0, 25.0, 12.0, 9.0, 6.0, 4.0, 3.0, 2.0], np.logspace(0, -6, n - 8)])
    K = psd_with_spectrum(rng, lam)
    e = top_eigenpairs(lambda V: K @ V, n, 8, key=jax.random.key(1))
    w, U = np.linalg.eigh(K)
    assert e.converged
    np.testing.assert_allclose(e.values, w[::-1][:8], rtol=1e-6)
    overlap = np.abs(np.sum(e.vectors * U[:, ::-1][:, :8], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    Y = rng.standard_normal((n, 3))
    np.testing.assert_allclose(
        alignment_curve(Y, e), kernels.alignment_spectrum(K, Y)[:8], atol=1e-6
    )


# ----------------------------------------------------------------- eNTK


def _mlp(n=60, k=3, width=24, seed=0):
    model = models.get_model("mlp", k, widths=(width,))
    variables = models.init_variables(model, jax.random.key(seed), (6,))
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    x = np.random.default_rng(seed).standard_normal((n, 6))
    return apply_fn, params, x


def _oracle_ntk(apply_fn, params, x, mode, logit=0):
    """The shared oracle (tests/oracles.py) as a NumPy matrix; full: (n·k, n·k), row i·k + a."""
    K = ntk_oracle(apply_fn, params, jnp.asarray(x), mode=mode, logit=logit)
    return np.asarray(as_matrix(K) if mode == "full" else K)


@pytest.mark.parametrize("mode", ["trace", "sum", "logit", "full"])
def test_streaming_matvec_matches_dense_kernel(mode):
    with jax.enable_x64(True):
        apply_fn, params, x = _mlp(n=37)
        K = _oracle_ntk(apply_fn, params, x, mode, logit=2)
        V = np.random.default_rng(1).standard_normal((K.shape[0], 3))
        for cache in ("never", "always"):
            mv = ntk_matvec(
                apply_fn,
                params,
                x,
                mode=mode,
                logit=2,
                block_size=8,
                dtype=jnp.float64,
                cache=cache,
            )
            got = mv(V)
            np.testing.assert_allclose(got, K @ V, rtol=1e-10, atol=1e-10 * np.abs(K @ V).max())
            traces = mv.traces
            mv(V + 1.0)
            assert mv.traces == traces, "second call with the same m recompiled"
            assert mv.trace() == pytest.approx(np.trace(K), rel=1e-12)
        with pytest.raises(ValueError, match="needs"):
            mv(np.ones((K.shape[0] + 1, 2)))


def test_bounds_on_real_entk_contain_dense_cholesky_value():
    with jax.enable_x64(True):
        apply_fn, params, x = _mlp(n=120, k=3, width=32)
        labels = np.random.default_rng(2).integers(0, 3, 120)
        Y = np.eye(3)[labels]
        K = np.asarray(ntk.empirical_ntk(apply_fn, params, jnp.asarray(x), mode="trace"))
        mv = ntk_matvec(apply_fn, params, x, mode="trace", block_size=32, dtype=jnp.float64)
        trace = mv.trace()
        assert trace == pytest.approx(np.trace(K), rel=1e-10)
        for ridge in (1e-4, 1e-2):
            factor = complexity.factor_kernel(K, ridge=ridge)
            dense = factor.complexity(Y)
            b = supervision_complexity_bounds(mv, Y, shift=shift_from_ridge(ridge, trace, 120))
            assert b.upper_certified and b.converged
            assert b.lower <= dense * (1 + 1e-9) <= b.upper * (1 + 1e-9), (ridge, b, dense)
            lo, hi = b.adjusted(trace)
            assert lo <= factor.adjusted_complexity(Y) * (1 + 1e-9) <= hi * (1 + 1e-9)


@pytest.mark.parametrize("mode", ["trace", "sum"])
def test_projected_ntk_error_shrinks_like_one_over_sqrt_d(mode):
    with jax.enable_x64(True):
        apply_fn, params, x = _mlp(n=50, k=3, width=16)
        K = _oracle_ntk(apply_fn, params, x, mode)
        errors = []
        for d in (16, 256, 4096):
            proj = projected_ntk(
                apply_fn,
                params,
                x,
                dim=d,
                mode=mode,
                block_size=32,
                chunk=256,
                check_n=50,
                key=jax.random.key(d),
            )
            Kh = proj.kernel()
            assert proj.error == pytest.approx(np.linalg.norm(Kh - K) / np.linalg.norm(K), rel=1e-8)
            assert proj.error <= 2.0 * proj.predicted_error, (d, proj.error, proj.predicted_error)
            V = np.random.default_rng(0).standard_normal((50, 2))
            np.testing.assert_allclose(
                proj.matvec(V), Kh @ V, rtol=1e-10, atol=1e-10 * np.abs(Kh).max()
            )
            errors.append(proj.error)
        # d grows 16× per step: the error should fall about 4× (at least 2× here)
        assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2, errors


MULTIDEVICE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ntkd import models, ntk
    from ntkd.matfree import ntk_matvec
    assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
    model = models.get_model("mlp", 3, widths=(16,))
    variables = models.init_variables(model, jax.random.key(0), (6,))
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    x = np.random.default_rng(0).standard_normal((45, 6))
    V = np.random.default_rng(1).standard_normal((45, 4))
    mv = ntk_matvec(apply_fn, params, x, block_size=4, dtype=jnp.float64, cache="never")
    np.save(sys.argv[1], mv(V))
""")


def test_four_devices_match_one(tmp_path):
    results = []
    for devices in (1, 4):
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
        )
        out = tmp_path / f"kv{devices}.npy"
        subprocess.run(
            [sys.executable, "-c", MULTIDEVICE, str(out), str(devices)], check=True, env=env
        )
        results.append(np.load(out))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12, atol=1e-12)


MULTIPROCESS = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    out, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    from ntkd import models, ntk
    from ntkd.matfree import ntk_matvec
    assert jax.process_count() == 2 and len(jax.local_devices()) == 1
    model = models.get_model("mlp", 3, widths=(16,))
    variables = models.init_variables(model, jax.random.key(0), (6,))
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    x = np.random.default_rng(0).standard_normal((45, 6))
    V = np.random.default_rng(1).standard_normal((45, 4))
    mv = ntk_matvec(apply_fn, params, x, block_size=4, dtype=jnp.float64)
    np.savez(out, kv=mv(V), trace=mv.trace(), cached=mv.cached)
""")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS, str(tmp_path / f"p{i}.npz"), str(i), str(port)],
            env=env,
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    subprocess.run(
        [sys.executable, "-c", MULTIDEVICE, str(tmp_path / "one.npy"), "1"], check=True, env=env
    )
    one = np.load(tmp_path / "one.npy")
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        assert not got["cached"]
        np.testing.assert_allclose(got["kv"], one, rtol=1e-12, atol=1e-12)
    with jax.enable_x64(True):
        model = models.get_model("mlp", 3, widths=(16,))
        variables = models.init_variables(model, jax.random.key(0), (6,))
        apply_fn, params = ntk.flax_apply_fn(model, variables)
        x = np.random.default_rng(0).standard_normal((45, 6))
        want = ntk_matvec(apply_fn, params, x, block_size=4, dtype=jnp.float64).trace()
    assert float(np.load(tmp_path / "p0.npz")["trace"]) == pytest.approx(want, rel=1e-12)
