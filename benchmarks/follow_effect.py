"""Does a kernel run slower right after neural-tangents' call than right after its own?

The interleaved benchmark takes every contender's repeats in turn, in a fixed
order: the first ntkd entry point (``flax_apply_fn``) always runs right after
neural-tangents' server call, and neural-tangents always right after an ntkd
call; every other ntkd entry follows another ntkd call. This script times
ntkd's ``structured`` kernel of a ``plain_models`` network (a) right after a
neural-tangents call, (b) right after its own call, (c) after a
neural-tangents call and an idle gap (spinning worker threads would be gone
by then, cold caches not), and neural-tangents' ``structured`` kernel after an
ntkd call and after its own, the five in turn for ``repeats`` rounds.

    PYTHONPATH=$PWD python benchmarks/follow_effect.py mlp784 128 trace 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ntk_speed  # importing it applies ntkd's host-malloc tuning, as it runs
import numpy as np
import plain_models

from ntkd.ntk import empirical_ntk_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=sorted(plain_models.PLAIN))
    p.add_argument("n", type=int)
    p.add_argument("mode", choices=("full", "trace"))
    p.add_argument("repeats", type=int)
    p.add_argument("--gap", type=float, default=0.05, help="idle seconds in case (c)")
    args = p.parse_args()
    init, plain = plain_models.PLAIN[args.workload]
    params = init(jax.random.PRNGKey(0))
    shape = (args.n,) + plain_models.SHAPES[args.workload]
    x = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    stem = f"{ntk_speed.WORK}/follow_{args.workload}_{args.n}_{args.mode}"
    ntk_speed.export(stem + "_in.npz", args.workload, {}, params, x, args.mode, 10, args.workload)
    server = ntk_speed.NTServer(
        ntk_speed.ensure_venv(), stem + "_in.npz", stem + "_out.npz", "nt-structured", False
    )
    ntk = empirical_ntk_fn(plain, mode=args.mode, implementation="structured")

    def ours() -> float:
        t = time.perf_counter()
        jax.block_until_ready(ntk(x, None, params))
        return time.perf_counter() - t

    def nt() -> float:
        return server.time("nt-structured")

    for _ in range(5):
        ours(), nt()
    gap = f"ntkd after NT + {1e3 * args.gap:.0f} ms idle"
    t = {
        "ntkd after NT": [],
        "ntkd after ntkd": [],
        gap: [],
        "NT after ntkd": [],
        "NT after NT": [],
    }
    for _ in range(args.repeats):
        nt()
        t["ntkd after NT"].append(ours())
        ours()
        t["ntkd after ntkd"].append(ours())
        nt()
        time.sleep(args.gap)
        t[gap].append(ours())
        ours()
        t["NT after ntkd"].append(nt())
        nt()
        t["NT after NT"].append(nt())
    server.close()
    print(f"{args.workload} n={args.n} {args.mode}, {args.repeats} rounds (medians, quartiles):")
    for k, v in t.items():
        q1, q3 = np.percentile(v, [25, 75])
        print(f"  {k:30s} {1e3 * statistics.median(v):.3f} ms ({1e3 * q1:.3f}-{1e3 * q3:.3f})")
    for a, b in (("ntkd after NT", "ntkd after ntkd"), ("NT after ntkd", "NT after NT")):
        ratio = np.median(np.array(t[a]) / np.array(t[b]))
        print(f"  paired ratio {a} / {b}: {ratio:.3f}")


if __name__ == "__main__":
    main()
