"""How this machine's speed drifts: one small kernel timed in consecutive windows.

`ntk_speed.py --generic-order blocked` takes each contender's repeats back to
back, and a small kernel's 9 repeats then last well under a second. This
script shows how much one fixed executable's time moves on that time scale:
it times `empirical_ntk_fn(f, mode, implementation=...)` of one
`plain_models` network for ``--seconds``, in windows of ``--calls`` calls,
and prints each window's median (ms) and the slowest / fastest window.
Nothing changes between windows but the time.

    PYTHONPATH=$PWD python benchmarks/machine_drift.py                # MLP 784 `trace`, n = 128
    PYTHONPATH=$PWD python benchmarks/machine_drift.py --workload cnn2d --n 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import plain_models
from ntk_speed import cpu_model  # importing it applies ntkd's host-malloc tuning, as it runs

from ntkd.ntk import empirical_ntk_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(plain_models.PLAIN), default="mlp784")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--mode", default="trace")
    p.add_argument("--implementation", default="structured")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--calls", type=int, default=50, help="calls per window")
    args = p.parse_args()
    init, fn = plain_models.PLAIN[args.workload]
    params = init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.n,) + plain_models.SHAPES[args.workload])
    ntk = empirical_ntk_fn(fn, mode=args.mode, implementation=args.implementation)
    jax.block_until_ready(ntk(x, None, params))
    windows = []
    t_end = time.perf_counter() + args.seconds
    while time.perf_counter() < t_end:
        runs = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            jax.block_until_ready(ntk(x, None, params))
            runs.append(time.perf_counter() - t0)
        windows.append(statistics.median(runs) * 1e3)
    print(f"{cpu_model()}; {args.workload} n={args.n} {args.mode} {args.implementation}")
    print(f"window medians (ms, {args.calls} calls each):")
    print(" ".join(f"{w:.1f}" for w in windows))
    print(
        f"{len(windows)} windows: fastest {min(windows):.2f} ms, slowest {max(windows):.2f} ms, "
        f"slowest / fastest {max(windows) / min(windows):.2f}"
    )


if __name__ == "__main__":
    main()
