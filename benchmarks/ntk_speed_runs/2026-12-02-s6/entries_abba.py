"""The MLP `trace` kernel at n = 128 through four entry points, without neural-tangents.

The entries are taken in turn, the order mirrored every round, 60 rounds:

    PYTHONPATH=$PWD python benchmarks/ntk_speed_runs/2026-12-02-s6/entries_abba.py
"""

import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ntk_speed  # noqa: E402, F401  (applies ntkd's host-malloc tuning, as the benchmark)
import plain_models  # noqa: E402

from ntkd import empirical_ntk, empirical_ntk_fn, flax_apply_fn  # noqa: E402

W, N, MODE, ROUNDS = "mlp784", 128, "trace", 60
init, plain = plain_models.PLAIN[W]
params = init(jax.random.PRNGKey(0))
model, variables = plain_models.linen(W)
apply_fn, lparams = flax_apply_fn(model, variables)
x = jax.random.normal(jax.random.PRNGKey(1), (N,) + plain_models.SHAPES[W], jnp.float32)
ntk_fn = empirical_ntk_fn(apply_fn, mode=MODE)
plain_fn = empirical_ntk_fn(plain, mode=MODE, implementation="structured")
entries = {
    "flax_apply_fn": lambda: ntk_fn(x, None, lparams),
    "linen": lambda: empirical_ntk(model, variables, x, mode=MODE),
    "plain structured": lambda: empirical_ntk(
        plain, params, x, mode=MODE, implementation="structured"
    ),
    "plain fn built once": lambda: plain_fn(x, None, params),
}
for call in entries.values():
    for _ in range(5):
        jax.block_until_ready(call())
times = {k: [] for k in entries}
keys = list(entries)
for r in range(ROUNDS):
    for k in keys if r % 2 == 0 else keys[::-1]:
        t = time.perf_counter()
        jax.block_until_ready(entries[k]())
        times[k].append(time.perf_counter() - t)
for k, v in times.items():
    print(f"{k:20s} median {1e3 * statistics.median(v):.3f} ms")
