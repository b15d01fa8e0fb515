"""Trial (not adopted): a convolution's input VJP as a matmul and an overlap-add.

Hypothesis tested in the seventh session: the structured features' backward passes
are slow on this AVX2 CPU because JAX transposes a strided ``conv_general_dilated``
into a convolution with lhs dilation. The alternative computes, per kernel tap t,
``cols_t = g · W_tᵀ`` in one matmul and adds each tap's columns at
``stride·o + dilation·t`` of the padded input (exact). Here it replaces the binding
of every ``conv_general_dilated`` equation in the structured algorithm's evaluation
(by patching the name ``bind_eqn`` in ``ntkd.ntk.structured.features``, a private
module: a trial, not an API), checks it against JAX's VJP on six convolutions
(strides, dilation, padding, 1-D/2-D/3-D, NCHW/OIHW), and times the whole kernel
against the unpatched one in alternating rounds.

    PYTHONPATH=$PWD python benchmarks/ntk_speed_runs/2026-12-03-s7/conv_transpose_trial.py cnn2d 64 trace 60
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import plain_models as pm  # noqa: E402

from ntkd import empirical_ntk  # noqa: E402
from ntkd.ntk.structured import features  # noqa: E402

_bind = features.bind_eqn


def supported(eqn) -> bool:
    p = eqn.params
    return (
        eqn.primitive.name == "conv_general_dilated"
        and p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
        and all(d == 1 for d in (p["lhs_dilation"] or ()))
        and all(lo >= 0 and hi >= 0 for lo, hi in p["padding"])
    )


def lhs_cotangent(eqn, g, w, lhs_shape):
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    strides, padding = tuple(p["window_strides"]), tuple(p["padding"])
    nd = len(strides)
    kdil = tuple(p["rhs_dilation"] or (1,) * nd)
    g = jnp.transpose(g, (out_spec[0], *out_spec[2:], out_spec[1]))
    w = jnp.transpose(w, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    ks, c_in = w.shape[:nd], w.shape[nd]
    outs = g.shape[1:-1]
    cols = jax.lax.dot_general(
        g,
        w.reshape(-1, c_in, w.shape[-1]),
        (((g.ndim - 1,), (2,)), ((), ())),
        precision=p["precision"],
        preferred_element_type=p["preferred_element_type"],
    )  # (N, *O, taps, C_in)
    spatial = [lhs_shape[d] for d in lhs_spec[2:]]
    padded = [n + lo + hi for n, (lo, hi) in zip(spatial, padding)]
    acc = None
    for i, taps in enumerate(np.ndindex(*ks)):
        cfg = [(0, 0, 0)]
        for t, d, s, o, n in zip(taps, kdil, strides, outs, padded):
            cfg.append((d * t, n - d * t - (s * (o - 1) + 1), s - 1))
        part = jax.lax.pad(cols[..., i, :], jnp.zeros((), cols.dtype), cfg + [(0, 0, 0)])
        acc = part if acc is None else acc + part
    acc = acc[(slice(None),) + tuple(slice(lo, lo + n) for (lo, _), n in zip(padding, spatial))]
    order = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    return jnp.transpose(acc, tuple(int(i) for i in np.argsort(order)))


def conv(eqn, lhs, rhs):
    fwd_only = lambda a, w: _bind(eqn, [a, w])[0]  # noqa: E731

    @jax.custom_vjp
    def f(a, w):
        return fwd_only(a, w)

    def fwd(a, w):
        return fwd_only(a, w), (a, w)

    def bwd(res, g):
        a, w = res
        dw = jax.vjp(lambda w_: fwd_only(a, w_), w)[1](g)[0]
        return lhs_cotangent(eqn, g, w, a.shape).astype(a.dtype), dw

    f.defvjp(fwd, bwd)
    return [f(lhs, rhs)]


def patched_bind(eqn, invals):
    return conv(eqn, *invals) if supported(eqn) else _bind(eqn, invals)


def check() -> float:
    """Largest relative error of the rule against JAX's VJP on six convolutions (float32)."""
    rng, worst = np.random.default_rng(0), 0.0
    cases = [
        ((2, 14, 14, 16), (3, 3, 16, 32), (2, 2), "SAME", (1, 1), ("NHWC", "HWIO", "NHWC")),
        ((2, 5, 15, 13), (7, 5, 3, 2), (3, 2), ((2, 1), (0, 3)), (2, 1), ("NCHW", "OIHW", "NCHW")),
        ((3, 17, 5), (4, 5, 3), (3,), ((1, 2),), (2,), ("NWC", "WIO", "NWC")),
        (
            (2, 7, 6, 5, 3),
            (2, 3, 2, 3, 4),
            (2, 1, 3),
            "VALID",
            (1, 2, 1),
            ("NDHWC", "DHWIO", "NDHWC"),
        ),
        ((2, 9, 9, 3), (5, 5, 3, 6), (1, 1), "VALID", (1, 1), ("NHWC", "HWIO", "NHWC")),
        ((2, 3, 8, 8), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), ("NCHW", "HWIO", "NHWC")),
    ]
    for ls, ws, st, pad, rd, dn in cases:
        x, w = (
            jnp.asarray(rng.normal(size=ls), jnp.float32),
            jnp.asarray(rng.normal(size=ws), jnp.float32),
        )

        def f(x, w, st=st, pad=pad, rd=rd, dn=dn):
            return jax.lax.conv_general_dilated(
                x, w, st, pad, rhs_dilation=rd, dimension_numbers=dn
            )

        y, vjp = jax.vjp(f, x, w)
        g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        eqn = next(
            e
            for e in jax.make_jaxpr(f)(x, w).jaxpr.eqns
            if e.primitive.name == "conv_general_dilated"
        )
        dx = jax.vjp(lambda x, w: conv(eqn, x, w)[0], x, w)[1](g)[0]
        ref = vjp(g)[0]
        worst = max(worst, float(jnp.max(jnp.abs(dx - ref)) / jnp.max(jnp.abs(ref))))
    return worst


def main():
    wl, n, mode, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(f"rule vs JAX's VJP, six convolutions: max relative error {check():.1e}")
    init, apply = pm.PLAIN[wl]
    p = init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (n,) + pm.SHAPES[wl])
    fs = {}
    for name, bind in (("as is", _bind), ("matmul + overlap-add", patched_bind)):
        features.bind_eqn = bind  # read when the kernel is traced, i.e. at the first call below
        f = jax.jit(lambda p, x: empirical_ntk(apply, p, x, mode=mode, implementation="structured"))
        jax.block_until_ready(f(p, x))
        fs[name] = f
    features.bind_eqn = _bind
    a, b = (np.asarray(f(p, x)) for f in fs.values())
    print(f"kernels agree to {np.max(np.abs(a - b)) / np.max(np.abs(a)):.1e} relative")
    names, ts = list(fs), {k: [] for k in fs}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            jax.block_until_ready(fs[k](p, x))
            ts[k].append(time.perf_counter() - t)
    base = np.array(ts[names[0]])
    for k in names:
        t = np.array(ts[k])
        print(
            f"{wl} n={n} {mode} {k:22s} median {np.median(t) * 1e3:7.2f} ms; paired ratio {np.median(t / base):.3f}"
        )


if __name__ == "__main__":
    main()
