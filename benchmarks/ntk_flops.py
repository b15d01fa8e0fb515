"""XLA's flop count of ntkd's structured eNTK on the generic workloads (one block).

Prints, per workload and mode, the flops XLA's ``cost_analysis`` reports for
the engine's feature pass (``row``) and one block pair at the benchmark's
small n, i.e. the work of one ``empirical_ntk(f, params, x)`` call on a
single block. (neural-tangents' flops cannot be read the same way: JAX
0.4.23's ``cost_analysis`` of its kernels reports 13–27 MFLOP for the MLP
`trace` kernel at n = 128, well below the Jacobian contraction it performs,
so it is not counted here.)

    PYTHONPATH=$PWD python benchmarks/ntk_flops.py
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_models  # noqa: E402
from ntk_speed import GENERIC_N  # noqa: E402

from ntkd.ntk import ContractionOptions, empirical_ntk  # noqa: E402
from ntkd.ntk import engine as _engine  # noqa: E402

UNCHUNKED = ContractionOptions(gram_chunk_min_depth=2**62)
"""Contraction options under which no Gram is chunked: the same products, each one matmul,
so that XLA's flop count (which counts a loop body once) sees all of them."""


def compiled_flops(compiled) -> float:
    """XLA's flop count of a compiled executable (``cost_analysis``; a loop body counts once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def structured_flops(f, params, x, mode: str) -> tuple[float, float]:
    """(feature-pass flops, pair flops) of the engine ``empirical_ntk`` built for this call.

    Built with :data:`UNCHUNKED` contraction options: XLA counts a loop body once, so a
    deep Gram contracted over K chunks would read low (the 2-D CNN `trace` pair at
    n = 64: 104 MFLOP chunked, 406 as one matmul).
    """
    empirical_ntk(f, params, x, mode=mode, implementation="structured", contraction=UNCHUNKED)
    engine = next(reversed(_engine._ENGINES.values()))  # the engine that call used
    c = next(reversed(engine._compiled.values()))
    p = jax.device_put(params, c.replicated)
    xb = jax.device_put(x, c.rows)
    feats = c.row(p, None, xb)
    return (
        compiled_flops(c.row.lower(p, None, xb).compile()),
        compiled_flops(c.pair.lower(p, None, feats, feats).compile()),
    )


def main() -> None:
    print("| workload | n | mode | feature pass MFLOP | pair MFLOP | total MFLOP |")
    print("|---|---|---|---|---|---|")
    for name, (init, f) in plain_models.PLAIN.items():
        n = GENERIC_N[name][0]
        params = init(jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (n,) + plain_models.SHAPES[name], jnp.float32)
        for mode in ("full", "trace"):
            row, pair = structured_flops(f, params, x, mode)
            print(
                f"| {name} | {n} | {mode} | {row / 1e6:.0f} | {pair / 1e6:.0f} | "
                f"{(row + pair) / 1e6:.0f} |"
            )


if __name__ == "__main__":
    main()
