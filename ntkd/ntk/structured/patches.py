"""Per-example layer inputs rearranged for the factorised rules.

Each rule views its op as ``y[h, s, c] = Σ_d patch[h, s, d] · W[h, d, c]`` for
one example: h over shared (batch) dimensions of the weight, s over output
positions, d over the contracted input and c over output features. The
weight's gradient is then ``Σ_s patch[h, s]ᵀ g[h, s]`` and a kernel entry
``Σ_{h,s,t} (patch1[h,s]·patch2[h,t]) (g1[h,s]·g2[h,t])``. The order of the
d and c axes need only be consistent between examples: the kernel is built
from inner products of gradients, which any fixed permutation preserves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def dense_dims(eqn, operand: int):
    """(a_batch, a_free, a_contract, w_free) dims of a ``dot_general`` with the weight at ``operand``."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a_c, a_b = (rc, rb) if operand == 0 else (lc, lb)
    w_c, w_b = (lc, lb) if operand == 0 else (rc, rb)
    a_nd = eqn.invars[1 - operand].aval.ndim
    w_nd = eqn.invars[operand].aval.ndim
    a_free = [d for d in range(a_nd) if d not in a_c and d not in a_b]
    w_free = [d for d in range(w_nd) if d not in w_c and d not in w_b]
    return tuple(a_b), tuple(a_free), tuple(a_c), tuple(w_free)


def dense_patches(eqn, operand: int, a: jax.Array) -> jax.Array:
    """(b, H, S, D) from the recorded activation a: (b, *a_shape)."""
    a_b, a_free, a_c, _ = dense_dims(eqn, operand)
    shape = a.shape[1:]
    h = math.prod(shape[d] for d in a_b)
    s = math.prod(shape[d] for d in a_free)
    perm = (0,) + tuple(1 + d for d in a_b + a_free + a_c)
    return jnp.transpose(a, perm).reshape(a.shape[0], h, s, -1)


def dense_cotangents(eqn, operand: int, g: jax.Array, lead: int) -> jax.Array:
    """(lead..., H, S, C) from output cotangents g: (lead..., *out_shape).

    ``dot_general`` writes (batch, lhs free, rhs free): with the weight on the
    left its free dims come before the activation's.
    """
    a_b, a_free, _, w_free = dense_dims(eqn, operand)
    out = eqn.outvars[0].aval.shape
    nb, na, nw = len(a_b), len(a_free), len(w_free)
    order = list(range(nb)) + (
        list(range(nb + nw, nb + nw + na)) + list(range(nb, nb + nw))
        if operand == 0
        else list(range(nb, nb + na + nw))
    )
    g = jnp.transpose(g, tuple(range(lead)) + tuple(lead + d for d in order))
    h = math.prod(out[:nb])
    c = math.prod(g.shape[lead + nb + na :])
    return g.reshape(g.shape[:lead] + (h, -1, c))


def conv_patches(eqn, a: jax.Array) -> jax.Array:
    """(b, 1, S, D) patches of ``conv_general_dilated``'s input a: (b, *lhs_shape).

    Strided slices of the padded (and, for input dilation, interior-padded)
    input, one per kernel offset: d work per position instead of the d² of a
    convolution with an identity kernel.
    """
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    ks = [rhs_shape[d] for d in rhs_spec[2:]]
    outs = [out_shape[d] for d in out_spec[2:]]
    nd = len(ks)
    strides = tuple(p["window_strides"])
    kdil = tuple(p["rhs_dilation"] or (1,) * nd)
    idil = tuple(p["lhs_dilation"] or (1,) * nd)
    b = a.shape[0]
    x = jnp.transpose(
        a, (0,) + tuple(1 + d for d in (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
    )
    x = x.reshape((-1,) + x.shape[2:])  # examples × conv batch, spatial..., C_in
    cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(p["padding"], idil)] + [(0, 0, 0)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    cols = []
    for offs in np.ndindex(*ks):
        idx = tuple(
            slice(o * d, o * d + (n - 1) * st + 1, st)
            for o, d, n, st in zip(offs, kdil, outs, strides)
        )
        cols.append(x[(slice(None),) + idx + (slice(None),)])
    pt = jnp.stack(cols, axis=-2)  # (b·N, *outs, taps, C_in)
    return pt.reshape(b, 1, -1, len(cols) * x.shape[-1])


def conv_cotangents(eqn, g: jax.Array, lead: int) -> jax.Array:
    """(lead..., 1, S, C) from output cotangents (lead..., *out_shape)."""
    out_spec = eqn.params["dimension_numbers"][2]
    order = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
    g = jnp.transpose(g, tuple(range(lead)) + tuple(lead + d for d in order))
    return g.reshape(g.shape[:lead] + (1, -1, g.shape[-1]))


def embed_tokens(eqn, ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(tokens (b, S) int32, valid (b, S) in ``dtype``) of a row lookup with indices ids: (b, ..., 1).

    Out-of-range rows: clamped for ``CLIP``/``PROMISE_IN_BOUNDS`` (as XLA does),
    dropped (zero gradient) for ``FILL_OR_DROP``.
    """
    rows = eqn.invars[0].aval.shape[0]
    tok = ids.reshape(ids.shape[0], -1).astype(jnp.int32)
    if eqn.params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        valid = (tok >= 0) & (tok < rows)
    else:
        tok, valid = jnp.clip(tok, 0, rows - 1), jnp.ones(tok.shape, bool)
    return tok, valid.astype(dtype)


def embed_cotangents(eqn, g: jax.Array, lead: int) -> jax.Array:
    """(lead..., 1, S, C): a lookup's output is (positions..., row features...)."""
    nrow = eqn.invars[0].aval.ndim - 1
    c = math.prod(g.shape[g.ndim - nrow :]) if nrow else 1
    return g.reshape(g.shape[:lead] + (1, -1, c))
