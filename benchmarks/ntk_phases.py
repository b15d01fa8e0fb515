"""Where one eNTK call spends its time: the blocking driver's compiled pieces, timed in place.

Runs ``empirical_ntk_fn(f, mode=..., implementation=...)`` on a benchmark
workload and times every call the driver (``ntkd.ntk.blocking.run``) makes to
its compiled pieces: the feature pass of a block (``row`` / ``col``), an
off-diagonal block pair (``pair``), a diagonal one (``pair_sym``) and the
fused one-block kernel (``whole_sym``; the warm one-block shortcut, which
calls the same executable, is switched off while timing). Each piece is
awaited before the next starts, so the pieces' times add up; the call as it
normally runs, where XLA may overlap a block's features with the previous
pair, is timed first and printed beside them.

For each piece it prints XLA's flop count (``cost_analysis``, read from a twin
whose Grams are not chunked: XLA counts a loop body once), the rate it ran
at, and that rate as a fraction of a float32 matmul peak measured in the same
run. Then the time the call would take if all its flops ran at that peak:
a floor for this algorithm on this machine that ignores memory traffic, and
so the largest speed-up over a reference time (neural-tangents') that the
algorithm allows here.

    PYTHONPATH=$PWD python benchmarks/ntk_phases.py cnn2d 500 full
    PYTHONPATH=$PWD python benchmarks/ntk_phases.py cnn2d 500 full --reference 1.8609
    PYTHONPATH=$PWD python benchmarks/ntk_phases.py lenet5 500 full --reference-json RUN.json

``--reference-json`` takes neural-tangents' best time for the same workload, n
and mode from an ``ntk_speed.py --reference`` JSON (its fastest ``nt-*``
contender, full-size rows or generic entries). ``--json`` appends this run's
numbers to a JSON list.
"""

from __future__ import annotations

import collections
import json
import os
import time

import jax
import numpy as np
from auto_vs_fixed import (  # importing it applies ntkd's host-malloc tuning, as it runs
    workload_inputs,
    workload_parser,
)
from ntk_flops import UNCHUNKED, compiled_flops
from ntk_speed import matmul_peak_gflops

from ntkd.ntk import blocking, empirical_ntk_fn
from ntkd.ntk import engine as _engine

PIECES = ("row", "col", "pair", "pair_sym", "whole_sym")


class _Known(dict):
    def __contains__(self, key):
        return True


class _NoFused(dict):
    """An engine's cache of fused one-block executables that stays empty (and so never
    compiles one to register)."""

    def setdefault(self, key, default=None):
        return _Known()


def _unfused() -> None:
    """Routes every engine's warm one-block calls through ``blocking.run`` (and stops them
    registering a fused executable)."""
    for engine in _engine._ENGINES.values():
        engine._fused = _NoFused()


