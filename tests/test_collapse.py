"""Trace-mode cotangent collapse (``ntkd.ntk.structured.collapse``).

Which layers collapse is read from the jaxpr; every case is checked against
the float64 brute-force oracle (``tests/oracles.py``), with the rule on and
off, per layer and as a whole, including networks built to break it.
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
from oracles import ntk_oracle, ntk_oracle_leaves, reduce_full, rel  # noqa: E402


def _params():
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    dense = lambda k, i, o: {  # noqa: E731
        "w": jax.random.normal(k, (i, o), jnp.float64) / np.sqrt(i),
        "b": jax.random.normal(jax.random.fold_in(k, 1), (o,), jnp.float64) * 0.1,
    }
    return {
        "l0": dense(key[0], 6, 7),
        "l1": dense(key[1], 7, 5),
        "head": dense(key[2], 5, 4),
        "aux": dense(key[3], 5, 4),
    }


def _mlp(p, x):
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["head"]["w"] + p["head"]["b"]


def _gelu_gated_scaled(p, x):
    gate = jax.nn.sigmoid(x[:, :5])  # per-example elementwise gating stays diagonal
    h = jax.nn.gelu(x @ p["l0"]["w"] + p["l0"]["b"])
    h = jnp.tanh(h @ p["l1"]["w"] + p["l1"]["b"]) * gate
    return 0.5 * (h @ p["head"]["w"] + p["head"]["b"])


def _leaky_where(p, x):
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    z = h @ p["l1"]["w"] + p["l1"]["b"]
    h = jnp.where(z > 0, z, 0.1 * z)  # comparison + select: still elementwise
    return (h @ p["head"]["w"] + p["head"]["b"]).reshape(x.shape[0], 2, 2).reshape(x.shape[0], 4)


def _transposed(p, x):  # the layer before the head computes W @ hᵀ, then transposes back
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    z = (p["l1"]["w"].T @ h.T).T + p["l1"]["b"]
    return jax.nn.silu(z).reshape(x.shape[0], 5) @ p["head"]["w"] + p["head"]["b"]


def _per_example_scale(p, x):  # logits scaled by a function of x: no layer collapses
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
    return (h @ p["head"]["w"] + p["head"]["b"]) * jnp.sum(x * x, axis=1, keepdims=True)


def _softmax_out(p, x):  # a non-linear map after the head
    return jax.nn.softmax(_mlp(p, x), axis=-1)


def _two_heads(p, x):  # l1 feeds two dense ops: its cotangents do not factor
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["head"]["w"] + p["head"]["b"] + jnp.tanh(h) @ p["aux"]["w"]


def _skip_to_output(p, x):  # l1's output also reaches the logits directly
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    z = h @ p["l1"]["w"] + p["l1"]["b"]
    out = jax.nn.relu(z) @ p["head"]["w"] + p["head"]["b"]
    return out + jnp.concatenate([z[:, :3], z[:, :1] ** 2], axis=1)


CASES = {
    # name: (f, {layer that collapses: the head it needs, or None for a head})
    "mlp": (_mlp, {"head": None, "l1": "head"}),
    "gelu_gated_scaled": (_gelu_gated_scaled, {"head": None, "l1": "head"}),
    "leaky_where": (_leaky_where, {"head": None, "l1": "head"}),
    "transposed": (_transposed, {"head": None, "l1": "head"}),
    "per_example_scale": (_per_example_scale, {}),
    "softmax_out": (_softmax_out, {}),
    "two_heads": (_two_heads, {"head": None, "aux": None}),
    "skip_to_output": (_skip_to_output, {"head": None}),
}


def _used(f, params):
    """Only the leaves the function reads (``aux`` is unused by most cases)."""
    return params if f is _two_heads else {k: v for k, v in params.items() if k != "aux"}


def _collapsed(f, params, x) -> dict:
    one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
    plan, _ = trace(lambda p, s, xx: f(p, xx), params, {}, one)
    groups = leaf_groups(params)
    found = collapse.collapsible(plan, set(range(len(plan.targets))))
    name = lambda i: groups[plan.targets[i].leaf]  # noqa: E731
    return {name(t): None if h is None else name(h[0]) for t, h in found.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_collapse_structure_and_kernel(case):
    f, expected = CASES[case]
    with jax.enable_x64(True):
        params = _used(f, _params())
        x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 6), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 6), jnp.float64)
        assert _collapsed(f, params, x1) == expected
        for y in (None, x2):
            ref = ntk_oracle(f, params, x1, y, "trace")
            on = ntkd.empirical_ntk(f, params, x1, y, mode="trace", implementation="structured")
            off = ntkd.empirical_ntk(
                f,
                params,
                x1,
                y,
                mode="trace",
                implementation="structured",
                contraction=ContractionOptions(collapse_trace=False),
            )
            assert rel(on, ref) < 1e-12, case
            assert rel(off, ref) < 1e-12, case


def test_collapse_per_layer_kernels_match_oracle():
    with jax.enable_x64(True):
        params = _used(_mlp, _params())
        x = jax.random.normal(jax.random.PRNGKey(1), (6, 6), jnp.float64)
        leaves = ntk_oracle_leaves(_mlp, params, x, x)
        paths = leaf_groups(params)
        want = {}
        for g, kern in zip(paths, leaves):
            want[g] = want.get(g, 0) + reduce_full(kern, "trace")
        got = ntkd.empirical_ntk(
            _mlp, params, x, mode="trace", implementation="structured", by_layer=True
        )
        assert set(got) == set(want)
        for g in want:
            assert rel(got[g], want[g]) < 1e-12, g


def test_collapse_through_equinox_views():
    """Equinox's vmapped ``W @ x + b`` transposes each layer's output: the layer before the
    head still collapses (its cotangents are rearranged back), exactly."""
    import equinox as eqx

    with jax.enable_x64(True):
        model = eqx.nn.MLP(6, 4, 7, 2, key=jax.random.PRNGKey(0), dtype=jnp.float64)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        f = lambda p, xx: jax.vmap(eqx.combine(p, static))(xx)  # noqa: E731
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 6), jnp.float64)
        found = _collapsed(f, params, x)
        assert found == {"layers/2": None, "layers/1": "layers/2"}, found
        ref = ntk_oracle(f, params, x, None, "trace")
        got = ntkd.empirical_ntk(model, None, x, mode="trace", implementation="structured")
        assert rel(got, ref) < 1e-12


def test_collapse_linen_and_nnx_models():
    """The rule finds the head through Linen's and NNX's own jaxprs (bias reshapes, relu)."""
    import flax.linen as nn
    from flax import nnx

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(7, param_dtype=jnp.float64)(x))
            return nn.Dense(3, param_dtype=jnp.float64)(
                nn.relu(nn.Dense(5, param_dtype=jnp.float64)(h))
            )

    class NNX(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 7, param_dtype=jnp.float64, rngs=rngs)
            self.b = nnx.Linear(7, 3, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 6), jnp.float64)
        model = Linen()
        variables = model.init(jax.random.PRNGKey(0), x)
        f = lambda p, xx: model.apply({"params": p}, xx)  # noqa: E731
        # Dense(3) is created (and named) before the Dense(5) inside its argument
        assert _collapsed(f, variables["params"], x) == {"Dense_1": None, "Dense_2": "Dense_1"}
        ref = ntk_oracle(f, variables["params"], x, None, "trace")
        got = ntkd.empirical_ntk(model, variables, x, mode="trace", implementation="structured")
        assert rel(got, ref) < 1e-12

        net = NNX(nnx.Rngs(0))
        graphdef, p = nnx.split(net, nnx.Param)
        g = lambda pp, xx: nnx.merge(graphdef, pp)(xx)  # noqa: E731
        got = ntkd.empirical_ntk(net, None, x, mode="trace", implementation="structured")
        assert rel(got, ntk_oracle(g, p, x, None, "trace")) < 1e-12
