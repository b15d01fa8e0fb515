"""``ntk_matvec(cache="features")``: products from cached structured features.

Oracles: the dense eNTK of ``ntkd.ntk.empirical_ntk(implementation="jacobian")``
(per-example Jacobians, no structured rule involved) and, for features with
per-term cotangent widths, the engine's own pair formula
(``ntkd.ntk.structured.contraction.factor_block`` and ``Mode.contract``).
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import as_matrix, rel

from ntkd import models, ntk
from ntkd.matfree import features as feat
from ntkd.matfree import matvec as matvec_module
from ntkd.matfree import ntk_matvec
from ntkd.ntk.modes import Mode
from ntkd.ntk.structured.contraction import factor_block

MODES = ["trace", "sum", "logit", "full"]
LOGIT = 1
N = 21  # not a multiple of the block (8): the last block is padded


def _mlp():
    model = models.get_model("mlp", 3, widths=(24,))
    variables = models.init_variables(model, jax.random.key(0), (6,))
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    return apply_fn, params, np.random.default_rng(0).standard_normal((N, 6))


def _cnn():
    """Two convolutions (8 and 2 output positions) and a dense head, all with biases."""
    k = jax.random.split(jax.random.key(0), 3)
    p = {
        "c1": {"w": jax.random.normal(k[0], (3, 4, 8)) / 3, "b": jnp.full(8, 0.1)},
        "c2": {"w": jax.random.normal(k[1], (4, 8, 16)) / 5, "b": jnp.full(16, 0.1)},
        "head": {"w": jax.random.normal(k[2], (32, 3)) / 5, "b": jnp.zeros(3)},
    }

    def f(p, x):  # x: (n, 8, 4)
        dn = ("NWC", "WIO", "NWC")
        h = jax.lax.conv_general_dilated(x, p["c1"]["w"], (1,), "SAME", dimension_numbers=dn)
        h = jnp.tanh(h + p["c1"]["b"])
        h = jax.lax.conv_general_dilated(h, p["c2"]["w"], (4,), "VALID", dimension_numbers=dn)
        h = jnp.tanh(h + p["c2"]["b"]).reshape(x.shape[0], -1)
        return h @ p["head"]["w"] + p["head"]["b"]

    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    return f, p, np.random.default_rng(0).standard_normal((N, 8, 4))


def _embed():
    """Lookups over 4 positions and over 1, weights per position (H = 4), a left-over scale."""
    k = jax.random.split(jax.random.key(1), 5)
    p = {
        "emb": jax.random.normal(k[0], (40, 6)),
        "emb0": jax.random.normal(k[1], (5, 6)),
        "pos": jax.random.normal(k[2], (4, 6, 5)) / 3,
        "scale": 1.0 + 0.1 * jax.random.normal(k[3], (5,)),
        "head": {"w": jax.random.normal(k[4], (20, 3)) / 4, "b": jnp.zeros(3)},
    }

    def f(p, tok):  # tok: (n, 4) token ids
        h = jnp.take(p["emb"], tok, axis=0)
        h = h + jnp.take(p["emb0"], tok[:, 0] % 5, axis=0)[:, None]
        h = jnp.einsum("nsd,sde->nse", jnp.tanh(h), p["pos"])
        h = h / jnp.sqrt(1.0 + jnp.mean(h**2, -1, keepdims=True)) * p["scale"]
        return jnp.tanh(h).reshape(tok.shape[0], -1) @ p["head"]["w"] + p["head"]["b"]

    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    tok = np.random.default_rng(0).integers(0, 40, (N, 4))
    tok[::2, 3] = tok[::2, 1]  # a token repeated within an example
    return f, p, tok


def _pooled():
    """A pooled head: the second convolution's terms are per-channel (``separable_pool``)."""
    k = jax.random.split(jax.random.key(2), 3)
    p = {
        "c1": {"w": jax.random.normal(k[0], (3, 4, 6)) / 3, "b": jnp.full(6, 0.1)},
        "c2": {"w": jax.random.normal(k[1], (3, 6, 5)) / 4},
        "head": {"w": jax.random.normal(k[2], (5, 3)) / 2, "b": jnp.zeros(3)},
    }

    def f(p, x):  # x: (n, 8, 4)
        dn = ("NWC", "WIO", "NWC")
        h = jax.lax.conv_general_dilated(x, p["c1"]["w"], (1,), "SAME", dimension_numbers=dn)
        h = jnp.tanh(h + p["c1"]["b"])
        h = jax.lax.conv_general_dilated(h, p["c2"]["w"], (2,), "SAME", dimension_numbers=dn)
        return jnp.mean(jax.nn.relu(h), axis=1) @ p["head"]["w"] + p["head"]["b"]

    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    return f, p, np.random.default_rng(0).standard_normal((N, 8, 4))