def _timed_calls(ntk, x, params, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(ntk(x, None, params))
        out.append(time.perf_counter() - t)
    return out


class Timed:
    """Wraps ``blocking.run`` so that every call to a compiled piece is awaited and timed
    (``on``), or, with ``count=True``, so that each piece's flops are read once (XLA's
    ``cost_analysis`` of its compiled executable)."""

    def __init__(self, count: bool = False):
        self.times = collections.defaultdict(list)
        self.flops: dict = {}
        self.rows: dict = {}  # piece -> examples in its first block argument
        self.on, self.count = False, count
        self._run = blocking.run

    def __enter__(self):
        blocking.run = self.run
        return self

    def __exit__(self, *exc):
        blocking.run = self._run

    def run(self, c, *args, **kwargs):
        view = type("TimedCompiled", (), {})()
        view.__dict__.update(c.__dict__)
        for name in PIECES:
            if hasattr(c, name):
                setattr(view, name, self._wrap(getattr(c, name), name))
        return self._run(view, *args, **kwargs)

    def _wrap(self, fn, name):
        def timed(*args):
            if not self.on:
                return fn(*args)
            if self.count:
                if name not in self.flops:  # equal blocks: one count per piece
                    self.flops[name] = compiled_flops(fn.lower(*args).compile())
                return fn(*args)
            jax.block_until_ready(args)
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            self.times[name].append(time.perf_counter() - t)
            self.rows.setdefault(name, jax.tree.leaves(args[2])[0].shape[0])
            return out

        return timed


def count_flops(fn, mode: str, implementation: str, block: int, x, params) -> dict:
    """Each piece's flops, read from a twin kernel function whose Grams are one matmul.

    XLA's ``cost_analysis`` counts a while loop's body once, not once per trip, so the
    executables that contract deep Grams in a loop over K chunks would read low. The twin
    differs only in its contraction options (``ntk_flops.UNCHUNKED``: the same products,
    each one matmul) and takes the timed run's block size, so it does the same arithmetic.
    """
    twin = empirical_ntk_fn(
        fn,
        mode=mode,
        implementation=implementation,
        block_size=block,
        contraction=UNCHUNKED,
    )
    with Timed(count=True) as counter:
        counter.on = True
        _unfused()
        jax.block_until_ready(twin(x, None, params))
    return counter.flops


def nt_best(path: str, workload: str, n: int, mode: str) -> float:
    """neural-tangents' fastest median for (workload, n, mode) in an ntk_speed.py JSON."""
    with open(path) as f:
        run = json.load(f)
    times = [
        r["seconds"]
        for r in run.get("rows", []) + run.get("generic", [])
        if (r["workload"], r["n"], r["mode"]) == (workload, n, mode)
        and str(r.get("contender", r.get("entry", ""))).startswith("nt-")
    ]
    if not times:
        raise SystemExit(f"{path} has no neural-tangents time for {workload} n={n} {mode}.")
    return min(times)


def main() -> None:
    p = workload_parser(__doc__)
    p.add_argument("--implementation", default="structured")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference", type=float, default=None, help="a reference time (s), e.g. NT's")
    p.add_argument("--reference-json", default=None, help="take --reference from this JSON")
    p.add_argument("--json", default=None, help="append the results to this JSON list")
    args = p.parse_args()
    if args.reference_json:
        args.reference = nt_best(args.reference_json, args.workload, args.n, args.mode)
    fn, params, x = workload_inputs(args)
    ntk = empirical_ntk_fn(
        fn, mode=args.mode, implementation=args.implementation, block_size=args.block_size
    )
    peak = matmul_peak_gflops()
    with Timed() as timed:
        for _ in range(2):
            jax.block_until_ready(ntk(x, None, params))
        untimed = _timed_calls(ntk, x, params, args.repeats)
        timed.on = True
        _unfused()
        jax.block_until_ready(ntk(x, None, params))  # the unfused path's first call
        timed.times.clear()
        awaited = _timed_calls(ntk, x, params, args.repeats)
    block = max(timed.rows.values())
    flops = count_flops(fn, args.mode, args.implementation, block, x, params)
    r = args.repeats
    total = float(np.median(awaited))
    print(
        f"{args.workload} n={args.n} {args.mode} {args.implementation}: "
        f"{1e3 * np.median(untimed):.1f} ms a call as run, {1e3 * total:.1f} ms with every "
        f"piece awaited; blocks of {block}; float32 matmul peak {peak:.1f} GFLOP/s"
    )
    print("| piece | calls | ms a call | ms in all | share | MFLOP a call | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    floor, pieces = 0.0, {}
    for name in PIECES:
        ts = timed.times.get(name)
        if not ts:
            continue
        calls, each, fl = len(ts) // r, float(np.median(ts)), flops[name]
        floor += calls * fl / (peak * 1e9)
        rate = fl / each / 1e9
        pieces[name] = {"calls": calls, "seconds": each, "flops": fl}
        print(
            f"| {name} | {calls} | {1e3 * each:.2f} | {1e3 * sum(ts) / r:.1f} | "
            f"{100 * sum(ts) / r / total:.0f}% | {fl / 1e6:.0f} | {rate:.1f} | "
            f"{100 * rate / peak:.0f}% |"
        )
    print(f"every piece at the matmul peak: {1e3 * floor:.1f} ms", end="")
    if args.reference:
        print(
            f"; against the reference {args.reference:.4f} s: at most {args.reference / floor:.2f}x "
            f"(as run: {args.reference / float(np.median(untimed)):.2f}x)"
        )
    else:
        print()
    if args.json:
        old = json.load(open(args.json)) if os.path.exists(args.json) else []
        old.append(
            dict(
                workload=args.workload,
                n=args.n,
                mode=args.mode,
                implementation=args.implementation,
                block_size=args.block_size,
                block=block,
                peak_gflops=peak,
                as_run=float(np.median(untimed)),
                awaited=total,
                pieces=pieces,
                floor=floor,
                reference=args.reference,
            )
        )
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(old, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
