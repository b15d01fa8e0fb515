"""Empirical neural tangent kernels of Flax/JAX networks.

For a network ``f(params, x) -> (n, k)`` logits the empirical NTK is

        Θ(x, x')[a, b] = Σ_p ∂f_a(x)/∂θ_p · ∂f_b(x')/∂θ_p

and this module computes it in four *modes* (``full`` (n1, n2, k, k),
``trace`` = Σ_a Θ[a, a], ``logit`` = Θ[c, c], ``sum`` = NTK of Σ_a f_a) with
three exact *implementations* (Novak, Sohl-Dickstein, Schoenholz, "Fast Finite
Width Neural Tangent Kernel", ICML 2022):

- ``jacobian``: per-example Jacobians (one VJP per logit), contracted by one
    large matmul per block pair.
- ``ntvp``: NTK-vector products; row Jacobians pushed forward through the
    linearised network on the column block (no parameter contraction).
- ``structured``: layer-wise. Inputs and output cotangents of every
    ``nn.Dense``/``nn.Conv`` are captured with ``flax.linen.intercept_methods``;
    a dense layer's block is ``(a1·a2ᵀ) ⊙ (g1·g2ᵀ)`` and a convolution's is
    ``Σ_{p,q} (patch1_p·patch2_q)(g1_p·g2_q)``, so kernel weights are never
    contracted one by one. Per layer the cheaper of that factorisation and a
    per-example weight gradient built from the same patches is chosen. Every
    other parameter (BatchNorm scale/shift, unknown layers) gets its exact
    per-example Jacobian from a VJP of its own layer only.

Kernels are computed in blocks of examples; each block's features
(Jacobians, patches, cotangents) are computed once and reused for all block
pairs, blocks are sharded over ``jax.devices()`` with ``NamedSharding`` and
results stream into a host buffer. See ``docs/ntk.md``.

Examples are assumed independent (``f(x)[i]`` depends on ``x[i]`` only), which
holds for every network in eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
        "MODES",
        "IMPLEMENTATIONS",
        "FlaxApplyFn",
        "flax_apply_fn",
        "empirical_ntk_fn",
        "empirical_ntk",
        "ntk_vp_fn",
]

MODES = ("full", "trace", "logit", "sum")
"""Kernel modes; ``trace`` is the SUM over logits (neural-tangents: mean)."""

IMPLEMENTATIONS = ("auto", "jacobian", "ntvp", "structured")
"""Exact algorithms; ``auto`` picks one by a cost model."""

BLOCK_MEMORY_BYTES: int | None = None
"""Working-memory budget per block used to pick the default ``block_size``;
None: a quarter of the first device's memory (host RAM on CPU), clamped to
1–8 GiB. Larger blocks matter when per-example gradients are long: the
pair contraction of two b-example blocks does O(b) flops per byte read
(ResNet-20 `trace`, n = 256, 2 CPU cores, 24 GiB: a fixed 1 GiB budget
gave blocks of 19 and 30.6 s; the 6 GiB default gives 3 blocks of 86 and
16.6 s)."""

FEATURE_CACHE_BYTES = 4 * 2**30
"""Up to this many bytes of per-block features are kept for reuse."""

DEVICE_KERNEL_BYTES = 2 * 2**30
"""Kernels up to this size are assembled on device from their blocks (peak
about twice this); larger ones, or ``as_numpy=True``, go through a host buffer."""

SERIAL_FEATURE_BYTES = 256 * 2**20
"""On CPU, blocks whose features are at least this large run one execution at a time."""

MIN_BLOCKS = 8
"""The default block size splits n into at least this many blocks (if blocks
stay ≥ ``MIN_BLOCK_SIZE``; half as many in ``trace``/``logit``/``sum`` when no
layer is factorised over several positions, i.e. every pair is plain matmuls:
MNIST-1D MLP ``trace`` at n = 1000, 4 blocks 61 ms vs 8 blocks 66 ms, while
the 1-D CNN's factorised convolutions want 8): symmetric kernels then compute only the
nb(nb+1)/2 upper block pairs (36 of 64 at 8 blocks), and smaller pair
temporaries stay in cache. Measured on 2 CPU cores, 1-D CNN, n = 1000, one
block → 8 blocks: ``full`` 14.9 s → 8.2 s, ``trace`` 1.5–1.8 s → 0.6 s."""

MIN_BLOCK_SIZE = 128
"""Smallest default block from the ``MIN_BLOCKS`` split; half of it in ``full``
mode, whose pair contractions have k rows per example and stay efficient at
smaller blocks. ResNet-20, n = 256, 2 CPU cores: ``full`` with blocks of 64
(10 of 16 block pairs) 19.4 s vs 21.7 s with 128 (3 of 4); ``trace`` with
blocks of 128 8.1 s vs 9.5 s with 64 (its b-row contractions need the rows)."""

_MAX_FACT_POSITIONS = 256
"""Above this many output positions a conv layer always uses weight gradients
(the factorised form needs (b1, b2, S, S) temporaries)."""

COTANGENT_LOOP_MAX = 16
"""Up to this many output cotangents per example (k in full/trace mode), the
structured algorithm unrolls one VJP per cotangent instead of vmapping them
(networks with convolutions only)."""

_SEPARATE_GRAD_SIZE = 4096
"""Per-example gradient blocks of at least this many entries (m × layer
parameters) are kept as their own feature array; smaller ones are concatenated."""

_HIGHEST = jax.lax.Precision.HIGHEST
PyTree = Any


# --------------------------------------------------------------------------
# Flax adapter
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxApplyFn:
    """``apply_fn(params, x)`` of a Linen module with frozen non-param state.

    Carries the module and the frozen collections so that the ``structured``
    implementation can intercept its layers.
    """

    module: nn.Module
    frozen: dict
    kwargs: dict

    def variables(self, params: PyTree) -> dict:
        return {"params": params, **self.frozen}

    def __call__(self, params: PyTree, x: jax.Array) -> jax.Array:
        return self.module.apply(self.variables(params), x, **self.kwargs)


def flax_apply_fn(model: nn.Module, variables: dict) -> tuple[FlaxApplyFn, PyTree]:
    """Splits a Linen model into a differentiable ``apply_fn`` and its params.

    Only ``variables["params"]`` is differentiated; every other collection
    (e.g. BatchNorm ``batch_stats``) is closed over and the model runs in eval
    mode (``train=False`` when its ``__call__`` takes ``train``).

    Args:
        model: a ``flax.linen.Module``.
        variables: its variables, e.g. from ``model.init``; must hold ``"params"``.

    Returns:
        ``(apply_fn, params)`` with ``apply_fn(params, x) -> (n, k)``.

    Example:
        >>> apply_fn, params = flax_apply_fn(model, variables)
        >>> k = empirical_ntk(apply_fn, params, x)
    """
    if "params" not in variables:
        raise ValueError(
                f"variables has collections {sorted(variables)} but no 'params'; pass "
                "the dict returned by model.init(...).")
    frozen = {c: v for c, v in variables.items() if c != "params"}
    kwargs = {}
    if "train" in inspect.signature(model.__call__).parameters:
        kwargs["train"] = False
    return FlaxApplyFn(model, frozen, kwargs), variables["params"]


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_options(mode: str, implementation: str, logit: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}.")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
                f"implementation={implementation!r} is unknown; use one of "
                f"{IMPLEMENTATIONS}.")
    if mode == "logit" and (not isinstance(logit, (int, np.integer)) or logit < 0):
        raise ValueError(f"logit={logit!r} must be a non-negative int logit index.")


def _is_tracer(*trees) -> bool:
    return any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(trees))


def _check_finite(name: str, tree: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            where = jax.tree_util.keystr(path) or "(array)"
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(
                    f"{name}{where} has {bad} non-finite value(s) (NaN/inf); the NTK "
                    "would be meaningless. Clean the inputs or restore finite params.")


def _output_width(apply_fn, params, x: jax.Array, logit: int, mode: str) -> int:
    """Number of logits k; checks that apply_fn maps (b, ...) to (b, k)."""
    out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((2,) + x.shape[1:], x.dtype))
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[0] != 2:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
                f"apply_fn must return logits of shape (batch, k); for a batch of 2 "
                f"inputs it returned {shape}. Wrap it, e.g. "
                "`lambda p, x: f(p, x).reshape(x.shape[0], -1)`.")
    k = out.shape[1]
    if mode == "logit" and logit >= k:
        raise ValueError(f"logit={logit} is out of range for k={k} logits; use 0..{k - 1}.")
    return k


def _cast(tree: PyTree, dtype) -> PyTree:
    if dtype is None:
        return tree
    return jax.tree.map(
            lambda l: jnp.asarray(l, dtype) if jnp.issubdtype(jnp.asarray(l).dtype, jnp.inexact) else l,
            tree)


def _basis(mode: str, k: int, logit: int, dtype) -> jax.Array:
    """(m, k) output cotangents: one per logit (full/trace) or a single one.

    ``trace`` needs Σ_a Θ[a, a], i.e. every logit's gradient, but contracts
    them pairwise; ``logit`` and ``sum`` need one gradient per example.
    """
    if mode in ("full", "trace"):
        return jnp.eye(k, dtype=dtype)
    if mode == "logit":
        return jnp.eye(k, dtype=dtype)[logit:logit + 1]
    return jnp.ones((1, k), dtype)


GRAM_CHUNK_BYTES = 3 * 2**20
"""Bytes of both operands per step of a long Gram contraction (about L2/L3 size)."""


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` for (r1, K) and (r2, K), accumulated over cache-sized K chunks.

    The kernel of a block pair contracts few rows over very many parameters
    (ResNet-20 ``trace``: 128 × 2.7 M); one matmul of that shape streams its
    operands from memory at a fraction of peak (measured 96 → 145 GFLOP/s at
    128 rows, 37 → 70 at 64 rows on a 2-core CPU).
    """
    (r1, kdim), r2 = a.shape, b.shape[0]
    ch = max(512, GRAM_CHUNK_BYTES // ((r1 + r2) * a.dtype.itemsize))
    steps = kdim // ch
    if steps < 4:
        return jnp.matmul(a, b.T, precision=_HIGHEST)

    def step(s, acc):
        x = jax.lax.dynamic_slice_in_dim(a, s * ch, ch, axis=1)
        y = jax.lax.dynamic_slice_in_dim(b, s * ch, ch, axis=1)
        return acc + jnp.matmul(x, y.T, precision=_HIGHEST)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((r1, r2), jnp.result_type(a, b)))
    if steps * ch < kdim:
        acc = acc + jnp.matmul(a[:, steps * ch:], b[:, steps * ch:].T, precision=_HIGHEST)
    return acc


def _contract_flat(mode: str, j1: jax.Array, j2: jax.Array, *, iajb: bool = False) -> jax.Array:
    """Θ from flat per-example gradients j: (b, m, P).

    For ``full`` the matmul's natural layout is (i, a, j, b); ``iajb=True``
    keeps it so callers can accumulate several terms before one transpose.
    """
    if mode == "full":
        (b1, m, _), b2 = j1.shape, j2.shape[0]
        prod = _gram(j1.reshape(b1 * m, -1), j2.reshape(b2 * m, -1)).reshape(b1, m, b2, m)
        return prod if iajb else jnp.transpose(prod, (0, 2, 1, 3))
    return _gram(j1.reshape(j1.shape[0], -1), j2.reshape(j2.shape[0], -1))


def _flatten_grads(tree: PyTree, lead: int) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([l.reshape(l.shape[:lead] + (-1,)) for l in leaves], axis=-1)


# --------------------------------------------------------------------------
# Jacobian contraction and NTK-vector products
# --------------------------------------------------------------------------


def _per_example_grads(f, params, x, basis):
    """Per-example VJPs, basis (m, k): params-shaped tree, leaves (b, m, *leaf)."""

    def one(xi):
        _, vjp = jax.vjp(lambda p: f(p, xi[None])[0], params)
        return jax.vmap(lambda c: vjp(c)[0])(basis)

    return jax.vmap(one)(x)


class _Jacobian:
    """Per-example Jacobians contracted with one matmul per block pair."""

    def __init__(self, apply_fn, mode, k, logit):
        self.f, self.mode, self.k, self.logit = apply_fn, mode, k, logit

    def row(self, params, x):
        basis = _basis(self.mode, self.k, self.logit, x.dtype)
        return _flatten_grads(_per_example_grads(self.f, params, x, basis), 2)

    col = row

    def pair(self, params, r, c):
        return _contract_flat(self.mode, r, c)


class _NtkVectorProducts:
    """Row Jacobians pushed forward through the network linearised at columns."""

    def __init__(self, apply_fn, mode, k, logit):
        self.f, self.mode, self.k, self.logit = apply_fn, mode, k, logit

    def row(self, params, x):
        basis = _basis(self.mode, self.k, self.logit, x.dtype)
        return _per_example_grads(self.f, params, x, basis)

    def col(self, params, x):
        return x

    def pair(self, params, r, x2):
        _, push = jax.linearize(lambda p: self.f(p, x2), params)
        b1, m = jax.tree.leaves(r)[0].shape[:2]
        flat = jax.tree.map(lambda l: l.reshape((b1 * m,) + l.shape[2:]), r)
        out = jax.lax.map(push, flat, batch_size=min(m * b1, 64))  # (b1*m, b2, k)
        out = out.reshape(b1, m, x2.shape[0], self.k)
        if self.mode == "full":
            return jnp.transpose(out, (0, 2, 1, 3))
        if self.mode == "trace":
            return jnp.einsum("iaja->ij", out)
        if self.mode == "logit":
            return out[:, 0, :, self.logit]
        return out[:, 0].sum(-1)


# --------------------------------------------------------------------------
# Structured (layer-wise) algorithm
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """Static facts about one parameter-owning module call."""

    path: tuple
    module: nn.Module  # unbound clone
    leaves: tuple  # names of params owned directly by the module
    count: int = 1
    arg_def: Any = None
    static_args: tuple = ()
    array_pos: tuple = ()


def _direct_leaves(module: nn.Module) -> tuple:
    params = module.variables.get("params", {})
    return tuple(n for n, v in params.items() if not isinstance(v, dict))


def _subtree(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _layer_rule(call: _Call) -> str | None:
    """'dense' / 'conv' when the kernel(+bias) block can be factorised."""
    mod = call.module
    names = set(call.leaves)
    if type(mod) is nn.Dense and names <= {"kernel", "bias"} and "kernel" in names:
        return "dense"
    if (type(mod) is nn.Conv and names <= {"kernel", "bias"} and "kernel" in names
            and mod.feature_group_count == 1 and mod.mask is None
            and not (isinstance(mod.padding, str) and mod.padding.upper() == "CIRCULAR")):
        return "conv"
    return None


def _sliced_patches(conv: nn.Conv, a: jax.Array) -> jax.Array | None:
    """Patches (b, S, prod(kernel)·C_in) of ``conv`` applied to ``a`` by strided slicing.

    Ordered like the flattened kernel (spatial offsets, then input channel).
    Covers what ``nn.Conv`` hands to ``lax.conv_general_dilated`` unchanged:
    one batch axis, ``"SAME"``/``"VALID"`` or explicit padding, any strides and
    kernel dilation, no input dilation and the default conv function. Returns
    None otherwise (the caller then uses an identity-kernel convolution).
    """
    ks = (conv.kernel_size,) if isinstance(conv.kernel_size, int) else tuple(conv.kernel_size)
    nd = len(ks)

    def per_dim(v):
        v = 1 if v is None else v
        return (v,) * nd if isinstance(v, int) else tuple(v)

    strides, kdil, idil = per_dim(conv.strides), per_dim(conv.kernel_dilation), per_dim(conv.input_dilation)
    custom = (getattr(conv, "conv_general_dilated", None), getattr(conv, "conv_general_dilated_cls", None))
    if a.ndim != nd + 2 or any(d != 1 for d in idil) or any(f is not None for f in custom):
        return None
    try:
        pads = nn.linear.canonicalize_padding(conv.padding, nd)
    except (TypeError, ValueError):
        return None
    span = [(k - 1) * d + 1 for k, d in zip(ks, kdil)]
    if isinstance(pads, str):
        if pads not in ("SAME", "VALID"):
            return None
        pads = jax.lax.padtype_to_pads(a.shape[1:-1], span, strides, pads)
    ap = jax.lax.pad(a, jnp.zeros((), a.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    out = [(ap.shape[1 + i] - span[i]) // strides[i] + 1 for i in range(nd)]
    if min(out) < 1:
        return None
    cols = []
    for offs in np.ndindex(*ks):
        idx = tuple(slice(o * d, o * d + (n - 1) * st + 1, st) for o, d, n, st in zip(offs, kdil, out, strides))
        cols.append(ap[(slice(None),) + idx + (slice(None),)])
    return jnp.stack(cols, axis=-2).reshape(a.shape[0], math.prod(out), len(cols) * a.shape[-1])


class _Structured:
    """Layer-wise kernel from captured layer inputs and output cotangents."""

    def __init__(self, apply_fn: FlaxApplyFn, mode, k, logit):
        self.f, self.mode, self.k, self.logit = apply_fn, mode, k, logit
        self.m = k if mode in ("full", "trace") else 1

    def _discover(self, params, x) -> dict:
        calls: dict = {}

        def record(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name == "__call__":
                leaves = _direct_leaves(ctx.module)
                if leaves:
                    path = tuple(ctx.module.path)
                    if path in calls:
                        calls[path].count += 1
                    else:
                        flat, arg_def = jax.tree.flatten((args, kwargs))
                        pos = tuple(i for i, l in enumerate(flat) if isinstance(l, jax.Array))
                        calls[path] = _Call(path, ctx.module.clone(parent=None), leaves,
                                                                arg_def=arg_def, array_pos=pos,
                                                                static_args=tuple(None if i in pos else l
                                                                                                    for i, l in enumerate(flat)))
            return out

        def run(p, xx):
            with nn.intercept_methods(record):
                return self.f(p, xx)

        jax.eval_shape(run, params, x)
        # A module called twice shares its weights across calls; its leaves go to
        # the exact whole-network fallback instead of the per-call rules.
        return {path: c for path, c in calls.items() if c.count == 1}

    def row(self, params, x):
        b, m = x.shape[0], self.m
        calls = self._discover(params, x)
        captured: dict = {}

        def forward(perts):
            def intercept(next_fun, args, kwargs, ctx):
                path = tuple(ctx.module.path)
                if ctx.method_name != "__call__" or path not in calls:
                    return next_fun(*args, **kwargs)
                flat = jax.tree.leaves((args, kwargs))
                captured[path] = [flat[i] for i in calls[path].array_pos]
                out = next_fun(*args, **kwargs)
                return jax.tree.map(jnp.add, out, perts[path])

            with nn.intercept_methods(intercept):
                out = self.f(params, x)
            return out, captured

        shapes = self._perturbation_shapes(params, x, calls)
        perts = {p: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), s) for p, s in shapes.items()}
        _, vjp, acts = jax.vjp(forward, perts, has_aux=True)
        basis = _basis(self.mode, self.k, self.logit, x.dtype)
        # Examples are independent, so one VJP per basis cotangent gives every
        # example's layer-output cotangents at once. `cot(path, axis)` stacks a
        # layer's m cotangents at the axis its consumer reads them in.
        cots = jnp.broadcast_to(basis[:, None, :], (m, b, self.k))
        convnet = any(isinstance(c.module, nn.Conv) for c in calls.values())
        if convnet and m <= COTANGENT_LOOP_MAX:
            # One VJP per cotangent rather than a vmap over them: batching the VJP
            # broadcasts the residuals of some layers m times (max-pooling's
            # select-and-scatter: 15x slower batched; LeNet-5 rows 1.41 -> 1.04
            # ms/example, ResNet-20 28.3 -> 25.9 on a 2-core CPU). Dense-only
            # networks keep the vmap: one matmul of m·b rows beats m of b rows
            # (MNIST-1D MLP rows 0.015 -> 0.011 ms/example).
            per = [vjp(cots[a])[0] for a in range(m)]

            def cot(path, axis):
                return jax.tree.map(lambda *t: jnp.stack(t, axis), *[q[path] for q in per])
        else:  # dense-only, or e.g. 100 classes: keep the compiled program small
            grads = jax.vmap(lambda c: vjp(c)[0])(cots)

            def cot(path, axis):
                return jax.tree.map(lambda t: jnp.moveaxis(t, 0, axis), grads[path])

        fact, flat_grads = [], []
        covered = set()
        for path, c in calls.items():
            arrays = acts[path]
            rule = _layer_rule(c)
            handled = ()
            batched = all(a.ndim >= 1 and a.shape[0] == b for a in arrays)
            if rule is not None and batched:
                a_in = arrays[0] if len(arrays) == 1 else None
                if a_in is not None:
                    patches = self._patches(rule, c, params, path, a_in)  # (b, S, D+1)
                    s, d1 = patches.shape[1:]
                    # output cotangents position-major, (b, S, m, C_out): the weight
                    # gradients below are then one batched matmul in its natural
                    # layout, with no transposed copy of the cotangents (ResNet-20
                    # stage 1: 0.57 -> 0.36 ms/example per conv vs (m, b, S, C))
                    g = cot(path, -2)
                    cout = g.shape[-1]
                    gs = g.reshape(b, s, m, cout)
                    if self._factorise(s, d1, cout):
                        fact.append((patches, jnp.swapaxes(gs, 1, 2)))
                    else:
                        w = jnp.einsum("ipd,ipe->ied", patches, gs.reshape(b, s, m * cout),
                                       precision=_HIGHEST)
                        flat_grads.append(w.reshape(b, m, cout * d1))
                    handled = c.leaves
            rest = tuple(n for n in c.leaves if n not in handled)
            if rest and batched:
                flat_grads.append(self._leaf_grads(c, params, path, arrays, cot(path, 0), rest))
                handled = c.leaves
            covered.update(path + (n,) for n in handled)

        uncovered = self._uncovered(params, covered)
        if uncovered is not None:
            flat_grads.append(self._global_grads(params, x, uncovered, basis))
        # Long per-layer gradients stay separate arrays, each contracted on its
        # own in `pair`: concatenating them copied every block's features once
        # more (ResNet-20, n = 256: `trace` 12.6 -> 9.9 s, `full` 23.9 -> 20.7 s).
        big = [f for f in flat_grads if f.shape[1] * f.shape[2] >= _SEPARATE_GRAD_SIZE]
        small = [f for f in flat_grads if f.shape[1] * f.shape[2] < _SEPARATE_GRAD_SIZE]
        return {"fact": fact, "j": big + ([jnp.concatenate(small, axis=-1)] if small else [])}

    col = row

    def _rebuild(self, c: _Call, arrays):
        flat = list(c.static_args)
        for i, a in zip(c.array_pos, arrays):
            flat[i] = a
        return jax.tree.unflatten(c.arg_def, flat)

    def _local_vars(self, params, path, direct=None):
        local = {"params": dict(_subtree(params, path))}
        if direct is not None:
            local["params"].update(direct)
        for col, tree in self.f.frozen.items():
            try:
                local[col] = _subtree(tree, path)
            except (KeyError, TypeError):
                pass
        return local

    def _perturbation_shapes(self, params, x, calls):
        shapes: dict = {}

        def record(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            path = tuple(ctx.module.path)
            if ctx.method_name == "__call__" and path in calls:
                shapes[path] = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out)
            return out

        def run(p, xx):
            with nn.intercept_methods(record):
                return self.f(p, xx)

        jax.eval_shape(run, params, x)
        return shapes

    def _patches(self, rule, c, params, path, a):
        b = a.shape[0]
        if rule == "dense":
            patches = a.reshape(b, -1, a.shape[-1])
        else:
            patches = _sliced_patches(c.module, a)
            if patches is None:
                kernel = _subtree(params, path)["kernel"]
                d = math.prod(kernel.shape[:-1])
                eye = jnp.eye(d, dtype=a.dtype).reshape(kernel.shape[:-1] + (d,))
                # The same Conv with an identity kernel: its output channels are the
                # patches, with Flax's own padding, stride and dilation conventions
                # (d² flops per position instead of d: only for unusual convs).
                ident = c.module.clone(features=d, use_bias=False, precision=_HIGHEST)
                patches = ident.apply({"params": {"kernel": eye}}, a).reshape(b, -1, d)
        if "bias" in c.leaves:
            patches = jnp.concatenate([patches, jnp.ones(patches.shape[:2] + (1,), patches.dtype)], -1)
        return patches

    def _factorise(self, s: int, d1: int, cout: int) -> bool:
        """Per block pair, per example pair cost: factorised vs weight gradients."""
        m = self.m
        if s == 1:
            return True
        if s > _MAX_FACT_POSITIONS or self.mode == "full":
            # full mode: the three-operand (i, j, p, q) contraction is memory-bound and
            # measured slower than weight gradients + one matmul even at S = 5..10
            # (1-D CNN, n = 1000: 26.5 s vs 17.4 s), despite its lower FLOP count
            return False
        fact = s * s * (d1 + m * cout)
        grad = m * d1 * cout
        return fact < grad

    def _leaf_grads(self, c, params, path, arrays, g, names):
        """Exact per-example grads of the module's own leaves via a local VJP.

        ``g`` holds the module's output cotangents as (m, b, ...); returns (b, m, P).
        """
        own = _subtree(params, path)
        diff = {n: own[n] for n in names}

        def one(arrs, gi):  # one example, one cotangent
            def local(dp):
                args, kwargs = self._rebuild(c, [a[None] for a in arrs])
                return c.module.apply(self._local_vars(params, path, dp), *args, **kwargs)

            _, vjp = jax.vjp(local, diff)
            return vjp(jax.tree.map(lambda t: t[None], gi))[0]

        # examples inside, cotangents outside: the layer's linearisation is shared
        # by the m cotangents and g is read in its own layout
        per = jax.vmap(jax.vmap(one), in_axes=(None, 0))(list(arrays), g)
        return jnp.swapaxes(_flatten_grads(per, 2), 0, 1)

    def _uncovered(self, params, covered):
        leaves = jax.tree_util.tree_leaves_with_path(params)
        names = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p) for p, _ in leaves]
        missing = [n for n in names if n not in covered]
        return missing or None

    def _global_grads(self, params, x, missing, basis):
        """Per-example grads of leaves no captured layer owns, through the net."""
        missing = set(missing)

        def split(p):
            flat = jax.tree_util.tree_leaves_with_path(p)
            return [l for path, l in flat
                            if tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path) in missing]

        treedef = jax.tree.structure(params)
        keys = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
                        for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        all_leaves = jax.tree.leaves(params)

        def f_sub(sub, xx):
            it = iter(sub)
            merged = [next(it) if key in missing else l for key, l in zip(keys, all_leaves)]
            return self.f(jax.tree.unflatten(treedef, merged), xx)

        g = _per_example_grads(f_sub, split(params), x, basis)
        return _flatten_grads(g, 2)

    def pair(self, params, r, c):
        mode = self.mode
        k = None
        for (a1, g1), (a2, g2) in zip(r["fact"], c["fact"]):
            s = a1.shape[1]
            if s == 1:
                pa = jnp.matmul(a1[:, 0], a2[:, 0].T, precision=_HIGHEST)
                if mode == "full":  # accumulated as (i, a, j, b): matmul layout
                    b1, m, _, cout = g1.shape
                    pg = jnp.matmul(g1.reshape(b1 * m, cout), g2.reshape(-1, cout).T,
                                    precision=_HIGHEST).reshape(b1, m, -1, m)
                    term = pa[:, None, :, None] * pg
                else:
                    f1 = g1.reshape(g1.shape[0], -1)
                    f2 = g2.reshape(g2.shape[0], -1)
                    term = pa * jnp.matmul(f1, f2.T, precision=_HIGHEST)
            else:  # trace / logit / sum only: `_factorise` keeps full-mode convs as grads
                pa = jnp.einsum("ipd,jqd->ijpq", a1, a2, precision=_HIGHEST)
                pg = jnp.einsum("iapc,jaqc->ijpq", g1, g2, precision=_HIGHEST)
                term = jnp.sum(pa * pg, axis=(2, 3))
            k = term if k is None else k + term
        for j1, j2 in zip(r["j"], c["j"]):
            term = _contract_flat(mode, j1, j2, iajb=True)
            k = term if k is None else k + term
        return jnp.transpose(k, (0, 2, 1, 3)) if mode == "full" else k


# --------------------------------------------------------------------------
# Cost model for `auto`
# --------------------------------------------------------------------------


def _forward_flops(apply_fn, params, x) -> float | None:
    try:
        one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
        cost = jax.jit(apply_fn).lower(params, one).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is optional on some backends
        return None


def _choose(apply_fn, params, x, mode, k) -> str:
    """``structured`` when the layers are visible, else the cheaper exact one.

    Per example pair, Jacobian contraction costs m_out·P (trace) or k²·P (full)
    and NTK-vector products ≈ 3·k·[FP]; the Jacobians themselves cost the same
    in both.
    """
    if isinstance(apply_fn, FlaxApplyFn):
        return "structured"
    if mode in ("logit", "sum"):
        return "jacobian"
    flops = _forward_flops(apply_fn, params, x)
    if flops is None:
        return "jacobian"
    p = sum(l.size for l in jax.tree.leaves(params))
    jc = (k * k if mode == "full" else k) * p
    return "ntvp" if 3 * k * flops < jc else "jacobian"


# --------------------------------------------------------------------------
# Blocked, sharded driver
# --------------------------------------------------------------------------


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("d",))


