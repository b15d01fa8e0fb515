"""One cell's `structured` kernel with default ContractionOptions against a variant.

Both built once, checked to agree, warmed up, then timed alternating (ABBA...);
prints the ratio of medians and the median of paired ratios (variant / default).

    PYTHONPATH=$PWD python benchmarks/ntk_speed_runs/2026-12-03-s8/options_ab.py \
        cnn2d 64 trace 200 '{"cotangent_loop_max": 0}'
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from auto_vs_fixed import workload_inputs, workload_parser  # noqa: E402

from ntkd.ntk import empirical_ntk_fn  # noqa: E402
from ntkd.ntk.options import ContractionOptions  # noqa: E402


def main() -> None:
    p = workload_parser(__doc__)
    p.add_argument("rounds", type=int)
    p.add_argument("options", help="the variant's ContractionOptions fields, as JSON")
    args = p.parse_args()
    fn, params, x = workload_inputs(args)
    opts = json.loads(args.options)
    a = empirical_ntk_fn(fn, mode=args.mode, implementation="structured")
    b = empirical_ntk_fn(
        fn, mode=args.mode, implementation="structured", contraction=ContractionOptions(**opts)
    )
    ka, kb = np.asarray(a(x, None, params)), np.asarray(b(x, None, params))
    print("max relative difference", float(np.max(np.abs(ka - kb)) / np.max(np.abs(ka))))
    for f in (a, b):
        for _ in range(3):
            jax.block_until_ready(f(x, None, params))
    times = {a: [], b: []}
    for r in range(args.rounds):
        for f in (a, b) if r % 2 == 0 else (b, a):
            s = time.perf_counter()
            jax.block_until_ready(f(x, None, params))
            times[f].append(time.perf_counter() - s)
    ma, mb = statistics.median(times[a]), statistics.median(times[b])
    paired = statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
    print(
        f"{args.workload} n={args.n} {args.mode} {opts}: default {1e3 * ma:.2f} ms, variant "
        f"{1e3 * mb:.2f} ms, ratio {mb / ma:.3f}, paired {paired:.3f} ({args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
