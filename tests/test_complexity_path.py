"""Dense or matrix-free supervision complexity in the toolkit (issue 17, "use in the toolkit").

The matrix-free rows are certified intervals on the same quantity as the dense rows (the same
relative ridge λ, converted to the absolute shift with the exact trace); ``path="auto"`` picks
by the memory budget; ridge = 0 on the matrix-free path is a clear error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MNIST1D

from ntkd import complexity as cx
from ntkd import models, ntk, targets
from ntkd.data import load_dataset
from ntkd.matfree import matfree_complexity, parse_bytes, resolve_path
from ntkd.study import teacher_complexity_table

# The dense path factorises the float32 eNTK (cast to float64); the matrix-free products are
# float64. The two kernels differ by float32 round-off (~1e-7 relative per entry), which moves C
# by well under this at n <= 200 and λ = 1e-2.
FLOAT32_KERNEL_RTOL = 1e-5


def _inside(value, lo, hi, rtol):
    return lo * (1 - rtol) <= value <= hi * (1 + rtol)


def test_parse_bytes_and_resolve_path():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512mib") == 512 * 2**20
    assert parse_bytes("2e9") == parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes(4096) == 4096
    for bad in ("8 parsecs", "GiB", "-1GiB", "0", True):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)
    assert resolve_path("auto", 1000, memory_budget="1GiB") == "dense"
    assert resolve_path("auto", 1000, memory_budget=1000) == "matfree"
    assert resolve_path("dense", 10**6, memory_budget=1) == "dense"
    assert resolve_path("matfree", 10, memory_budget="1TiB") == "matfree"
    with pytest.raises(ValueError, match=r"path must be one of .* got 'fast'"):
        resolve_path("fast", 10)


def test_matfree_interval_contains_the_float64_dense_value(tiny_mnist1d):
    """Library level, all float64: the interval brackets the Cholesky value to round-off."""
    n = 160
    x, y = tiny_mnist1d.x_train[:n], tiny_mnist1d.y_train[:n]
    model = models.get_model("mlp", 10, widths=(24,))
    variables = models.init_variables(model, jax.random.key(0), tiny_mnist1d.input_shape)
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    z = 4.0 * np.random.default_rng(0).standard_normal((n, 10))
    Ys = {
        "labels": np.asarray(targets.one_hot(y, 10), np.float64),
        "τ=2": np.asarray(targets.softmax_targets(z, 2.0), np.float64),
    }
    res = matfree_complexity(apply_fn, params, x, Ys, ridge=1e-3, rtol=0.05, group_columns=10)
    assert res.groups == (("labels",), ("τ=2",))  # 10 columns each: one Krylov space per target
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        K = np.asarray(ntk.empirical_ntk(apply_fn, p64, jnp.asarray(x, jnp.float64)))
    assert res.trace == pytest.approx(np.trace(K), rel=1e-12)
    assert res.trace_source.startswith("exact")
    factor = cx.factor_kernel(K, ridge=1e-3)
    assert res.shift == pytest.approx(factor.info.ridge, rel=1e-12)
    for name, Y in Ys.items():
        b, c = res.bounds[name], res.columns(name)
        assert b.upper_certified and b.eig_lower_source == "shift"
        assert _inside(factor.complexity(Y), b.lower, b.upper, 1e-9)
        A, A_hat = factor.adjusted_complexity(Y), factor.normalized_complexity(Y)
        assert _inside(A, c["adjusted_lower"], c["adjusted_upper"], 1e-9)
        assert _inside(A_hat, c["normalized_lower"], c["normalized_upper"], 1e-9)
        assert c["adjusted_lower"] <= c["adjusted_complexity"] <= c["adjusted_upper"]
    assert res.matvecs == sum(res.bounds[g[0]].matvecs for g in res.groups)


def test_memory_budget_picks_the_matvec_cache_and_the_interval_does_not_move(tiny_mnist1d):
    """Half the budget may hold Jacobians (32 MiB), else structured features (2 MiB), else the
    products stream (2 KiB); all three give the same certified interval."""
    n = 96
    x, y = tiny_mnist1d.x_train[:n], tiny_mnist1d.y_train[:n]
    model = models.get_model("mlp", 10, widths=(24,))
    variables = models.init_variables(model, jax.random.key(0), tiny_mnist1d.input_shape)
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    Ys = {"labels": np.asarray(targets.one_hot(y, 10), np.float64)}
    got = {}
    for budget in ("64MiB", "2MiB", "2KiB"):
        res = matfree_complexity(apply_fn, params, x, Ys, ridge=1e-2, memory_budget=budget)
        got[res.matvec_cache] = res.bounds["labels"]
        assert res.columns("labels")["matvec_cache"] == res.matvec_cache
    assert set(got) == {"jacobian", "features", None}
    for b in got.values():
        assert b.lower == pytest.approx(got[None].lower, rel=1e-9)
        assert b.upper == pytest.approx(got[None].upper, rel=1e-9)


def test_dense_and_matfree_tables_measure_the_same_rows(tiny_teacher_dir):
    """``teacher_complexity_table``: every matfree row's interval holds the dense row's value."""
    kw = dict(teacher_epochs=[2, 4], temperatures=(1.0, 4.0), n=200, ridge=1e-2)
    dense = teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, path="dense", **kw)
    free = teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, path="matfree", **kw)
    assert [(r["target"], r["temperature"]) for r in free] == [
        (r["target"], r["temperature"]) for r in dense
    ]
    assert len(free) == 2 * 2 + 2  # checkpoints × temperatures, labels, random
    for d, f in zip(dense, free):
        assert d["path"] == "dense" and f["path"] == "matfree" and f["n"] == d["n"] == 200
        assert "complexity_lower" not in d
        assert f["ridge"] == pytest.approx(d["ridge"], rel=FLOAT32_KERNEL_RTOL)
        assert f["upper_certified"] and f["converged"] and f["relative_gap"] <= 1e-2
        assert f["eig_lower_source"] in ("shift", "exact")
        for stem, col in (
            ("complexity", "complexity"),
            ("adjusted", "adjusted_complexity"),
            ("normalized", "normalized_complexity"),
        ):
            lo, hi = f[f"{stem}_lower"], f[f"{stem}_upper"]
            assert _inside(d[col], lo, hi, FLOAT32_KERNEL_RTOL), (f["target"], stem, d[col], lo, hi)
        assert f["margin_mean"] == d["margin_mean"]  # the student's logits, the same either way
        assert f.get("teacher_test_acc") == d.get("teacher_test_acc")


def test_auto_path_follows_the_memory_budget(tiny_teacher_dir):
    kw = dict(teacher_epochs=[4], temperatures=(2.0,), n=64, ridge=1e-2)
    small = teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, memory_budget=1000, **kw)
    large = teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, memory_budget="1GiB", **kw)
    assert {r["path"] for r in small} == {"matfree"} and {r["path"] for r in large} == {"dense"}
    for s, big in zip(small, large):
        assert _inside(
            big["complexity"], s["complexity_lower"], s["complexity_upper"], FLOAT32_KERNEL_RTOL
        )


def test_matfree_without_ridge_is_a_clear_error(tiny_teacher_dir):
    for kw in ({"path": "matfree"}, {"path": "auto", "memory_budget": 1}):
        with pytest.raises(ValueError, match=r"needs a relative ridge > 0, got ridge=0\.0") as e:
            teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, n=50, ridge=0.0, **kw)
        assert "ridge=1e-2" in str(e.value) and "path='dense'" in str(e.value)


def test_n_all_and_too_many_examples(tiny_teacher_dir, tiny_mnist1d):
    n_train = len(tiny_mnist1d.x_train)
    rows = teacher_complexity_table(
        tiny_teacher_dir, tiny_teacher_dir, teacher_epochs=[4], temperatures=(1.0,), n="all"
    )
    assert {r["n"] for r in rows} == {n_train} and {r["path"] for r in rows} == {"dense"}
    with pytest.raises(ValueError, match=rf"n={n_train + 1} exceeds the {n_train} training"):
        teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, n=n_train + 1)
    with pytest.raises(ValueError, match="n must be an int >= 1 or 'all'"):
        teacher_complexity_table(tiny_teacher_dir, tiny_teacher_dir, n="everything")


def test_compare_teachers_refuses_a_dense_kernel_on_the_matfree_path():
    with pytest.raises(ValueError, match="kernel= is a dense kernel"):
        cx.compare_teachers(
            None,
            None,
            np.zeros((3, 1)),
            np.arange(3) % 2,
            {},
            kernel=np.eye(3),
            student_logits=np.eye(3)[:, :2],
            path="matfree",
        )


def test_load_dataset_of_the_fixture_is_the_tiny_one(tiny_mnist1d):
    assert len(tiny_mnist1d.x_train) == len(load_dataset("mnist1d", **TINY_MNIST1D).x_train)
