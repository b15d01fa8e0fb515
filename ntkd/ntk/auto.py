"""``implementation="auto"``: the fastest exact algorithm, measured on the actual shapes.

Each candidate's feature pass and one block pair are compiled and timed at
the block size the driver will use, and the totals (blocks × feature pass +
block pairs × pair) compared. Candidates the flop model rules out are not
compiled at all: NTK-vector products only compete when 3·O·[FP] is within
2× of the Jacobian contraction's O·P per example pair ([FP] from XLA's cost
analysis of one example's forward pass). Decisions are cached per model
structure, shapes and options, so only a first call pays for them.
"""

from __future__ import annotations

import time

import jax


def forward_flops(fn, params, state, x) -> float | None:
    """XLA's flop count of one example's forward pass (None where unavailable)."""
    try:
        one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
        cost = jax.jit(fn).lower(params, state, one).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is optional on some backends
        return None


def candidates(fn, mode, k, params, state, x) -> list[str]:
    """Implementations worth measuring, most promising first."""
    out = ["structured", "jacobian"]
    flops = forward_flops(fn, params, state, x)
    if flops is not None and mode.name in ("full", "trace"):
        p = sum(l.size for l in jax.tree.leaves(params))
        jc = (k * k if mode.full else k) * p
        if 3 * k * flops < 2 * jc:
            out.append("ntvp")
    return out


def _timed(f) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    return time.perf_counter() - t0


def measure(c, params, state, xb, nblocks: int, npairs: int) -> float:
    """Estimated seconds of a whole kernel: nblocks feature passes + npairs pairs (second runs)."""
    row = lambda: c.row(params, state, xb)
    feats = jax.block_until_ready(row())  # compiles
    cfeats = feats if c.algo.shares_features else jax.block_until_ready(c.col(params, state, xb))
    jax.block_until_ready(c.pair(params, state, feats, cfeats))  # compiles
    t_row = _timed(row)
    t_pair = _timed(lambda: c.pair(params, state, feats, cfeats))
    return nblocks * t_row + npairs * t_pair
