"""Matrix-free certified supervision complexity vs the dense Cholesky path, by n.

MNIST-1D generated with 62,500 examples (50,000 train), the MLP student
(widths 256, 256, as in ``ntkd/configs/mnist1d.py``) at init and after a short
training, trace eNTK in float64, relative ridge λ (default 1e-2, i.e. shift
ρ = λ · tr K / n with the exact trace), targets = one-hot labels and a 1-D CNN
teacher's softmax at τ = 1 and τ = 4 (all three share one block Krylov
space). For every n: the dense path (``ntkd.ntk.empirical_ntk`` + Cholesky
``ntkd.complexity.factor_kernel``) where it fits, and the matrix-free path
(``ntkd.matfree.ntk_matvec`` + ``supervision_complexity_bounds``, rtol 1e-2),
each in its own process so that peak RSS is per path.

Command (what produced benchmarks/complexity_scale.json/.png; the table it
prints is the one in benchmarks/README.md):

    PYTHONPATH=. python3 benchmarks/complexity_scale.py --out benchmarks/complexity_scale

Runtime: about 40 minutes on 2 shared CPU cores. ``--quick`` (n = 500, 1000) runs
in a few minutes. ``--probe 50000`` times one 10-column product and the exact
trace at n = 50,000 (no full solve).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN = 50_000
NUM_SAMPLES = 62_500  # mnist1d's 80/20 split gives 50,000 training examples
TEACHER = {
    "model": "cnn1d",
    "model_options": {"features": [32, 32, 32]},
    "epochs": 3,
    "batch_size": 128,
    "learning_rate": 1e-2,
}
STUDENT = {
    "model": "mlp",
    "model_options": {"widths": [256, 256]},
    "epochs": 3,
    "batch_size": 128,
    "learning_rate": 1e-2,
}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def prepare(cache: Path) -> None:
    """Data, teacher logits and the student's init/trained params, once."""
    if (cache / "data.npz").exists():
        return
    import jax
    from flax import serialization

    from ntkd.data import load_dataset
    from ntkd.models import get_model, init_variables
    from ntkd.training import TrainConfig, predict, train

    cache.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist1d", num_samples=NUM_SAMPLES)
    assert len(ds.x_train) == TRAIN, ds
    info = {}
    t0 = time.perf_counter()
    teacher = train(
        TrainConfig(
            dataset="mnist1d",
            dataset_options={"num_samples": NUM_SAMPLES},
            checkpoint_every=100,
            **TEACHER,
        ),
        cache / "teacher",
        dataset=ds,
        progress=False,
    )
    info["teacher_seconds"] = time.perf_counter() - t0
    info["teacher_test_acc"] = teacher["history"][-1]["test_acc"]
    logits = predict(teacher["model"], teacher["variables"], ds.x_train)
    t0 = time.perf_counter()
    student = train(
        TrainConfig(
            dataset="mnist1d",
            dataset_options={"num_samples": NUM_SAMPLES},
            checkpoint_every=100,
            **STUDENT,
        ),
        cache / "student",
        dataset=ds,
        progress=False,
    )
    info["student_seconds"] = time.perf_counter() - t0
    info["student_test_acc"] = student["history"][-1]["test_acc"]
    model = get_model(STUDENT["model"], ds.num_classes, **STUDENT["model_options"])
    init = init_variables(model, jax.random.key(0), ds.input_shape)  # TrainConfig seed 0
    for name, v in (("init", init), ("trained", student["variables"])):
        (cache / f"student_{name}.msgpack").write_bytes(serialization.to_bytes(jax.device_get(v)))
    np.savez(cache / "data.npz", x=ds.x_train, y=ds.y_train, teacher_logits=logits)
    (cache / "info.json").write_text(json.dumps(info, indent=1))


def _load(cache: Path, student: str, n: int):
    import jax
    import jax.numpy as jnp
    from flax import serialization

    from ntkd import ntk, targets
    from ntkd.models import get_model, init_variables

    d = np.load(cache / "data.npz")
    x, y, z = d["x"][:n], d["y"][:n], d["teacher_logits"][:n]
    model = get_model(STUDENT["model"], 10, **STUDENT["model_options"])
    template = init_variables(model, jax.random.key(0), x.shape[1:])
    variables = serialization.from_bytes(
        template, (cache / f"student_{student}.msgpack").read_bytes()
    )
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    apply_fn, params = ntk.flax_apply_fn(model, variables)
    Y = {
        "labels": np.asarray(targets.one_hot(y, 10), np.float64),
        "teacher τ=1": np.asarray(targets.softmax_targets(z, 1.0), np.float64),
        "teacher τ=4": np.asarray(targets.softmax_targets(z, 4.0), np.float64),
    }
    return apply_fn, params, x.astype(np.float64), Y


