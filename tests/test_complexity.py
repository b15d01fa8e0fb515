"""Tests for ntkd.complexity against NumPy/SciPy oracles and invariances."""

import doctest
import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import ntk_oracle

from ntkd import complexity as cx
from ntkd import kernels, targets


def random_psd(rng, n, *, floor=0.1):
    a = rng.normal(size=(n, n))
    return a @ a.T / n + floor * np.eye(n)


def full_from_matrix(mat, n, k):
    """(n·k, n·k) matrix with index i·k + a  ->  (n, n, k, k) kernel."""
    return mat.reshape(n, k, n, k).transpose(0, 2, 1, 3)


def numpy_complexity(mat, Y):
    return float(np.sum(Y * np.linalg.solve(mat, Y)))


# --- direct solves vs NumPy -------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_scalar_kernel_matches_numpy(k):
    rng = np.random.default_rng(0)
    K, Y = random_psd(rng, 30), rng.normal(size=(30, k))
    got, info = cx.supervision_complexity(K, Y, return_info=True)
    assert got == pytest.approx(numpy_complexity(K, Y), rel=1e-8)
    assert info.method == "cholesky" and info.ridge == 0 and info.jitter == 0
    assert info.condition_number == pytest.approx(np.linalg.cond(K, 1), rel=0.5)


def test_one_dimensional_targets():
    rng = np.random.default_rng(1)
    K, y = random_psd(rng, 12), rng.normal(size=12)
    assert cx.supervision_complexity(K, y) == pytest.approx(
        float(y @ np.linalg.solve(K, y)), rel=1e-8
    )


def test_full_kernel_matches_numpy_in_documented_order():
    rng = np.random.default_rng(2)
    n, k = 8, 3
    mat, Y = random_psd(rng, n * k), rng.normal(size=(n, k))
    K4 = full_from_matrix(mat, n, k)
    expected = float(Y.reshape(-1) @ np.linalg.solve(mat, Y.reshape(-1)))
    assert cx.supervision_complexity(K4, Y) == pytest.approx(expected, rel=1e-8)
    trace = np.einsum("iiaa->", K4)
    assert cx.adjusted_supervision_complexity(K4, Y) == pytest.approx(
        math.sqrt(expected * trace) / n, rel=1e-8
    )


def test_ridge_is_relative_to_mean_diagonal_and_reported():
    rng = np.random.default_rng(3)
    K, Y = random_psd(rng, 20), rng.normal(size=(20, 2))
    got, info = cx.supervision_complexity(K, Y, ridge=0.1, return_info=True)
    rho = 0.1 * np.trace(K) / 20
    assert info.ridge == pytest.approx(rho) and info.relative_ridge == 0.1
    assert got == pytest.approx(numpy_complexity(K + rho * np.eye(20), Y), rel=1e-8)


def test_jax_float32_input_is_solved_in_float64():
    rng = np.random.default_rng(4)
    K, Y = random_psd(rng, 16), rng.normal(size=(16, 2))
    got = cx.supervision_complexity(jnp.asarray(K, jnp.float32), jnp.asarray(Y, jnp.float32))
    expected = numpy_complexity(
        K.astype(np.float32).astype(np.float64), Y.astype(np.float32).astype(np.float64)
    )
    assert got == pytest.approx(expected, rel=1e-8)


def test_factor_is_reused_across_targets():
    rng = np.random.default_rng(5)
    K = random_psd(rng, 10)
    f = cx.factor_kernel(K)
    for _ in range(3):
        Y = rng.normal(size=(10, 4))
        assert f.complexity(Y) == pytest.approx(numpy_complexity(K, Y), rel=1e-8)


# --- invariances and closed forms --------------------------------------------


@pytest.mark.parametrize("c", [1e-3, 1.0, 250.0])
def test_identity_kernel_with_one_hot_gives_one(c):
    Y = targets.one_hot(jnp.arange(12) % 4, 4)
    assert cx.adjusted_supervision_complexity(c * np.eye(12), Y) == pytest.approx(1, abs=1e-12)


