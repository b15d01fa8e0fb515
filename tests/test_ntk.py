"""Tests for ntkd.ntk against independent oracles (float64 jacrev + einsum, tests/oracles.py)."""

import dataclasses
import gc
import logging
import os
import subprocess
import sys
import textwrap
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntkd
from ntkd.models import get_model, init_variables
from ntkd.ntk import (
    BlockOptions,
    ContractionOptions,
    as_apply_fn,
    blocking,
    chosen_implementation,
    empirical_ntk,
    empirical_ntk_fn,
    flax_apply_fn,
    ntk_vp_fn,
)
from ntkd.ntk import models as ntk_models
from ntkd.ntk._util import leaf_groups
from ntkd.ntk.engine import _engine, _options

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracles import (  # noqa: E402
    KINDS,
    jitter,
    ntk_oracle,
    ntk_oracle_leaves,
    ntk_oracle_modes,
    reduce_full,
    rel,
)

IMPLS = ("jacobian", "ntvp", "structured", "auto")
MODES = ("full", "trace", "logit", "sum")


# ---------------------------------------------------------------- every model kind
# The default suite runs every kind with `structured` and every implementation on the plain
# function and the NNX module; the rest of the grid is marked slow (compile-bound on 2 cores).
_KIND_FAST = (
    {(k, "structured") for k in KINDS}
    | {("function", i) for i in IMPLS}
    | {("nnx_bn", "jacobian"), ("nnx_bn", "ntvp"), ("equinox", "jacobian"), ("linen_bn", "ntvp")}
    | {("equinox_bn", "jacobian")}
)
_KIND_GRID = [
    pytest.param(k, i, marks=[] if (k, i) in _KIND_FAST else [pytest.mark.slow])
    for k in KINDS
    for i in IMPLS
]


@pytest.mark.parametrize("kind,impl", _KIND_GRID)
def test_every_implementation_mode_and_model_kind_matches_oracle_float64(kind, impl):
    with jax.enable_x64(True):
        model, params, f, oracle_params, x1, x2 = KINDS[kind]()
        oracle = ntk_oracle_modes(f, oracle_params, x1, x2, logit=1)
        for mode in MODES:
            want = oracle[mode]
            got = empirical_ntk(model, params, x1, x2, mode=mode, logit=1, implementation=impl)
            assert got.dtype == jnp.float64
            assert got.shape == want.shape, (kind, impl, mode)
            assert rel(got, want) <= 1e-6, (kind, impl, mode, rel(got, want))


def _assert_structured_matches_oracle(f, p, x1, x2):
    """Every mode of the structured implementation against the float64 oracle (1e-10)."""
    oracle = ntk_oracle_modes(f, p, x1, x2)
    for mode in MODES:
        got = empirical_ntk(f, p, x1, x2, mode=mode, implementation="structured")
        assert rel(got, oracle[mode]) <= 1e-10, mode


@pytest.mark.parametrize("kind", list(KINDS))
def test_structured_finds_the_layers_of_every_model_kind(kind):
    """The jaxpr discovery gives dense/conv/embedding rules, not only the exact fallback."""
    from ntkd.ntk.structured import trace

    with jax.enable_x64(True):
        model, params, *_, x1, _ = KINDS[kind]()
        apply_fn, p = as_apply_fn(model, params)
        plan, _ = trace(
            apply_fn.fn, p, apply_fn.state, jax.ShapeDtypeStruct((1,) + x1.shape[1:], x1.dtype)
        )
    kinds = sorted({t.kind for t in plan.targets})
    want = {
        "linen_bn": ["conv", "dense"],
        "nnx_bn": ["dense"],
        "equinox": ["conv", "dense"],
        "equinox_bn": ["conv", "dense"],
        "function": ["conv", "dense"],
        "transformer": ["dense", "embed"],
    }[kind]
    assert kinds == want
    # biases are folded into their layer's rule; left over: BatchNorm / LayerNorm scales and
    # shifts, and the plain function's weight used twice
    assert (
        len(plan.leftover)
        == {
            "linen_bn": 2,
            "nnx_bn": 2,
            "equinox": 0,
            "equinox_bn": 4,
            "function": 1,
            "transformer": 6,
        }[kind]
    )
    assert (
        sum(t.bias is not None for t in plan.targets)
        == {
            "linen_bn": 2,
            "nnx_bn": 2,
            "equinox": 3,
            "equinox_bn": 3,
            "function": 2,
            "transformer": 7,
        }[kind]
    )
    if kind == "function":  # the weight used twice is left to the exact fallback
        names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)]
        assert names.index("['shared']") in plan.leftover


# ---------------------------------------------------------------- ntkd's model families
FAMILIES = {  # name -> (get_model kwargs, per-example input shape)
    "mlp": (dict(name="mlp", widths=(7, 5)), (12, 1)),
    "cnn1d": (dict(name="cnn1d", features=(4, 3), kernel_size=3, strides=(2, 1)), (12, 1)),
    "lenet5": (dict(name="lenet5", width=1, padding="SAME"), (8, 8, 1)),
    "resnet": (dict(name="resnet", depth=8, width=2), (4, 4, 2)),
}


def _make(family, n1=3, n2=2, seed=0):
    """A tiny ntkd model with non-trivial params and BatchNorm statistics."""
    kwargs, shape = FAMILIES[family]
    model = get_model(num_classes=3, **kwargs)
    k0, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 4)
    x1 = jax.random.normal(k1, (n1,) + shape)
    x2 = jax.random.normal(k2, (n2,) + shape)
    variables = jitter(init_variables(model, k0, shape), k3)
    return model, variables, x1, x2


def _f64(*trees):
    return [jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), t) for t in trees]


_SLOW = {
    ("lenet5", "ntvp"),
    ("lenet5", "jacobian"),
    ("resnet", "ntvp"),
    ("resnet", "jacobian"),
    ("lenet5", "structured"),
}
_GRID = [
    pytest.param(f, i, marks=[pytest.mark.slow] if (f, i) in _SLOW else [])
    for f in FAMILIES
    for i in ("jacobian", "ntvp", "structured")
] + [("mlp", "auto")]


@pytest.mark.parametrize("family,impl", _GRID)
def test_model_families_through_flax_apply_fn_match_oracle_float64(family, impl):
    with jax.enable_x64(True):
        model, variables, x1, x2 = _make(family, n1=3, n2=3)
        variables, x1, x2 = _f64(variables, x1, x2)
        apply_fn, params = flax_apply_fn(model, variables)
        oracle = ntk_oracle_modes(apply_fn, params, x1, x2, logit=1)
        for mode in MODES:
            want = oracle[mode]
            got = empirical_ntk_fn(apply_fn, mode=mode, logit=1, implementation=impl)(
                x1, x2, params
            )
            assert got.dtype == jnp.float64
            assert rel(got, want) <= 1e-6, (family, impl, mode, rel(got, want))


