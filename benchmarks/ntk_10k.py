"""10,000 × 10,000 `trace` eNTK of the MNIST-1D MLP student (widths (256, 256), k=10).

    PYTHONPATH=. python benchmarks/ntk_10k.py [--n 10000] [--impl auto]

Prints wall time (first call, includes compilation), a repeat's time, peak
host memory and a symmetry/spot check against an unblocked 64×64 sub-kernel.
"""

import argparse
import resource
import time

import jax
import numpy as np

import ntkd
from ntkd.models import get_model, init_variables
from ntkd.ntk import empirical_ntk_fn, flax_apply_fn

ntkd.tune_host_memory()  # before any JAX computation, as the ntkd CLI does (ntkd/_hostmem.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--repeat", action="store_true", help="time a second (compiled) call")
    args = parser.parse_args()
    model = get_model("mlp", 10, widths=(256, 256))
    variables = init_variables(model, jax.random.PRNGKey(0), (40, 1))
    apply_fn, params = flax_apply_fn(model, variables)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.n, 40, 1))
    fn = empirical_ntk_fn(
        apply_fn, mode="trace", implementation=args.impl, block_size=args.block_size
    )
    t0 = time.perf_counter()
    k = fn(x, None, params, as_numpy=True)
    first = time.perf_counter() - t0
    print(f"n={args.n} impl={args.impl} first call (incl. compile): {first:.1f} s", flush=True)
    if args.repeat:
        t0 = time.perf_counter()
        fn(x, None, params, as_numpy=True)
        print(f"second call: {time.perf_counter() - t0:.1f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    idx = np.random.default_rng(0).choice(args.n, 64, replace=False)
    sub = np.asarray(
        empirical_ntk_fn(apply_fn, mode="trace", implementation="jacobian")(x[idx], None, params)
    )
    err = np.max(np.abs(k[np.ix_(idx, idx)] - sub)) / np.max(np.abs(sub))
    print(
        f"kernel {k.shape} {k.dtype}, symmetric: {np.array_equal(k, k.T)}, "
        f"finite: {np.isfinite(k).all()}, peak RSS {rss:.1f} GiB, "
        f"64x64 spot check vs unblocked jacobian rel err {err:.1e}"
    )


if __name__ == "__main__":
    main()