def test_full_identity_kernel_gives_sqrt_k():
    n, k = 6, 3
    K4 = full_from_matrix(np.eye(n * k), n, k)
    Y = targets.one_hot(jnp.arange(n) % k, k)
    assert cx.adjusted_supervision_complexity(K4, Y) == pytest.approx(math.sqrt(k), rel=1e-12)


def test_adjusted_is_invariant_to_scaling_and_permutation():
    rng = np.random.default_rng(6)
    K, Y = random_psd(rng, 25), rng.normal(size=(25, 3))
    a = cx.adjusted_supervision_complexity(K, Y, ridge=1e-3)
    assert cx.adjusted_supervision_complexity(37.0 * K, Y, ridge=1e-3) == pytest.approx(
        a, rel=1e-10
    )
    perm = rng.permutation(25)
    assert cx.adjusted_supervision_complexity(
        K[np.ix_(perm, perm)], Y[perm], ridge=1e-3
    ) == pytest.approx(a, rel=1e-10)


def test_block_diagonal_full_kernel_is_sum_of_per_class_complexities():
    rng = np.random.default_rng(7)
    n, k = 10, 3
    per_class = [random_psd(rng, n) for _ in range(k)]
    K4 = np.zeros((n, n, k, k))
    for a in range(k):
        K4[:, :, a, a] = per_class[a]
    Y = rng.normal(size=(n, k))
    expected = sum(cx.supervision_complexity(per_class[a], Y[:, a]) for a in range(k))
    assert cx.supervision_complexity(K4, Y) == pytest.approx(expected, rel=1e-10)


# --- conditioning, jitter and bad inputs --------------------------------------


def test_near_singular_kernel_warns_with_condition_number():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(10, 10))
    K = X @ np.diag(np.logspace(0, -12, 10)) @ X.T
    with pytest.warns(cx.IllConditionedKernelWarning, match="condition number"):
        _, info = cx.supervision_complexity(K, np.ones(10), return_info=True)
    assert info.condition_number > cx.COND_WARN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.supervision_complexity(K, np.ones(10), ridge=1e-3)


def test_roundoff_negative_eigenvalue_gets_jitter():
    rng = np.random.default_rng(9)
    U, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    K = U @ np.diag([5, 4, 3, 2, 1, 0.5, 0.1, -1e-15]) @ U.T
    with pytest.warns(cx.IllConditionedKernelWarning):
        _, info = cx.supervision_complexity(K, np.ones(8), return_info=True)
    assert 0 < info.jitter < 1e-12


@pytest.mark.parametrize(
    "K, Y, match",
    [
        (np.eye(4), np.ones((5, 2)), r"shape \(4, k\)"),
        (np.eye(4)[None], np.ones(4), r"shape \(1, 4, 4\)"),
        (full_from_matrix(np.eye(6), 3, 2), np.ones((3, 5)), r"k=2 outputs"),
        (np.diag([1.0, np.nan, 1.0]), np.ones(3), r"K\[1, 1\] = nan"),
        (np.eye(3), np.array([1.0, np.inf, 0.0]), r"Y\[1, 0\] = inf"),
        (np.array([[1.0, 0.5], [0.2, 1.0]]), np.ones(2), r"not symmetric: \|K\[0, 1\]"),
        (np.diag([1.0, -0.5]), np.ones(2), r"smallest eigenvalue is -0.5.*ridge="),
    ],
)
def test_bad_inputs_raise_clear_errors(K, Y, match):
    with pytest.raises(ValueError, match=match):
        cx.supervision_complexity(K, Y)


def test_negative_ridge_raises():
    with pytest.raises(ValueError, match="ridge must be >= 0, got -1"):
        cx.supervision_complexity(np.eye(2), np.ones(2), ridge=-1)


# --- conjugate gradients -----------------------------------------------------


def test_cg_matches_direct_solve():
    rng = np.random.default_rng(10)
    K, Y = random_psd(rng, 40, floor=0.05), rng.normal(size=(40, 3))
    direct = cx.supervision_complexity(K, Y)
    K_j = jnp.asarray(K)
    with jax.enable_x64(True):
        got, info = cx.supervision_complexity_cg(
            jax.jit(lambda v: K_j @ v), Y, tol=1e-8, return_info=True
        )
    assert got == pytest.approx(direct, rel=1e-4)
    assert info.method == "cg" and info.converged and info.residual <= 1e-8
    assert 0 < info.iterations <= 2 * 40