def test_model_apply_as_a_plain_function_matches_oracle():
    """``model.apply`` with the whole variables dict: everything passed is differentiated."""
    with jax.enable_x64(True):
        model, variables, x1, x2 = _make("cnn1d")
        variables, x1, x2 = _f64(variables, x1, x2)
        oracle = ntk_oracle_modes(model.apply, variables, x1, x2)
        for impl in ("structured", "auto"):
            for mode in ("full", "trace"):
                got = empirical_ntk(model.apply, variables, x1, x2, mode=mode, implementation=impl)
                assert rel(got, oracle[mode]) <= 1e-6, (impl, mode)


def test_chosen_implementation_is_what_auto_runs():
    """auto's choice is one exact algorithm, it is cached, and running it gives auto's kernel."""
    with jax.enable_x64(True):
        model, variables, x1, _ = _make("mlp")
        variables, x1 = _f64(variables, x1)
        picked = chosen_implementation(model, variables, x1)
        assert picked in ("structured", "jacobian", "ntvp")
        assert chosen_implementation(model, variables, x1) == picked  # cached, not re-measured
        assert chosen_implementation(model, variables, x1, implementation="ntvp") == "ntvp"
        auto = empirical_ntk(model, variables, x1)
        fixed = empirical_ntk(model, variables, x1, implementation=picked)
        assert rel(auto, fixed) <= 1e-12
        with pytest.raises(ValueError, match="x1 is required"):
            chosen_implementation(model, variables)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_model_closed_form(impl):
    """f(x) = W x + b has Θ(x, x') = (x·x' + 1) I_k."""
    with jax.enable_x64(True):
        model = nn.Dense(4)
        x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 3), jnp.float64)
        variables = _f64(model.init(jax.random.PRNGKey(0), x1))[0]
        gram = np.asarray(x1) @ np.asarray(x2).T + 1.0
        full = empirical_ntk(model, variables, x1, x2, mode="full", implementation=impl)
        np.testing.assert_allclose(full, gram[:, :, None, None] * np.eye(4), rtol=1e-12, atol=1e-12)
        trace = empirical_ntk(model, variables, x1, x2, mode="trace", implementation=impl)
        np.testing.assert_allclose(trace, 4 * gram, rtol=1e-12)


class _OddConvs(nn.Module):
    """Convolutions of every padding kind Flax has, with strides and dilation."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3,), strides=2, padding=((2, 1),), kernel_dilation=2)(x))
        x = nn.tanh(nn.Conv(3, (2,), padding="CAUSAL")(x))
        x = nn.tanh(nn.Conv(2, (3,), padding="REFLECT", use_bias=False)(x))
        x = nn.tanh(nn.Conv(3, (3,), padding="CIRCULAR")(x))
        x = nn.tanh(nn.Conv(4, (3,), strides=2, padding="SAME", kernel_dilation=2)(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_structured_on_every_conv_padding_matches_oracle():
    with jax.enable_x64(True):
        model = _OddConvs()
        x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 11, 2), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 11, 2), jnp.float64)
        variables = _f64(model.init(jax.random.PRNGKey(0), x1))[0]
        apply_fn, params = flax_apply_fn(model, variables)
        oracle = ntk_oracle_modes(apply_fn, params, x1, x2)
        for mode in MODES:
            got = empirical_ntk(apply_fn, params, x1, x2, mode=mode, implementation="structured")
            assert rel(got, oracle[mode]) <= 1e-10, mode


@pytest.mark.parametrize("layout", [("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC")])
def test_structured_lax_convolutions_with_dilations_and_layouts(layout):
    """lax-level convs: input (transposed-conv) and kernel dilation, strides, explicit pads, layouts."""
    with jax.enable_x64(True):
        lhs, rhs, _ = layout
        ws = {"HWIO": (3, 2, 2, 4), "OIHW": (4, 2, 3, 2)}
        p = {
            "w1": jax.random.normal(jax.random.PRNGKey(0), ws[rhs], jnp.float64),
            "w2": jax.random.normal(jax.random.PRNGKey(1), ws[rhs], jnp.float64)[..., :1]
            if rhs == "HWIO"
            else jax.random.normal(jax.random.PRNGKey(1), (1, 4, 3, 2), jnp.float64),
        }
        if rhs == "HWIO":
            p["w2"] = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 4, 1), jnp.float64)

        def f(p, x):
            h = jax.lax.conv_general_dilated(
                x,
                p["w1"],
                (2, 1),
                ((1, 2), (0, 1)),
                lhs_dilation=(1, 2),
                rhs_dilation=(2, 1),
                dimension_numbers=layout,
            )
            h = jax.lax.conv_general_dilated(
                jnp.tanh(h), p["w2"], (1, 2), "SAME", dimension_numbers=layout
            )
            return h.reshape(x.shape[0], -1)[:, :3]

        shape = (2, 7, 5) if lhs == "NCHW" else (7, 5, 2)
        x1 = jax.random.normal(jax.random.PRNGKey(2), (3,) + shape, jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(3), (2,) + shape, jnp.float64)
        _assert_structured_matches_oracle(f, p, x1, x2)


def test_structured_dense_with_shared_axes_and_weight_on_the_left():
    """einsum with a weight batch axis (per-head weights) and W @ x (weight as lhs)."""
    with jax.enable_x64(True):
        p = {
            "heads": jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3), jnp.float64),
            "left": jax.random.normal(jax.random.PRNGKey(1), (3, 6), jnp.float64),
        }

        def f(p, x):  # x: (n, 2 heads, 4)
            h = jnp.tanh(jnp.einsum("nhd,hde->nhe", x, p["heads"])).reshape(x.shape[0], -1)
            return (p["left"] @ h.T).T

        x1 = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 4), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 4), jnp.float64)
        _assert_structured_matches_oracle(f, p, x1, x2)


def test_structured_embedding_lookups_out_of_range_and_repeated_tokens():
    """jnp.take (fill: out-of-range rows get no gradient), clip mode, E[ids]; repeated ids."""
    with jax.enable_x64(True):
        p = {
            "e": jax.random.normal(jax.random.PRNGKey(0), (6, 3), jnp.float64),
            "c": jax.random.normal(jax.random.PRNGKey(1), (6, 3), jnp.float64),
            "i": jax.random.normal(jax.random.PRNGKey(2), (6, 3), jnp.float64),
        }

        def f(p, ids):
            h = (
                jnp.take(p["e"], ids, axis=0, fill_value=0.0)
                + jnp.take(p["c"], ids + 2, axis=0, mode="clip")
                + p["i"][ids % 6]
            )
            return jnp.tanh(h).sum(1)

        x1 = jnp.array([[0, 1, 1, 7], [5, 5, 2, 0], [3, 3, 3, 3]])
        x2 = jnp.array([[1, 1, 0, 9], [2, 4, 5, 5]])
        _assert_structured_matches_oracle(f, p, x1, x2)


def test_gram_in_chunks_equals_one_matmul():
    """The cache-blocked Gram (K split into chunks plus a remainder) == NumPy's a @ b.T."""
    from ntkd.ntk._util import gram

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7001)), rng.normal(size=(3, 7001))
    opts = ContractionOptions(gram_chunk_bytes=8 * 8 * 600, gram_chunk_min_depth=0)
    with jax.enable_x64(True):
        got = gram(jnp.asarray(a), jnp.asarray(b), opts)  # 600 columns per step: 11 steps + 401
    np.testing.assert_allclose(got, a @ b.T, rtol=1e-12, atol=1e-10)


