"""Per-example weight gradients of the 2-D CNN's second convolution, in several layouts.

The batched matmul (b = 64, S = 49 positions, D = 145 input columns, m·C = 320
cotangent columns) that the engine's `weight_grads` runs, alone, in different
operand and output layouts: first each timed on its own, then all in turn
(round robin). "current" is the engine's form (`ipd,ipe->ied`); "vmap matmul"
writes the same product as `vmap(lambda p, c: c.T @ p)` and compiles to the
identical HLO (printed), so any gap between those two is the machine's noise.

    PYTHONPATH=$PWD python benchmarks/ntk_speed_runs/2026-12-03-s8/layout_trial.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

N, Q, D, C = 64, 49, 145, 320
FLOPS = 2 * N * Q * D * C


def median_time(f, a, b, repeats=300):
    for _ in range(5):
        f(a, b).block_until_ready()
    ts = []
    for _ in range(repeats):
        s = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - s)
    return float(np.median(ts))


def main() -> None:
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.standard_normal((N, Q, D)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((N, Q, C)), jnp.float32)
    pt, ct = jnp.swapaxes(p, 1, 2).copy(), jnp.swapaxes(c, 1, 2).copy()
    pad = ((0, 0), (0, 15), (0, 0))
    variants = {
        "current qd,qc->cd": (lambda a, b: jnp.einsum("iqd,iqc->icd", a, b), p, c),
        "qd,qc->dc": (lambda a, b: jnp.einsum("iqd,iqc->idc", a, b), p, c),
        "dq,cq->cd": (lambda a, b: jnp.einsum("idq,icq->icd", a, b), pt, ct),
        "dq,cq->dc": (lambda a, b: jnp.einsum("idq,icq->idc", a, b), pt, ct),
        "dq,qc->dc": (lambda a, b: jnp.einsum("idq,iqc->idc", a, b), pt, c),
        "S padded to 64": (
            lambda a, b: jnp.einsum("iqd,iqc->icd", jnp.pad(a, pad), jnp.pad(b, pad)),
            p,
            c,
        ),
        "vmap matmul": (jax.vmap(lambda a, b: b.T @ a), p, c),
    }
    fns = {k: (jax.jit(f), a, b) for k, (f, a, b) in variants.items()}
    for k in ("current qd,qc->cd", "vmap matmul"):
        f, a, b = fns[k]
        dots = [ln for ln in f.lower(a, b).compile().as_text().splitlines() if " dot(" in ln]
        print(k, "HLO:", dots[0].split(", metadata")[0].strip())
    print("each on its own:")
    for k, (f, a, b) in fns.items():
        m = median_time(f, a, b)
        print(f"  {k:18s} {1e3 * m:.3f} ms {FLOPS / m / 1e9:.0f} GFLOP/s")
    print("in turn, 400 rounds:")
    times = {k: [] for k in fns}
    for _ in range(400):
        for k, (f, a, b) in fns.items():
            s = time.perf_counter()
            f(a, b).block_until_ready()
            times[k].append(time.perf_counter() - s)
    for k, v in times.items():
        m = float(np.median(v))
        print(f"  {k:18s} {1e3 * m:.3f} ms {FLOPS / m / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
