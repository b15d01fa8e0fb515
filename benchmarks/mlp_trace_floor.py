"""How close ntkd's MLP `trace` kernel is to a hand-derived one (issue 16).

The MLP 784-256-256-10 (``plain_models.mlp_apply``, ReLU) has a closed-form
`trace` eNTK (the sum over the k logits) that a person can write in a dozen
lines of ``jnp``, with every algebraic shortcut ntkd's structured algorithm
finds on its own (bias folding, the collapse of the head's and the last
hidden layer's k cotangents into one):

    term_head = k (h2·h2ᵀ + 1)
    term_l1   = (h1·h1ᵀ + 1) ⊙ (c·cᵀ),   c_i = d2_i ⊙ ‖W3 rows‖
    term_l0   = (x·xᵀ + 1) ⊙ Σ_a g_a·g_aᵀ, g_ia = d1_i ⊙ W2 (d2_i ⊙ W3[:, a])

with d1, d2 the ReLU derivatives. Its flops are those the kernel cannot
avoid. This script times, in interleaved rounds of one call each, that
hand-written kernel jitted once, ntkd's public ``empirical_ntk`` on the same
function (warm), and ntkd inside the caller's ``jax.jit`` (no entry-point
work at all), and checks all three against each other. Seconds are medians
of the rounds; ``--gap`` sleeps between calls so that the cores go idle, as
between a notebook's calls.

    PYTHONPATH=$PWD python benchmarks/mlp_trace_floor.py --rounds 600
    PYTHONPATH=$PWD python benchmarks/mlp_trace_floor.py --rounds 400 --gap 0.002
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_models  # noqa: E402

from ntkd import empirical_ntk  # noqa: E402


def hand_trace_kernel(p, x):
    """The closed-form `trace` eNTK of plain_models.mlp_apply (the sum over logits)."""
    x = x.reshape(x.shape[0], -1)
    w1, b1 = p["l0"]["w"], p["l0"]["b"]
    w2, b2 = p["l1"]["w"], p["l1"]["b"]
    w3 = p["head"]["w"]
    hi = jax.lax.Precision.HIGHEST
    gram = lambda a: jnp.matmul(a, a.T, precision=hi)  # noqa: E731
    z1 = jnp.matmul(x, w1, precision=hi) + b1
    h1, d1 = jax.nn.relu(z1), (z1 > 0).astype(x.dtype)
    z2 = jnp.matmul(h1, w2, precision=hi) + b2
    h2, d2 = jax.nn.relu(z2), (z2 > 0).astype(x.dtype)
    b, k, width = x.shape[0], w3.shape[1], w2.shape[0]
    head = k * (gram(h2) + 1)
    c = d2 * jnp.sqrt(jnp.sum(w3 * w3, axis=1))
    layer1 = (gram(h1) + 1) * gram(c)
    v = d2[:, None, :] * w3.T[None]  # (b, k, width): the cotangents of z2, one per logit
    g = jnp.matmul(v.reshape(b * k, -1), w2.T, precision=hi).reshape(b, k, width) * d1[:, None]
    layer0 = (gram(x) + 1) * gram(g.reshape(b, -1))
    return head + layer1 + layer0


def flops(n: int, d: int = 784, width: int = 256, k: int = 10) -> dict:
    """Multiply-adds × 2 of the hand-written kernel's matmuls (full Grams)."""
    return {
        "forward": 2 * n * (d * width + width * width),
        "backward per logit": 2 * n * k * width * width,
        "grams": 2 * n * n * (d + width + width + width + k * width),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--gap", type=float, default=0.0, help="seconds idle before each call")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    init, plain = plain_models.PLAIN["mlp784"]
    params = init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.n,) + plain_models.SHAPES["mlp784"])
    hand = jax.jit(hand_trace_kernel)
    in_jit = jax.jit(lambda p, x: empirical_ntk(plain, p, x, mode="trace"))
    calls = {
        "hand-written, jitted": lambda: hand(params, x),
        "ntkd empirical_ntk": lambda: empirical_ntk(plain, params, x, mode="trace"),
        "ntkd inside jax.jit": lambda: in_jit(params, x),
    }
    kernels = {name: np.asarray(call()) for name, call in calls.items()}
    ref = kernels["hand-written, jitted"]
    errors = {
        name: float(np.max(np.abs(k - ref)) / np.max(np.abs(ref))) for name, k in kernels.items()
    }
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            if args.gap:
                time.sleep(args.gap)
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    fl = flops(args.n)
    print(f"MLP 784-256-256-10 `trace`, n = {args.n}, {args.rounds} rounds, gap {args.gap} s")
    print("flops (MFLOP): " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in fl.items()))
    print("| kernel | median ms | p10 ms | p90 ms | rel. err vs hand-written |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        rows[name] = {
            "median_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)),
            "rel_err": errors[name],
        }
        r = rows[name]
        print(
            f"| {name} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['rel_err']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "flops": fl, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
