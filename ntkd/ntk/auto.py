"""``implementation="auto"``: the fastest exact algorithm, measured on the actual shapes.

Each candidate's feature pass and one block pair are compiled and timed
(best of a few runs) at the block size the driver will use, and the totals (blocks × feature pass +
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


def _best_of(f, repeats: int, budget_s: float) -> float:
    """Fastest of up to ``repeats`` timed runs, stopping once ``budget_s`` is spent.

    The minimum, not one run: on a shared machine a single timing can be 2×
    off, which flips close decisions (MLP trace, n = 128: structured vs a
    slower fixed path measured once under load).
    """
    best, spent = float("inf"), 0.0
    for _ in range(max(1, repeats)):
        t = _timed(f)
        best, spent = min(best, t), spent + t
        if spent >= budget_s:
            break
    return best


def measure(
    c, params, state, xb, nblocks: int, npairs: int, repeats: int = 3, budget_s: float = 1.0
) -> float:
    """Estimated seconds of a whole kernel: nblocks feature passes + npairs pairs.

    Each piece is compiled by a first call, then timed as the best of up to
    ``repeats`` runs within ``budget_s`` seconds (a slow candidate is timed once).
    """
    row = lambda: c.row(params, state, xb)
    feats = jax.block_until_ready(row())  # compiles
    cfeats = feats if c.algo.shares_features else jax.block_until_ready(c.col(params, state, xb))
    jax.block_until_ready(c.pair(params, state, feats, cfeats))  # compiles
    t_row = _best_of(row, repeats, budget_s)
    t_pair = _best_of(lambda: c.pair(params, state, feats, cfeats), repeats, budget_s)
    return nblocks * t_row + npairs * t_pair
