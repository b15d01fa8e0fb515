"""Pooled-head separable convolutions (``ntkd.ntk.structured.collapse.separable``).

A convolution whose output reaches a linear head through elementwise ops and sums
over its positions only has cotangents D_i[s, c] · V[c, a]; the structured
algorithm then contracts one weight gradient per example per channel instead of k.
Which layers qualify is read from the jaxpr; every case is checked against the
float64 brute-force oracle in every mode, with the rule on and off, per layer and
as a whole, including networks built to break it.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkd
from ntkd.ntk._util import leaf_groups
from ntkd.ntk.options import ContractionOptions
from ntkd.ntk.structured import collapse
from ntkd.ntk.structured.discovery import trace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracles import jitter, ntk_oracle, ntk_oracle_leaves, reduce_full, rel  # noqa: E402

MODES = ("full", "trace", "logit", "sum")


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    n = lambda key, shape, s: jax.random.normal(key, shape, jnp.float64) * s  # noqa: E731
    return {
        "c0": {"w": n(k[0], (3, 3, 2, 4), 0.4), "b": n(k[1], (4,), 0.1)},
        "c1": {"w": n(k[2], (3, 3, 4, 4), 0.3)},
        "bn": {"scale": 1 + n(k[3], (4,), 0.3), "shift": n(k[4], (4,), 0.2)},
        "head": {"w": n(k[5], (4, 3), 0.5), "b": jnp.arange(3.0, dtype=jnp.float64)},
    }


def _conv(x, w, layout="NHWC"):
    spec = (layout, "HWIO", layout)
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=spec)


def _stem(p, x):
    return jax.nn.relu(_conv(x, p["c0"]["w"]) + p["c0"]["b"])


def _resnet_tail(p, x):  # c1 → affine "BatchNorm" → residual add → ReLU → GAP → head
    h = _stem(p, x)
    z = _conv(h, p["c1"]["w"]) * p["bn"]["scale"] + p["bn"]["shift"]
    pooled = jnp.mean(jax.nn.relu(h + z), axis=(1, 2))
    return pooled @ p["head"]["w"] + p["head"]["b"]


def _nchw(p, x):  # the same with channels first
    xt = jnp.transpose(x, (0, 3, 1, 2))
    h = jax.nn.relu(_conv(xt, p["c0"]["w"], "NCHW") + p["c0"]["b"][:, None, None])
    z = jnp.tanh(_conv(h, p["c1"]["w"], "NCHW"))
    return jnp.sum(z, axis=(2, 3)) @ p["head"]["w"]


def _pool_then_gelu(p, x):  # a bias (folded into the layer), elementwise ops after the pooling
    z = _conv(_stem(p, x), p["c1"]["w"]) + p["bn"]["shift"]
    pooled = jax.nn.gelu(jnp.mean(z, axis=(1, 2)) * p["bn"]["scale"])
    return 0.5 * (pooled @ p["head"]["w"])


def _flatten_head(p, x):  # positions reach the head separately: not separable
    z = jax.nn.relu(_conv(_stem(p, x), p["c1"]["w"]))
    w = jnp.tile(p["head"]["w"], (z.shape[1] * z.shape[2], 1))
    return z.reshape(z.shape[0], -1) @ w


def _channel_mix(p, x):  # a sum over channels after the pooling
    z = jax.nn.relu(_conv(_stem(p, x), p["c1"]["w"]))
    pooled = jnp.mean(z, axis=(1, 2))
    pooled = pooled + jnp.sum(pooled, axis=1, keepdims=True)
    return pooled @ p["head"]["w"]


def _two_heads(p, x):  # the pooled features feed two dense ops
    pooled = jnp.mean(jax.nn.relu(_conv(_stem(p, x), p["c1"]["w"])), axis=(1, 2))
    return pooled @ p["head"]["w"] + jnp.tanh(pooled) @ p["head"]["w"][::-1]


def _per_example_scale(p, x):  # the head's output is scaled by a function of x
    return _resnet_tail(p, x) * jnp.sum(x * x, axis=(1, 2, 3))[:, None]


CASES = {
    # name: (f, the layers the rule finds)
    "resnet_tail": (_resnet_tail, {"c1"}),
    "nchw": (_nchw, {"c1"}),
    "pool_then_gelu": (_pool_then_gelu, {"c1"}),
    "flatten_head": (_flatten_head, set()),
    "channel_mix": (_channel_mix, set()),
    "two_heads": (_two_heads, set()),
    "per_example_scale": (_per_example_scale, set()),
}


def _separable(f, params, x) -> set:
    one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
    plan, _ = trace(lambda p, s, xx: f(p, xx), params, {}, one)
    groups = leaf_groups(params)
    convs = {t.index for t in plan.targets if t.kind == "conv"}
    return {groups[plan.targets[i].leaf] for i in collapse.separable(plan, convs)}


def _inputs():
    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 5, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 5, 2), jnp.float64)
    return x1, x2


@pytest.mark.parametrize("case", sorted(CASES))
def test_separable_structure_and_kernel(case):
    f, expected = CASES[case]
    with jax.enable_x64(True):
        params = _params()
        x1, x2 = _inputs()
        assert _separable(f, params, x1) == expected
        # Where the rule applies: every mode, on and off (off in `full` only); where it
        # does not, the kernel must still be right (a wrongly found layer would not be).
        for mode in MODES if expected else ("full", "trace"):
            for y in (None, x2):
                ref = ntk_oracle(f, params, x1, y, mode)
                # off, and on with the vmapped-cotangent backward pass (k > 16 classes)
                variants = [{}]
                if expected and mode == "full":
                    variants += [{"separable_pool": False}, {"cotangent_loop_max": 0}]
                for opts in variants:
                    got = ntkd.empirical_ntk(
                        f,
                        params,
                        x1,
                        y,
                        mode=mode,
                        implementation="structured",
                        contraction=ContractionOptions(**opts),
                    )
                    assert rel(got, ref) < 1e-12, (case, mode, y is None, opts)


def test_separable_per_layer_kernels_match_oracle():
    with jax.enable_x64(True):
        params = _params()
        x, _ = _inputs()
        leaves = ntk_oracle_leaves(_resnet_tail, params, x, x)
        for mode in ("full", "trace"):
            want = {}
            for g, kern in zip(leaf_groups(params), leaves):
                want[g] = want.get(g, 0) + reduce_full(kern, mode)
            got = ntkd.empirical_ntk(
                _resnet_tail, params, x, mode=mode, implementation="structured", by_layer=True
            )
            assert set(got) == set(want)
            for g in want:
                assert rel(got[g], want[g]) < 1e-12, (mode, g)


def test_separable_linen_resnet_and_blocks():
    """ntkd's Linen ResNet (BatchNorm statistics fixed, non-zero scales): its last block's
    convolutions qualify; blocked and unblocked kernels match the oracle."""
    from ntkd.models import get_model

    with jax.enable_x64(True):
        model = get_model("resnet20", 3, depth=8, width=2)
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 6, 6, 3), jnp.float64)
        variables = jitter(jax.jit(model.init)(jax.random.PRNGKey(0), x), jax.random.PRNGKey(3))
        variables = jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), variables)
        rest = {c: v for c, v in variables.items() if c != "params"}
        f = lambda p, xx: model.apply({"params": p, **rest}, xx)  # noqa: E731
        found = _separable(f, variables["params"], x)
        assert found == {"BasicBlock_2/Conv_1", "BasicBlock_2/proj"}, found
        ref = ntk_oracle(f, variables["params"], x, None, "full")
        for block in (None, 2):
            got = ntkd.empirical_ntk(
                model, variables, x, mode="full", implementation="structured", block_size=block
            )
            assert rel(got, ref) < 1e-11, block
        assert np.all(np.isfinite(np.asarray(got)))