def _pad_to(x: np.ndarray | jax.Array, n: int):
    if x.shape[0] == n:
        return x
    reps = jnp.broadcast_to(x[-1:], (n - x.shape[0],) + x.shape[1:])
    return jnp.concatenate([x, reps.astype(x.dtype)], axis=0)


def _memory_budget() -> int:
    if BLOCK_MEMORY_BYTES is not None:
        return int(BLOCK_MEMORY_BYTES)
    return _auto_budget()


@functools.cache
def _auto_budget() -> int:
    total = None
    try:
        total = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # memory_stats is optional per backend
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * 2**30
    return int(min(max(total // 4, 2**30), 8 * 2**30))


def _block_default(bytes_per_example: int, k: int, mode: str) -> int:
    """Largest block whose row + column features and kernel block fit the budget."""
    out = 4 * (k * k if mode == "full" else 1)
    budget = _memory_budget()
    b = budget // max(2 * bytes_per_example, 1)
    return max(8, int(min(b, math.isqrt(budget // out), 2048)))


_BLOCK_CACHE: dict = {}
"""Default block sizes already checked against XLA's memory plan."""


def _planned_bytes(row, pair, params, xb) -> int | None:
    """Device bytes (output + temporaries) XLA plans for the row features and one block pair.

    None where the backend gives no memory analysis.
    """
    try:
        feat = jax.eval_shape(row, params, xb)
        need = 0
        for fn, args in ((row, (params, xb)), (pair, (params, feat, feat))):
            stats = fn.lower(*args).compile().memory_analysis()
            if stats is None:
                return None
            need = max(need, stats.output_size_in_bytes + stats.temp_size_in_bytes)
        feat_bytes = _nbytes(feat)
        return need + 2 * feat_bytes
    except Exception:  # memory analysis is optional on some backends
        return None


class _Engine:
    """Compiled pieces shared by every call of one ntk_fn."""

    def __init__(self, apply_fn, mode, logit, implementation, block_size, dtype):
        self.apply_fn, self.mode, self.logit = apply_fn, mode, logit
        self.implementation, self.block_size, self.dtype = implementation, block_size, dtype
        self._algos: dict = {}

    def algo(self, params, x):
        k = _output_width(self.apply_fn, params, x, self.logit, self.mode)
        impl = self.implementation
        if impl == "auto":
            impl = _choose(self.apply_fn, params, x, self.mode, k)
        if impl == "structured" and not isinstance(self.apply_fn, FlaxApplyFn):
            impl = "jacobian"  # no layer structure to exploit; exact fallback
        key = (impl, k)
        if key not in self._algos:
            cls = {"jacobian": _Jacobian, "ntvp": _NtkVectorProducts, "structured": _Structured}[impl]
            a = cls(self.apply_fn, self.mode, k, self.logit)
            mesh = _mesh()
            rows = PartitionSpec("d")
            # Features are per example: each device computes its own slice of the
            # block with no communication (shard_map); the pair contraction is a
            # plain jit whose output rows stay sharded.
            shard = lambda f: jax.jit(jax.shard_map(
                    f, mesh=mesh, in_specs=(PartitionSpec(), rows), out_specs=rows,
                    check_vma=False))
            pair = jax.jit(a.pair, out_shardings=NamedSharding(mesh, rows))
            self._algos[key] = (a, shard(a.row), shard(a.col), pair, k)
        return self._algos[key]

    def __call__(self, x1, x2, params, *, as_numpy=False):
        params = _cast(params, self.dtype)
        x1 = _cast(jnp.asarray(x1), self.dtype)
        symmetric = x2 is None
        x2 = x1 if symmetric else _cast(jnp.asarray(x2), self.dtype)
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(
                    f"x1 has per-example shape {x1.shape[1:]} but x2 has {x2.shape[1:]}; "
                    "both must hold examples of the same shape (batch first).")
        if x1.ndim < 1 or x1.shape[0] == 0 or x2.shape[0] == 0:
            raise ValueError(f"x1 {x1.shape} / x2 {x2.shape} must have a non-empty batch axis.")
        algo, row, col, pair, k = self.algo(params, x1)
        if _is_tracer(x1, x2, params):
            return algo.pair(params, algo.row(params, x1), algo.col(params, x2))
        _check_finite("params", params)
        _check_finite("x1", x1)
        if not symmetric:
            _check_finite("x2", x2)
        return self._blocked(algo, row, col, pair, k, params, x1, x2, symmetric, as_numpy)

    def _default_block(self, row, pair, k, params, x, ndev, n):
        """Block size from the features' size, then checked against XLA's own memory plan.

        The feature-based guess ignores the temporaries of the row and pair
        computations (e.g. the per-example-pair patch products of factorised
        convolutions in ``full`` mode, which grow as block²); the compiled
        ``memory_analysis`` of both at the guessed size shrinks the block until
        output + temporaries fit the memory budget. Cached per model, shapes
        and options, so new closures over the same model (e.g. one per checkpoint)
        do not repeat the check.
        """
        fn = self.apply_fn
        fn_key = (fn.module, tuple(sorted(fn.kwargs.items()))) if isinstance(fn, FlaxApplyFn) else fn
        shapes = tuple((l.shape, str(l.dtype)) for l in jax.tree.leaves(params))
        budget = _memory_budget()
        key = (fn_key, self.mode, self.logit, self.implementation, k, shapes, x.shape[1:], str(x.dtype), n, ndev,
               budget)
        if key in _BLOCK_CACHE:
            return _BLOCK_CACHE[key]
        feat = jax.eval_shape(row, params, jax.ShapeDtypeStruct((ndev,) + x.shape[1:], x.dtype))
        # Pairs are plain matmuls unless a factorised conv term (S > 1 positions)
        # builds block² × S² temporaries; then more, smaller blocks pay off.
        spatial = isinstance(feat, dict) and any(p.shape[1] > 1 for p, _ in feat.get("fact", ()))
        per_ex = _nbytes(feat) // ndev
        b = min(_block_default(per_ex, k, self.mode), n)
        floor = ndev * math.ceil(8 / ndev)
        while b > floor:
            b = -(-b // ndev) * ndev
            need = _planned_bytes(row, pair, params, jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype))
            if need is None or need <= budget:
                break
            # temporaries grow at most as block², so this ratio lands at or below budget
            b = max(floor, min(b // 2 * 2 - ndev, int(b * 0.9 * math.sqrt(budget / need))))
        _BLOCK_CACHE[key] = b, spatial
        return b, spatial

    def _blocked(self, algo, row, col, pair, k, params, x1, x2, symmetric, as_numpy):
        mesh = _mesh()
        ndev = mesh.devices.size
        cpu = mesh.devices.flat[0].platform == "cpu"

        def ready(out, feats=None):
            # XLA:CPU runs independent executions concurrently on the same cores:
            # with large features, a block's feature pass overlapping the previous
            # pair thrashes both caches (ResNet-20 `full`, n = 256: 16.2-18.1 s
            # dispatched ahead, 15.9 s one at a time); small blocks gain from the
            # overlap. Accelerators queue executions in order anyway.
            if cpu and _nbytes(out if feats is None else feats) >= SERIAL_FEATURE_BYTES:
                jax.block_until_ready(out)
            return out

        n1, n2 = x1.shape[0], x2.shape[0]
        b = self.block_size
        if b is None:
            n = max(n1, n2)
            b, spatial = self._default_block(row, pair, k, params, x1, ndev, n)
            floor = MIN_BLOCK_SIZE // 2 if self.mode == "full" else MIN_BLOCK_SIZE
            nblocks = MIN_BLOCKS if self.mode == "full" or spatial else MIN_BLOCKS // 2
            b = min(b, max(floor, -(-n // nblocks)))
            b = -(-n // -(-n // b))  # equal blocks, none mostly padding
        b = int(min(b, max(n1, n2)))
        b = -(-b // ndev) * ndev  # every block splits evenly over the devices
        rows = NamedSharding(mesh, PartitionSpec("d"))
        starts1 = list(range(0, n1, b))
        starts2 = list(range(0, n2, b))

        def block(x, s):
            xb = _pad_to(x[s:s + b], b)
            return jax.device_put(xb, rows)

        out_shape = (n1, n2) + ((k, k) if self.mode == "full" else ())
        result = None
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

        # With x2=None and row features == column features, a block's features
        # serve both as its row and as the column of earlier rows.
        shared = symmetric and type(algo).col is type(algo).row
        cache_cols = len(starts2) > 1
        col_cache: dict = {}

        def col_feats(j):
            if j in col_cache:
                return col_cache[j]
            f = ready(col(params, block(x2, starts2[j])))
            if cache_cols:
                if _nbytes(f) * len(starts2) <= FEATURE_CACHE_BYTES:
                    col_cache[j] = f
            return f

        if len(starts1) == len(starts2) == 1:  # one block: stay on device
            rf = row(params, block(x1, 0))
            kij = pair(params, rf, rf if shared else col(params, block(x2, 0)))[:n1, :n2]
            return np.asarray(kij) if as_numpy else kij

        # A kernel that fits DEVICE_KERNEL_BYTES is assembled on device (no host
        # round trip, pairs dispatched asynchronously); a larger one, or
        # as_numpy=True, streams block by block into a host buffer.
        itemsize = jnp.dtype(x1.dtype).itemsize
        on_device = not as_numpy and math.prod(out_shape) * itemsize <= DEVICE_KERNEL_BYTES
        tiles: dict = {}
        for i, s1 in enumerate(starts1):
            rf = col_feats(i) if shared else ready(row(params, block(x1, s1)))
            for j, s2 in enumerate(starts2):
                if symmetric and j < i:
                    continue
                cf = rf if shared and i == j else col_feats(j)
                kij = ready(pair(params, rf, cf), rf)
                e1, e2 = min(b, n1 - s1), min(b, n2 - s2)
                if on_device:
                    tiles[i, j] = kij[:e1, :e2]
                    continue
                kij = np.asarray(kij)
                if result is None:
                    result = np.zeros(out_shape, kij.dtype)
                result[s1:s1 + e1, s2:s2 + e2] = kij[:e1, :e2]
                if symmetric and j > i:
                    result[s2:s2 + e2, s1:s1 + e1] = _mirror(kij, self.mode)[:e2, :e1]
            if shared:
                col_cache.pop(i, None)  # later rows only pair with later columns
        if on_device:
            get = lambda i, j: tiles[i, j] if (i, j) in tiles else _mirror(tiles[j, i], self.mode)
            return jnp.concatenate([jnp.concatenate([get(i, j) for j in range(len(starts2))], axis=1)
                                    for i in range(len(starts1))], axis=0)
        return result if as_numpy else jnp.asarray(result)


def _nbytes(tree) -> int:
    return sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(tree))


def _mirror(kij, mode: str):
    """The (j, i) block of a symmetric kernel from its (i, j) block."""
    t = kij.swapaxes(0, 1)
    return t.swapaxes(2, 3) if mode == "full" else t


def empirical_ntk_fn(apply_fn: Callable, *, mode: str = "trace", logit: int = 0,
                                          implementation: str = "auto", block_size: int | None = None,
                                          dtype=None) -> Callable:
    """Returns ``ntk_fn(x1, x2, params)`` computing the empirical NTK.

    Args:
        apply_fn: ``apply_fn(params, x) -> (n, k)`` logits; examples independent
            (eval mode). Use ``flax_apply_fn`` for Flax models so that
            ``structured`` can see the layers.
        mode: ``"full"`` (n1, n2, k, k); ``"trace"`` (n1, n2) = Σ_a Θ[a, a], the
            SUM over logits (neural-tangents' ``trace_axes=(-1,)`` is this / k);
            ``"logit"`` (n1, n2) = Θ[c, c] with c = ``logit``; ``"sum"`` (n1, n2) =
            NTK of the scalar Σ_a f_a.
        logit: the logit c of ``mode="logit"``.
        implementation: ``"jacobian"``, ``"ntvp"``, ``"structured"`` or ``"auto"``
            (``structured`` for ``FlaxApplyFn``, else a cost model). ``structured``
            on an apply_fn without layer information falls back to ``jacobian``.
        block_size: examples per block (rounded up to a multiple of the device
            count); default from a memory budget (``BLOCK_MEMORY_BYTES``).
        dtype: cast params and inputs to this dtype (e.g. ``jnp.float64`` inside
            ``jax.enable_x64(True)``); default keeps theirs. Accumulation runs in
            this dtype with ``Precision.HIGHEST``.

    Returns:
        ``ntk_fn(x1, x2, params, *, as_numpy=False)``: x1 (n1, ...), x2 (n2, ...)
        or ``None`` (= x1, computing only the upper block triangle). Returns a
        ``jax.Array`` (a NumPy array with ``as_numpy=True``). Under ``jax.jit``
        it computes one unblocked block.

    Example:
        >>> apply_fn, params = flax_apply_fn(model, variables)
        >>> ntk_fn = empirical_ntk_fn(apply_fn, mode="trace")
        >>> k = ntk_fn(x, None, params)  # (n, n)
    """
    _check_options(mode, implementation, logit)
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
        raise ValueError(f"block_size={block_size!r} must be a positive int or None.")
    engine = _Engine(apply_fn, mode, int(logit), implementation, block_size, dtype)

    def ntk_fn(x1, x2=None, params=None, *, as_numpy=False):
        if params is None:
            raise ValueError("ntk_fn(x1, x2, params): params is required.")
        return engine(x1, x2, params, as_numpy=as_numpy)

    return ntk_fn


@functools.lru_cache(maxsize=32)
def _cached_ntk_fn(apply_fn, mode, logit, implementation, block_size, dtype):
    return empirical_ntk_fn(apply_fn, mode=mode, logit=logit, implementation=implementation,
                                                    block_size=block_size, dtype=dtype)


def empirical_ntk(apply_fn: Callable, params: PyTree, x1: jax.Array, x2: jax.Array | None = None,
                                    *, mode: str = "trace", logit: int = 0, implementation: str = "auto",
                                    block_size: int | None = None, dtype=None) -> jax.Array:
    """One-shot ``empirical_ntk_fn(apply_fn, ...)(x1, x2, params)``.

    Compiled functions are cached per (apply_fn, options), so repeated calls
    with the same shapes do not recompile.

    Example:
        >>> k = empirical_ntk(apply_fn, params, x, mode="full")  # (n, n, k, k)
    """
    _check_options(mode, implementation, logit)
    fn = _cached_ntk_fn(apply_fn, mode, int(logit), implementation, block_size,
                                            None if dtype is None else jnp.dtype(dtype))
    return fn(x1, x2, params)


def ntk_vp_fn(apply_fn: Callable, params: PyTree, x: jax.Array, *, mode: str = "trace",
                            logit: int = 0) -> Callable[[jax.Array], jax.Array]:
    """Matrix-free kernel-vector product ``v -> K @ v`` on the inputs ``x``.

    Computes J (Jᵀ v) with one linearisation of the network at ``x`` and its
    transpose, never forming K (memory ≈ one forward pass over x plus one
    parameter-sized vector per logit).

    Args:
        apply_fn: ``apply_fn(params, x) -> (n, k)``.
        params: network parameters.
        x: (n, ...) inputs.
        mode: as in ``empirical_ntk_fn``.
        logit: the logit of ``mode="logit"``.

    Returns:
        ``matvec(v)``: v (n,) for scalar modes, (n, k) for ``full``; returns K @ v
        of the same shape (for ``full``, (K v)[i, a] = Σ_{j,b} Θ[i,j,a,b] v[j,b]).

    Example:
        >>> mv = ntk_vp_fn(apply_fn, params, x, mode="trace")
        >>> kv = mv(jnp.ones(x.shape[0]))
    """
    _check_options(mode, "auto", logit)
    x = jnp.asarray(x)
    k = _output_width(apply_fn, params, x, logit, mode)
    n = x.shape[0]
    _check_finite("params", params)
    _check_finite("x", x)

    @jax.jit
    def matvec(v):
        out, push = jax.linearize(lambda p: apply_fn(p, x), params)
        pull = jax.linear_transpose(push, params)
        v = jnp.asarray(v, out.dtype)
        if mode == "full":
            return push(pull(v)[0])
        if mode == "trace":
            cots = v[None, :, None] * jnp.eye(k, dtype=out.dtype)[:, None, :]
            outs = jax.vmap(lambda c: push(pull(c)[0]))(cots)  # (k, n, k)
            return jnp.einsum("ana->n", outs)
        if mode == "logit":
            return push(pull(v[:, None] * jax.nn.one_hot(logit, k, dtype=out.dtype))[0])[:, logit]
        return push(pull(jnp.broadcast_to(v[:, None], (n, k)))[0]).sum(-1)

    def checked(v):
        shape = (n, k) if mode == "full" else (n,)
        if tuple(jnp.shape(v)) != shape:
            raise ValueError(f"v has shape {jnp.shape(v)}; mode={mode!r} on n={n} inputs with "
                                              f"k={k} logits needs {shape}.")
        return matvec(v)

    return checked
