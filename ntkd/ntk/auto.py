"""``implementation="auto"``: the fastest exact algorithm, measured on the actual shapes.

Each candidate's feature pass and one block pair are compiled and timed
(fastest of a few interleaved rounds) at the block size the driver will use,
and the totals (blocks × feature pass +
block pairs × pair) compared. Candidates the flop model rules out are not
compiled at all: NTK-vector products only compete when 3·O·[FP] is within
2× of the Jacobian contraction's O·P per example pair ([FP] from XLA's cost
analysis of one example's forward pass). Decisions are cached per model
structure, shapes and options, so only a first call pays for them. When the
first candidate's kernel is already fast (``FAST_ENOUGH_S``) no other is
compiled, nor is one whose unavoidable flops would take longer, even at twice
this machine's measured matmul peak, than the best measured candidate's
whole kernel (:func:`cannot_win`).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp


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


def candidates(fn, mode, k, params, state, x, n1: int, n2: int, symmetric: bool) -> list:
    """[(implementation, lower bound on its kernel's flops or None)], most promising first.

    Bounds count only the unavoidable work: the Jacobian contraction's pairs
    (2·n1·n2·m·P, × m in ``full``) and one forward pass per pushed-forward row
    and column example for NTK-vector products (n1·n2·m·[FP]), halved for a
    symmetric kernel (only the upper block pairs are computed).
    """
    m = mode.width(k)
    p = sum(math.prod(jnp.shape(l)) for l in jax.tree.leaves(params))
    half = 0.5 if symmetric else 1.0
    jc = 2.0 * n1 * n2 * m * p * (m if mode.full else 1) * half
    out = [("structured", None), ("jacobian", jc)]
    flops = forward_flops(fn, params, state, x)
    if flops is not None and mode.name in ("full", "trace"):
        if 3 * k * flops < 2 * (k * k if mode.full else k) * p:
            out.append(("ntvp", n1 * n2 * m * flops * half))
    return out


@functools.cache
def matmul_peak(dtype) -> float:
    """Flop/s of a 1024³ matmul at HIGHEST precision on the default device (fastest of 3)."""
    a = jnp.ones((1024, 1024), dtype)
    mm = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(mm(a))
    return 2 * 1024**3 / min(_timed(lambda: mm(a)) for _ in range(3))


def cannot_win(flops: float | None, best_s: float, dtype) -> bool:
    """True when ``flops`` would take longer than ``best_s`` at twice the matmul peak of
    every device (``jax.device_count()``; blocks may be spread over all of them).

    Such a candidate is neither compiled nor timed; the factor 2 absorbs a
    peak measured under load. (MLP 784-256-256-10, `full`, n = 1000: the
    Jacobian contraction's pairs are 2.7·10¹³ flops, minutes at any CPU peak,
    against 0.7 s for ``structured``; compiling and timing it and the
    NTK-vector products made auto's first call 31 s, now 3 s.)
    """
    if flops is None or not math.isfinite(best_s):
        return False
    return flops / (2 * matmul_peak(dtype) * jax.device_count()) > best_s


def _timed(f) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    return time.perf_counter() - t0


class Candidate:
    """One implementation, compiled, with the block counts of the kernel it would compute.

    Its features live only while it is being timed, so candidates measured in
    turn never hold their (possibly large) features at the same time.
    """

    def __init__(
        self, name: str, c, params, state, xb, nblocks: int, npairs: int, symmetric: bool = False
    ):
        self.name, self.nblocks, self.npairs, self.symmetric = name, nblocks, npairs, symmetric
        # a one-block symmetric kernel on one device runs features and pair in one call
        self.whole = symmetric and c.fused and nblocks == 1 and npairs == 1
        self._c, self._args = c, (params, state, xb)
        self.t_row = self.t_pair = float("inf")
        self.time_once(record=False)  # compiles both pieces

    def time_once(self, record: bool = True) -> float:
        """Times one feature pass and one pair; returns the seconds spent."""
        c, (params, state, xb) = self._c, self._args
        if self.whole:
            t = _timed(lambda: c.whole_sym(params, state, xb)[0])
            if record:
                self.t_row, self.t_pair = min(self.t_row, t), 0.0
            return t
        t0 = time.perf_counter()
        feats = jax.block_until_ready(c.row(params, state, xb))
        r = time.perf_counter() - t0
        cfeats = (
            feats if c.algo.shares_features else jax.block_until_ready(c.col(params, state, xb))
        )
        if c.algo.shares_features and self.symmetric:  # the pair the diagonal blocks run
            q = _timed(lambda: c.pair_sym(params, state, feats))
        else:
            q = _timed(lambda: c.pair(params, state, feats, cfeats))
        if record:
            self.t_row, self.t_pair = min(self.t_row, r), min(self.t_pair, q)
        return r + q

    @property
    def estimate(self) -> float:
        """Seconds of the whole kernel: nblocks feature passes + npairs pairs (fastest runs)."""
        return self.nblocks * self.t_row + self.npairs * self.t_pair


FAST_ENOUGH_S = 0.2
"""A first candidate (structured) whose whole kernel is estimated below this many
seconds is taken without compiling the others: their compilation and timing
(3–5 s on 2 CPU cores) could not pay off over tens of calls, while the most a
wrong pick can cost is this much per call. (A 23k-parameter MLP, n = 500,
`trace`: 25–40 ms a kernel; auto's first call 1.4 s with the shortcut, 4.6–5.8 s
when it also compiled and timed the Jacobian contraction.)"""


def fast_enough(cand: Candidate) -> bool:
    """Times ``cand`` once more; True when its estimated kernel time is below FAST_ENOUGH_S."""
    cand.time_once()
    return cand.estimate < FAST_ENOUGH_S


def choose(
    candidates: list[Candidate], min_rounds: int = 2, rounds: int = 3, budget_s: float = 2.0
) -> str:
    """The candidate with the smallest estimated kernel time.

    Candidates are timed in turn, round after round (each piece keeps its
    fastest run), so load from other jobs on a shared machine falls on all of
    them alike instead of on whichever ran while it peaked; a single
    sequential timing flipped the 1-D CNN `full` choice (n = 1000: jacobian
    picked, 1.44× slower than structured, at load 6 on 2 cores). At least
    ``min_rounds`` rounds run; more, up to ``rounds``, while under ``budget_s``
    seconds in all.
    """
    spent = 0.0
    for i in range(max(1, rounds)):
        for cand in candidates:
            spent += cand.time_once()
        if i + 1 >= min_rounds and spent >= budget_s:
            break
    return min(candidates, key=lambda c: c.estimate).name
