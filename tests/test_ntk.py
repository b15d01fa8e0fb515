"""Tests for ntkd.ntk against independent oracles (float64 jacrev + einsum)."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkd.models import get_model, init_variables
from ntkd.ntk import empirical_ntk, empirical_ntk_fn, flax_apply_fn, ntk_vp_fn

IMPLS = ("jacobian", "ntvp", "structured", "auto")
MODES = ("full", "trace", "logit", "sum")


# ---------------------------------------------------------------- tiny models
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
    variables = init_variables(model, k0, shape)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(k3, len(leaves))
    # Zero-initialised BatchNorm scales would hide whole branches from the oracle.
    variables = jax.tree.unflatten(
        tree, [l + 0.3 * jnp.abs(jax.random.normal(kk, l.shape)) for l, kk in zip(leaves, keys)])
    return model, variables, x1, x2


def _oracle(apply_fn, params, x1, x2, mode, logit=0):
    """Brute force: full Jacobians of the batched network, einsum per leaf."""
    j1 = jax.jacrev(apply_fn)(params, x1)  # leaves (n1, k, *leaf)
    j2 = jax.jacrev(apply_fn)(params, x2)
    full = sum(
            jnp.einsum("iap,jbp->ijab", a.reshape(a.shape[:2] + (-1,)), b.reshape(b.shape[:2] + (-1,)))
            for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)))
    if mode == "full":
        return full
    if mode == "trace":
        return jnp.einsum("ijaa->ij", full)
    if mode == "logit":
        return full[:, :, logit, logit]
    return full.sum((2, 3))


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


# ---------------------------------------------------------------- oracle tests
_SLOW = {("lenet5", "ntvp"), ("lenet5", "jacobian"), ("resnet", "ntvp"), ("resnet", "jacobian")}
_GRID = [pytest.param(f, i, marks=[pytest.mark.slow] if (f, i) in _SLOW else [])
         for f in FAMILIES for i in ("jacobian", "ntvp", "structured")] + [("mlp", "auto")]


@pytest.mark.parametrize("family,impl", _GRID)
def test_every_implementation_and_mode_matches_oracle_float64(family, impl):
    with jax.enable_x64(True):
        model, variables, x1, x2 = _make(family, n1=3, n2=3)
        variables = jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), variables)
        x1, x2 = jnp.asarray(x1, jnp.float64), jnp.asarray(x2, jnp.float64)
        apply_fn, params = flax_apply_fn(model, variables)
        for mode in MODES:
            want = _oracle(apply_fn, params, x1, x2, mode, logit=1)
            got = empirical_ntk_fn(apply_fn, mode=mode, logit=1, implementation=impl)(x1, x2, params)
            assert got.dtype == jnp.float64
            assert got.shape == want.shape, (impl, mode)
            assert _rel(got, want) <= 1e-6, (family, impl, mode, _rel(got, want))


def test_plain_apply_fn_falls_back_to_exact_method():
    with jax.enable_x64(True):
        model, variables, x1, x2 = _make("cnn1d")
        variables = jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), variables)
        x1, x2 = jnp.asarray(x1, jnp.float64), jnp.asarray(x2, jnp.float64)
        plain = lambda p, x: model.apply({"params": p}, x)
        for impl in IMPLS:
            for mode in ("full", "trace"):
                got = empirical_ntk(plain, variables["params"], x1, x2, mode=mode, implementation=impl)
                assert _rel(got, _oracle(plain, variables["params"], x1, x2, mode)) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_model_closed_form(impl):
    """f(x) = W x + b has Θ(x, x') = (x·x' + 1) I_k."""
    with jax.enable_x64(True):
        model = nn.Dense(4)
        x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 3), jnp.float64)
        variables = model.init(jax.random.PRNGKey(0), x1)
        apply_fn, params = flax_apply_fn(model, jax.tree.map(lambda l: l.astype(jnp.float64), variables))
        gram = np.asarray(x1) @ np.asarray(x2).T + 1.0
        full = empirical_ntk(apply_fn, params, x1, x2, mode="full", implementation=impl)
        np.testing.assert_allclose(full, gram[:, :, None, None] * np.eye(4), rtol=1e-12, atol=1e-12)
        trace = empirical_ntk(apply_fn, params, x1, x2, mode="trace", implementation=impl)
        np.testing.assert_allclose(trace, 4 * gram, rtol=1e-12)


class _OddConvs(nn.Module):
    """Convolutions of every padding kind Flax has, with strides and dilation."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3,), strides=2, padding=((2, 1),), kernel_dilation=2)(x))
        x = nn.tanh(nn.Conv(3, (2,), padding="CAUSAL")(x))
        x = nn.tanh(nn.Conv(2, (3,), padding="REFLECT", use_bias=False)(x))
        x = nn.tanh(nn.Conv(4, (3,), strides=2, padding="SAME", kernel_dilation=2)(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_structured_on_every_conv_padding_matches_oracle():
    with jax.enable_x64(True):
        model = _OddConvs()
        x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 11, 2), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 11, 2), jnp.float64)
        variables = jax.tree.map(lambda l: l.astype(jnp.float64), model.init(jax.random.PRNGKey(0), x1))
        apply_fn, params = flax_apply_fn(model, variables)
        for mode in MODES:
            got = empirical_ntk(apply_fn, params, x1, x2, mode=mode, implementation="structured")
            want = _oracle(apply_fn, params, x1, x2, mode)
            assert _rel(got, want) <= 1e-10, (mode, _rel(got, want))


