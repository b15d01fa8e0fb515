"""Shared test oracles and tiny models of every kind the eNTK engine accepts.

The oracle is independent of ntkd.ntk: full Jacobians of the batched network
by ``jax.jacrev``, contracted per parameter leaf with ``einsum`` (float64 in
the tests). Each model kind is split into ``f(params, x)`` here by hand (Flax
and Equinox public APIs), not by ``ntkd.as_apply_fn``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def jacobian_leaves(f, params, x) -> list:
    """Per leaf (n, k, P) Jacobians of the batched network."""
    jac = jax.jit(jax.jacrev(f))(params, x)  # jitted: eager dispatch of every op is slow
    return [j.reshape(j.shape[:2] + (-1,)) for j in jax.tree.leaves(jac)]


def ntk_oracle_leaves(f, params, x1, x2) -> list:
    """Full kernel (n1, n2, k, k) of each parameter leaf; they sum to the whole kernel."""
    j1, j2 = jacobian_leaves(f, params, x1), jacobian_leaves(f, params, x2)
    return [jnp.einsum("iap,jbp->ijab", a, b) for a, b in zip(j1, j2)]


def reduce_full(full, mode: str, logit: int = 0):
    """A full kernel (n1, n2, k, k) in ``mode``: ntkd's ``trace`` is the SUM over logits."""
    if mode == "full":
        return full
    if mode == "trace":
        return jnp.einsum("ijaa->ij", full)
    if mode == "logit":
        return full[:, :, logit, logit]
    return full.sum((2, 3))


def as_matrix(full):
    """A full kernel (n1, n2, k, k) as the (n1·k, n2·k) matrix with row index i·k + a."""
    n1, n2, k, _ = full.shape
    return jnp.transpose(full, (0, 2, 1, 3)).reshape(n1 * k, n2 * k)


def ntk_oracle(f, params, x1, x2=None, mode: str = "trace", logit: int = 0):
    """Brute-force empirical NTK of ``f(params, x) -> (batch, k)``; ``x2=None``: x2 = x1."""
    return reduce_full(sum(ntk_oracle_leaves(f, params, x1, x1 if x2 is None else x2)), mode, logit)


def ntk_oracle_modes(f, params, x1, x2, logit: int = 0) -> dict:
    """{mode: kernel} for every mode, from one pair of Jacobians."""
    full = ntk_oracle(f, params, x1, x2, "full")
    return {mode: reduce_full(full, mode, logit) for mode in ("full", "trace", "logit", "sum")}


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def jitter(tree, key, scale=0.3):
    """Non-trivial values (zero-initialised BatchNorm scales would hide whole branches).

    NumPy noise (seeded from ``key``): no per-shape JAX compilations.
    """
    rng = np.random.default_rng(
        np.asarray(jax.random.key_data(key)).ravel().tolist()
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        else np.asarray(key).tolist()
    )

    def one(l):
        if not jnp.issubdtype(jnp.result_type(l), jnp.inexact):
            return l
        noise = np.abs(rng.normal(size=jnp.shape(l)))
        return jnp.asarray(np.asarray(l) + scale * noise.astype(np.asarray(l).dtype))

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------ models, float64
class LinenBN(nn.Module):
    """Conv → BatchNorm → ReLU → Dense, with running statistics."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(3, (3,), padding="SAME")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class TinyTransformer(nn.Module):
    """Token + position embeddings, one pre-LN self-attention block, mean-pooled head."""

    vocab: int = 11
    width: int = 8

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        h = nn.Embed(self.vocab, self.width)(tokens) + nn.Embed(t, self.width)(jnp.arange(t))[None]
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=self.width)(
            nn.LayerNorm()(h)
        )
        h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(h))))
        return nn.Dense(3)(nn.LayerNorm()(h).mean(1))


def linen_bn():
    """(model, variables, f, params, x1, x2): Linen with BatchNorm statistics held fixed."""
    model = LinenBN()
    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 2), jnp.float64)
    variables = jitter(jax.jit(model.init)(jax.random.PRNGKey(0), x1), jax.random.PRNGKey(3))
    variables = jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), variables)
    rest = {c: v for c, v in variables.items() if c != "params"}
    f = lambda p, x: model.apply({"params": p, **rest}, x, train=False)
    return model, variables, f, variables["params"], x1, x2


def transformer():
    model = TinyTransformer()
    x1 = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, 11)
    x2 = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 11)
    variables = jitter(jax.jit(model.init)(jax.random.PRNGKey(0), x1), jax.random.PRNGKey(3))
    variables = jax.tree.map(lambda l: jnp.asarray(l, jnp.float64), variables)
    f = lambda p, x: model.apply({"params": p}, x)
    return model, variables, f, variables["params"], x1, x2


def nnx_bn():
    """An NNX module with BatchNorm (running statistics fixed, eval mode)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 5, param_dtype=jnp.float64, rngs=rngs)
            self.bn = nnx.BatchNorm(5, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(5, 3, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.tanh(self.bn(self.l1(x))))

    model = Net(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jitter(params, jax.random.PRNGKey(3))
    rest = jitter(rest, jax.random.PRNGKey(4))
    nnx.update(model, params, rest)

    def f(p, x):
        m = nnx.merge(graphdef, p, rest)
        m.eval()
        return m(x)

    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 4), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 4), jnp.float64)
    return model, None, f, params, x1, x2


