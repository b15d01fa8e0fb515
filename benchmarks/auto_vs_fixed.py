"""`auto` against the fixed implementation it picks, alternating in one process.

`ntk_speed.py` takes every contender's repeats in turn, always in the same
order, so `auto` is always timed right after the same contender
(neural-tangents' last implementation, in a full-size run). This script
removes that confound: it builds `empirical_ntk_fn(..., implementation="auto")`
and the fixed implementation `auto` picked, warms both up, and times them in
alternating order (ABBA...), reporting the ratio of medians and the median of
paired ratios. The two run the same executables, so a ratio far from 1 here
would mean `auto`'s own dispatch costs time.

    PYTHONPATH=$PWD python benchmarks/auto_vs_fixed.py resnet20 256 trace 5
    PYTHONPATH=$PWD python benchmarks/auto_vs_fixed.py mlp784 128 trace 201

Workloads: the full-size ones of ntk_speed.py (mlp, cnn1d, lenet5, resnet20,
Linen via flax_apply_fn) and the plain functions of plain_models.py (mlp784,
cnn2d).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import plain_models  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from ntk_speed import WORKLOADS  # importing it applies ntkd's host-malloc tuning, as it runs

from ntkd.models import get_model, init_variables
from ntkd.ntk import chosen_implementation, empirical_ntk_fn, flax_apply_fn


def model_of(workload: str):
    """(fn, params, per-example input shape)."""
    if workload in WORKLOADS:
        name, kwargs, shape, _ = WORKLOADS[workload]
        model = get_model(name, 10, **kwargs)
        fn, params = flax_apply_fn(model, init_variables(model, jax.random.PRNGKey(0), shape))
        return fn, params, shape
    init, fn = plain_models.PLAIN[workload]
    return fn, init(jax.random.PRNGKey(0)), plain_models.SHAPES[workload]


def workload_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the arguments every one-cell script takes: workload, n, mode."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("workload", choices=sorted(WORKLOADS) + sorted(plain_models.PLAIN))
    p.add_argument("n", type=int)
    p.add_argument("mode", choices=("full", "trace", "logit", "sum"))
    return p


def workload_inputs(args) -> tuple:
    """(fn, params, x) of a parsed cell: n standard-normal float32 inputs, seed 1."""
    fn, params, shape = model_of(args.workload)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.n,) + tuple(shape), jnp.float32)
    return fn, params, x


def main() -> None:
    p = workload_parser(__doc__)
    p.add_argument("repeats", type=int, help="timed calls of each, alternating")
    args = p.parse_args()
    fn, params, x = workload_inputs(args)
    auto = empirical_ntk_fn(fn, mode=args.mode)
    auto(x, None, params)  # measures the candidates, then caches the pick
    picked = chosen_implementation(fn, params, x, mode=args.mode)
    fns = {"auto": auto, picked: empirical_ntk_fn(fn, mode=args.mode, implementation=picked)}
    for f in fns.values():
        jax.block_until_ready(f(x, None, params))
        jax.block_until_ready(f(x, None, params))
    runs: dict = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.repeats):
        for key in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[key](x, None, params))
            runs[key].append(time.perf_counter() - t0)
    a, b = runs["auto"], runs[picked]
    print(
        f"{args.workload} n={args.n} {args.mode}: auto picked {picked}; "
        f"auto {statistics.median(a) * 1e3:.2f} ms, {picked} {statistics.median(b) * 1e3:.2f} ms; "
        f"ratio of medians {statistics.median(a) / statistics.median(b):.3f}, "
        f"median paired ratio {statistics.median([u / v for u, v in zip(a, b)]):.3f} "
        f"({args.repeats} each)"
    )


if __name__ == "__main__":
    main()
