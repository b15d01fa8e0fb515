"""The benchmark's networks as plain ``jax.numpy`` functions, and the same networks in Linen, NNX and Equinox.

``plain_models.PLAIN[name] = (init(key) -> params, apply(params, x) -> (n, 10))``
uses only ``jax.numpy``/``jax.lax`` APIs present in JAX 0.4.23, so
``nt_reference.py`` runs exactly the same function in neural-tangents' venv.
``linen``, ``nnx`` and ``equinox`` build the same architecture in each
framework (own random init: only timings are compared across frameworks).

Networks (float32, 10 logits):
    mlp784: MLP 784-256-256-10 on 28×28×1 inputs (ReLU).
    cnn2d: conv 3×3×16 stride 2 → ReLU → conv 3×3×32 stride 2 → ReLU →
        dense 10, on 28×28×1 inputs ("SAME" padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SHAPES = {"mlp784": (28, 28, 1), "cnn2d": (28, 28, 1)}


def _dense_init(key, d_in, d_out):
    return {"w": jax.random.normal(key, (d_in, d_out)) / jnp.sqrt(d_in), "b": jnp.zeros(d_out)}


def mlp_init(key):
    k = jax.random.split(key, 3)
    return {
        "l0": _dense_init(k[0], 784, 256),
        "l1": _dense_init(k[1], 256, 256),
        "head": _dense_init(k[2], 256, 10),
    }


def mlp_apply(p, x):
    h = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ p["l0"]["w"] + p["l0"]["b"])
    h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["head"]["w"] + p["head"]["b"]


def cnn_init(key):
    k = jax.random.split(key, 3)
    return {
        "c0": {"w": jax.random.normal(k[0], (3, 3, 1, 16)) / 3.0, "b": jnp.zeros(16)},
        "c1": {"w": jax.random.normal(k[1], (3, 3, 16, 32)) / 12.0, "b": jnp.zeros(32)},
        "head": _dense_init(k[2], 7 * 7 * 32, 10),
    }


def _conv(x, c):
    y = jax.lax.conv_general_dilated(
        x, c["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(y + c["b"])


def cnn_apply(p, x):
    h = _conv(_conv(x, p["c0"]), p["c1"])
    return h.reshape(x.shape[0], -1) @ p["head"]["w"] + p["head"]["b"]


PLAIN = {"mlp784": (mlp_init, mlp_apply), "cnn2d": (cnn_init, cnn_apply)}


def linen(name):
    """(model, variables) of the Linen version."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = x.reshape(x.shape[0], -1)
            h = nn.relu(nn.Dense(256)(h))
            return nn.Dense(10)(nn.relu(nn.Dense(256)(h)))

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
            h = nn.relu(nn.Conv(32, (3, 3), strides=2)(h))
            return nn.Dense(10)(h.reshape(x.shape[0], -1))

    model = {"mlp784": MLP, "cnn2d": CNN}[name]()
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPES[name]))


def nnx(name):
    from flax import nnx as fnnx

    rngs = fnnx.Rngs(0)

    class MLP(fnnx.Module):
        def __init__(self):
            self.l0, self.l1 = fnnx.Linear(784, 256, rngs=rngs), fnnx.Linear(256, 256, rngs=rngs)
            self.head = fnnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            h = x.reshape(x.shape[0], -1)
            return self.head(fnnx.relu(self.l1(fnnx.relu(self.l0(h)))))

    class CNN(fnnx.Module):
        def __init__(self):
            self.c0 = fnnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
            self.c1 = fnnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
            self.head = fnnx.Linear(7 * 7 * 32, 10, rngs=rngs)

        def __call__(self, x):
            h = fnnx.relu(self.c1(fnnx.relu(self.c0(x))))
            return self.head(h.reshape(x.shape[0], -1))

    return {"mlp784": MLP, "cnn2d": CNN}[name]()


def equinox(name):
    """The Equinox version, called on one example (H, W, C) as Equinox modules are."""
    import equinox as eqx

    k = jax.random.split(jax.random.PRNGKey(0), 3)

    class MLP(eqx.Module):
        layers: list

        def __init__(self):
            self.layers = [
                eqx.nn.Linear(784, 256, key=k[0]),
                eqx.nn.Linear(256, 256, key=k[1]),
                eqx.nn.Linear(256, 10, key=k[2]),
            ]

        def __call__(self, x):
            h = x.reshape(-1)
            for layer in self.layers[:-1]:
                h = jax.nn.relu(layer(h))
            return self.layers[-1](h)

    class CNN(eqx.Module):
        c0: eqx.nn.Conv2d
        c1: eqx.nn.Conv2d
        head: eqx.nn.Linear

        def __init__(self):
            self.c0 = eqx.nn.Conv2d(1, 16, 3, stride=2, padding=1, key=k[0])
            self.c1 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k[1])
            self.head = eqx.nn.Linear(7 * 7 * 32, 10, key=k[2])

        def __call__(self, x):
            h = jnp.transpose(x, (2, 0, 1))  # (C, H, W)
            h = jax.nn.relu(self.c1(jax.nn.relu(self.c0(h))))
            return self.head(h.reshape(-1))

    return {"mlp784": MLP, "cnn2d": CNN}[name]()