def worker(args) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from ntkd import complexity, ntk
    from ntkd.matfree import ntk_matvec, shift_from_ridge, supervision_complexity_bounds

    cache, n = Path(args.cache), args.n
    apply_fn, params, x, Y = _load(cache, args.student, n)
    row = {"path": args.path, "n": n, "student": args.student, "ridge": args.ridge}

    def matvec():
        mv = ntk_matvec(
            apply_fn,
            params,
            x,
            block_size=args.block_size,
            dtype=jnp.float64,
            cache=args.matvec_cache,
            cache_bytes=int(args.cache_gib * 2**30),
        )
        row["matvec_cache"] = mv.cache_kind
        return mv

    t0 = time.perf_counter()
    if args.path == "dense":
        K = np.asarray(ntk.empirical_ntk(apply_fn, params, jnp.asarray(x), mode="trace"))
        row["kernel_seconds"] = time.perf_counter() - t0
        factor = complexity.factor_kernel(K, ridge=args.ridge)
        row["trace"] = factor.trace
        row["shift"] = factor.info.ridge
        row["condition_number"] = factor.info.condition_number
        row["complexity"] = {name: factor.complexity(v) for name, v in Y.items()}
    elif args.path == "probe":
        mv = matvec()
        V = np.random.default_rng(0).standard_normal((n, 10))
        t1 = time.perf_counter()
        mv(V)
        row["first_product_seconds"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        mv(V)
        row["product_seconds"] = time.perf_counter() - t1
        row["product_columns"] = 10
        t1 = time.perf_counter()
        row["trace"] = mv.trace()
        row["trace_seconds"] = time.perf_counter() - t1
    else:
        mv = matvec()
        trace = mv.trace()
        row["trace_seconds"] = time.perf_counter() - t0
        row["trace"] = trace
        row["shift"] = shift_from_ridge(args.ridge, trace, n)
        res = supervision_complexity_bounds(
            mv, Y, shift=row["shift"], rtol=args.rtol, nystrom_rank=args.nystrom_rank
        )
        first = next(iter(res.values()))
        row.update(
            iterations=first.iterations,
            matvecs=first.matvecs,
            preconditioner=first.preconditioner,
            preconditioner_matvecs=first.preconditioner_matvecs,
            eig_lower_source=first.eig_lower_source,
            bounds={
                name: {
                    "lower": b.lower,
                    "upper": b.upper,
                    "relative_gap": b.relative_gap,
                    "converged": b.converged,
                    "upper_certified": b.upper_certified,
                    "adjusted": b.adjusted(trace),
                    "normalized": b.normalized(trace),
                }
                for name, b in res.items()
            },
        )
    row["seconds"] = time.perf_counter() - t0
    row["peak_rss_bytes"] = _peak_rss()
    return row


def run_worker(cache: Path, path: str, n: int, student: str, a, **extra) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        path,
        "--cache",
        str(cache),
        "--n",
        str(n),
        "--student",
        student,
        "--ridge",
        str(a.ridge),
        "--rtol",
        str(a.rtol),
        "--block-size",
        str(a.block_size),
        "--matvec-cache",
        a.matvec_cache,
        "--cache-gib",
        str(a.cache_gib),
    ]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in row.items() if k != "bounds"}), flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.0))
    for p, marker in (("dense", "s"), ("matfree", "o")):
        for student, ls in (("init", "--"), ("trained", "-")):
            rs = sorted(
                (
                    r
                    for r in rows
                    if r["path"] == p and r["student"] == student and not r.get("preconditioner")
                ),
                key=lambda r: r["n"],
            )
            if not rs:
                continue
            label = f"{'dense Cholesky' if p == 'dense' else 'matrix-free'} · {student}"
            ns = [r["n"] for r in rs]
            axes[0].plot(ns, [r["seconds"] for r in rs], ls, marker=marker, label=label)
            axes[1].plot(
                ns, [r["peak_rss_bytes"] / 2**30 for r in rs], ls, marker=marker, label=label
            )
    probes = [r for r in rows if r["path"] == "probe"]
    for r in probes:
        axes[1].plot(
            [r["n"]],
            [r["peak_rss_bytes"] / 2**30],
            "k*",
            ms=9,
            label=f"matrix-free, one 10-column product only, n={r['n']}",
        )
        axes[0].plot([r["n"]], [r["product_seconds"]], "k*", ms=9)
    axes[0].set(xscale="log", yscale="log", xlabel="n", ylabel="wall time [s] (3 targets)")
    axes[1].set(xscale="log", yscale="log", xlabel="n", ylabel="peak RSS [GiB]")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(
        "MNIST-1D MLP trace eNTK, float64, certified rel. gap ≤ 1% (2 shared CPU cores)", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=80)


