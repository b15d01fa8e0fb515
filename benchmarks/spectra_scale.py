"""Matrix-free top eigenpairs and target–kernel alignment of the eNTK, up to the full training set.

Same data, students and kernel as ``complexity_scale.py`` (MNIST-1D, 50,000
training examples; the MLP (256, 256) student at init and after training;
trace eNTK in float64; its cache of data and params is reused). For every n:
``ntkd.matfree.top_eigenpairs`` (block Lanczos on ``ntk_matvec`` products
from cached features) gives the top ``--num`` eigenpairs, and
``alignment_curve`` the fraction of ‖Y‖² in the top-m eigenvectors for the
one-hot labels and the teacher's τ = 1 and τ = 4 softmax. Where the dense
kernel fits (``--dense-sizes``), ``numpy.linalg.eigh`` of the materialised
kernel is the reference: the largest relative eigenvalue error and the
largest absolute difference of the alignment curves are recorded. Each
(path, n, student) runs in its own process, so peak RSS is per path.

Command (what produced benchmarks/spectra_scale.json/.png):

    PYTHONPATH=. python3 benchmarks/spectra_scale.py --out benchmarks/spectra_scale

Runtime: about 25 minutes on 2 CPU cores (most of it the two n = 50,000 runs).
``--sizes 1000 --dense-sizes 1000`` runs in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from complexity_scale import _load, _peak_rss, prepare  # noqa: E402

from ntkd._io import read_json, write_json  # noqa: E402


def worker(args) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from ntkd import ntk
    from ntkd.matfree import alignment_curve, ntk_matvec, top_eigenpairs

    apply_fn, params, x, Y = _load(Path(args.cache), args.student, args.n)
    row = {"path": args.path, "n": args.n, "student": args.student, "num": args.num}
    t0 = time.perf_counter()
    if args.path == "dense":
        K = np.asarray(ntk.empirical_ntk(apply_fn, params, jnp.asarray(x), mode="trace"))
        w, Z = np.linalg.eigh(K)
        w, Z = w[::-1][: args.num], Z[:, ::-1][:, : args.num]
        row["values"] = w.tolist()
        row["trace"] = float(np.trace(K))
        row["alignment"] = {
            name: (np.cumsum(np.sum((Z.T @ y) ** 2, axis=1)) / np.sum(y * y)).tolist()
            for name, y in Y.items()
        }
    else:
        mv = ntk_matvec(
            apply_fn,
            params,
            x,
            dtype=jnp.float64,
            cache="auto",
            cache_bytes=int(args.cache_gib * 2**30),
        )
        eig = top_eigenpairs(mv, args.n, args.num, tol=args.tol)
        row.update(
            matvec_cache=mv.cache_kind,
            values=np.asarray(eig.values).tolist(),
            residuals=np.asarray(eig.residuals).tolist(),
            converged=bool(eig.converged),
            iterations=eig.iterations,
            matvecs=eig.matvecs,
            tol=args.tol,
            alignment={name: alignment_curve(y, eig).tolist() for name, y in Y.items()},
        )
        row["trace"] = float(mv.trace())
    row["seconds"] = time.perf_counter() - t0
    row["peak_rss_bytes"] = _peak_rss()
    return row


def run_worker(cache: Path, path: str, n: int, student: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--cache", str(cache), "--n", str(n)]
    cmd += ["--student", student, "--num", str(a.num), "--tol", str(a.tol)]
    cmd += ["--cache-gib", str(a.cache_gib)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    brief = {k: row[k] for k in ("path", "n", "student", "seconds") if k in row}
    print(json.dumps({**brief, "iterations": row.get("iterations")}), flush=True)
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Per (n, student) with both paths: eigenvalue and alignment agreement."""
    dense = {(r["n"], r["student"]): r for r in rows if r["path"] == "dense"}
    out = []
    for r in rows:
        d = dense.get((r["n"], r["student"]))
        if r["path"] != "matfree" or d is None:
            continue
        mv, dv = np.asarray(r["values"]), np.asarray(d["values"])
        out.append(
            {
                "n": r["n"],
                "student": r["student"],
                "max_rel_eigenvalue_error": float(np.max(np.abs(mv - dv) / dv)),
                "max_alignment_difference": max(
                    float(np.max(np.abs(np.subtract(r["alignment"][t], d["alignment"][t]))))
                    for t in r["alignment"]
                ),
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mf = [r for r in rows if r["path"] == "matfree"]
    big = max(r["n"] for r in mf)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    colors = {"labels": "C0", "teacher τ=1": "C1", "teacher τ=4": "C2"}
    for r in sorted(mf, key=lambda r: (r["student"], r["n"])):
        ls = "-" if r["student"] == "trained" else "--"
        m = np.arange(1, len(r["values"]) + 1)
        if r["n"] in (min(x["n"] for x in mf), big):
            axes[0].plot(
                m,
                np.asarray(r["values"]) / r["trace"],
                ls,
                marker="o" if r["n"] == big else ".",
                ms=3,
                label=f"{r['student']}, n = {r['n']:,}",
            )
        if r["n"] == big:
            for name, curve in r["alignment"].items():
                axes[1].plot(m, curve, ls, color=colors[name], label=f"{name} · {r['student']}")
    axes[0].set(yscale="log", xlabel="eigenvalue index m", ylabel="λ_m / tr K")
    axes[0].set_title("top eigenvalues (matrix-free block Lanczos)", fontsize=9)
    axes[1].set(xlabel="m", ylabel="fraction of ‖Y‖² in top-m eigenvectors", ylim=(0, 1))
    axes[1].set_title(f"target–kernel alignment, n = {big:,}", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(
        "MNIST-1D MLP (256, 256) trace eNTK, float64 (solid: trained, dashed: init)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/spectra_scale")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ntkd_complexity_scale"))
    ap.add_argument("--sizes", default="1000,5000,10000,50000")
    ap.add_argument("--dense-sizes", default="1000,5000,10000")
    ap.add_argument("--students", default="init,trained")
    ap.add_argument("--num", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument(
        "--cache-gib",
        type=float,
        default=4.0,
        help="ntk_matvec cache budget (n = 50,000 needs ~1.3 GiB of features; 1 GiB streams)",
    )
    ap.add_argument("--worker", choices=("dense", "matfree"))
    ap.add_argument("--n", type=int)
    ap.add_argument("--student")
    a = ap.parse_args()
    if a.worker:
        a.path = a.worker
        print(json.dumps(worker(a)))
        return
    cache = Path(a.cache)
    prepare(cache)
    out = Path(a.out)
    saved = out.with_suffix(".json")
    rows = read_json(saved)["rows"] if saved.exists() else []  # resume: finished rows stay
    done = {(r["path"], r["n"], r["student"]) for r in rows}
    sizes = [int(s) for s in a.sizes.split(",") if s]
    dense_sizes = {int(s) for s in a.dense_sizes.split(",") if s}
    for n in sizes:
        for student in a.students.split(","):
            for path in ("dense", "matfree"):
                if (path == "dense" and n not in dense_sizes) or (path, n, student) in done:
                    continue
                rows.append(run_worker(cache, path, n, student, a))
                result = {
                    "meta": {"command": " ".join(sys.argv), "num": a.num, "tol": a.tol},
                    "rows": rows,
                    "agreement": compare(rows),
                }
                write_json(saved, result)  # atomic: a kill keeps the rows
    for c in compare(rows):
        print(json.dumps(c))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