def test_symmetric_gram_by_halves_equals_one_matmul():
    """``gram(a, a)`` (three half blocks, the fourth mirrored; odd rows; chunked K) == a @ a.T;
    the depth bounds decide between halves (three matmuls) and one matmul."""
    from ntkd.ntk._util import gram

    rng = np.random.default_rng(1)
    halves = lambda chunk: ContractionOptions(  # noqa: E731
        gram_chunk_bytes=chunk, gram_chunk_min_depth=0, symmetric_max_depth_ratio=float("inf")
    )
    with jax.enable_x64(True):
        depth0 = ContractionOptions().symmetric_min_depth
        for rows, depth, chunk in [(65, depth0, 2**30), (97, 7001, 8 * 160 * 600)]:
            a = rng.normal(size=(rows, depth))
            got = np.asarray(jax.jit(lambda v: gram(v, v, halves(chunk)))(jnp.asarray(a)))
            np.testing.assert_allclose(got, a @ a.T, rtol=1e-12, atol=1e-10)
            np.testing.assert_array_equal(got, got.T)
        v = jnp.asarray(rng.normal(size=(64, 1024)))
        dots = lambda opts: str(jax.make_jaxpr(lambda v: gram(v, v, opts))(v)).count("dot_general")  # noqa: E731
        assert dots(halves(2**30)) == 3
        assert dots(dataclasses.replace(halves(2**30), symmetric_max_depth_ratio=15.9)) == 1
        assert dots(dataclasses.replace(halves(2**30), symmetric_min_depth=1025)) == 1
        assert dots(dataclasses.replace(halves(2**30), symmetric_min_rows=65)) == 1


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_diagonal_blocks_with_symmetric_grams_match_oracle(mode):
    """Kernels whose diagonal blocks are big enough for the symmetric Gram (≥ 64 rows, ≥ 512
    columns; no depth cap), one block and blocked, every Gram-based implementation, against
    the oracle."""
    halves = ContractionOptions(symmetric_max_depth_ratio=float("inf"))

    def f(p, x):
        h = jnp.tanh(x @ p["w0"])
        return jnp.tanh(h @ p["w1"]) @ p["w2"]

    with jax.enable_x64(True):
        key = jax.random.split(jax.random.PRNGKey(0), 4)
        p = {
            "w0": jax.random.normal(key[0], (600, 9), jnp.float64) / 25,
            "w1": jax.random.normal(key[1], (9, 70), jnp.float64) / 3,
            "w2": jax.random.normal(key[2], (70, 3), jnp.float64) / 8,
        }
        x = jax.random.normal(key[3], (150, 600), jnp.float64)
        want = ntk_oracle(f, p, x, None, mode)
        for impl in ("structured", "jacobian"):
            for block in (None, 64):
                got = empirical_ntk(
                    f, p, x, mode=mode, implementation=impl, block_size=block, contraction=halves
                )
                assert rel(got, want) < 1e-12, (impl, block)


@pytest.mark.parametrize("family", [pytest.param("lenet5", marks=pytest.mark.slow), "resnet"])
def test_structured_vmapped_cotangents_match_oracle(family):
    """k above cotangent_loop_max takes the vmapped-VJP path (max-pooling LeNet, BatchNorm ResNet)."""
    opts = ContractionOptions(cotangent_loop_max=1, gram_chunk_bytes=4096, gram_chunk_min_depth=0)
    _assert_family_structured_matches_oracle(family, opts)


def _assert_family_structured_matches_oracle(family, *contractions):
    """A tiny model family's structured `full` and `trace` kernels under each
    ContractionOptions against the float64 oracle (1e-6)."""
    with jax.enable_x64(True):
        model, variables, x1, x2 = _make(family)
        variables, x1, x2 = _f64(variables, x1, x2)
        apply_fn, params = flax_apply_fn(model, variables)
        oracle = ntk_oracle_modes(apply_fn, params, x1, x2)
        for opts in contractions:
            for mode in ("full", "trace"):
                got = empirical_ntk(
                    apply_fn,
                    params,
                    x1,
                    x2,
                    mode=mode,
                    implementation="structured",
                    contraction=opts,
                )
                assert rel(got, oracle[mode]) <= 1e-6, (family, opts, mode)


@pytest.mark.parametrize("family", ["cnn1d", "resnet"])
def test_structured_weight_gradients_in_either_layout_match_oracle(family):
    """Per-example conv weight gradients with the cotangent columns last
    (``wide_grad_ratio=0``) or the input columns last (``inf``) give the oracle's kernel
    in ``full`` (every conv as weight gradients) and ``trace``. (A kernel cannot see the
    order of the P axis, only which logit each row belongs to; the order is checked by
    test_weight_grads_in_both_layouts_match_einsum.)"""
    _assert_family_structured_matches_oracle(
        family,
        ContractionOptions(wide_grad_ratio=0.0),
        ContractionOptions(wide_grad_ratio=float("inf")),
    )


# ---------------------------------------------------------------- per-layer kernels
@pytest.mark.parametrize(
    "kind",
    ["linen_bn", pytest.param("transformer", marks=pytest.mark.slow), "equinox", "equinox_bn"],
)
def test_by_layer_kernels_match_oracle_per_group_and_sum_to_whole(kind):
    from ntkd.ntk._util import leaf_groups

    with jax.enable_x64(True):
        model, params, f, oracle_params, x1, x2 = KINDS[kind]()
        groups = leaf_groups(as_apply_fn(model, params)[1])
        per_group = {}
        for g, term in zip(groups, ntk_oracle_leaves(f, oracle_params, x1, x2)):
            per_group[g] = per_group.get(g, 0) + term
        for impl in ("structured", "jacobian", "ntvp"):
            for mode in ("full", "trace", "sum"):
                parts = empirical_ntk(
                    model, params, x1, x2, mode=mode, implementation=impl, by_layer=True
                )
                assert sorted(parts) == sorted(per_group)
                whole = reduce_full(sum(per_group.values()), mode)
                assert rel(sum(parts.values()), whole) <= 1e-10, (impl, mode)
                for g, kern in parts.items():
                    err = np.max(np.abs(kern - reduce_full(per_group[g], mode)))
                    assert err <= 1e-10 * np.max(np.abs(whole)), (impl, mode, g)


def test_by_layer_groups_are_module_paths():
    model, variables, x1, _ = _make("mlp")
    parts = empirical_ntk(model, variables, x1, by_layer=True)
    assert sorted(parts) == ["dense0", "dense1", "head"]
    np.testing.assert_allclose(sum(parts.values()), empirical_ntk(model, variables, x1), rtol=1e-5)


