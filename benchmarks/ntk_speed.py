"""Speed of ntkd's empirical NTK against a naive baseline and neural-tangents.

Full run (all workloads at the sizes of the issue, neural-tangents included;
tens of minutes on a 2-core CPU):

    PYTHONPATH=. python benchmarks/ntk_speed.py --reference

Quick run (n scaled by 0.1, one repeat, a few minutes):

    PYTHONPATH=. python benchmarks/ntk_speed.py --quick --reference

Workloads (same params and inputs for every contender): MLP (256, 256) on
MNIST-1D shapes (n=1000), 1-D CNN on MNIST-1D (n=1000), LeNet-5 on 32×32×3
(n=500), ResNet-20 on 32×32×3 (n=256); modes ``full`` and ``trace``; x2 = None
(symmetric kernels) everywhere.

Contenders: ntkd ``auto``/``structured``/``jacobian``/``ntvp``; ``naive``
(``jit(vmap(jacrev))`` + per-leaf ``einsum``, one block); with
``--reference``, neural-tangents 0.6.5 JACOBIAN_CONTRACTION,
NTK_VECTOR_PRODUCTS and STRUCTURED_DERIVATIVES run by ``nt_reference.py`` in
the pinned venv ``benchmarks/.nt_venv`` (created on demand).

Reported per contender: median seconds after a warm-up call, compile time
(first call minus median), ratio to neural-tangents' best, JC-equivalent
GFLOP/s (the Jacobian-contraction cost N·O·3[FP] + 2·N²·O²·P (full) or
2·N²·O·P (trace), [FP] from XLA's cost analysis of one forward pass, divided
by the time) and that as a fraction of a float32 matmul peak measured in the
same run, and the max relative deviation from ntkd ``jacobian`` (NT's trace
is multiplied by k: it is a mean).

Generic entry points (``--generic``): the networks of ``plain_models.py``
(MLP 784-256-256-10 and a small 2-D CNN on 28×28×1) at a small n (128 / 64)
and, with ``--generic-sizes small,full``, at n = 1000 / 500, each through

- ``flax_apply_fn``: ``empirical_ntk_fn(apply_fn)`` built once (Linen);
- ``linen``: ``empirical_ntk(model, variables, x)`` every call;
- ``model.apply``: ``empirical_ntk(model.apply, variables, x)``, the bound
  method taken fresh every call, as in a notebook;
- ``plain``: ``empirical_ntk(f, params, x)`` of the plain-``jnp`` function,
  with every fixed implementation too (to check ``auto``);
- ``nnx`` / ``equinox``: ``empirical_ntk(module, None, x)``;

and neural-tangents (``--reference``) runs the same plain function, jitted
once, on the same params and inputs. Quick generic run:

    PYTHONPATH=. python benchmarks/ntk_speed.py --generic --reference --workloads ""

The benchmark makes glibc keep freed host memory, as the ``ntkd`` command line
does (``ntkd.tune_host_memory()``, ntkd/_hostmem.py; off with
``NTKD_TUNE_MALLOC=0``); ``--nt-tuned-malloc`` runs neural-tangents'
process with the same allocator settings (``GLIBC_TUNABLES``), to separate
the engine's speed from the allocator's. ``--impls ""`` times NT only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import plain_models  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from ntkd import _hostmem
from ntkd.models import get_model, init_variables
from ntkd.ntk import chosen_implementation, empirical_ntk, empirical_ntk_fn, flax_apply_fn

_hostmem.tune()  # before any JAX computation: the allocator settings of the ntkd CLI

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")
VENV = os.path.join(HERE, ".nt_venv")
NT_PINS = [
    "jax==0.4.23",
    "jaxlib==0.4.23",
    "flax==0.8.0",
    "optax==0.1.9",
    "tensorflow-cpu==2.15.*",
    "neural-tangents==0.6.5",
    "numpy<2",
]

WORKLOADS = {  # name -> (model, model kwargs, input shape, n)
    "mlp": ("mlp", {"widths": [256, 256]}, (40, 1), 1000),
    "cnn1d": ("cnn1d", {}, (40, 1), 1000),
    "lenet5": ("lenet5", {}, (32, 32, 3), 500),
    "resnet20": ("resnet20", {}, (32, 32, 3), 256),
}
NTKD_IMPLS = ("auto", "structured", "jacobian", "ntvp")


def _time(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    out = np.asarray(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    med = statistics.median(runs)
    return med, max(first - med, 0.0), out


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    f = jax.jit(lambda u: u @ u)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def cpu_model() -> str:
    """The host CPU's model name, logical cores and vector extensions (the same code's
    ratios moved by up to 1.7x between two 2-core machines: benchmarks/README.md)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    return f"{name}, {os.cpu_count()} cores" + (f", {'/'.join(simd)}" if simd else "")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def naive_ntk_fn(apply_fn, mode: str):
    """vmap(jacrev) of the per-example network, einsum per parameter leaf."""

    def per_example(p, xi):
        return apply_fn(p, xi[None])[0]

    @jax.jit
    def fn(params, x):
        j = jax.vmap(jax.jacrev(per_example), (None, 0))(params, x)
        leaves = [l.reshape(l.shape[:2] + (-1,)) for l in jax.tree.leaves(j)]
        if mode == "full":
            return sum(jnp.einsum("iap,jbp->ijab", l, l) for l in leaves)
        return sum(jnp.einsum("iap,jap->ij", l, l) for l in leaves)

    return fn


