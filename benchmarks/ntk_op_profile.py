"""Which XLA operations one eNTK call spends its time in (a per-op profile).

Runs ``empirical_ntk_fn(f, mode=..., implementation=...)`` on a benchmark
workload, then records ``--calls`` warm calls under ``jax.profiler.trace``
(public API; its Perfetto trace is plain JSON) and sums each XLA operation's
time over them. Printed per call: the operations' total, and the ``--top``
largest, each with how many times it ran per call. Names are XLA's
(``convolution-base-dilated`` is a convolution with input dilation, i.e. the
input VJP of a strided one; ``ynn_fusion`` a fusion XLA CPU hands to its
YNNPACK kernels, dots among them; ``dot_general.N`` a dot left on its own).
Times are wall-clock spans of the ops, which may overlap on the two cores, so
they need not add up to the call's time.

    PYTHONPATH=$PWD python benchmarks/ntk_op_profile.py cnn2d 64 trace
    PYTHONPATH=$PWD python benchmarks/ntk_op_profile.py lenet5 500 trace --calls 3
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
from auto_vs_fixed import (  # importing it applies ntkd's host-malloc tuning, as it runs
    workload_inputs,
    workload_parser,
)

from ntkd.ntk import empirical_ntk_fn

# Spans that wrap others (the executor, Python frames) rather than being one op.
_WRAPPERS = ("ThunkExecutor", "$", "PjitFunction", "TfrtCpu", "PjRt")


def op_times(ntk, x, params, calls: int) -> tuple[dict, dict, float]:
    """({op: seconds per call}, {op: runs per call}, wall seconds per call) over ``calls`` calls."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t0 = time.perf_counter()  # the profiler's start and stop are not the calls' time
            for _ in range(calls):
                jax.block_until_ready(ntk(x, None, params))
            wall = (time.perf_counter() - t0) / calls
        (path,) = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_WRAPPERS):
            total[e["name"]] += e["dur"] * 1e-6 / calls
            count[e["name"]] += 1 / calls
    return dict(total), dict(count), wall


def main() -> None:
    p = workload_parser(__doc__)
    p.add_argument("--implementation", default="structured")
    p.add_argument("--calls", type=int, default=10, help="profiled calls, after 3 warm ones")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="write every op's time to this JSON file")
    args = p.parse_args()
    fn, params, x = workload_inputs(args)
    ntk = empirical_ntk_fn(fn, mode=args.mode, implementation=args.implementation)
    for _ in range(3):
        jax.block_until_ready(ntk(x, None, params))
    total, count, wall = op_times(ntk, x, params, args.calls)
    ops = sum(total.values())
    print(
        f"{args.workload} n={args.n} {args.mode} {args.implementation}: {1e3 * wall:.2f} ms a "
        f"call under the profiler, {1e3 * ops:.2f} ms in {len(total)} distinct ops "
        f"({args.calls} calls; jax {jax.__version__})"
    )
    for name, t in sorted(total.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {1e3 * t:8.3f} ms  {100 * t / ops:5.1f}%  x{count[name]:<5.1f} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "wall_s": wall, "ops_s": total, "runs": count}, f, indent=1
            )


if __name__ == "__main__":
    main()
