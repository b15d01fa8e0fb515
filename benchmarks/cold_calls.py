"""How much slower a millisecond eNTK call is after the machine idled.

Times ``empirical_ntk(f, params, x, mode="trace")`` on the MLP 784-256-256-10
of ``plain_models.py`` (n = 128) and, separately, the one compiled call it
runs, back to back and after idle gaps of 1–100 ms (sleeping) or 20 ms of a
Python busy loop; a trivial jitted op shows the dispatch floor. Run it under
``taskset -c 0`` to see whether the penalty is the thread pool waking up
(it then disappears) or data re-fetched after the idle (it stays).

    PYTHONPATH=$PWD python benchmarks/cold_calls.py [--n 128] [--repeats 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_models  # noqa: E402

from ntkd import empirical_ntk  # noqa: E402
from ntkd.ntk import engine as _engine  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _spin(seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    init, f = plain_models.PLAIN["mlp784"]
    params = init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.n,) + plain_models.SHAPES["mlp784"])
    call = lambda: empirical_ntk(f, params, x, mode="trace")  # noqa: E731
    call(), call()
    c = next(reversed(next(reversed(_engine._ENGINES.values()))._compiled.values()))
    compiled = lambda: c.whole_sym(params, None, x)  # noqa: E731
    compiled()
    tiny_fn, z = jax.jit(lambda a: a + 1.0), jnp.ones(8)
    tiny = lambda: tiny_fn(z)  # noqa: E731
    tiny()
    waits = [("back to back", None)] + [
        (f"{g * 1e3:g} ms asleep", g) for g in (1e-3, 5e-3, 2e-2, 0.1)
    ]
    waits.append(("20 ms busy loop", "spin"))
    print(f"| call (n = {args.n}) | before each call | median ms | min ms |")
    print("|---|---|---|---|")
    for name, fn in (
        ("empirical_ntk", call),
        ("its compiled call", compiled),
        ("a + 1 (jit)", tiny),
    ):
        for label, wait in waits:
            runs = []
            for _ in range(args.repeats):
                if wait == "spin":
                    _spin(0.02)
                elif wait:
                    time.sleep(wait)
                runs.append(_timed(fn))
            print(
                f"| {name} | {label} | {statistics.median(runs) * 1e3:.3f} | "
                f"{min(runs) * 1e3:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