@pytest.mark.parametrize("padding", ["SAME", "VALID", 2, ((2, 0), (1, 3))])
@pytest.mark.parametrize("strides,dilation", [(1, 1), (2, 1), (1, 2), ((2, 1), (1, 2))])
def test_sliced_patches_equal_identity_kernel_convolution(padding, strides, dilation):
    """Patches by slicing == the same nn.Conv applied with an identity kernel (lax's conventions)."""
    from ntkd.ntk import _sliced_patches

    conv = nn.Conv(5, (3, 2), strides=strides, padding=padding, kernel_dilation=dilation)
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 3))
    d = 3 * 2 * 3
    eye = jnp.eye(d).reshape(3, 2, 3, d)
    want = conv.clone(features=d, use_bias=False).apply({"params": {"kernel": eye}}, a)
    got = _sliced_patches(conv, a)
    np.testing.assert_array_equal(got, want.reshape(2, -1, d))


def test_gram_in_chunks_equals_one_matmul(monkeypatch):
    """The cache-blocked Gram (K split into chunks plus a remainder) == NumPy's a @ b.T."""
    from ntkd import ntk

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7001)), rng.normal(size=(3, 7001))
    monkeypatch.setattr(ntk, "GRAM_CHUNK_BYTES", 8 * 8 * 600)  # 600 columns per step: 11 steps + 401
    with jax.enable_x64(True):
        got = ntk._gram(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(got, a @ b.T, rtol=1e-12, atol=1e-10)


def test_structured_vmapped_cotangents_match_oracle(monkeypatch):
    """k above COTANGENT_LOOP_MAX takes the vmapped-VJP path (max-pooling LeNet, BatchNorm ResNet)."""
    from ntkd import ntk

    monkeypatch.setattr(ntk, "COTANGENT_LOOP_MAX", 1)
    with jax.enable_x64(True):
        for family in ("lenet5", "resnet"):
            model, variables, x1, x2 = _make(family)
            variables = jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), variables)
            x1, x2 = jnp.asarray(x1, jnp.float64), jnp.asarray(x2, jnp.float64)
            apply_fn, params = flax_apply_fn(model, variables)
            for mode in ("full", "trace"):
                got = empirical_ntk(apply_fn, params, x1, x2, mode=mode, implementation="structured")
                assert _rel(got, _oracle(apply_fn, params, x1, x2, mode)) <= 1e-6, (family, mode)


