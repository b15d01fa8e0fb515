"""Kernel blocks from factorised features: (patch1·patch2ᵀ) ⊙ (g1·g2ᵀ) summed over positions."""

from __future__ import annotations

import jax.numpy as jnp

from ntkd.ntk.modes import HIGHEST, Mode


def wants_factor(
    mode: Mode, kind: str, h: int, s: int, d: int, c: int, m: int, max_positions: int
) -> bool:
    """Factorised (per example pair H·S²·(D + m·C)) vs weight gradients (m·H·D·C).

    ``full`` factorises only single-position layers: its three-operand
    (i, j, p, q) contraction is memory-bound and measured slower than weight
    gradients and one matmul even at S = 5..10 (1-D CNN, n = 1000: 26.5 s vs
    17.4 s) despite fewer flops. Above ``max_positions`` the (b1, b2, S, S)
    temporaries are too large.
    """
    if mode.full:
        return s == 1 and h == 1
    if s == 1:
        return True
    if s > max_positions:
        return False
    d_pair = 1 if kind == "embed" else d  # a lookup's input product is an index comparison
    return h * s * s * (d_pair + m * c) < m * h * d * c


def _input_products(kind: str, x1, x2, single: bool, gram):
    """(i, j) for single-position layers, else (i, j, h, p, q)."""
    if kind == "embed":
        (t1, v1), (t2, v2) = x1, x2
        if single:
            return (t1[:, 0, None] == t2[None, :, 0]) * (v1[:, 0, None] * v2[None, :, 0])
        same = t1[:, None, :, None] == t2[None, :, None, :]
        return (same * (v1[:, None, :, None] * v2[None, :, None, :]))[:, :, None]
    if single:
        a = x1[:, 0, 0]
        return gram(a, a if x2 is x1 else x2[:, 0, 0])
    return jnp.einsum("ihpd,jhqd->ijhpq", x1, x2, precision=HIGHEST)


def factor_block(mode: Mode, kind: str, x1, g1, x2, g2, gram):
    """One target's kernel block; ``full`` in the (i, a, j, b) layout.

    Args:
        x1, x2: patches (b, H, S, D), or (tokens, valid) each (b, S) for a lookup.
        g1, g2: output cotangents (b, H, m, S, C).
        gram: ``gram(a, b) = a @ b.T`` (``Problem.gram``; symmetric when ``a is b``).
    """
    b1, h, m, s, c = g1.shape
    b2 = g2.shape[0]
    single = s == 1 and h == 1
    pa = _input_products(kind, x1, x2, single, gram).astype(g1.dtype)
    if single:
        rows = b1 * m if mode.full else b1
        a = g1.reshape(rows, -1)
        b = a if g2 is g1 else g2.reshape(b2 * m if mode.full else b2, -1)
        if mode.full:
            return pa[:, None, :, None] * gram(a, b).reshape(b1, m, b2, m)
        return pa * gram(a, b)
    pg = jnp.einsum("ihapc,jhaqc->ijhpq", g1, g2, precision=HIGHEST)
    return jnp.sum(pa * pg, axis=(2, 3, 4))