def table(rows: list[dict]) -> str:
    """Markdown table: per (n, student, target) the dense value and the certified interval."""
    dense = {(r["n"], r["student"]): r for r in rows if r["path"] == "dense"}
    lines = [
        "| n | student | target | dense C | certified [lower, upper] | rel. gap | dense inside | "
        "iterations / products | matrix-free s, GiB | dense s, GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in rows if r["path"] == "matfree"), key=lambda r: (r["n"], r["student"])
    ):
        d = dense.get((r["n"], r["student"]))
        pre = " (" + r["preconditioner"] + ")" if r.get("preconditioner") else ""
        cost = "%.0f, %.2f" % (r["seconds"], r["peak_rss_bytes"] / 2**30)
        dcost = "" if d is None else "%.0f, %.2f" % (d["seconds"], d["peak_rss_bytes"] / 2**30)
        for name, b in r["bounds"].items():
            c = None if d is None else d["complexity"][name]
            inside = "" if c is None else ("yes" if b["lower"] <= c <= b["upper"] else "**no**")
            lines.append(
                "| %d | %s | %s | %s | [%.6g, %.6g] | %.2f%% | %s | %d / %d%s | %s | %s |"
                % (
                    r["n"],
                    r["student"],
                    name,
                    "" if c is None else "%.6g" % c,
                    b["lower"],
                    b["upper"],
                    100 * b["relative_gap"],
                    inside,
                    r["iterations"],
                    r["matvecs"],
                    pre,
                    cost,
                    dcost,
                )
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/complexity_scale")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/ntkd_complexity_scale"))
    p.add_argument("--sizes", default="1000,2000", help="matrix-free, both students")
    p.add_argument("--trained-sizes", default="5000", help="matrix-free, trained student only")
    p.add_argument("--dense-sizes", default="1000,2000,5000,10000")
    p.add_argument("--students", default="init,trained")
    p.add_argument("--probe", type=int, default=0, help="also time one product at this n")
    p.add_argument("--nystrom-sizes", default="", help="also run with a Nyström preconditioner")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--rtol", type=float, default=1e-2)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--nystrom-rank", type=int, default=0)
    p.add_argument(
        "--matvec-cache",
        default="auto",
        choices=["auto", "never", "always", "features"],
        help="ntk_matvec's cache (never: stream every product through the network)",
    )
    p.add_argument("--cache-gib", type=float, default=4.0, help="ntk_matvec cache_bytes in GiB")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=["dense", "matfree", "probe"])
    p.add_argument("--n", type=int)
    p.add_argument("--student", default="trained")
    a = p.parse_args(argv)
    cache = Path(a.cache)
    if a.worker:
        a.path = a.worker
        print(json.dumps(worker(a)))
        return
    if a.quick:
        a.sizes = a.dense_sizes = "500,1000"
        a.trained_sizes = ""
    prepare(cache)
    out = Path(a.out)
    rows = []
    done = set()
    command = "PYTHONPATH=. python3 benchmarks/complexity_scale.py " + " ".join(
        repr(w) if not w or " " in w else w for w in (sys.argv[1:] if argv is None else argv)
    )
    commands, note = [command], None
    if out.with_suffix(".json").exists():  # resume: keep finished rows and earlier commands
        old = json.loads(out.with_suffix(".json").read_text())
        rows = old["rows"]
        commands = [c for c in old["meta"].get("commands", []) if c != command] + commands
        note = old["meta"].get("note")
        done = {(r["path"], r["n"], r["student"], r.get("preconditioner")) for r in rows}

    def save():
        meta = {
            "commands": commands,
            "ridge": a.ridge,
            "rtol": a.rtol,
            "teacher": TEACHER,
            "student": STUDENT,
            "train_examples": TRAIN,
            "info": json.loads((cache / "info.json").read_text()),
        }
        if note:
            meta["note"] = note
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        plot(rows, out.with_suffix(".png"))

    jobs = []
    for student in a.students.split(","):
        for n in [int(s) for s in a.dense_sizes.split(",") if s]:
            jobs.append(("dense", n, student, {}))
        for n in [int(s) for s in a.sizes.split(",") if s]:
            jobs.append(("matfree", n, student, {}))
    for n in [int(s) for s in a.trained_sizes.split(",") if s]:
        jobs.append(("matfree", n, "trained", {}))
    for n in [int(s) for s in a.nystrom_sizes.split(",") if s]:
        jobs.append(("matfree", n, "trained", {"nystrom_rank": a.nystrom_rank or 100}))
    if a.probe:
        jobs.append(("probe", a.probe, "trained", {}))
    for path, n, student, extra in jobs:
        tag = (path, n, student, f"nystrom(rank={extra['nystrom_rank']})" if extra else None)
        if tag in done:
            continue
        rows.append(run_worker(cache, path, n, student, a, **extra))
        save()
    save()
    print(table(rows))


if __name__ == "__main__":
    main()