def equinox_mlp():
    """An Equinox module called per example (conv + MLP on (channels, length) inputs)."""
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv1d
        mlp: eqx.nn.MLP

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv1d(2, 3, 3, padding=1, key=k1, dtype=jnp.float64)
            self.mlp = eqx.nn.MLP(18, 3, 5, 1, activation=jnp.tanh, key=k2, dtype=jnp.float64)

        def __call__(self, x):
            return self.mlp(jnp.tanh(self.conv(x)).reshape(-1))

    model = Net(jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = jitter(params, jax.random.PRNGKey(3))
    model = eqx.combine(params, static)
    f = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 6), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 6), jnp.float64)
    return model, None, f, params, x1, x2


def equinox_bn():
    """A stateful Equinox module (``eqx.nn.make_with_state``): conv → BatchNorm ("ema") →
    dropout → Linear → BatchNorm ("batch") → Linear, passed to ntkd as ``(model, state)``
    in training mode; the oracle is the inference-mode function with the state fixed."""
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv1d
        bn1: eqx.nn.BatchNorm
        drop: eqx.nn.Dropout
        l1: eqx.nn.Linear
        bn2: eqx.nn.BatchNorm
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            f64 = jnp.float64
            self.conv = eqx.nn.Conv1d(2, 3, 3, padding=1, key=k1, dtype=f64)
            self.bn1 = eqx.nn.BatchNorm(3, "batch", mode="ema", dtype=f64)
            self.drop = eqx.nn.Dropout(0.5)
            self.l1 = eqx.nn.Linear(18, 5, key=k2, dtype=f64)
            self.bn2 = eqx.nn.BatchNorm(5, "batch", mode="batch", dtype=f64)
            self.l2 = eqx.nn.Linear(5, 3, key=k3, dtype=f64)

        def __call__(self, x, state):
            h, state = self.bn1(self.conv(x), state)
            h, state = self.bn2(self.l1(self.drop(jnp.tanh(h)).reshape(-1)), state)
            return self.l2(jnp.tanh(h)), state

    model, state = eqx.nn.make_with_state(Net)(jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = jitter(params, jax.random.PRNGKey(3))
    state = jitter(state, jax.random.PRNGKey(4))  # running statistics away from 0 / 1
    model = eqx.combine(params, static)
    static = eqx.partition(eqx.nn.inference_mode(model), eqx.is_inexact_array)[1]
    f = lambda p, x: jax.vmap(lambda xi: eqx.combine(p, static)(xi, state)[0])(x)
    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 6), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 6), jnp.float64)
    return (model, state), None, f, params, x1, x2


def plain_function():
    """A jnp function f(params, x): conv via lax, a shared weight, an embedding-free MLP."""
    key = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "conv": {
            "w": jax.random.normal(key[0], (3, 2, 4), jnp.float64),
            "b": jnp.ones(4, jnp.float64),
        },
        "dense": {"w": jax.random.normal(key[1], (24, 5), jnp.float64) / 5},
        "shared": jax.random.normal(key[2], (5, 5), jnp.float64) / 3,
        "head": {
            "w": jax.random.normal(key[3], (3, 5), jnp.float64),
            "b": jnp.zeros(3, jnp.float64),
        },
    }

    def f(p, x):  # x: (n, 6, 2)
        h = jax.lax.conv_general_dilated(
            x, p["conv"]["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
        h = jnp.tanh(h + p["conv"]["b"]).reshape(x.shape[0], -1)
        h = jnp.tanh(h @ p["dense"]["w"])
        h = jnp.tanh(h @ p["shared"]) @ p["shared"].T  # one weight used twice: exact fallback
        return jnp.einsum("nd,kd->nk", h, p["head"]["w"]) + p["head"]["b"]

    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 2), jnp.float64)
    return f, params, f, params, x1, x2


KINDS = {
    "linen_bn": linen_bn,
    "nnx_bn": nnx_bn,
    "equinox": equinox_mlp,
    "equinox_bn": equinox_bn,
    "function": plain_function,
    "transformer": transformer,
}
"""kind -> () -> (model, params to pass, oracle f, oracle params, x1, x2); call inside enable_x64."""