# ---------------------------------------------------------------- blocking invariances
@pytest.mark.parametrize("impl", ["structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_blocked_equals_unblocked_and_symmetric_equals_explicit(mode, impl):
    model, variables, x1, _ = _make("cnn1d", n1=7)
    apply_fn, params = flax_apply_fn(model, variables)
    ref = empirical_ntk_fn(apply_fn, mode=mode, implementation=impl, block_size=7)(x1, x1, params)
    blocked = empirical_ntk_fn(apply_fn, mode=mode, implementation=impl, block_size=3)
    tol = dict(rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(blocked(x1, None, params), ref, **tol)
    np.testing.assert_allclose(blocked(x1, x1, params), ref, **tol)
    np.testing.assert_allclose(
        empirical_ntk_fn(apply_fn, mode=mode, implementation=impl)(x1, None, params), ref, **tol
    )
    # host streaming (as_numpy=True, or kernels above device_kernel_bytes) == device assembly
    for x2 in (None, x1[:5]):
        host = blocked(x1, x2, params, as_numpy=True)
        assert isinstance(host, np.ndarray)
        np.testing.assert_allclose(host, ref[:, :5] if x2 is not None else ref, **tol)
    streamed = empirical_ntk_fn(
        apply_fn,
        mode=mode,
        implementation=impl,
        blocks=BlockOptions(block_size=3, device_kernel_bytes=0),
    )(x1, None, params)
    assert isinstance(streamed, jax.Array)
    np.testing.assert_allclose(streamed, ref, **tol)


def _compiled(model, variables, x, mode, impl="structured", blocks=None):
    apply_fn, params = as_apply_fn(model, variables)
    options = _options(mode, 0, impl, False, None, None, blocks, None)
    engine = _engine(apply_fn.key, options, apply_fn.fn)
    sig_params = (params, apply_fn.state)
    from ntkd.ntk.engine import _spec

    sig = (_spec(params), _spec(apply_fn.state), x.shape[1:], str(x.dtype))
    problem = engine.problem(sig, apply_fn, *sig_params, x)
    c = engine.compiled(impl, sig, problem, *sig_params, x)
    return c, options[0], problem.k, params, apply_fn.state


def test_planned_blocks_are_even_and_at_least_min_blocks():
    """11 examples: `full` wants ≥ 8 blocks → 6 blocks of 2; this tiny net's `trace` factorises no
    layer over several positions → ≥ 4 blocks → 4 blocks of 3."""
    model, variables, x1, _ = _make("cnn1d", n1=11)
    opts = BlockOptions(min_block_size=2)
    for mode, want in (("full", 2), ("trace", 3)):
        c, m, k, params, state = _compiled(model, variables, x1, mode, blocks=opts)
        assert blocking.plan_block(c, m, k, params, state, x1, 11, opts) == want
        got = empirical_ntk(
            model, variables, x1, mode=mode, blocks=opts, implementation="structured"
        )
        ref = empirical_ntk(
            model, variables, x1, mode=mode, block_size=11, implementation="structured"
        )
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-5)


def test_planned_block_fits_xla_memory_plan():
    """The planned block also budgets the pair's temporaries (block² patch products), not only features."""
    model = get_model("cnn1d", 10)
    variables = init_variables(model, jax.random.PRNGKey(0), (40, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 40, 1))
    c, m, k, params, state = _compiled(model, variables, x, "trace")
    at_n = blocking.planned_bytes(c, params, state, jax.ShapeDtypeStruct(x.shape, x.dtype))
    feat = jax.eval_shape(c.row, params, state, jax.ShapeDtypeStruct((1, 40, 1), x.dtype))
    per_ex = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(feat))
    opts = BlockOptions(memory_bytes=int(at_n * 0.7), min_blocks=1)
    assert blocking.block_from_features(per_ex, k, m, opts) >= 64  # features alone would allow 64
    assert (
        c.algo.spatial
    )  # the 1-D CNN's convolutions are factorised over S > 1 positions in `trace`
    b = blocking.plan_block(c, m, k, params, state, x, 64, opts)
    assert 8 <= b < 64
    assert (
        blocking.planned_bytes(c, params, state, jax.ShapeDtypeStruct((b, 40, 1), x.dtype))
        <= opts.memory_bytes
    )
    kernel = empirical_ntk(model, variables, x, implementation="structured", blocks=opts)
    ref = empirical_ntk(model, variables, x, implementation="jacobian", block_size=64)
    np.testing.assert_allclose(kernel, ref, rtol=2e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_permuting_inputs_permutes_kernel():
    model, variables, x1, x2 = _make("cnn1d", n1=6, n2=4)
    fn = empirical_ntk_fn(model, mode="full", block_size=4)
    k = np.asarray(fn(x1, x2, variables))
    p1, p2 = np.array([3, 0, 5, 1, 4, 2]), np.array([2, 3, 1, 0])
    np.testing.assert_allclose(fn(x1[p1], x2[p2], variables), k[p1][:, p2], rtol=1e-5, atol=1e-6)


def test_jit_of_ntk_fn_matches_eager():
    model, variables, x1, x2 = _make("mlp")
    apply_fn, params = flax_apply_fn(model, variables)
    fn = empirical_ntk_fn(apply_fn, mode="trace")
    np.testing.assert_allclose(jax.jit(fn)(x1, x2, params), fn(x1, x2, params), rtol=1e-5)


# ---------------------------------------------------------------- no recompiles
class _CompileLog:
    """Collects JAX's "Compiling ..." log records."""

    def __enter__(self):
        self.records, self.handler = [], logging.Handler()
        self.handler.emit = self.records.append
        self.ctx = jax.log_compiles()
        self.ctx.__enter__()
        logging.getLogger("jax").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self.handler)
        self.ctx.__exit__(*exc)

    @property
    def compiles(self):
        return [r.getMessage() for r in self.records if "Compiling" in r.getMessage()]


def _new_values(tree, seed):
    return jitter(tree, jax.random.PRNGKey(seed), 0.1)


@pytest.mark.parametrize(
    "kind", ["linen", "model_apply", "nnx", "equinox", "equinox_bn", "function"]
)
def test_second_call_with_new_params_compiles_nothing(kind):
    """A loop over checkpoints: new params (and state) of the same structure, fresh wrappers."""
    model, variables, x1, x2 = _make("lenet5")
    calls = {
        "linen": lambda v: empirical_ntk(model, v, x1, x2),
        "model_apply": lambda v: empirical_ntk(model.apply, v, x1, x2),
        "function": lambda v: empirical_ntk(_plain_lenet, v, x1, x2),
    }
    if kind in calls:
        calls[kind](variables).block_until_ready()
        fresh = _new_values(variables, 1)
        with _CompileLog() as log:
            calls[kind](fresh).block_until_ready()
            empirical_ntk_fn(*flax_apply_fn(model, fresh)[:1])(
                x1, x2, flax_apply_fn(model, fresh)[1]
            )
        assert not log.compiles, log.compiles
        return
    if kind == "nnx":
        from flax import nnx

        net = _nnx_net(0)
        x = jnp.ones((4, 4))
        empirical_ntk(net, None, x).block_until_ready()
        _, params, rest = nnx.split(net, nnx.Param, ...)
        nnx.update(net, _new_values(params, 2), _new_values(rest, 3))
        other = _nnx_net(5)  # another instance of the same structure
        with _CompileLog() as log:
            empirical_ntk(net, None, x).block_until_ready()
            empirical_ntk_fn(other)(x).block_until_ready()
        assert not log.compiles, log.compiles
        return
    import equinox as eqx

    x = jnp.ones((4, 2, 6))
    if kind == "equinox_bn":  # (model, state): new params and new statistics, another instance
        net = lambda key: eqx.nn.Sequential(
            [
                eqx.nn.Conv1d(2, 3, 3, key=key),
                eqx.nn.BatchNorm(3, "batch", mode="batch"),
                eqx.nn.Lambda(jnp.ravel),
                eqx.nn.Linear(12, 3, key=key),
            ]
        )
        model, state = eqx.nn.make_with_state(net)(jax.random.PRNGKey(0))
        empirical_ntk((model, state), None, x).block_until_ready()
        fresh = eqx.combine(
            _new_values(eqx.filter(model, eqx.is_inexact_array), 1),
            eqx.filter(model, eqx.is_inexact_array, inverse=True),
        )
        other = eqx.nn.make_with_state(net)(jax.random.PRNGKey(1))
        with _CompileLog() as log:
            empirical_ntk((fresh, _new_values(state, 2)), None, x).block_until_ready()
            empirical_ntk_fn(other)(x).block_until_ready()
        assert not log.compiles, log.compiles
        return
    mlp = lambda key: eqx.nn.Sequential(
        [eqx.nn.Conv1d(2, 3, 3, key=key), eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(12, 3, key=key)]
    )
    empirical_ntk(mlp(jax.random.PRNGKey(0)), None, x).block_until_ready()
    with _CompileLog() as log:
        empirical_ntk(mlp(jax.random.PRNGKey(1)), None, x).block_until_ready()
    assert not log.compiles, log.compiles


def test_warm_one_block_call_takes_the_fused_path_and_agrees_with_the_oracle():
    """A warm symmetric one-block call skips the general path's planning (Engine._warm_fused)
    and must give what the float64 oracle gives, for the whole kernel and per layer, with
    new params, compiling nothing; a new batch size or an x2 takes the general path."""
    with jax.enable_x64(True):
        model, variables, x1, x2 = _make("mlp", n1=5)
        variables, x1, x2 = _f64(variables, x1, x2)
        fresh = _f64(_new_values(variables, 7))[0]
        f = lambda p, x: model.apply(p, x)
        want = {}
        for group, kern in zip(leaf_groups(fresh), ntk_oracle_leaves(f, fresh, x1, x1)):
            want[group] = want.get(group, 0) + kern
        call = lambda p, x, x2=None, **kw: empirical_ntk(
            f, p, x, x2, mode="full", implementation="structured", **kw
        )
        for by_layer in (False, True):
            first = call(variables, x1, by_layer=by_layer)
            opts = _options("full", 0, "structured", by_layer, None, None, None, None)
            engine = _engine(("function", f), opts, None)  # the cached one
            assert engine._fused, "a one-block symmetric call registers the fused path"
            with _CompileLog() as log:
                warm = call(fresh, x1, by_layer=by_layer)
            assert not log.compiles, log.compiles
            if by_layer:
                assert list(warm) == sorted(want) and warm.keys() == first.keys()
                for key in warm:
                    assert rel(warm[key], want[key]) < 1e-6, key
            else:
                whole = warm
                assert rel(whole, sum(want.values())) < 1e-6
        longer = call(fresh, jnp.concatenate([x1, x1[:1]]))
        assert rel(longer[:5, :5], whole) < 1e-10
        # The registered executable refuses what it was not compiled for (TypeError): these
        # take the general path at the same n and agree.
        assert rel(jax.jit(call)(fresh, x1), whole) < 1e-10  # tracers
        as32 = jax.tree.map(lambda a: a.astype(jnp.float32), (fresh, x1))
        assert call(*as32).dtype == jnp.float32 and rel(call(*as32), whole) < 1e-5  # dtypes
        for args in ((fresh, x1), as32):  # both structures stay registered at this n
            with _CompileLog() as log:
                call(*args)
            assert not log.compiles, log.compiles
        both = call(fresh, jnp.concatenate([x1, x2]))
        assert rel(call(fresh, x1, x2), both[:5, 5:]) < 1e-10


def _plain_lenet(v, x):
    return get_model("lenet5", 3, width=1, padding="SAME").apply(v, x)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 5, rngs=rngs)
        self.bn = nnx.BatchNorm(5, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def _nnx_net(seed):
    return _NnxNet(nnx.Rngs(seed))


# ---------------------------------------------------------------- matrix-free products
def test_ntk_vp_matches_materialised_kernel():
    model, variables, x, _ = _make("cnn1d", n1=5)
    apply_fn, params = flax_apply_fn(model, variables)
    for mode in MODES:
        k = np.asarray(empirical_ntk(apply_fn, params, x, mode=mode, logit=2))
        v = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 3) if mode == "full" else (5,)))
        want = np.einsum("ijab,jb->ia", k, v) if mode == "full" else k @ v
        got = ntk_vp_fn(apply_fn, params, x, mode=mode, logit=2)(v)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- devices