MODELS = {"mlp": _mlp, "cnn": _cnn, "embed": _embed, "pooled": _pooled}


def _dense(f, params, x, mode):
    K = ntk.empirical_ntk(
        f, params, jnp.asarray(x), mode=mode, logit=LOGIT, implementation="jacobian"
    )
    return np.asarray(as_matrix(K) if mode == "full" else K)


def _terms(mv):
    """(kind, H, m, S) of each factorised term and (m, P) of each flat one."""
    F = mv._feats[0]
    fact = [(kind, *g.shape[1:4]) for kind, (_, g) in zip(mv._kinds, F["fact"])]
    return fact, [f.shape[1:] for f in F["flat"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_feature_products_match_dense_kernel(name, mode):
    with jax.enable_x64(True):
        f, params, x = MODELS[name]()
        K = _dense(f, params, x, mode)
        mv = ntk_matvec(
            f, params, x, mode=mode, logit=LOGIT, block_size=8, dtype=jnp.float64, cache="features"
        )
        assert mv.cache_kind == "features" and mv.cached
        assert mv._nb * mv._B > N
        fact, flat = _terms(mv)
        # the models exercise what they are meant to (the cost model's choices)
        if name == "cnn" and mode != "full":
            assert ("conv", 1, mv.k if mode == "trace" else 1, 2) in fact
        if name == "pooled":
            assert mv._feats[0]["pooled"], "the pooled head's convolution is separable"
        if name == "embed":
            assert flat, "the left-over scale has flat gradients"
            assert any(t[0] == "embed" and t[3] == 1 for t in fact)
            if mode != "full":
                assert any(t[0] == "embed" and t[3] == 4 for t in fact)
                assert any(t[0] == "dense" and t[1] == 4 for t in fact)
        rng = np.random.default_rng(1)
        for m in (1, 3):
            V = rng.standard_normal((K.shape[0], m))
            assert rel(mv(V), K @ V) <= 1e-10, (m, rel(mv(V), K @ V))
            traces = mv.traces
            assert rel(mv(V + 1.0), K @ (V + 1.0)) <= 1e-10
            assert mv.traces == traces, "a second product with the same m recompiled"
        v = rng.standard_normal(K.shape[0])
        assert mv(v).shape == v.shape and rel(mv(v), K @ v) <= 1e-10
        assert rel(mv.diagonal(), np.diag(K)) <= 1e-10
        assert mv.trace() == pytest.approx(np.trace(K), rel=1e-10)


def test_auto_picks_jacobians_then_features_then_streaming():
    with jax.enable_x64(True):
        f, params, x = _mlp()
        K = _dense(f, params, x, "trace")
        V = np.random.default_rng(2).standard_normal((N, 2))
        kw = dict(mode="trace", block_size=8, dtype=jnp.float64)
        need = ntk_matvec(f, params, x, cache="features", **kw).cache_bytes_needed
        jb, fb = need["jacobian"], need["features"]
        # padded n = 24, k = 3, P = 243: Jacobians 24·3·243·8 bytes; features far fewer
        assert jb == 24 * 3 * 243 * 8 and 0 < fb < jb / 4
        for budget, kind in ((jb, "jacobian"), ((jb + fb) // 2, "features"), (fb - 1, None)):
            mv = ntk_matvec(f, params, x, cache="auto", cache_bytes=budget, **kw)
            assert mv.cache_kind == kind and mv.cached == (kind is not None), budget
            assert rel(mv(V), K @ V) <= 1e-10
        assert ntk_matvec(f, params, x, cache="never", **kw).cache_kind is None
        assert ntk_matvec(f, params, x, cache="always", **kw).cache_kind == "jacobian"
        with pytest.raises(ValueError, match="cache must be one of"):
            ntk_matvec(f, params, x, cache="feature", **kw)


def test_without_a_structured_plan_auto_streams_and_features_explains(monkeypatch):
    def fail(*args, **kwargs):
        raise NotImplementedError("no rule for this model")

    monkeypatch.setattr(matvec_module.Structured, "build", fail)
    with jax.enable_x64(True):
        f, params, x = _mlp()
        K = _dense(f, params, x, "sum")
        kw = dict(mode="sum", block_size=8, dtype=jnp.float64, cache_bytes=1)
        mv = ntk_matvec(f, params, x, cache="auto", **kw)
        assert mv.cache_kind is None and mv.cache_bytes_needed["features"] is None
        V = np.random.default_rng(3).standard_normal((N, 2))
        assert rel(mv(V), K @ V) <= 1e-10
        with pytest.raises(ValueError, match="structured plan.*no rule.*cache='auto'"):
            ntk_matvec(f, params, x, cache="features", **kw)


def _random_features(rng, b, k, full):
    """Features of every kind; outside ``full`` each term has its own width m_t (1 or k)."""
    m = (lambda w: k) if full else (lambda w: w)
    g = lambda h, w, s, c: rng.standard_normal((b, h, m(w), s, c))  # noqa: E731
    x = lambda h, s, d: rng.standard_normal((b, h, s, d))  # noqa: E731
    tok = rng.integers(0, 5, (b, 3))
    valid = (rng.random((b, 3)) > 0.2).astype(np.float64)
    fact = [
        ("dense", x(1, 1, 4), g(1, 1, 1, 3)),
        ("dense", x(2, 1, 3), g(2, k, 1, 2)),
        ("conv", x(1, 3, 5), g(1, 1, 3, 2)),
        ("conv", x(2, 2, 3), g(2, k, 2, 4)),
        ("embed", (tok, valid), g(1, 1, 3, 2)),
        ("embed", (tok[:, :1], valid[:, :1]), g(1, k, 1, 3)),
    ]
    flat = [rng.standard_normal((b, m(1), 7)), rng.standard_normal((b, m(k), 5))]
    kinds = [t[0] for t in fact]
    return kinds, {"fact": [(t[1], t[2]) for t in fact], "flat": flat}


def _weight_grads(kind, x, g, rows):
    """Per-example weight gradients W_ia = Σ_{h,p} x_ihp ⊗ g_ihap: (b, m, H·D·C)."""
    if kind == "embed":
        tok, valid = x
        onehot = jax.nn.one_hot(tok, rows) * valid[..., None]  # (b, S, rows)
        w = jnp.einsum("isr,iasc->iarc", onehot, g[:, 0])
    else:
        w = jnp.einsum("ihpd,ihapc->iahdc", x, g)
    return w.reshape(w.shape[0], w.shape[1], -1)


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_products_match_weight_gradients_with_per_term_widths(mode):
    """pass1 / pass2 / diagonal against explicit per-example weight gradients (and, outside
    ``full``, against factor_block + Mode.contract, the pair formula of the structured
    kernel) on features of every kind whose terms have different cotangent widths."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        b, k, nb = 6, 3, 2
        full = mode == "full"
        md = Mode(mode)
        blocks = [_random_features(rng, b, k, full) for _ in range(nb)]
        kinds = blocks[0][0]
        rows = [5 if kd == "embed" else None for kd in kinds]
        feats = [jax.tree.map(jnp.asarray, F) for _, F in blocks]

        def grads(F):  # (b, m, P) per term
            ws = [_weight_grads(kd, x, g, r) for kd, r, (x, g) in zip(kinds, rows, F["fact"])]
            return ws + list(F["flat"])

        def gram(F1, F2):
            out = 0
            for w1, w2 in zip(grads(F1), grads(F2)):
                if full:
                    out = out + jnp.einsum("iap,jbp->iajb", w1, w2).reshape(b * k, b * k)
                else:
                    out = out + jnp.einsum("iap,jap->ij", w1, w2)
            return out

        def pair(F1, F2):
            out = 0
            for kd, (x1, g1), (x2, g2) in zip(kinds, F1["fact"], F2["fact"]):
                out = out + factor_block(md, kd, x1, g1, x2, g2, lambda a, c: a @ c.T)
            for f1, f2 in zip(F1["flat"], F2["flat"]):
                out = out + md.contract(f1, f2, lambda a, c: a @ c.T)
            return out

        gram, pair = jax.jit(gram), jax.jit(pair)  # eager einsums compile one by one: slow
        K = np.block([[np.asarray(gram(F1, F2)) for F2 in feats] for F1 in feats])
        if not full:
            Kp = np.block([[np.asarray(pair(F1, F2)) for F2 in feats] for F1 in feats])
            assert rel(Kp, K) <= 1e-12
        size = K.shape[0]
        V = rng.standard_normal((size, 2))
        rb = size // nb
        Vb = [jnp.asarray(V[i * rb : (i + 1) * rb]) for i in range(nb)]
        Vb = [v.reshape(b, k, -1) if full else v for v in Vb]
        pass1 = jax.jit(functools.partial(feat.pass1, kinds, rows, full))
        pass2 = jax.jit(functools.partial(feat.pass2, kinds, full))
        diagonal = jax.jit(functools.partial(feat.diagonal, kinds, full))
        M = None
        for F, v in zip(feats, Vb):
            c = pass1(F, v)
            M = c if M is None else jax.tree.map(jnp.add, M, c)
        out = [np.asarray(pass2(F, M)).reshape(rb, -1) for F in feats]
        assert rel(np.concatenate(out), K @ V) <= 1e-12
        diag = [np.asarray(diagonal(F)).reshape(-1) for F in feats]
        assert rel(np.concatenate(diag), np.diag(K)) <= 1e-12


FOUR_DEVICES = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, sys.argv[1])
    from test_matvec_features import _cnn
    from ntkd.matfree import ntk_matvec
    assert len(jax.devices()) == 4, jax.devices()
    f, params, x = _cnn()
    V = np.random.default_rng(0).standard_normal((x.shape[0] * 3, 2))  # full: n·k rows
    kw = dict(mode="full", block_size=2, dtype=jnp.float64)
    mv = ntk_matvec(f, params, x, cache="features", **kw)
    # the per-example Jacobians of this conv net once came out wrong on devices 1..3
    # (batch-sharded jit(vmap(jacrev(conv)))): they are now computed per device
    jac = ntk_matvec(f, params, x, cache="always", **kw)
    ref = ntk_matvec(f, params, x, cache="never", **kw)
    assert mv.cache_kind == "features" and mv._B == 8 and jac.cache_kind == "jacobian"
    want = ref(V)
    d = ref.diagonal()
    for op in (mv, jac):
        assert np.abs(op(V) - want).max() <= 1e-12 * np.abs(want).max(), op.cache_kind
        assert np.abs(op.diagonal() - d).max() <= 1e-12 * d.max(), op.cache_kind
""")


def test_four_devices_match_streaming():
    """Features and Jacobian caches on 4 fake CPU devices == streaming (1e-12, float64)."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", FOUR_DEVICES, tests], check=True, env=env)