def jc_flops(apply_fn, params, x, k: int, mode: str) -> float:
    one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
    cost = jax.jit(apply_fn).lower(params, one).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    fp = float(cost.get("flops", 0.0))
    n = x.shape[0]
    p = sum(l.size for l in jax.tree.leaves(params))
    contraction = 2 * n * n * (k * k if mode == "full" else k) * p
    return n * k * 3 * fp + contraction


def ensure_venv() -> str:
    python = os.path.join(VENV, "bin", "python")
    if os.path.exists(python):
        return python
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *NT_PINS], check=True)
    return python


def export(
    path: str,
    name: str,
    kwargs: dict,
    variables: dict,
    x,
    mode: str,
    k: int,
    plain: str | None = None,
) -> None:
    flat = {}
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(variables):
        flat["var:" + "/".join(str(getattr(q, "key", q)) for q in keypath)] = np.asarray(leaf)
    meta = {"model": name, "model_kwargs": kwargs, "mode": mode, "k": k, "plain": plain}
    np.savez(path, x=np.asarray(x), meta=json.dumps(meta), **flat)


def _nt_env(tuned_malloc: bool) -> dict:
    """Environment of a neural-tangents process: its own venv, optionally ntkd's allocator."""
    env = dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3")
    if tuned_malloc:
        env["GLIBC_TUNABLES"] = _hostmem.GLIBC_TUNABLES  # what _hostmem.tune() sets
    return env


def run_reference(
    python: str, inp: str, out: str, repeats: int, impls: str, tuned_malloc: bool = False
) -> tuple[dict, dict]:
    subprocess.run(
        [
            python,
            os.path.join(HERE, "nt_reference.py"),
            inp,
            out,
            "--repeats",
            str(repeats),
            "--impls",
            impls,
        ],
        check=True,
        env=_nt_env(tuned_malloc),
    )
    data = np.load(out)
    timings = json.loads(str(data["timings"]))
    kernels = {n: data[n] for n in data.files if n.startswith("nt-")}
    return timings, kernels


def auto_row(workload, n, mode, found: dict, prefix: str, picked: str) -> dict | None:
    """auto against the best fixed implementation timed in the same run.

    auto runs the compiled code of the implementation it picked, so its steady
    cost is that implementation's: ``picked / best`` compares the two medians
    of one run (``auto / best`` adds auto's own repeats' noise).
    """
    fixed = {
        k[len(prefix) :]: v[0]
        for k, v in found.items()
        if k.startswith(prefix) and k[len(prefix) :] in NTKD_IMPLS
    }
    auto = fixed.pop("auto", None)
    if auto is None or not fixed:
        return None
    best = min(fixed, key=fixed.get)
    return dict(
        workload=workload,
        n=n,
        mode=mode,
        picked=picked,
        best_fixed=best,
        best_seconds=fixed[best],
        auto_seconds=auto,
        auto_vs_best=auto / fixed[best],
        picked_vs_best=fixed[picked] / fixed[best] if picked in fixed else None,
    )