def test_four_fake_devices_match_one_device():
    code = textwrap.dedent("""
            import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
            from ntkd.ntk import empirical_ntk_fn, flax_apply_fn
            assert len(jax.devices()) == 4, jax.devices()
            class M(nn.Module):
                @nn.compact
                def __call__(self, x, train=False):
                    x = nn.relu(nn.Conv(3, (3,))(x))
                    x = nn.BatchNorm(use_running_average=not train)(x)
                    return nn.Dense(3)(x.reshape(x.shape[0], -1))
            x = jax.random.normal(jax.random.PRNGKey(1), (10, 6, 1))
            m = M(); v = m.init(jax.random.PRNGKey(0), x)
            plain = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p["w"]) @ p["v"]
            pp = {"w": jnp.ones((6, 4)) / 3, "v": jnp.arange(12.0).reshape(4, 3) / 10}
            out = {}
            for mode in ("full", "trace"):
                for impl in ("jacobian", "structured", "ntvp"):
                    for by_layer in (False, True):
                        k = empirical_ntk_fn(m, mode=mode, implementation=impl, block_size=4,
                                             by_layer=by_layer)(x, None, v)
                        for g, kk in (k.items() if by_layer else [("", k)]):
                            out[mode + impl + g] = np.asarray(kk)
                    out[mode + impl + "plain"] = np.asarray(empirical_ntk_fn(
                            plain, mode=mode, implementation=impl, block_size=4)(x, x[:7], pp))
            class Pooled(nn.Module):  # a pooled head: its last conv takes separable_pool
                @nn.compact
                def __call__(self, x):
                    x = nn.Conv(5, (3,))(nn.relu(nn.Conv(3, (3,))(x)))
                    return nn.Dense(3)(jnp.mean(nn.relu(x), axis=1))
            pm = Pooled(); pv = pm.init(jax.random.PRNGKey(2), x)
            for mode in ("full", "trace"):
                for by_layer in (False, True):
                    k = empirical_ntk_fn(pm, mode=mode, implementation="structured",
                                         block_size=4, by_layer=by_layer)(x, x[:7], pv)
                    for g, kk in (k.items() if by_layer else [("", k)]):
                        out[mode + "pooled" + g] = np.asarray(kk)
            np.savez(OUT, **out)
    """)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results = {}
    for count in (1, 4):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ntkd_dev{count}_{os.getpid()}.npz")
        src = code.replace("OUT", repr(path)).replace("== 4", f"== {count}")
        subprocess.run([sys.executable, "-c", src], check=True, env=env, timeout=300)
        results[count] = dict(np.load(path))
        os.remove(path)
    assert results[1].keys() == results[4].keys()
    for key in results[1]:
        np.testing.assert_allclose(results[4][key], results[1][key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- errors
def test_clear_errors():
    model, variables, x1, x2 = _make("mlp")
    apply_fn, params = flax_apply_fn(model, variables)
    with pytest.raises(ValueError, match="mode='diag'"):
        empirical_ntk_fn(apply_fn, mode="diag")
    with pytest.raises(ValueError, match="implementation='fast'"):
        empirical_ntk_fn(apply_fn, implementation="fast")
    with pytest.raises(ValueError, match="logit=3 is out of range for k=3"):
        empirical_ntk(apply_fn, params, x1, mode="logit", logit=3)
    # checked option sets are remembered per argument values and types: logit=1 first must
    # not let logit=True or logit=1.0 (equal to 1 in Python) through
    empirical_ntk(apply_fn, params, x1, mode="logit", logit=1)
    for bad_logit in (True, 1.0):
        with pytest.raises(ValueError, match=f"logit={bad_logit!r} must be a non-negative int"):
            empirical_ntk(apply_fn, params, x1, mode="logit", logit=bad_logit)
    with pytest.raises(ValueError, match=r"per-example shape \(12, 1\) but x2 has \(1, 12\)"):
        empirical_ntk(apply_fn, params, x1, x2.reshape(2, 1, 12))
    with pytest.raises(ValueError, match="x1.*non-finite"):
        empirical_ntk(apply_fn, params, x1.at[0, 0, 0].set(jnp.nan))
    bad = jax.tree.map(lambda l: l, params)
    bad["dense0"]["bias"] = bad["dense0"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"params\['dense0'\]\['bias'\].*non-finite"):
        empirical_ntk(apply_fn, bad, x1)
    # a warm one-block call checks after dispatching the kernel: still refused, for every
    # implementation (auto's cached pick included)
    for impl in ("auto", "structured", "jacobian"):
        empirical_ntk(apply_fn, params, x1, implementation=impl)
        empirical_ntk(apply_fn, params, x1, implementation=impl)
        with pytest.raises(ValueError, match=r"params\['dense0'\]\['bias'\].*non-finite"):
            empirical_ntk(apply_fn, bad, x1, implementation=impl)
        with pytest.raises(ValueError, match="x1.*non-finite"):
            empirical_ntk(apply_fn, params, x1.at[1, 0, 0].set(jnp.inf), implementation=impl)
        empirical_ntk(apply_fn, params, x1, x2, implementation=impl)  # x2: not one call
        with pytest.raises(ValueError, match="x2.*non-finite"):
            empirical_ntk(apply_fn, params, x1, x2.at[0, 0, 0].set(jnp.nan), implementation=impl)
    with pytest.raises(ValueError, match=r"shape \(batch, k\).*returned \(2, 3, 1\)"):
        empirical_ntk(lambda p, x: apply_fn(p, x)[..., None], params, x1)
    with pytest.raises(ValueError, match="block_size=0"):
        empirical_ntk_fn(apply_fn, block_size=0)


def test_finiteness_flag_never_passes_bad_values_and_overflow_is_confirmed_on_host():
    """The device flag is the finiteness of the leaves' sum: NaN, +inf, -inf (also +inf and
    -inf in two leaves, which could cancel in a careless sum) make it False; finite values
    whose sum overflows make it False too, and the host check then finds no bad leaf."""
    from ntkd.ntk._util import all_finite, check_finite

    ok = {"a": jnp.ones((3, 4), jnp.float32), "b": jnp.arange(5.0, dtype=jnp.bfloat16)}
    assert all_finite(ok)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        tree = {**ok, "a": ok["a"].at[1, 2].set(bad)}
        assert not all_finite(tree)
        with pytest.raises(ValueError, match=r"\['a'\] has 1 non-finite"):
            check_finite("params", tree)
    both = {"a": ok["a"].at[0, 0].set(jnp.inf), "b": ok["b"].at[1].set(-jnp.inf)}
    assert not all_finite(both)
    with pytest.raises(ValueError, match=r"\['a'\] has 1 non-finite"):
        check_finite("params", both)
    huge = {"a": jnp.full((4,), 3e38, jnp.float32)}  # finite; the sum overflows
    assert not all_finite(huge) and np.isfinite(np.asarray(huge["a"])).all()
    check_finite("params", huge)  # no error: confirmed on the host
    assert all_finite({"i": jnp.arange(3)})  # integer leaves are not checked


def test_clear_errors_for_model_kinds():
    import equinox as eqx

    x = jnp.ones((3, 4))
    net = _nnx_net(0)
    with pytest.raises(
        ValueError, match="NNX module _NnxNet owns its parameters; pass params=None"
    ):
        empirical_ntk(net, {"w": 1.0}, x)
    lin = eqx.nn.Linear(4, 3, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="Equinox module Linear owns its parameters"):
        empirical_ntk(lin, lin.weight, x)
    with pytest.raises(ValueError, match=r"shape \(batch, k\).*returned \(2,\).*Equinox"):
        empirical_ntk(eqx.nn.Linear(4, "scalar", key=jax.random.PRNGKey(0)), None, x)
    # stateful Equinox: the state comes with the module, as (model, state)
    bn_net = lambda key: eqx.nn.Sequential(
        [eqx.nn.Linear(4, 3, key=key), eqx.nn.BatchNorm(3, "batch", mode="batch")]
    )
    model, state = eqx.nn.make_with_state(bn_net)(jax.random.PRNGKey(0))
    with pytest.raises(
        ValueError,
        match=r"Equinox module Sequential is stateful .* pass it together with its "
        r"eqx.nn.State as the model: empirical_ntk\(\(model, state\), None, x\)",
    ):
        empirical_ntk(model, None, x)
    with pytest.raises(
        ValueError,
        match=r"Equinox module Linear has no eqx.nn.StateIndex, so it takes no state; "
        r"pass the module alone",
    ):
        empirical_ntk((lin, state), None, x)
    with pytest.raises(ValueError, match="state must be the eqx.nn.State .* got dict"):
        empirical_ntk((model, {}), None, x)
    _, other_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "b", mode="batch")
    with pytest.raises(ValueError, match="the eqx.nn.State has no value for StateIndex"):
        empirical_ntk((model, other_state), None, x)
    with pytest.raises(ValueError, match="Equinox module Sequential owns its parameters"):
        empirical_ntk((model, state), state, x)
    with pytest.raises(
        ValueError, match="Linen module Dense holds no parameters; pass its variables"
    ):
        empirical_ntk(nn.Dense(3), None, x)
    haiku_like = types.SimpleNamespace(init=lambda *a: None, apply=lambda *a: None)
    with pytest.raises(ValueError, match="cannot split a types.SimpleNamespace"):
        empirical_ntk(haiku_like, {}, x)
    with pytest.raises(ValueError, match="needs its params"):
        empirical_ntk(lambda p, x: x, None, x)


def test_equinox_state_is_a_constant_and_the_new_state_is_discarded():
    """A layer that updates its state even in inference mode: the kernel is that of the
    function at the given state, and the caller's eqx.nn.State stays valid and unchanged."""
    import equinox as eqx

    class Shift(eqx.Module):
        index: eqx.nn.StateIndex

        def __init__(self):
            self.index = eqx.nn.StateIndex(jnp.full(3, 0.5, jnp.float64))

        def __call__(self, x, state):
            s = state.get(self.index)
            return x * s, state.set(self.index, s + x)  # a state update, discarded

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        shift: Shift

        def __call__(self, x, state):
            return self.shift(jnp.tanh(self.lin(x)), state)

    with jax.enable_x64(True):
        make = lambda: Net(
            eqx.nn.Linear(4, 3, key=jax.random.PRNGKey(0), dtype=jnp.float64), Shift()
        )
        model, state = eqx.nn.make_with_state(make)()
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 4), jnp.float64)
        p, static = eqx.partition(model, eqx.is_inexact_array)
        clone = lambda: jax.tree.map(lambda l: l, state)  # State.set invalidates its object
        f = lambda p, x: jax.vmap(lambda xi: eqx.combine(p, static)(xi, clone())[0])(x)
        want = ntk_oracle_modes(f, p, x, x)["full"]
        for impl in ("structured", "jacobian"):
            got = empirical_ntk((model, state), None, x, mode="full", implementation=impl)
            assert rel(got, want) <= 1e-10, impl
        apply_fn, params = as_apply_fn((model, state))
        for _ in range(2):  # eager calls, each from the same fixed state
            np.testing.assert_allclose(apply_fn(params, x), f(p, x), rtol=1e-12)
        np.testing.assert_array_equal(state.get(model.shift.index), np.full(3, 0.5))


