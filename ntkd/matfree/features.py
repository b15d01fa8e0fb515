"""eNTK products ``K @ V`` and diag K from cached structured features.

The structured algorithm (:mod:`ntkd.ntk.structured`) gives, per block of
examples, for each factorised op t its patches x_t (b, H, S, D) (a lookup:
``(tokens, valid)``, each (b, S)) and output cotangents g_t (b, H, m_t, S, C),
and flat per-example gradients f (b, m_f, P_f) for everything else. Op t's
per-example weight gradient for cotangent a is W_ia = Σ_{h,p} x_ihp ⊗ g_ihap,
so its kernel is

- scalar modes (trace, sum, logit): K_t(i, j) = Σ_a ⟨W_ia, W_ja⟩
  = Σ_{h,p,q} (x_ihp·x_jhq) (Σ_a g_ihap·g_jhaq), with the term's own m_t;
- ``full`` (m_t = k): K_t((i, a), (j, b)) = ⟨W_ia, W_jb⟩.

A product never forms W per example: pass 1 accumulates over blocks the
V-weighted weight gradient M = Σ_j v_j W_j (per column, and per a in the
scalar modes), pass 2 returns out_i = Σ_{h,p} x_ihpᵀ M g_ihp, both as
batched matmuls (a lookup: a scatter-add and a gather). Flat terms are plain
Gram products (Σ_a f_ia·f_ja). Every contraction uses ``Precision.HIGHEST``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ntkd.ntk.modes import HIGHEST


def _e(spec, *ops):
    return jnp.einsum(spec, *ops, precision=HIGHEST)


def _flat(feats) -> list:
    """The flat terms, with each pooled-head term (H (b, C, D), V (b, C, m)) as its
    per-example weight gradients f[i, a] = H_i ⊙ V[:, a] (b, m, C·D) (``separable_pool``)."""
    pooled = [
        (h[:, None] * v[0].T[None, :, :, None]).reshape(h.shape[0], v.shape[2], -1)
        for h, v in feats.get("pooled", [])
    ]
    return list(feats["flat"]) + pooled


def pass1(kinds, rows, full: bool, feats, V):
    """Per-term M from one block's features and its V rows.

    Args:
      kinds: per factorised term, ``"dense"``, ``"conv"`` or ``"embed"``.
      rows: per factorised term, its table rows (lookups) or None.
      full: ``full`` mode: V is (b, k, c) and M sums over the logits too.
      feats: ``{"fact": [(x, g), ...], "flat": [f, ...], "pooled": [(H, V), ...]}`` of
        the block (pooled terms count as flat ones).
      V: (b, c) (scalar modes) or (b, k, c) (``full``), zero on padding.

    Returns:
      ``{"fact": [M_t, ...], "flat": [M_f, ...]}``; M_t is (c, [m_t,] H, D, C)
      (a lookup: (rows, c, [m_t,] C)), M_f (c, [m_f,] P).
    """
    out_fact = []
    for kind, nrows, (x, g) in zip(kinds, rows, feats["fact"]):
        V_ = V.astype(g.dtype)
        if kind == "embed":
            tok, valid = x
            gs = g[:, 0] * valid[:, None, :, None].astype(g.dtype)  # (b, m, S, C)
            if full:
                vals = _e("iasc,ian->isnc", gs, V_)
            else:
                vals = gs.transpose(0, 2, 1, 3)[:, :, None] * V_[:, None, :, None, None]
            b, s = tok.shape
            zero = jnp.zeros((nrows,) + vals.shape[2:], g.dtype)
            out_fact.append(zero.at[tok.reshape(-1)].add(vals.reshape((b * s,) + vals.shape[2:])))
            continue
        if full:
            gv = _e("ihapc,ian->ihnpc", g, V_)
            out_fact.append(_e("ihpd,ihnpc->nhdc", x.astype(g.dtype), gv))
        else:
            gv = g[:, :, None] * V_[:, None, :, None, None, None]  # (b, H, c, m, S, C)
            out_fact.append(_e("ihpd,ihnapc->nahdc", x.astype(g.dtype), gv))
    out_flat = []
    for f in _flat(feats):
        V_ = V.astype(f.dtype)
        out_flat.append(_e("iap,ian->np", f, V_) if full else _e("iap,in->nap", f, V_))
    return {"fact": out_fact, "flat": out_flat}


def pass2(kinds, full: bool, feats, M):
    """One block of K @ V from its features and the summed M of :func:`pass1`.

    Returns (b, c) (scalar modes) or (b, k, c) (``full``).
    """
    total = None
    for kind, (x, g), Mt in zip(kinds, feats["fact"], M["fact"]):
        if kind == "embed":
            tok, valid = x
            Mg = Mt[tok]  # (b, S, c, [m,] C)
            Mg = Mg * valid.reshape(valid.shape + (1,) * (Mg.ndim - 2)).astype(g.dtype)
            if full:
                o = _e("isnc,iasc->ian", Mg, g[:, 0])
            else:
                o = _e("isnac,iasc->in", Mg, g[:, 0])
        elif full:
            xm = _e("ihpd,nhdc->ihnpc", x.astype(g.dtype), Mt)
            o = _e("ihnpc,ihapc->ian", xm, g)
        else:
            _, _, m, _, c = g.shape
            if x.shape[-1] <= m * c:  # contract g with M first: the smaller temporary
                gm = _e("ihapc,nahdc->ihnpd", g, Mt)
                o = _e("ihnpd,ihpd->in", gm, x.astype(g.dtype))
            else:
                xm = _e("ihpd,nahdc->ihnapc", x.astype(g.dtype), Mt)
                o = _e("ihnapc,ihapc->in", xm, g)
        total = o if total is None else total + o
    for f, Mf in zip(_flat(feats), M["flat"]):
        o = _e("iap,np->ian", f, Mf) if full else _e("iap,nap->in", f, Mf)
        total = o if total is None else total + o
    return total


def diagonal(kinds, full: bool, feats):
    """Exact diag K of one block: (b,) (scalar modes) or (b, k) (``full``)."""
    total = None
    for kind, (x, g) in zip(kinds, feats["fact"]):
        if kind == "embed":
            tok, valid = x
            v = valid.astype(g.dtype)
            px = (tok[:, :, None] == tok[:, None, :]) * (v[:, :, None] * v[:, None, :])
            pg = _e("iapc,iaqc->iapq", g[:, 0], g[:, 0])
            o = _e("ipq,iapq->ia", px.astype(g.dtype), pg)
        else:
            xg = x.astype(g.dtype)
            px = _e("ihpd,ihqd->ihpq", xg, xg)
            pg = _e("ihapc,ihaqc->ihapq", g, g)
            o = _e("ihpq,ihapq->ia", px, pg)
        o = o if full else o.sum(1)
        total = o if total is None else total + o
    for f in _flat(feats):
        o = _e("iap,iap->ia", f, f)
        o = o if full else o.sum(1)
        total = o if total is None else total + o
    return total


def column_bytes(feats) -> int:
    """Bytes of the largest per-column temporary of :func:`pass1` / :func:`pass2`
    (about one term's cotangents g, or its patches for one column)."""
    best = 0
    for x, g in feats["fact"]:
        size = g.size
        if not isinstance(x, tuple):
            size = max(size, (g.size // (g.shape[2] * g.shape[4])) * x.shape[-1])
        best = max(best, size * jnp.dtype(g.dtype).itemsize)
    for f in feats["flat"]:
        best = max(best, f.size // f.shape[0] * jnp.dtype(f.dtype).itemsize)
    for h, v in feats.get("pooled", []):  # expanded to (b, m, C·D) flat terms
        best = max(best, h.size // h.shape[0] * v.shape[2] * jnp.dtype(h.dtype).itemsize)
    return int(best)