def print_auto(rows) -> None:
    print()
    print(
        "| workload | n | mode | auto picked | best fixed | best s | auto / best | picked / best |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pv = f"{r['picked_vs_best']:.2f}" if r["picked_vs_best"] is not None else "-"
        print(
            f"| {r['workload']} | {r['n']} | {r['mode']} | {r['picked']} | {r['best_fixed']} | "
            f"{r['best_seconds']:.4f} | {r['auto_vs_best']:.2f} | {pv} |"
        )


GENERIC_N = {"mlp784": (128, 1000), "cnn2d": (64, 500)}
"""Generic workloads: (small n, full n)."""


def generic_rows(args, python) -> tuple[list, list]:
    """Every generic entry point on the plain_models networks, NT on the same plain function.

    Returns (rows, auto rows).
    """
    rows, autos = [], []
    for wname in filter(None, args.generic_workloads.split(",")):
        shape = plain_models.SHAPES[wname]
        init, plain = plain_models.PLAIN[wname]
        params = init(jax.random.PRNGKey(0))
        model, variables = plain_models.linen(wname)
        apply_fn, lparams = flax_apply_fn(model, variables)
        nnx_model, eqx_model = plain_models.nnx(wname), plain_models.equinox(wname)
        for size in args.generic_sizes.split(","):
            n = GENERIC_N[wname][0 if size == "small" else 1]
            x = jax.random.normal(jax.random.PRNGKey(1), (n,) + shape, jnp.float32)
            for mode in args.modes.split(","):
                ntk_fn = empirical_ntk_fn(apply_fn, mode=mode)
                entries = {
                    "flax_apply_fn": lambda: ntk_fn(x, None, lparams),
                    "linen": lambda: empirical_ntk(model, variables, x, mode=mode),
                    "model.apply": lambda: empirical_ntk(model.apply, variables, x, mode=mode),
                    "nnx": lambda: empirical_ntk(nnx_model, None, x, mode=mode),
                    "equinox": lambda: empirical_ntk(eqx_model, None, x, mode=mode),
                }
                for impl in filter(None, args.generic_impls.split(",")):
                    entries["plain " + impl] = lambda impl=impl: empirical_ntk(
                        plain, params, x, mode=mode, implementation=impl
                    )
                inp = os.path.join(WORK, f"g_{wname}_{n}_{mode}_in.npz")
                out = os.path.join(WORK, f"g_{wname}_{n}_{mode}_out.npz")
                if python:
                    export(inp, wname, {}, params, x, mode, 10, plain=wname)
                found = _time_with_server(
                    entries,
                    python,
                    inp,
                    out,
                    args,
                    f"  {wname} n={n} {mode}",
                    mode,
                    args.generic_order,
                )
                if "plain auto" in found:
                    picked = chosen_implementation(plain, params, x, mode=mode)
                    a = auto_row(wname, n, mode, found, "plain ", picked)
                    if a:
                        autos.append(a)
                ref = found["plain jacobian"][2] if "plain jacobian" in found else None
                nt_best = min((v[0] for k, v in found.items() if k.startswith("nt-")), default=None)
                for key, (sec, comp, kern) in found.items():
                    same_fn = key.startswith(("plain", "nt-"))  # other entries have their own init
                    err = (
                        float(np.max(np.abs(kern - ref)) / np.max(np.abs(ref)))
                        if same_fn and ref is not None
                        else None
                    )
                    rows.append(
                        dict(
                            workload=wname,
                            n=n,
                            mode=mode,
                            entry=key,
                            seconds=sec,
                            compile=comp,
                            vs_nt_best=(nt_best / sec) if nt_best else None,
                            rel_err=err,
                        )
                    )
    return rows, autos


class NTServer:
    """neural-tangents in its venv, timing one call per request (``nt_reference.py --serve``)."""

    def __init__(self, python: str, inp: str, out: str, impls: str, tuned_malloc: bool):
        script = os.path.join(HERE, "nt_reference.py")
        self.out = out
        self.proc = subprocess.Popen(
            [python, script, inp, out, "--serve", "--impls", impls],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_nt_env(tuned_malloc),
        )
        ready = json.loads(self.proc.stdout.readline())
        self.first, self.errors = ready["ready"], ready["errors"]

    def time(self, name: str) -> float:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> dict:
        """Ends the server; returns its kernels (``trace``: neural-tangents' mean over logits)."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait()
        data = np.load(self.out)
        return {n: data[n] for n in data.files if n.startswith("nt-")}


class Served:
    """One neural-tangents implementation of an :class:`NTServer`, as a round-robin entry."""

    def __init__(self, server: NTServer, name: str):
        self.server, self.name, self.first = server, name, server.first[name]

    def run(self) -> float:
        return self.server.time(self.name)


SLOW_FACTOR = 20.0
"""Interleaved timing: contenders this much slower than the fastest are timed after the turns."""


def _time_round_robin(entries: dict, repeats: int, label: str, order: str = "interleaved") -> dict:
    """{key: (median s, compile s, kernel)}: a warm-up call each, then repeats taken in turn.

    Taking the entries in turn spreads the load of a shared machine over all
    of them instead of penalising whichever ran while another job was busy.
    For millisecond kernels it also runs each call with caches filled by
    another contender (a notebook's situation); ``order="blocked"`` times each
    contender's repeats back to back instead (a loop over checkpoints).
    A :class:`Served` entry (neural-tangents in its own process) is timed
    inside that process, one call per turn like the others; its kernel is
    None here (the server returns it on close). Interleaved, a contender more
    than ``SLOW_FACTOR`` times slower than the fastest in the first round
    takes its remaining repeats after the others' (Jacobian contractions
    allocating and freeing GiB-sized Jacobians made the next contender's
    millisecond call 3–30× slower: MLP `trace`, n = 128, runs of 4 ms and
    60–70 ms).
    """
    first, out, runs = {}, {}, {}
    for key, call in entries.items():
        if isinstance(call, Served):
            first[key], out[key], runs[key] = call.first, None, []
            continue
        try:
            t0 = time.perf_counter()
            out[key] = np.asarray(call())
            first[key] = time.perf_counter() - t0
            runs[key] = []
        except Exception as e:  # e.g. out of memory: report and go on
            print(f"{label} {key}: {type(e).__name__}: {str(e)[:200]}")

    def one(key):
        if isinstance(entries[key], Served):
            runs[key].append(entries[key].run())
            return
        t0 = time.perf_counter()
        jax.block_until_ready(entries[key]())
        runs[key].append(time.perf_counter() - t0)

    if order == "blocked":  # each contender's repeats back to back: its buffers stay warm
        for key in runs:
            for _ in range(repeats):
                one(key)
    else:
        keys, slow = list(runs), []
        for r in range(repeats):
            for key in keys:
                one(key)
            if r == 0 and keys:  # contenders SLOW_FACTOR× slower than the fastest leave the turns
                fastest = min(runs[key][0] for key in keys)
                slow = [key for key in keys if runs[key][0] > SLOW_FACTOR * fastest]
                keys = [key for key in keys if key not in slow]
        for key in slow:
            for _ in range(repeats - 1):
                one(key)
    found = {}
    for key, ts in runs.items():
        med = statistics.median(ts)
        found[key] = (med, max(first[key] - med, 0.0), out[key])
        print(
            f"{label} {key}: {med:.4f}s (compile {found[key][1]:.1f}s; runs "
            f"{', '.join(f'{t:.4f}' for t in ts)})",
            flush=True,
        )
    return found


def _from_nt(kernel, mode: str):
    """A neural-tangents kernel on ntkd's scale: its ``trace`` is a mean over the k = 10
    logits, ntkd's the sum."""
    return kernel * (10 if mode == "trace" else 1)


def _time_with_server(
    entries: dict, python, inp: str, out: str, args, label: str, mode: str, order="interleaved"
) -> dict:
    """:func:`_time_round_robin` of ``entries`` with neural-tangents' server (on the exported
    ``inp``) joining the turns when ``python`` (its venv) is given; its kernels are filled in
    (:func:`_from_nt`)."""
    server = None
    if python:
        server = NTServer(python, inp, out, args.nt_impls, args.nt_tuned_malloc)
        for key, err in server.errors.items():
            print(f"{label} {key}: {err}")
        entries = {**entries, **{key: Served(server, key) for key in server.first}}
    found = _time_round_robin(entries, args.repeats, label, order)
    if server is not None:
        for key, kernel in server.close().items():
            sec, comp, _ = found[key]
            found[key] = (sec, comp, _from_nt(kernel, mode))
    return found


def print_generic(rows) -> None:
    print()
    print(
        "| workload | n | mode | entry point | seconds | compile s | speed-up vs NT best | rel. err |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_nt_best']:.2f}x" if r["vs_nt_best"] else "-"
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "-"
        print(
            f"| {r['workload']} | {r['n']} | {r['mode']} | {r['entry']} | {r['seconds']:.4f} | "
            f"{r['compile']:.1f} | {ratio} | {err} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-scale", type=float, default=1.0, help="multiply every n by this")
    parser.add_argument("--quick", action="store_true", help="--n-scale 0.1 --repeats 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--modes", default="full,trace")
    parser.add_argument(
        "--impls",
        default=",".join(NTKD_IMPLS + ("naive",)),
        help="ntkd implementations through flax_apply_fn, 'naive', and 'model.apply' (auto "
        "through empirical_ntk(model.apply, variables, x), the entry point a notebook uses)",
    )
    parser.add_argument("--reference", action="store_true", help="also time neural-tangents 0.6.5")
    parser.add_argument("--nt-impls", default="nt-jacobian,nt-ntvp,nt-structured")
    parser.add_argument(
        "--nt-tuned-malloc",
        action="store_true",
        help="run neural-tangents with the allocator settings `import ntkd` applies",
    )
    parser.add_argument(
        "--generic",
        action="store_true",
        help="also time the generic entry points on plain_models.py networks",
    )
    parser.add_argument("--generic-workloads", default=",".join(plain_models.PLAIN))
    parser.add_argument("--generic-sizes", default="small", help="small and/or full")
    parser.add_argument(
        "--full-order",
        choices=("sequential", "interleaved"),
        default="sequential",
        help="full-size workloads: each contender's warm-up and repeats in a row (default), or "
        "neural-tangents as a server with every contender's repeats taken in turn",
    )
    parser.add_argument(
        "--generic-order",
        choices=("interleaved", "blocked"),
        default="interleaved",
        help="generic contenders' repeats taken in turn (default) or each back to back",
    )
    parser.add_argument(
        "--generic-impls",
        default=",".join(NTKD_IMPLS),
        help="fixed implementations timed on the plain function",
    )
    parser.add_argument("--json", default=os.path.join(WORK, "ntk_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.n_scale, args.repeats = 0.1, 1
    os.makedirs(WORK, exist_ok=True)
    python = ensure_venv() if args.reference else None

    peak = matmul_peak_gflops()
    cpu = cpu_model()
    print(
        f"device: {jax.devices()[0].device_kind} x{len(jax.devices())} ({cpu}); "
        f"float32 matmul peak {peak:.1f} GFLOP/s; jax {jax.__version__}; "
        f"ntkd host-malloc tuning {'on' if _hostmem.TUNED else 'off'}, "
        f"neural-tangents' {'same' if args.nt_tuned_malloc else 'glibc defaults'}",
        flush=True,
    )
    rows, autos = [], []
    for wname in filter(None, args.workloads.split(",")):
        name, kwargs, shape, n = WORKLOADS[wname]
        n = max(8, int(round(n * args.n_scale)))
        model = get_model(name, 10, **kwargs)
        variables = init_variables(model, jax.random.PRNGKey(0), shape)
        x = jax.random.normal(jax.random.PRNGKey(1), (n,) + shape, jnp.float32)
        apply_fn, params = flax_apply_fn(model, variables)
        nparams = sum(l.size for l in jax.tree.leaves(params))
        for mode in args.modes.split(","):
            flops = jc_flops(apply_fn, params, x, 10, mode)
            found, calls = {}, {}
            for impl in filter(None, args.impls.split(",")):  # --impls "" times NT only
                if impl == "naive":
                    fn = naive_ntk_fn(apply_fn, mode)
                    call = lambda fn=fn: fn(params, x)
                elif impl == "model.apply":  # the generic entry point, bound method fresh each call
                    call = lambda mode=mode: empirical_ntk(model.apply, variables, x, mode=mode)
                else:
                    fn = empirical_ntk_fn(apply_fn, mode=mode, implementation=impl)
                    call = lambda fn=fn: fn(x, None, params)
                calls["ntkd-" + impl if impl != "naive" else "naive"] = call
            inp = os.path.join(WORK, f"{wname}_{mode}_in.npz")
            out = os.path.join(WORK, f"{wname}_{mode}_out.npz")
            if python:
                export(inp, name, kwargs, variables, x, mode, 10)
            if python and args.full_order == "interleaved":
                found = _time_with_server(
                    calls, python, inp, out, args, f"  {wname} n={n} {mode}", mode
                )
                calls = {}
            for key, call in calls.items():  # one contender after another
                try:
                    found[key] = _time(call, args.repeats)
                    print(f"  {wname} n={n} {mode} {key}: {found[key][0]:.3f}s", flush=True)
                except Exception as e:  # e.g. out of memory: report and go on
                    print(f"  {wname} {mode} {key}: {type(e).__name__}: {str(e)[:200]}")
            if python and args.full_order == "sequential":
                timings, kernels = run_reference(
                    python, inp, out, args.repeats, args.nt_impls, args.nt_tuned_malloc
                )
                for key, t in timings.items():
                    if "error" in t:
                        print(f"  {wname} {mode} {key}: {t['error']}")
                        continue
                    found[key] = (t["seconds"], t["compile"], _from_nt(kernels[key], mode))
            if not found:
                continue
            if "ntkd-auto" in found:
                picked = chosen_implementation(apply_fn, params, x, mode=mode)
                a = auto_row(wname, n, mode, found, "ntkd-", picked)
                if a:
                    autos.append(a)
            ref = found.get("ntkd-jacobian", next(iter(found.values())))[2]
            nt_best = min((v[0] for k, v in found.items() if k.startswith("nt-")), default=None)
            for key, (sec, comp, kern) in found.items():
                err = float(np.max(np.abs(kern - ref)) / np.max(np.abs(ref)))
                rows.append(
                    dict(
                        workload=wname,
                        n=n,
                        params=nparams,
                        mode=mode,
                        contender=key,
                        seconds=sec,
                        compile=comp,
                        vs_nt_best=(nt_best / sec) if nt_best else None,
                        gflops=flops / sec / 1e9,
                        peak_frac=flops / sec / 1e9 / peak,
                        rel_err=err,
                    )
                )
    generic, generic_autos = generic_rows(args, python) if args.generic else ([], [])
    autos += generic_autos
    with open(args.json, "w") as f:
        json.dump(
            {
                "peak_gflops": peak,
                "cpu": cpu,
                "rows": rows,
                "generic": generic,
                "auto": autos,
                "argv": sys.argv,
            },
            f,
            indent=1,
        )
    if generic:
        print_generic(generic)
    if autos:
        print_auto(autos)
    print()
    print(
        "| workload | n | mode | contender | seconds | compile s | speed-up vs NT best | "
        "JC-equiv GFLOP/s | of peak | rel. err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_nt_best']:.2f}x" if r["vs_nt_best"] else "-"
        print(
            f"| {r['workload']} | {r['n']} | {r['mode']} | {r['contender']} | {r['seconds']:.3f} | "
            f"{r['compile']:.1f} | {ratio} | {r['gflops']:.1f} | {100 * r['peak_frac']:.0f}% | "
            f"{r['rel_err']:.1e} |"
        )


if __name__ == "__main__":
    main()