def test_cg_full_kernel_with_ridge_matches_direct():
    rng = np.random.default_rng(11)
    n, k = 10, 3
    mat, Y = random_psd(rng, n * k), rng.normal(size=(n, k))
    K4 = full_from_matrix(mat, n, k)
    direct = cx.supervision_complexity(K4, Y, ridge=1e-2)
    matvec = lambda v: np.einsum("ijab,jb->ia", K4, v)  # noqa: E731
    got = cx.supervision_complexity_cg(
        matvec, Y, full=True, ridge=1e-2, trace=np.trace(mat), tol=1e-8
    )
    assert got == pytest.approx(direct, rel=1e-4)


def test_cg_float32_matvec_reaches_1e_4():
    rng = np.random.default_rng(12)
    K, Y = random_psd(rng, 50, floor=0.2), rng.normal(size=(50, 2))
    K32 = jnp.asarray(K, jnp.float32)
    got = cx.supervision_complexity_cg(jax.jit(lambda v: K32 @ v), Y, tol=1e-5, maxiter=200)
    assert got == pytest.approx(numpy_complexity(np.asarray(K32, np.float64), Y), rel=1e-4)


def test_cg_reports_non_convergence_and_needs_trace_for_ridge():
    rng = np.random.default_rng(13)
    K = random_psd(rng, 30, floor=1e-6)
    with pytest.warns(cx.IllConditionedKernelWarning, match="maxiter=3"):
        _, info = cx.supervision_complexity_cg(
            lambda v: K @ v, np.ones(30), maxiter=3, return_info=True
        )
    assert not info.converged and info.iterations == 3
    with pytest.raises(ValueError, match="pass trace="):
        cx.supervision_complexity_cg(lambda v: K @ v, np.ones(30), ridge=1e-3)
    with pytest.raises(ValueError, match="non-positive curvature"):
        cx.supervision_complexity_cg(lambda v: -v, np.ones(3))


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_cg_with_ntk_vector_products_matches_direct_solve(mode):
    from ntkd import ntk

    apply_fn, params = tiny_student()
    x = jax.random.normal(jax.random.key(1), (24, 6))
    Y = targets.one_hot(jnp.arange(24) % 4, 4)
    K = np.asarray(ntk_oracle(apply_fn, params, x, mode=mode), np.float64)
    trace = float(np.einsum("iiaa->", K) if mode == "full" else np.trace(K))
    direct = cx.supervision_complexity(K, Y, ridge=1e-2)
    matvec = ntk.ntk_vp_fn(apply_fn, params, x, mode=mode)
    got, info = cx.supervision_complexity_cg(
        matvec, Y, full=mode == "full", ridge=1e-2, trace=trace, tol=1e-6, return_info=True
    )
    assert info.converged
    assert got == pytest.approx(direct, rel=1e-4)


# --- margin bound ------------------------------------------------------------