def test_repeated_module_calls_follow_in_place_updates_structure_changes_and_modes():
    """NNX and Equinox splits are remembered between calls (models.py): a later call must
    see in-place parameter updates, a changed structure, and dropout flags in training
    mode, exactly as a fresh split would."""
    import equinox as eqx

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (5, 4), jnp.float64)

        def nnx_oracle(net):  # split by hand, as the user would
            g, p, rest = nnx.split(net, nnx.Param, ...)

            def f(p, x):
                m = nnx.merge(g, p, rest)
                m.eval()
                return m(x)

            return ntk_oracle(f, p, x, mode="full")

        net = _NnxNet(nnx.Rngs(0))
        net = jax.tree.map(
            lambda l: l.astype(jnp.float64) if jnp.issubdtype(l.dtype, jnp.floating) else l, net
        )
        before = empirical_ntk(net, None, x, mode="full")
        assert rel(before, nnx_oracle(net)) <= 1e-10
        assert net in ntk_models._NNX_SPLITS  # the next call takes the remembered split
        net.l1.kernel[...] = 2.0 * net.l1.kernel[...]  # in place: same structure
        got = empirical_ntk(net, None, x, mode="full")
        assert rel(got, nnx_oracle(net)) <= 1e-10 and rel(got, before) > 1e-2
        net.l2 = nnx.Linear(5, 3, use_bias=False, rngs=nnx.Rngs(3), param_dtype=jnp.float64)
        got = empirical_ntk(net, None, x, mode="full")  # new structure: a new split
        assert rel(got, nnx_oracle(net)) <= 1e-10
        net.bn.use_running_average = False  # a static attribute; eval() resets it
        assert rel(empirical_ntk(net, None, x, mode="full"), nnx_oracle(net)) <= 1e-10

        def eqx_net(key, inference):
            k1, k2 = jax.random.split(key)
            return eqx.nn.Sequential(
                [
                    eqx.nn.Linear(4, 6, key=k1, dtype=jnp.float64),
                    eqx.nn.Lambda(jnp.tanh),
                    eqx.nn.Dropout(0.5, inference=inference),
                    eqx.nn.Linear(6, 3, key=k2, dtype=jnp.float64),
                ]
            )

        def eqx_oracle(model):
            p, static = eqx.partition(eqx.nn.inference_mode(model), eqx.is_inexact_array)
            f = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
            return ntk_oracle(f, p, x, mode="full")

        ready = eqx_net(jax.random.PRNGKey(1), inference=True)
        want = eqx_oracle(ready)
        assert rel(empirical_ntk(ready, None, x, mode="full"), want) <= 1e-10
        # same structure and flags as one already seen, dropout on: still inference mode
        training = eqx_net(jax.random.PRNGKey(1), inference=False)
        for model in (training, ready, training):
            assert rel(empirical_ntk(model, None, x, mode="full"), want) <= 1e-10
        assert len(ntk_models._EQX_PLAIN) >= 1  # the ready structure skipped its rewrites
        scaled = eqx.tree_at(lambda m: m.layers[0].weight, ready, 3.0 * ready.layers[0].weight)
        assert rel(empirical_ntk(scaled, None, x, mode="full"), eqx_oracle(scaled)) <= 1e-10
        # a live module's last split is given back while its leaves are the same objects,
        # and is forgotten with the module
        assert as_apply_fn(scaled)[1] is as_apply_fn(scaled)[1]
        gone = id(scaled)
        assert gone in ntk_models._EQX_LAST
        del scaled
        gc.collect()
        assert gone not in ntk_models._EQX_LAST


