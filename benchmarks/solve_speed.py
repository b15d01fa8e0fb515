"""Speed of the dense supervision-complexity solve: Cholesky vs numpy.linalg.solve.

Run (from the repository root; ~1 minute on 2 shared CPU cores):

    PYTHONPATH=$PWD python benchmarks/solve_speed.py --n 4000 --k 10 --repeats 5

Times, in one run and on the same float64 kernel K (n, n) and targets Y (n, k):

* ``cholesky``: ``scipy.linalg.cho_factor`` alone (the n³/3-flop factorisation),
  reported with its GFLOP/s;
* ``cholesky+solve``: factorisation plus the triangular solve C = ‖L⁻¹Y‖²_F,
  the arithmetic inside :func:`ntkd.complexity.supervision_complexity`;
* ``supervision_complexity``: the library call end to end (input checks,
  symmetrisation, condition-number estimate);
* ``numpy.linalg.solve``: the LU-based (2n³/3 flops) general solve
  C = tr(Yᵀ solve(K, Y)) (NumPy's own OpenBLAS);
* ``scipy.linalg.solve``: the same LU solve through SciPy's OpenBLAS, the
  library the Cholesky uses, for a same-BLAS comparison.

Each is the median of ``--repeats`` runs after one warm-up, timed
round-robin. K is a Gaussian
(RBF) kernel of random points plus 0.1·I, which is PSD and well conditioned.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import scipy.linalg

from ntkd import complexity


def _interleaved_medians(fns: dict, repeats: int, pause: float = 0.2) -> dict:
    """Median seconds and last output per function, timed round-robin.

    Round-robin keeps slow drifts of a shared machine from favouring one method.
    NumPy and SciPy wheels each bundle their own OpenBLAS whose idle threads
    spin for a while after a call; the pause before every timed call lets them
    park so that one library's threads do not slow the other's.
    """
    outs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="examples (kernel side)")
    parser.add_argument("--k", type=int, default=10, help="target columns")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    points = rng.normal(size=(args.n, 10))
    sq = np.sum(points**2, axis=1)
    K = np.exp(-(sq[:, None] + sq[None, :] - 2 * points @ points.T) / 20.0)
    K += 0.1 * np.eye(args.n)
    Y = rng.normal(size=(args.n, args.k))

    def chol():
        return scipy.linalg.cho_factor(K, lower=True, check_finite=False)

    def chol_solve():
        c, _ = chol()
        half = scipy.linalg.solve_triangular(c, Y, lower=True, check_finite=False)
        return float(np.sum(half * half))

    def library():
        return complexity.supervision_complexity(K, Y)

    def lu_solve():
        return float(np.sum(Y * np.linalg.solve(K, Y)))

    def scipy_lu_solve():
        return float(np.sum(Y * scipy.linalg.solve(K, Y, check_finite=False)))

    results = _interleaved_medians(
        {
            "cholesky": chol,
            "cholesky+solve": chol_solve,
            "supervision_complexity": library,
            "numpy.linalg.solve": lu_solve,
            "scipy.linalg.solve": scipy_lu_solve,
        },
        args.repeats,
    )

    c_chol, c_lib, c_lu = (
        results[k][1] for k in ("cholesky+solve", "supervision_complexity", "numpy.linalg.solve")
    )
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(
        f"n={args.n} k={args.k} repeats={args.repeats} cpus={os.cpu_count()} "
        f"OPENBLAS_NUM_THREADS={threads} load={os.getloadavg()[0]:.1f} "
        f"numpy={np.__version__} scipy={scipy.__version__} {platform.machine()}"
    )
    print(
        f"C: cholesky {c_chol:.10g}  library {c_lib:.10g}  lu {c_lu:.10g}  "
        f"(rel diff {abs(c_chol - c_lu) / abs(c_lu):.1e})"
    )
    gflops = args.n**3 / 3 / results["cholesky"][0] / 1e9
    for name, (t, _) in results.items():
        extra = f"  {gflops:.1f} GFLOP/s (n^3/3)" if name == "cholesky" else ""
        print(f"{name:>24s}: {t * 1e3:9.1f} ms{extra}")
    for name in ("numpy.linalg.solve", "scipy.linalg.solve"):
        ratio = results[name][0] / results["cholesky+solve"][0]
        print(f"{name} / (cholesky+solve) = {ratio:.2f}x")


if __name__ == "__main__":
    main()
