"""Where the time of one matrix-free eNTK product goes, and a faster one from cached features.

MNIST-1D MLP (256, 256) at init, trace eNTK, n = 5000, on this CPU:

1. ``ntk_matvec`` products of 10 columns in float64 and float32, with 20 and 100
   cotangents vmapped at once (trace mode needs k = 10 VJPs and JVPs per column);
2. the two passes of one 2-column chunk timed separately (VJPs, then JVPs), and
   the achieved rate on the 4·n·P·k flops per column, against a float64 GEMM;
3. a prototype of the same product from cached per-layer features: the
   activations H_l (n × d_l, with a ones column for the bias) and the
   back-propagated vectors Δ_{l,a} = ∂f_a/∂z_l (n × k × d_l). For a ReLU MLP the
   trace eNTK is Σ_l Σ_a (Δ_{l,a}Δ_{l,a}ᵀ) ∘ (H_{l-1}H_{l-1}ᵀ), so
   (K v) = Σ_l rowsum((H_{l-1} G_lᵀ) ∘ Δ_l) with G_l = (Δ_l ∘ v)ᵀ H_{l-1}, the
   weight gradient: plain float64 GEMMs, no forward or backward pass per product.
   Checked against ``ntk_matvec`` to round-off.

Command (the numbers in benchmarks/README.md, "Where the time of one product goes"):

    PYTHONPATH=. python3 benchmarks/matvec_profile.py

Runtime: about 2 minutes on 2 shared CPU cores.
"""

import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntkd import models, ntk  # noqa: E402
from ntkd.data import load_dataset  # noqa: E402
from ntkd.matfree import ntk_matvec  # noqa: E402

N, M = 5000, 10


def main():
    ds = load_dataset("mnist1d", num_samples=6260)
    x = ds.x_train[:N]
    model = models.get_model("mlp", 10, widths=(256, 256))
    variables = models.init_variables(model, jax.random.key(0), ds.input_shape)
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    P = sum(a.size for a in jax.tree_util.tree_leaves(params))
    print(f"n={N} P={P} k=10 devices={jax.device_count()}")
    rng = np.random.default_rng(0)
    V = rng.standard_normal((N, M))

    for dtype in (jnp.float64, jnp.float32):
        for mc in (20, 100):
            mv = ntk_matvec(apply_fn, params, x, dtype=dtype, cache="never", max_cotangents=mc)
            mv(V)  # compile
            t = time.perf_counter()
            mv(V)
            s = time.perf_counter() - t
            name = jnp.dtype(dtype).name
            print(f"ntk_matvec {name} m={M} max_cotangents={mc}: {s:.2f} s, {s / M:.3f} s/column")

    mv = ntk_matvec(apply_fn, params, x, dtype=jnp.float64, cache="never")
    Vp = np.zeros((mv._nb * mv._B, 2))
    Vp[:N] = V[:, :2]
    mv(Vp[:N])  # compile
    blocks = [mv._put(Vp[i * mv._B : (i + 1) * mv._B], mv._shard) for i in range(mv._nb)]
    G = jax.tree_util.tree_map(lambda a: jnp.zeros((20, *a.shape), a.dtype), mv.params)
    t = time.perf_counter()
    for i, Vb in enumerate(blocks):
        G = mv._pass1(G, mv.params, mv._block_x(i), Vb)
    jax.block_until_ready(G)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready([mv._pass2(mv.params, mv._block_x(i), G, 2) for i in range(mv._nb)])
    t2 = time.perf_counter() - t
    rate = 4 * N * P * 10 * 2 / (t1 + t2) / 1e9
    print(
        f"float64, 2 columns: pass 1 (VJPs) {t1:.2f} s, pass 2 (JVPs) {t2:.2f} s, {rate:.1f} GFLOP/s"
    )
    a = rng.standard_normal((2048, 2048))
    t = time.perf_counter()
    a @ a
    print(f"float64 GEMM 2048³: {2 * 2048**3 / (time.perf_counter() - t) / 1e9:.1f} GFLOP/s")

    # cached per-layer features (prototype for the MLP only)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    W1, b1 = p["dense0"]["kernel"], p["dense0"]["bias"]
    W2, b2 = p["dense1"]["kernel"], p["dense1"]["bias"]
    W3 = p["head"]["kernel"]
    k = W3.shape[1]
    t = time.perf_counter()
    h0 = x.reshape(N, -1).astype(np.float64)
    z1 = h0 @ W1 + b1
    z2 = np.maximum(z1, 0) @ W2 + b2
    D2 = W3.T[None, :, :] * (z2 > 0)[:, None, :]  # (n, k, d2) = ∂f_a/∂z2
    D1 = (D2 @ W2.T) * (z1 > 0)[:, None, :]  # (n, k, d1)
    one = np.ones((N, 1))
    H0, H1, H2 = (np.hstack([h, one]) for h in (h0, np.maximum(z1, 0), np.maximum(z2, 0)))
    mib = sum(a.nbytes for a in (D1, D2, H0, H1, H2)) / 2**20
    print(f"features: {time.perf_counter() - t:.2f} s, {mib:.0f} MiB")

    def product(V):
        out = k * (H2 @ (H2.T @ V))  # head: Δ_a = e_a
        for D, H in ((D1, H0), (D2, H1)):
            Df = D.reshape(N, -1)  # (n, k·d)
            for c in range(V.shape[1]):
                G = (Df * V[:, c : c + 1]).T @ H  # (k·d, e): the weight gradient
                out[:, c] += np.einsum("ij,ij->i", H @ G.T, Df)
        return out

    t = time.perf_counter()
    KV = product(V)
    s = time.perf_counter() - t
    ref = mv(V[:, :2])
    err = float(np.abs(KV[:, :2] - ref).max() / np.abs(ref).max())
    print(
        f"feature product float64 m={M}: {s:.2f} s, {s / M:.3f} s/column; max rel. error {err:.1e}"
    )


if __name__ == "__main__":
    main()