def test_public_facade():
    assert ntkd.empirical_ntk is empirical_ntk and ntkd.as_apply_fn is as_apply_fn
    assert ntkd.flax_apply_fn is flax_apply_fn and ntkd.ntk_vp_fn is ntk_vp_fn


def test_by_layer_keeps_a_bias_of_another_group_apart():
    """A bias folded into its layer's rule is split out again when it is its own group."""
    with jax.enable_x64(True):
        p = {
            "b": jnp.arange(3.0) / 3,
            "w": jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64),
        }
        f = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])
        x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 4), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 4), jnp.float64)
        per_leaf = dict(zip(("b", "w"), ntk_oracle_leaves(f, p, x1, x2)))  # leaves in key order
        for mode in ("full", "trace"):
            parts = empirical_ntk(
                f, p, x1, x2, mode=mode, implementation="structured", by_layer=True
            )
            assert sorted(parts) == ["b", "w"]
            for g, want in per_leaf.items():
                assert rel(parts[g], reduce_full(want, mode)) <= 1e-12, (mode, g)
            whole = empirical_ntk(f, p, x1, x2, mode=mode, implementation="structured")
            assert rel(parts["b"] + parts["w"], whole) <= 1e-12


def test_float64_without_x64_is_refused_not_silently_float32():
    import subprocess
    import sys

    code = (
        "import jax, numpy as np, ntkd\n"
        "f = lambda p, x: x @ p\n"
        "try:\n"
        "    ntkd.empirical_ntk(f, np.ones((3, 2), np.float32), np.ones((4, 3), np.float32), dtype='float64')\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout and "jax_enable_x64" in out.stdout, out.stdout + out.stderr


class _FakeCandidate:
    """Stands in for auto.Candidate: each timing returns the next of its runs."""

    def __init__(self, name, runs):
        self.name, self.runs, self.timed = name, list(runs), []

    def time_once(self):
        t = self.runs[len(self.timed) % len(self.runs)]
        self.timed.append(t)
        return t

    @property
    def estimate(self):
        return min(self.timed)


def test_auto_choose_keeps_each_candidates_fastest_round():
    """A candidate slowed by one loaded round still wins on its fastest run; rounds interleave."""
    from ntkd.ntk import auto

    a = _FakeCandidate("structured", [5.0, 1.0, 1.0])  # first round hit by load
    b = _FakeCandidate("jacobian", [2.0, 2.0, 2.0])
    assert auto.choose([a, b], min_rounds=2, rounds=3, budget_s=1e9) == "structured"
    assert len(a.timed) == len(b.timed) == 3
    c, d = _FakeCandidate("structured", [5.0, 1.0]), _FakeCandidate("jacobian", [2.0])
    assert auto.choose([c, d], min_rounds=1, rounds=3, budget_s=0.0) == "jacobian"  # one round only
    assert len(c.timed) == 1


def test_auto_bounds_count_the_unavoidable_flops_and_prune_only_hopeless_candidates():
    """candidates' lower bounds are the closed-form contraction counts; cannot_win is a sound cut."""
    from ntkd.ntk import auto
    from ntkd.ntk.modes import Mode

    def f(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    p = {"w": jnp.ones((6, 5)), "v": jnp.ones((5, 3))}
    x = jnp.ones((4, 6))
    n_params = 6 * 5 + 5 * 3
    for name, m_rows in (("full", 3), ("trace", 1)):
        got = dict(auto.candidates(lambda q, s, x: f(q, x), Mode(name), 3, p, None, x, 7, 9, False))
        # 2·n1·n2·(m rows per example)²·P in full, 2·n1·n2·k·P in trace
        want = 2.0 * 7 * 9 * 3 * n_params * m_rows
        assert got["jacobian"] == want, name
        assert got["structured"] is None
        sym = dict(auto.candidates(lambda q, s, x: f(q, x), Mode(name), 3, p, None, x, 7, 7, True))
        assert sym["jacobian"] == 2.0 * 7 * 7 * 3 * n_params * m_rows / 2
    peak = auto.matmul_peak(jnp.float32)
    assert 1e6 < peak < 1e16  # a measured rate in flop/s
    every = peak * jax.device_count()
    assert not auto.cannot_win(None, 1e-9, jnp.float32)  # no bound: always measured
    assert not auto.cannot_win(1e30, float("inf"), jnp.float32)  # nothing measured yet
    assert auto.cannot_win(4 * every, 1.0, jnp.float32)  # 2 s even at twice the peak
    assert not auto.cannot_win(every, 1.0, jnp.float32)  # 0.5 s at twice the peak: measure it


def test_auto_compiles_no_candidate_its_flop_bound_rules_out(monkeypatch):
    """MLP `full`: the Jacobian contraction's pairs would take far longer than structured's kernel."""
    from ntkd.ntk import auto
    from ntkd.ntk import engine as engine_module

    monkeypatch.setattr(auto, "FAST_ENOUGH_S", 0.0)  # structured alone is never enough here

    def f(p, x):
        return jax.nn.relu(x @ p["w"]) @ p["v"]

    key = jax.random.split(jax.random.PRNGKey(3), 3)
    p = {"w": jax.random.normal(key[0], (512, 512)), "v": jax.random.normal(key[1], (512, 10))}
    x = jax.random.normal(key[2], (200, 512))
    engine_module._ENGINES.clear()
    got = empirical_ntk(f, p, x, mode="full")
    (engine,) = engine_module._ENGINES.values()
    assert {impl for impl, _ in engine._compiled} == {"structured"}
    fixed = empirical_ntk(f, p, x, mode="full", implementation="jacobian", block_size=50)
    assert rel(got, fixed) < 1e-5


def test_weight_grads_in_both_layouts_match_einsum():
    """features.weight_grads gives W_ia = Σ_p x_ihp ⊗ g_ihpa in the (b, m, H·C·D) order
    whichever operand's columns its matmul puts last (``wide_grad_ratio`` 0: the
    cotangents', inf: the inputs'), with and without shared dims H, against NumPy."""
    import types

    from ntkd.ntk.structured.features import weight_grads

    rng = np.random.default_rng(3)
    for b, h, s, d, m, c in [(3, 1, 5, 2, 4, 3), (2, 3, 4, 3, 2, 5), (4, 1, 1, 6, 1, 2)]:
        x = rng.standard_normal((b, h, s, d)).astype(np.float32)
        g = rng.standard_normal((b, h, s, m, c)).astype(np.float32)
        want = np.einsum("ihpd,ihpac->iahcd", x, g).reshape(b, m, -1)
        for ratio in (0.0, float("inf")):
            got = np.asarray(weight_grads(types.SimpleNamespace(kind="conv"), x, g, 0, ratio))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weight_right_is_the_dot_it_replaces():
    """features.weight_right computes a weight-left dot_general (Equinox's ``W @ x``) with
    the operands swapped and transposes back: the same array as the op itself, for batch,
    several free and several contracting dims, and a per-operand precision pair."""
    from ntkd.ntk.structured.discovery import bind_eqn
    from ntkd.ntk.structured.features import weight_right

    hi, lo = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
    cases = [  # (w shape, a shape, ((w contract, a contract), (w batch, a batch)), precision)
        ((3, 4), (4,), (((1,), (0,)), ((), ())), None),
        ((3, 4), (4, 5), (((1,), (0,)), ((), ())), None),
        ((5, 3, 4), (2, 4), (((2,), (1,)), ((), ())), (hi, lo)),
        ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,))), hi),
        ((3, 4, 2), (6, 2, 4), (((1, 2), (2, 1)), ((), ())), None),
    ]
    key = jax.random.PRNGKey(0)
    for w_shape, a_shape, dims, precision in cases:
        w = jax.random.normal(key, w_shape)
        a = jax.random.normal(jax.random.fold_in(key, 1), a_shape)
        f = lambda w, a: jax.lax.dot_general(w, a, dims, precision=precision)  # noqa: B023
        (eqn,) = jax.make_jaxpr(f)(w, a).eqns
        want = np.asarray(bind_eqn(eqn, [w, a])[0])
        got = np.asarray(weight_right(eqn, w, a))
        assert got.shape == want.shape, (w_shape, a_shape, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
