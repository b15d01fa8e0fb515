"""Per-block features of the structured algorithm: one backward pass per cotangent.

The per-example jaxpr is re-evaluated (vmapped over the block's examples)
with two changes: each target op records its activation (or lookup indices)
and adds a zero *perturbation* to its output, and every left-over parameter
is replaced by a per-example copy. One VJP per output cotangent, over the
whole block, then returns every target's output cotangents g and every
left-over leaf's per-example gradient at once; the target weights' gradients
are never formed unless the cost model prefers them (``wants_factor``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ntkd.ntk.modes import HIGHEST
from ntkd.ntk.structured import patches as pt
from ntkd.ntk.structured.discovery import Plan, Target, bind_eqn


def evaluate(plan: Plan, args: list, perts: list, pins: dict | None = None) -> tuple[list, list]:
    """Runs the plan's jaxpr on ``args``; returns (outputs, recorded target operands).

    ``pins`` maps target indices to zero perturbations added to that target's
    activation (their VJP is the cotangent of the op's input).
    """
    pins = pins or {}
    recorded = [None] * len(plan.targets)

    def run(jaxpr, consts, vals, ctx):
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, vals))
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        for eqn in jaxpr.eqns:
            path = ctx + (id(eqn),)
            invals = [read(v) for v in eqn.invars]
            t = plan.by_path.get(path)
            if t is not None and t.index in pins:
                invals = list(invals)
                invals[t.activation] = invals[t.activation] + pins[t.index]
            if path in plan.inline:
                inner = eqn.params["jaxpr"]
                outs = run(inner.jaxpr, inner.consts, invals, path)
            elif t is not None and t.kind == "dense" and t.operand == 0:
                outs = [weight_right(eqn, *invals)]
            else:
                outs = bind_eqn(eqn, invals)
            if t is not None:
                recorded[t.index] = invals[t.activation]
                outs = [outs[0] + perts[t.index]]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    return run(plan.closed.jaxpr, plan.closed.consts, args, ()), recorded


def weight_right(eqn, w, a):
    """``dot_general(w, a)`` (the weight on the left, as in Equinox's ``W @ x``) computed
    as ``dot_general(a, w)`` and transposed back: exact, and vmapped over the block the
    examples stay the rows of the product instead of its columns (an Equinox MLP's
    forward ran as ``W · xᵀ``, with x and the layer outputs transposed to and from it:
    MLP 784-256-256-10 `trace`, n = 128, ~0.27 ms of a 3.3 ms kernel)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    precision = eqn.params["precision"]
    out = jax.lax.dot_general(
        a,
        w,
        ((rc, lc), (rb, lb)),
        precision=tuple(reversed(precision)) if isinstance(precision, tuple) else precision,
        preferred_element_type=eqn.params["preferred_element_type"],
    )
    nb, nl = len(lb), w.ndim - len(lb) - len(lc)
    nr = a.ndim - len(rb) - len(rc)
    perm = (*range(nb), *range(nb + nr, nb + nr + nl), *range(nb, nb + nr))
    return out if perm == tuple(range(out.ndim)) else jax.lax.transpose(out, perm)


def sizes(t: Target) -> tuple[int, int, int, int]:
    """(H, S, D, C) of a target: shared dims, positions, contracted size, output features.

    D counts the constant-1 column of a folded bias; for a lookup it is the
    number of table rows.
    """
    h, s, d, c = _op_sizes(t)
    return h, s, d + (t.bias is not None), c


def _op_sizes(t: Target) -> tuple[int, int, int, int]:
    eqn = t.eqn
    out = eqn.outvars[0].aval.shape
    if t.kind == "dense":
        a_b, a_free, a_c, w_free = pt.dense_dims(eqn, t.operand)
        a, w = eqn.invars[t.activation].aval.shape, eqn.invars[t.operand].aval.shape
        size = lambda shape, dims: math.prod(shape[d] for d in dims)
        return size(a, a_b), size(a, a_free), size(a, a_c), size(w, w_free)
    if t.kind == "conv":
        out_spec = eqn.params["dimension_numbers"][2]
        w = eqn.invars[1].aval.shape
        c = out[out_spec[1]]
        return 1, math.prod(out) // c, math.prod(w) // c, c
    table = eqn.invars[0].aval.shape
    c = math.prod(table[1:])
    return 1, math.prod(out) // c, table[0], c


def cotangents(t: Target, g: jax.Array, lead: int) -> jax.Array:
    """(lead..., H, S, C) output cotangents of a target from (lead..., *out_shape)."""
    if t.kind == "dense":
        return pt.dense_cotangents(t.eqn, t.operand, g, lead)
    if t.kind == "conv":
        return pt.conv_cotangents(t.eqn, g, lead)
    return pt.embed_cotangents(t.eqn, g, lead)


def inputs(t: Target, a: jax.Array, dtype):
    """Patches (b, H, S, D), or for a lookup (tokens, valid) each (b, S).

    A folded bias is a constant-1 input column: its gradient Σ_s g_s joins the
    weight's (a dense layer's block becomes ((a1·a2ᵀ) + 1) ⊙ (g1·g2ᵀ)).
    """
    if t.kind == "embed":
        return pt.embed_tokens(t.eqn, a, dtype)
    x = pt.dense_patches(t.eqn, t.operand, a) if t.kind == "dense" else pt.conv_patches(t.eqn, a)
    if t.bias is not None:
        x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
    return x


def weight_grads(t: Target, x, g: jax.Array, rows: int, wide_ratio: float) -> jax.Array:
    """Per-example weight gradients (b, m, H·C·D) from inputs and g: (b, H, S, m, C).

    Position-major cotangents make this one batched matmul (over b·H, contracting
    the S positions) with no transposed copy of its operands (ResNet-20 stage 1 on 2
    CPU cores: 0.57 → 0.36 ms per example and conv against a cotangent-major einsum).
    Its output puts the input columns D last, unless the m·C cotangent columns are at
    least ``wide_ratio`` times as many: then they go last and the product is
    transposed back, 1/S of the matmul's work (XLA CPU's batched matmuls with a narrow
    last output dim ran at a fraction of peak: b = 64, S = 196, D = 10, m·C = 160,
    1.96 → 1.20 ms; ``ContractionOptions.wide_grad_ratio`` has the measurements).
    """
    b, h, s, m, c = g.shape
    if t.kind == "embed":
        tok, valid = x
        gv = (g[:, 0] * valid[:, :, None, None]).reshape(b, s, m * c)
        w = jax.vmap(lambda tk, gg: jnp.zeros((rows, m * c), g.dtype).at[tk].add(gg))(tok, gv)
        return jnp.swapaxes(w.reshape(b, rows, m, c), 1, 2).reshape(b, m, -1)
    d = x.shape[-1]
    xs, gs = x.reshape(b * h, s, d), g.reshape(b * h, s, m * c)
    if m * c >= wide_ratio * d:
        w = jnp.einsum("ipd,ipe->ide", xs, gs, precision=HIGHEST).reshape(b, h, d, m, c)
        return jnp.transpose(w, (0, 3, 1, 4, 2)).reshape(b, m, -1)  # (b, m, H, C, D)
    w = jnp.einsum("ipd,ipe->ied", xs, gs, precision=HIGHEST)
    w = w.reshape(b, h, m, c * d)
    return (w[:, 0] if h == 1 else jnp.swapaxes(w, 1, 2)).reshape(b, m, -1)