def test_margin_bound_terms_match_hand_computation():
    student = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 0.2], [1.0, 1.0, 4.0], [2.0, 0.0, 1.9]])
    teacher = np.array([[5.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 4.0, 1.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 0])
    b = cx.margin_bound(
        student, teacher, labels, complexity=8.0, kernel_trace=2.0, gamma=0.5, delta=0.1
    )
    # teacher argmax [0, 1, 1, 0] vs labels: one error. Student margins w.r.t.
    # it: [2, 0.3, -3, 0.1]; three are <= 0.5.
    assert b.teacher_error == 0.25
    assert b.margin_error == 0.75
    assert b.complexity_term == pytest.approx(2 / (0.5 * 4) * 4.0)
    assert b.confidence_term == pytest.approx(3 * np.sqrt(np.log(20) / 8))
    assert b.total == pytest.approx(0.25 + 0.75 + 4.0 + 3 * np.sqrt(np.log(20) / 8))
    assert set(b.as_dict()) >= {"teacher_error", "margin_error", "total", "gamma"}
    doubled = cx.margin_bound(
        student,
        teacher,
        labels,
        complexity=8.0,
        kernel_trace=2.0,
        gamma=0.5,
        delta=0.1,
        multiclass_factor=2.0,
    )
    assert doubled.complexity_term == pytest.approx(2 * b.complexity_term)


def test_margin_bound_rejects_bad_gamma():
    z = np.eye(2)
    with pytest.raises(ValueError, match="gamma must be > 0, got 0"):
        cx.margin_bound(z, z, np.array([0, 1]), complexity=1.0, kernel_trace=1.0, gamma=0)


# --- compare_teachers and tables ----------------------------------------------


def test_compare_teachers_with_precomputed_kernel():
    rng = np.random.default_rng(14)
    n, k = 20, 4
    K = random_psd(rng, n)
    labels = rng.integers(0, k, n)
    student = rng.normal(size=(n, k))
    teachers = {"epoch 1": rng.normal(size=(n, k)), "epoch 9": 5 * rng.normal(size=(n, k))}
    rows = cx.compare_teachers(
        None,
        None,
        np.zeros((n, 1)),
        labels,
        teachers,
        temperatures=(1, 4),
        kernel=K,
        student_logits=student,
        gamma=0.1,
    )
    assert [(r["target"], r["temperature"]) for r in rows] == [
        ("epoch 1", 1.0),
        ("epoch 1", 4.0),
        ("epoch 9", 1.0),
        ("epoch 9", 4.0),
        ("labels", None),
        ("random", None),
    ]
    r = rows[3]
    Y = np.asarray(targets.softmax_targets(teachers["epoch 9"], 4.0))
    assert r["complexity"] == pytest.approx(numpy_complexity(K, Y), rel=1e-6)
    assert r["adjusted_complexity"] == pytest.approx(
        math.sqrt(r["complexity"] * np.trace(K)) / n, rel=1e-12
    )
    ref = teachers["epoch 9"].argmax(1)
    assert r["teacher_accuracy"] == np.mean(ref == labels)
    srt = np.sort(student, axis=1)
    margins = student[np.arange(n), ref] - np.where(
        student.argmax(1) == ref, srt[:, -2], srt[:, -1]
    )
    assert r["margin_mean"] == pytest.approx(margins.mean(), rel=1e-5)
    assert r["margin_median"] == pytest.approx(np.median(margins), rel=1e-5)
    assert r["margin_error"] == np.mean(margins <= 0.1)
    assert rows[4]["teacher_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"teacher 'bad' logits must have shape \(20, 4\)"):
        cx.compare_teachers(
            None, None, None, labels, {"bad": np.zeros((n, 3))}, kernel=K, student_logits=student
        )


def test_compare_teachers_full_kernel_and_centred_targets():
    rng = np.random.default_rng(15)
    n, k = 8, 3
    K4 = full_from_matrix(random_psd(rng, n * k), n, k)
    z = rng.normal(size=(n, k))
    rows = cx.compare_teachers(
        None,
        None,
        None,
        np.arange(n) % k,
        {"t": z},
        temperatures=(2,),
        kernel=K4,
        student_logits=z,
        center=True,
    )
    Y = np.asarray(targets.softmax_targets(z, 2.0)) - 1.0 / k
    assert rows[0]["complexity"] == pytest.approx(cx.supervision_complexity(K4, Y), rel=1e-6)
    assert rows[0]["margin_error"] == 0.0  # the student is the teacher here
    assert rows[1]["complexity"] == pytest.approx(
        cx.supervision_complexity(K4, np.eye(k)[np.arange(n) % k]), rel=1e-10
    )


def test_write_and_format_table(tmp_path):
    rows = [
        {"target": "labels", "temperature": None, "complexity": 1.23456789},
        {"target": "t", "temperature": 2.0, "complexity": float("nan"), "extra": 3},
    ]
    csv_path, json_path = cx.write_table(rows, str(tmp_path / "table"))
    assert sorted(os.listdir(tmp_path)) == ["table.csv", "table.json"]
    with open(json_path) as f:
        back = json.load(f)
    assert back[0]["complexity"] == 1.23456789 and back[1]["complexity"] is None
    assert back[0]["extra"] is None and back[1]["extra"] == 3
    with open(csv_path, newline="") as f:
        lines = f.read().splitlines()
    assert lines[0] == "target,temperature,complexity,extra"
    assert lines[2] == "t,2.0,,3"
    text = cx.format_table(rows)
    assert text.splitlines()[2] == "| labels |  | 1.235 |  |"


@pytest.mark.parametrize("module", [cx, kernels, targets], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --- integration: temperature lowers complexity on MNIST-1D --------------------


def tiny_student(k=4, d=6):
    from ntkd import models, ntk

    model = models.get_model("mlp", k, widths=(32,))
    return ntk.flax_apply_fn(model, models.init_variables(model, jax.random.key(0), (d,)))


def test_compare_teachers_computes_the_kernel_with_the_ntk_engine():
    apply_fn, params = tiny_student()
    x = jax.random.normal(jax.random.key(1), (16, 6))
    labels = np.arange(16) % 4
    teachers = {"t": 3 * np.asarray(jax.random.normal(jax.random.key(2), (16, 4)))}
    K = np.asarray(ntk_oracle(apply_fn, params, x), np.float64)
    expected = cx.compare_teachers(
        apply_fn, params, x, labels, teachers, temperatures=(2,), kernel=K, ridge=1e-3
    )
    got = cx.compare_teachers(apply_fn, params, x, labels, teachers, temperatures=(2,), ridge=1e-3)
    for e, g in zip(expected, got):
        assert g["complexity"] == pytest.approx(e["complexity"], rel=1e-3)
        assert g["margin_mean"] == pytest.approx(e["margin_mean"], rel=1e-5)


def test_higher_temperature_lowers_teacher_complexity_on_mnist1d():
    import optax

    from ntkd import data, models

    ds = data.load_dataset("mnist1d", num_samples=2500)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    t_model = models.get_model("mlp", 10, widths=(100, 100))
    t_apply = lambda p, x: t_model.apply({"params": p}, x)  # noqa: E731
    teacher = models.init_variables(t_model, jax.random.key(0), ds.input_shape)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(teacher)

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(t_apply(p, xb), yb).mean()
        )(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    for idx in np.random.default_rng(0).integers(0, x.shape[0], (300, 128)):
        teacher, state = step(teacher, state, x[idx], y[idx])
    n = 200
    xs, ys = x[:n], np.asarray(y[:n])
    t_logits = t_apply(teacher, xs)
    assert np.mean(np.asarray(t_logits).argmax(1) == ys) > 0.8

    s_model = models.get_model("mlp", 10, widths=(64,))
    s_apply = lambda p, x: s_model.apply({"params": p}, x)  # noqa: E731
    student = models.init_variables(s_model, jax.random.key(1), ds.input_shape)["params"]
    K = ntk_oracle(s_apply, student, xs)
    rows = cx.compare_teachers(
        s_apply,
        student,
        xs,
        ys,
        {"final": t_logits},
        temperatures=(1, 2, 4, 8),
        kernel=K,
        ridge=1e-6,
    )
    c = [r["complexity"] for r in rows if r["target"] == "final"]
    a = [r["adjusted_complexity"] for r in rows if r["target"] == "final"]
    assert all(c1 > c2 for c1, c2 in zip(c, c[1:])), c
    assert all(a1 > a2 for a1, a2 in zip(a, a[1:])), a
    by_name = {r["target"]: r["adjusted_complexity"] for r in rows}
    assert by_name["random"] > by_name["labels"] > a[-1]


def test_large_cholesky_runs_blas_on_one_thread(monkeypatch):
    """From SERIAL_CHOLESKY_SIZE the factorisation runs under a one-thread BLAS limit
    (threaded OpenBLAS potrf segfaulted at n = 16,000); the factor is the same."""
    import threadpoolctl

    from ntkd import complexity as cx

    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 5))
    K = A @ A.T
    Y = rng.standard_normal((40, 3))
    ref = cx.factor_kernel(K, ridge=1e-2).complexity(Y)
    limits = []
    real = threadpoolctl.threadpool_limits

    def recording(*args, **kwargs):
        limits.append(kwargs.get("limits", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", recording)
    monkeypatch.setattr(cx, "SERIAL_CHOLESKY_SIZE", 40)
    assert cx.factor_kernel(K, ridge=1e-2).complexity(Y) == pytest.approx(ref, rel=1e-12)
    assert limits == [1]