# ---------------------------------------------------------------- invariances
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_blocked_equals_unblocked_and_symmetric_equals_explicit(mode, monkeypatch):
    model, variables, x1, _ = _make("cnn1d", n1=7)
    apply_fn, params = flax_apply_fn(model, variables)
    ref = empirical_ntk_fn(apply_fn, mode=mode)(x1, x1, params)
    blocked = empirical_ntk_fn(apply_fn, mode=mode, block_size=3)
    np.testing.assert_allclose(blocked(x1, None, params), ref, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(blocked(x1, x1, params), ref, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(empirical_ntk_fn(apply_fn, mode=mode)(x1, None, params), ref,
                                                          rtol=2e-5, atol=1e-5)
    # host streaming (as_numpy=True, or kernels above DEVICE_KERNEL_BYTES) == device assembly
    for x2 in (None, x1[:5]):
        host = blocked(x1, x2, params, as_numpy=True)
        assert isinstance(host, np.ndarray)
        np.testing.assert_allclose(host, ref[:, :5] if x2 is not None else ref, rtol=2e-5, atol=1e-5)
    import ntkd.ntk as ntk_mod

    monkeypatch.setattr(ntk_mod, "DEVICE_KERNEL_BYTES", 0)
    streamed = blocked(x1, None, params)
    assert isinstance(streamed, jax.Array)
    np.testing.assert_allclose(streamed, ref, rtol=2e-5, atol=1e-5)


def test_default_splits_into_even_blocks(monkeypatch):
    """Default blocking: ≥ MIN_BLOCKS even blocks, upper pairs mirrored, same kernel."""
    import ntkd.ntk as ntk_mod

    model, variables, x1, _ = _make("cnn1d", n1=11)
    apply_fn, params = flax_apply_fn(model, variables)
    ref = {m: empirical_ntk_fn(apply_fn, mode=m)(x1, x1, params) for m in ("full", "trace")}
    monkeypatch.setattr(ntk_mod, "MIN_BLOCK_SIZE", 2)
    seen = {}
    orig = ntk_mod._pad_to
    for m in ("full", "trace"):
        seen[m] = set()
        monkeypatch.setattr(ntk_mod, "_pad_to", lambda x, n, m=m: seen[m].add(n) or orig(x, n))
        got = empirical_ntk_fn(apply_fn, mode=m)(x1, None, params)
        np.testing.assert_allclose(got, ref[m], rtol=2e-5, atol=1e-5)
    # 11 examples: `full` wants ≥ 8 blocks → 6 blocks of 2 (the last padded by 1); this tiny
    # net's `trace` factorises no layer over several positions → ≥ 4 blocks → 4 blocks of 3
    assert seen == {"full": {2}, "trace": {3}}


def test_default_block_fits_xla_memory_plan(monkeypatch):
    """The default block also budgets the pair's temporaries (block² patch products), not only features."""
    import ntkd.ntk as ntk_mod

    model = get_model("cnn1d", 10)
    variables = init_variables(model, jax.random.PRNGKey(0), (40, 1))
    apply_fn, params = flax_apply_fn(model, variables)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 40, 1))
    engine = ntk_mod._Engine(apply_fn, "trace", 0, "structured", None, None)
    _, row, _, pair, k = engine.algo(params, x)
    at_n = ntk_mod._planned_bytes(row, pair, params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    feat = jax.eval_shape(row, params, jax.ShapeDtypeStruct((1, 40, 1), x.dtype))
    per_ex = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(feat))
    budget = int(at_n * 0.7)  # features alone would still allow one block of all 64 examples
    monkeypatch.setattr(ntk_mod, "BLOCK_MEMORY_BYTES", budget)
    assert ntk_mod._block_default(per_ex, k, "trace") >= 64
    b, spatial = engine._default_block(row, pair, k, params, x, 1, 64)
    assert spatial  # the 1-D CNN's convolutions are factorised over S > 1 positions in `trace`
    assert 8 <= b < 64
    assert ntk_mod._planned_bytes(row, pair, params, jax.ShapeDtypeStruct((b, 40, 1), x.dtype)) <= budget
    kernel = empirical_ntk(apply_fn, params, x, mode="trace", implementation="structured")
    ref = empirical_ntk(apply_fn, params, x, mode="trace", implementation="jacobian", block_size=64)
    np.testing.assert_allclose(kernel, ref, rtol=2e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_permuting_inputs_permutes_kernel():
    model, variables, x1, x2 = _make("cnn1d", n1=6, n2=4)
    apply_fn, params = flax_apply_fn(model, variables)
    fn = empirical_ntk_fn(apply_fn, mode="full", block_size=4)
    k = np.asarray(fn(x1, x2, params))
    p1, p2 = np.array([3, 0, 5, 1, 4, 2]), np.array([2, 3, 1, 0])
    np.testing.assert_allclose(fn(x1[p1], x2[p2], params), k[p1][:, p2], rtol=1e-5, atol=1e-6)


def test_jit_of_ntk_fn_matches_eager():
    model, variables, x1, x2 = _make("mlp")
    apply_fn, params = flax_apply_fn(model, variables)
    fn = empirical_ntk_fn(apply_fn, mode="trace")
    np.testing.assert_allclose(jax.jit(fn)(x1, x2, params), fn(x1, x2, params), rtol=1e-5)


def test_second_call_does_not_recompile():
    model, variables, x1, x2 = _make("lenet5")
    apply_fn, params = flax_apply_fn(model, variables)
    fn = empirical_ntk_fn(apply_fn, mode="trace")
    fn(x1, x2, params).block_until_ready()
    x1b, x2b = x1 + 1.0, x2 - 1.0
    with jax.log_compiles():
        import logging
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("jax")
        logger.addHandler(handler)
        try:
            fn(x1b, x2b, params).block_until_ready()
        finally:
            logger.removeHandler(handler)
    compiles = [r for r in records if "Compiling" in r.getMessage()]
    assert not compiles, [r.getMessage() for r in compiles]


def test_ntk_vp_matches_materialised_kernel():
    model, variables, x, _ = _make("cnn1d", n1=5)
    apply_fn, params = flax_apply_fn(model, variables)
    for mode in MODES:
        k = np.asarray(empirical_ntk(apply_fn, params, x, mode=mode, logit=2))
        v = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 3) if mode == "full" else (5,)))
        want = np.einsum("ijab,jb->ia", k, v) if mode == "full" else k @ v
        got = ntk_vp_fn(apply_fn, params, x, mode=mode, logit=2)(v)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_four_fake_devices_match_one_device():
    code = textwrap.dedent("""
            import jax, numpy as np, flax.linen as nn
            from ntkd.ntk import empirical_ntk_fn, flax_apply_fn
            assert len(jax.devices()) == 4, jax.devices()
            class M(nn.Module):
                @nn.compact
                def __call__(self, x, train=False):
                    x = nn.relu(nn.Conv(3, (3,))(x))
                    return nn.Dense(3)(x.reshape(x.shape[0], -1))
            x = jax.random.normal(jax.random.PRNGKey(1), (10, 6, 1))
            m = M(); v = m.init(jax.random.PRNGKey(0), x)
            f, p = flax_apply_fn(m, v)
            out = {}
            for mode in ("full", "trace"):
                for impl in ("jacobian", "structured", "ntvp"):
                    out[mode + impl] = np.asarray(empirical_ntk_fn(f, mode=mode, implementation=impl,
                                                                                                                  block_size=4)(x, None, p))
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
    with pytest.raises(ValueError, match=r"per-example shape \(12, 1\) but x2 has \(1, 12\)"):
        empirical_ntk(apply_fn, params, x1, x2.reshape(2, 1, 12))
    with pytest.raises(ValueError, match="x1.*non-finite"):
        empirical_ntk(apply_fn, params, x1.at[0, 0, 0].set(jnp.nan))
    bad = jax.tree.map(lambda l: l, params)
    bad["dense0"]["bias"] = bad["dense0"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"params\['dense0'\]\['bias'\].*non-finite"):
        empirical_ntk(apply_fn, bad, x1)
    with pytest.raises(ValueError, match=r"shape \(batch, k\).*returned \(2, 3, 1\)"):
        empirical_ntk(lambda p, x: apply_fn(p, x)[..., None], params, x1)
