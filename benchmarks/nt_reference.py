"""Times neural-tangents 0.6.5 on a workload exported by ``ntk_speed.py``.

Runs inside the pinned venv ``benchmarks/.nt_venv`` (JAX 0.4.23, Flax 0.8.0,
neural-tangents 0.6.5), never in the main environment:

    benchmarks/.nt_venv/bin/python benchmarks/nt_reference.py IN.npz OUT.npz --repeats 3

IN.npz holds ``x``, ``meta`` (JSON: model name/kwargs, mode, k, or ``plain``:
a network of ``benchmarks/plain_models.py``) and the variables as flattened
leaves named by their path (``params/dense0/kernel``). The model is rebuilt
from ``ntkd/models.py`` or ``benchmarks/plain_models.py`` (imported by file
path, so the rest of ntkd, which needs current JAX, is not imported); a plain
network is the very function ntkd's benchmark times, with all of its params
differentiated. OUT.npz receives
each implementation's kernel (``trace`` is neural-tangents' MEAN over logits)
and a JSON ``timings`` record.

With ``--serve`` it compiles every implementation, prints one JSON line
``{"ready": {impl: first-call seconds}}`` and then times one call of the
implementation named on each line of stdin, answering with its seconds (an
empty line or EOF ends it and writes OUT.npz). ``ntk_speed.py`` uses this to
interleave neural-tangents' repeats with ntkd's on a shared machine, so load
from other jobs falls on both alike.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import neural_tangents as nt
import numpy as np

IMPLEMENTATIONS = {
    "nt-jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION,
    "nt-ntvp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
    "nt-structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
}


def _load_models(*parts):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts)
    spec = importlib.util.spec_from_file_location("ntkd_" + parts[-1][:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Flax dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = jax.numpy.asarray(value)
    return tree


def _kernel_fn(apply_fn, trace_axes, name: str):
    """neural-tangents' kernel function of one implementation, jitted once."""
    return jax.jit(
        nt.empirical_ntk_fn(
            apply_fn, trace_axes=trace_axes, vmap_axes=0, implementation=IMPLEMENTATIONS[name]
        )
    )


def serve(apply_fn, params, x, trace_axes, names, out) -> None:
    """Compile each implementation, then time one call per stdin line naming it."""
    fns, results, first, errors = {}, {}, {}, {}
    for name in names:
        fn = _kernel_fn(apply_fn, trace_axes, name)
        try:
            t0 = time.perf_counter()
            results[name] = np.asarray(fn(x, None, params))
            first[name] = time.perf_counter() - t0
            fns[name] = fn
        except Exception as e:  # report, serve the others
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps({"ready": first, "errors": errors}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        t0 = time.perf_counter()
        fns[name](x, None, params).block_until_ready()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    np.savez(out, timings=json.dumps({}), **results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("inp")
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--serve", action="store_true", help="time calls named on stdin")
    args = parser.parse_args()

    data = np.load(args.inp)
    meta = json.loads(str(data["meta"]))
    variables = _unflatten({k[len("var:") :]: data[k] for k in data.files if k.startswith("var:")})
    x = jax.numpy.asarray(data["x"])
    if meta.get("plain"):
        apply_fn = _load_models("plain_models.py").PLAIN[meta["plain"]][1]
        variables = {"params": variables}
    else:
        models = _load_models("..", "ntkd", "models.py")
        model = models.get_model(meta["model"], meta["k"], **meta["model_kwargs"])
        rest = {c: v for c, v in variables.items() if c != "params"}

        def apply_fn(params, xx):
            return model.apply({"params": params, **rest}, xx, train=False)

    trace_axes = () if meta["mode"] == "full" else (-1,)
    if args.serve:
        serve(apply_fn, variables["params"], x, trace_axes, args.impls.split(","), args.out)
        return
    results, timings = {}, {}
    for name in args.impls.split(","):
        fn = _kernel_fn(apply_fn, trace_axes, name)
        try:
            t0 = time.perf_counter()
            kernel = np.asarray(fn(x, None, variables["params"]))
            first = time.perf_counter() - t0
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(x, None, variables["params"]).block_until_ready()
                runs.append(time.perf_counter() - t0)
            med = statistics.median(runs)
            results[name] = kernel
            timings[name] = {"seconds": med, "compile": max(first - med, 0.0), "runs": runs}
        except Exception as e:  # report, keep timing the others
            timings[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, timings[name], file=sys.stderr, flush=True)
    np.savez(
        args.out,
        timings=json.dumps(timings),
        jax=jax.__version__,
        nt=nt.__version__ if hasattr(nt, "__version__") else "0.6.5",
        **results,
    )


if __name__ == "__main__":
    main()
