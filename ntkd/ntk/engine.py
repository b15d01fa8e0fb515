"""Entry points: ``empirical_ntk_fn`` / ``empirical_ntk`` for every model kind, with a cache.

Compiled pieces live in an :class:`Engine`, cached per (model structure,
options); inside it per (implementation, params/state/input shapes and
dtypes). New params or state of the same structure, a fresh ``model.apply``
bound method of the same module, or a new ``ntk_fn`` for the same model
reuse them: nothing is recompiled.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ntkd.ntk import auto, blocking
from ntkd.ntk._util import (
    Hashed,
    cast,
    check_finite,
    finite_flag,
    host_bool,
    is_tracer,
    leaf_groups,
    remember,
)
from ntkd.ntk.algorithm import Problem
from ntkd.ntk.jacobian import Jacobian
from ntkd.ntk.models import ApplyFn, Model, split_for_engine
from ntkd.ntk.modes import Mode
from ntkd.ntk.ntvp import NtkVectorProducts
from ntkd.ntk.options import BlockOptions, ContractionOptions
from ntkd.ntk.structured import Structured

PyTree = Any
Kernel = jax.Array | np.ndarray | dict[str, jax.Array | np.ndarray]
"""A kernel, or ``{group: kernel}`` with ``by_layer=True``."""

IMPLEMENTATIONS = ("auto", "jacobian", "ntvp", "structured")
"""Exact algorithms; ``auto`` measures the candidates on the actual shapes."""

ENGINE_CACHE_SIZE = 64
FUSED_PER_SIZE = 4  # warm fused executables kept per batch size (structures, dtypes)


def output_width(apply_fn: ApplyFn, params, x: jax.Array, mode: Mode) -> tuple[int, Any]:
    """(k, dtype) of the logits; checks that the model maps (b, ...) to (b, k)."""
    spec = jax.ShapeDtypeStruct((2,) + x.shape[1:], x.dtype)
    try:
        out = jax.eval_shape(apply_fn.fn, params, apply_fn.state, spec)
    except Exception as e:
        raise ValueError(
            f"calling the {apply_fn.kind} model on a batch of 2 inputs of per-example shape "
            f"{x.shape[1:]} failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[0] != 2:
        shape = getattr(out, "shape", type(out).__name__)
        hint = (
            "an Equinox module must map one example to (k,) logits"
            if apply_fn.kind == "equinox"
            else "wrap it, e.g. `lambda p, x: f(p, x).reshape(x.shape[0], -1)`"
        )
        raise ValueError(
            f"the model must return logits of shape (batch, k); for a batch of 2 "
            f"inputs it returned {shape}: {hint}."
        )
    k = out.shape[1]
    if mode.name == "logit" and mode.logit >= k:
        raise ValueError(f"logit={mode.logit} is out of range for k={k} logits; use 0..{k - 1}.")
    return k, out.dtype


def _spec(tree):
    leaves, treedef = jax.tree.flatten(tree)
    try:  # arrays (the common case) without jnp's dispatch or an ABC instance check
        return treedef, tuple((l.shape, l.dtype) for l in leaves)
    except AttributeError:  # Python scalars among the leaves
        return treedef, tuple((jnp.shape(l), jnp.result_type(l)) for l in leaves)


def _as_array(x):
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


class Engine:
    """Compiled pieces shared by every call with one model structure and options."""

    def __init__(
        self,
        fn: Callable,
        mode: Mode,
        implementation: str,
        by_layer: bool,
        dtype,
        blocks: BlockOptions,
        contraction: ContractionOptions,
    ):
        self.fn, self.mode, self.implementation, self.by_layer = fn, mode, implementation, by_layer
        self.dtype, self.blocks, self.contraction = dtype, blocks, contraction
        self._compiled: dict = {}
        self._blocks: dict = {}
        self._auto: dict = {}
        self._problems: dict = {}
        self._sigs: dict = {}
        # {n: {sig: executable}}: one-block symmetric kernels of n examples, as registered
        self._fused: dict = {}

    def problem(self, sig, apply_fn: ApplyFn, params, state, x) -> Problem:
        """The algorithms' problem, built once per structure signature: k and the logits'
        dtype from one abstract evaluation, the groups from the params treedef's paths."""
        if sig not in self._problems:
            k, dtype = output_width(
                ApplyFn(self.fn, state, None, apply_fn.kind), params, x, self.mode
            )
            self._problems[sig] = Problem(
                self.fn,
                self.mode,
                k,
                dtype,
                tuple(leaf_groups(params)),
                self.by_layer,
                self.contraction,
            )
        return self._problems[sig]

    def compiled(self, impl: str, sig, problem: Problem, params, state, x) -> blocking.Compiled:
        key = (impl, sig)
        if key not in self._compiled:
            if impl == "structured":
                one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
                algo = Structured.build(problem, params, state, one)
            else:
                algo = {"jacobian": Jacobian, "ntvp": NtkVectorProducts}[impl](problem)
            self._compiled[key] = blocking.Compiled(algo, blocking.local_mesh())
        return self._compiled[key]

    def block(self, impl, sig, c, k, params, state, x, n) -> int:
        if self.blocks.block_size is not None:
            return self.blocks.block_size
        key = (impl, sig, n, blocking.memory_budget(self.blocks))
        if key not in self._blocks:
            b = blocking.plan_block(c, self.mode, k, params, state, x, n, self.blocks)
            self._blocks[key] = _agreed(range(1, n + 1), b)
        return self._blocks[key]

    def choose(self, sig, problem, params, state, x1, n1, n2, symmetric) -> str:
        key = (sig, n1, n2, symmetric)
        if key not in self._auto:
            cands = []
            options = auto.candidates(
                self.fn, self.mode, problem.k, params, state, x1, n1, n2, symmetric
            )
            for impl, flops in options:
                if len(cands) == 1 and auto.fast_enough(cands[0]):
                    break  # compiling another candidate would cost more than it could save
                best = min((c.estimate for c in cands), default=float("inf"))
                if auto.cannot_win(flops, best, problem.dtype):
                    continue  # its flops alone would take longer than the best kernel
                c = self.compiled(impl, sig, problem, params, state, x1)
                b = self.block(impl, sig, c, problem.k, params, state, x1, max(n1, n2))
                b = -(-min(b, max(n1, n2)) // c.ndev) * c.ndev
                nb1, nb2 = -(-n1 // b), -(-n2 // b)
                pairs = nb1 * (nb1 + 1) // 2 if symmetric else nb1 * nb2
                xb = jax.device_put(blocking._pad_to(x1[:b], b), c.rows)
                blocks = nb1 if symmetric and c.algo.shares_features else nb1 + nb2
                cands.append(auto.Candidate(impl, c, params, state, xb, blocks, pairs, symmetric))
            pick = cands[0].name if len(cands) == 1 else auto.choose(cands)
            self._auto[key] = _agreed(IMPLEMENTATIONS, pick)
        return self._auto[key]

    def _prepare(self, apply_fn: ApplyFn, params, x1, x2):
        """Cast and checked inputs, the structure signature, k and the problem."""
        params = cast(params, self.dtype)
        state = cast(apply_fn.state, self.dtype)
        x1 = cast(_as_array(x1), self.dtype)
        symmetric = x2 is None
        x2 = x1 if symmetric else cast(_as_array(x2), self.dtype)
        if x1.ndim < 1 or x1.shape[0] == 0 or x2.ndim < 1 or x2.shape[0] == 0:
            raise ValueError(f"x1 {x1.shape} / x2 {x2.shape} must have a non-empty batch axis.")
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(
                f"x1 has per-example shape {x1.shape[1:]} but x2 has {x2.shape[1:]}; "
                "both must hold examples of the same shape (batch first)."
            )
        sig = self._signature(params, state, x1)
        problem = self.problem(sig, apply_fn, params, state, x1)
        return params, state, x1, x2, symmetric, sig, problem.k, problem.dtype, problem

    def _signature(self, params, state, x):
        """The interned structure signature: params' and state's trees, leaf shapes and
        dtypes, the per-example input shape and dtype."""
        raw = (_spec(params), _spec(state), x.shape[1:], x.dtype)
        sig = self._sigs.get(raw)
        if sig is None:
            sig = self._sigs.setdefault(raw, Hashed(raw))
        return sig

    def _warm_fused(self, apply_fn: ApplyFn, params, x):
        """The kernel of a warm one-block symmetric call (one executable: features, pair and
        the inputs' finiteness flag), or None when the call takes the general path.

        It skips the general path's planning, which a warm call repeats to the same end,
        and its structure signature: the executable, compiled ahead of time for the
        arguments of the call that registered it, checks their tree, shapes and dtypes
        itself and raises TypeError on any other (or on tracers). MLP `trace`, n = 128,
        2 CPU cores, each call after another kernel (Python runs cache-cold): planning
        ~0.25 ms, then signature and tracer check ~0.1 ms, of a 3 ms call.
        """
        if self.dtype is not None or not isinstance(x, jax.Array) or x.ndim < 1:
            return None
        for exe in reversed(self._fused.get(x.shape[0], {}).values()):
            try:
                kij, finite = exe(params, apply_fn.state, x)
            except (TypeError, ValueError):  # another structure, shape, dtype or placement
                continue
            if not host_bool(finite):
                self._name_nonfinite(params, x, None)
            return self._unwrap(kij)
        return None

    @staticmethod
    def _name_nonfinite(params, x1, x2):
        """Raises naming the first non-finite input (after a failed finiteness flag; none
        raises when the flag was an overflowing sum of finite values)."""
        check_finite("params", params)
        check_finite("x1", x1)
        if x2 is not None:
            check_finite("x2", x2)

    def implementation_for(self, apply_fn: ApplyFn, params, x1, x2) -> str:
        """The implementation a call with these arguments runs (``auto``: measured, cached)."""
        params, state, x1, x2, symmetric, sig, _, _, problem = self._prepare(
            apply_fn, params, x1, x2
        )
        return self._implementation(sig, problem, params, state, x1, x2, symmetric)

    def _implementation(self, sig, problem, params, state, x1, x2, symmetric) -> str:
        if self.implementation != "auto":
            return self.implementation
        n1, n2 = x1.shape[0], x2.shape[0]
        return self.choose(sig, problem, params, state, x1, n1, n2, symmetric)

    def __call__(self, apply_fn: ApplyFn, params, x1, x2, *, as_numpy=False):
        if x2 is None and not as_numpy and self._fused:
            out = self._warm_fused(apply_fn, params, x1)
            if out is not None:
                return out
        params, state, x1, x2, symmetric, sig, k, out_dtype, problem = self._prepare(
            apply_fn, params, x1, x2
        )
        groups = sorted(set(problem.groups)) if self.by_layer else [""]
        if is_tracer(x1, x2, params, state):
            impl = "structured" if self.implementation == "auto" else self.implementation
            algo = self.compiled(impl, sig, problem, params, state, x1).algo
            r = algo.row(params, state, x1)
            if symmetric and algo.shares_features:  # one feature pass; symmetric Grams
                return self._unwrap(algo.pair(params, state, r, r))
            col = algo.row if algo.shares_features else algo.col
            return self._unwrap(algo.pair(params, state, r, col(params, state, x2)))
        inputs = (params, x1, None if symmetric else x2)

        def require_finite(flag):  # waits for the flag; on failure names the culprit
            if flag is not None and not host_bool(flag):
                self._name_nonfinite(params, x1, None if symmetric else x2)

        n = max(x1.shape[0], x2.shape[0])
        # A warm call whose kernel is one block stays on the device: its finiteness check
        # is awaited after the kernel is dispatched (a one-block symmetric kernel on one
        # device computes the flag in its own executable; MLP `trace`, n = 128: a separate
        # awaited check cost ~0.4 ms of 3.6 ms). Anything else (a first call, which
        # compiles and may time candidates; several blocks; a host kernel) is checked
        # first, so bad input fails before any work.
        impl = self._warm_implementation(sig, n, symmetric)
        deferred = (
            impl is not None
            and not as_numpy
            and (impl, sig) in self._compiled
            and self._one_block(impl, sig, n)
        )
        if not deferred:
            require_finite(finite_flag(inputs))
            impl = self._implementation(sig, problem, params, state, x1, x2, symmetric)
        c = self.compiled(impl, sig, problem, params, state, x1)
        b = self.block(impl, sig, c, k, params, state, x1, n)
        out, finite = blocking.run(
            c,
            self.mode,
            k,
            params,
            state,
            x1,
            x2,
            symmetric,
            b,
            self.blocks,
            as_numpy,
            groups,
            out_dtype,
        )
        if deferred:
            require_finite(finite if finite is not None else finite_flag(inputs))
        if finite is not None and b == n and impl == self._warm_implementation(sig, n, symmetric):
            # The next such call takes _warm_fused (lowering finds jit's executable: no
            # compile); FUSED_PER_SIZE structures per n are kept, the first registered dropped.
            known = self._fused.setdefault(n, {})
            if sig not in known:
                known[sig] = c.whole_sym.lower(params, state, x1).compile()
                if len(known) > FUSED_PER_SIZE:
                    del known[next(iter(known))]
        return self._unwrap(out)

    def _warm_implementation(self, sig, n: int, symmetric: bool) -> str | None:
        """The implementation of a call decided earlier (fixed, or auto's cached pick)."""
        if self.implementation != "auto":
            return self.implementation
        return self._auto.get((sig, n, n, True)) if symmetric else None

    def _one_block(self, impl, sig, n: int) -> bool:
        """Whether a kernel of n examples is one block on this process (block size known)."""
        if jax.process_count() > 1:
            return False
        if self.blocks.block_size is not None:
            return n <= self.blocks.block_size
        key = (impl, sig, n, blocking.memory_budget(self.blocks))
        return key in self._blocks and n <= self._blocks[key]

    def _unwrap(self, out: dict):
        return dict(sorted(out.items())) if self.by_layer else out[""]


def _agreed(choices, mine):
    """Process 0's choice in every process (timings and memory may differ between hosts,
    and every process must deal out the same blocks)."""
    if jax.process_count() == 1:
        return mine
    from jax.experimental import multihost_utils

    choices = list(choices)
    index = multihost_utils.broadcast_one_to_all(np.array(choices.index(mine), np.int32))
    return choices[int(index)]


_ENGINES: collections.OrderedDict = collections.OrderedDict()


def _engine(key, options: tuple, fn) -> Engine:
    full = (key, options)
    if full in _ENGINES:
        _ENGINES.move_to_end(full)
        return _ENGINES[full]
    mode, implementation, by_layer, dtype, blocks, contraction = options
    engine = Engine(fn, mode, implementation, by_layer, dtype, blocks, contraction)
    return remember(_ENGINES, full, engine, ENGINE_CACHE_SIZE)


def _bound(model, params, options: tuple) -> tuple[Engine, ApplyFn, PyTree]:
    """(cached engine, apply_fn, params) of a model under one set of options."""
    apply_fn, p = split_for_engine(model, params)
    return _engine(apply_fn.key, options, apply_fn.fn), apply_fn, p


_OPTIONS: collections.OrderedDict = collections.OrderedDict()


def _options(
    mode, logit, implementation, by_layer, block_size, dtype, blocks, contraction
) -> tuple:
    """The checked option set (one interned object per distinct arguments: warm calls
    neither rebuild nor re-hash it)."""
    raw = (mode, logit, implementation, by_layer, block_size, dtype, blocks, contraction)
    key = (raw, tuple(map(type, raw)))  # logit=True must not find logit=1's checked options
    try:
        found = _OPTIONS.get(key)
    except TypeError:  # an unhashable argument: checked below, not remembered
        return _checked_options(*raw)
    if found is None:
        found = remember(_OPTIONS, key, Hashed(_checked_options(*raw)), ENGINE_CACHE_SIZE)
    return found


def _checked_options(
    mode, logit, implementation, by_layer, block_size, dtype, blocks, contraction
) -> tuple:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is unknown; use one of {IMPLEMENTATIONS}."
        )
    if mode == "logit" and (
        not isinstance(logit, (int, np.integer)) or isinstance(logit, bool) or logit < 0
    ):
        raise ValueError(f"logit={logit!r} must be a non-negative int logit index.")
    blocks = blocks or BlockOptions()
    if block_size is not None:
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive int or None.")
        blocks = BlockOptions(**{**blocks.__dict__, "block_size": int(block_size)})
    m = Mode(mode, int(logit) if mode == "logit" else 0)
    if dtype is not None and jnp.dtype(dtype).itemsize == 8 and not jax.config.jax_enable_x64:
        # JAX would silently compute in 32 bits: refuse instead of returning a float32 kernel.
        raise ValueError(
            f"dtype={jnp.dtype(dtype).name} needs 64-bit JAX; call "
            "jax.config.update('jax_enable_x64', True) before building the kernel, or use float32."
        )
    return (
        m,
        implementation,
        bool(by_layer),
        None if dtype is None else jnp.dtype(dtype),
        blocks,
        contraction or ContractionOptions(),
    )


def empirical_ntk_fn(
    model: Model,
    *,
    mode: str = "trace",
    logit: int = 0,
    implementation: str = "auto",
    by_layer: bool = False,
    block_size: int | None = None,
    dtype: DTypeLike | None = None,
    blocks: BlockOptions | None = None,
    contraction: ContractionOptions | None = None,
) -> Callable:
    """Returns ``ntk_fn(x1, x2=None, params=None)`` computing the empirical NTK of ``model``.

    Θ(x, x')[a, b] = Σ_p ∂f_a(x)/∂θ_p · ∂f_b(x')/∂θ_p over the differentiated
    parameters θ (Novak, Sohl-Dickstein, Schoenholz, "Fast Finite Width Neural
    Tangent Kernel", ICML 2022, for the three algorithms).

    Args:
        model: a Flax Linen module (``params`` = its variables; only
            ``"params"`` differentiated, other collections fixed, eval mode), a
            Flax NNX module or an Equinox module (they own their parameters:
            ``params=None``; NNX differentiates ``nnx.Param``s, Equinox its
            inexact arrays, both in eval mode with other state fixed), a
            stateful Equinox module as the pair ``(model, state)`` of
            ``eqx.nn.make_with_state`` (``params=None``; the ``eqx.nn.State``
            held fixed, ``eqx.nn.inference_mode``, the returned new state
            discarded), an ``apply_fn`` from :func:`as_apply_fn` /
            :func:`flax_apply_fn`, or any ``f(params, x) -> (batch, k)`` (all of
            ``params`` differentiated).
            Examples must be independent (eval mode).
        mode: ``"full"`` (n1, n2, k, k); ``"trace"`` (n1, n2) = Σ_a Θ[a, a], the
            SUM over logits (neural-tangents' ``trace_axes=(-1,)`` is this / k);
            ``"logit"`` (n1, n2) = Θ[c, c], c = ``logit``; ``"sum"`` (n1, n2) =
            NTK of Σ_a f_a.
        logit: the logit c of ``mode="logit"``.
        implementation: ``"structured"``, ``"jacobian"``, ``"ntvp"`` or ``"auto"``
            (measures the candidates on the actual shapes once, then caches).
        by_layer: return ``{group: kernel}`` per parameter group (a leaf's path
            without its last key: a layer), summing to the whole kernel.
        block_size: examples per block (shortcut for ``blocks.block_size``).
        dtype: cast params, state and inputs to this dtype (e.g. ``jnp.float64``
            inside ``jax.enable_x64(True)``); accumulation uses it with
            ``Precision.HIGHEST``.
        blocks: :class:`BlockOptions` of the blocking driver.
        contraction: :class:`ContractionOptions` of the feature/pair computations.

    Returns:
        ``ntk_fn(x1, x2=None, params=None, *, as_numpy=False)``: x1 (n1, ...), x2
        (n2, ...) or None (= x1; only the upper block triangle is computed).
        Returns a ``jax.Array`` (NumPy with ``as_numpy=True``), or a dict of them
        with ``by_layer``. Under ``jax.jit`` it computes one unblocked block.

    Example:
        >>> ntk_fn = empirical_ntk_fn(model, mode="trace")   # Linen
        >>> k = ntk_fn(x, None, variables)                    # (n, n)
        >>> k = empirical_ntk_fn(nnx_model)(x)                # NNX / Equinox
        >>> k = empirical_ntk_fn(eqx.nn.make_with_state(Net)(key))(x)  # Equinox + State
    """
    options = _options(
        mode, logit, implementation, by_layer, block_size, dtype, blocks, contraction
    )

    def ntk_fn(x1, x2=None, params=None, *, as_numpy=False):
        engine, apply_fn, p = _bound(model, params, options)
        return engine(apply_fn, p, x1, x2, as_numpy=as_numpy)

    return ntk_fn


def empirical_ntk(
    model: Model,
    params: PyTree = None,
    x1: jax.Array = None,
    x2: jax.Array | None = None,
    *,
    mode: str = "trace",
    logit: int = 0,
    implementation: str = "auto",
    by_layer: bool = False,
    block_size: int | None = None,
    dtype: DTypeLike | None = None,
    blocks: BlockOptions | None = None,
    contraction: ContractionOptions | None = None,
    as_numpy: bool = False,
) -> Kernel:
    """One-shot ``empirical_ntk_fn(model, ...)(x1, x2, params)``; options as there.

    Compiled functions are cached per (model structure, options, shapes,
    dtypes): repeated calls, e.g. over checkpoints, compile nothing.

    Example:
        >>> k = empirical_ntk(model, variables, x, mode="full")   # (n, n, k, k)
        >>> k = empirical_ntk(eqx_model, None, x)                 # (n, n)
        >>> k = empirical_ntk((eqx_model, state), None, x)        # stateful Equinox
    """
    if x1 is None:
        raise ValueError("empirical_ntk(model, params, x1, x2=None): x1 is required.")
    options = _options(
        mode, logit, implementation, by_layer, block_size, dtype, blocks, contraction
    )
    engine, apply_fn, p = _bound(model, params, options)
    return engine(apply_fn, p, x1, x2, as_numpy=as_numpy)


def chosen_implementation(
    model: Model,
    params: PyTree = None,
    x1: jax.Array = None,
    x2: jax.Array | None = None,
    *,
    mode: str = "trace",
    logit: int = 0,
    implementation: str = "auto",
    by_layer: bool = False,
    block_size: int | None = None,
    dtype: DTypeLike | None = None,
    blocks: BlockOptions | None = None,
    contraction: ContractionOptions | None = None,
) -> str:
    """The implementation :func:`empirical_ntk` runs for these arguments.

    With ``implementation="auto"`` this is the measured choice (made once per
    model structure, options and shapes, then cached; the same decision the
    kernel call uses, so calling this first costs nothing later). Options as in
    :func:`empirical_ntk_fn`.

    Example:
        >>> chosen_implementation(model, variables, x, mode="trace")
        'structured'
    """
    if x1 is None:
        raise ValueError("chosen_implementation(model, params, x1, x2=None): x1 is required.")
    options = _options(
        mode, logit, implementation, by_layer, block_size, dtype, blocks, contraction
    )
    engine, apply_fn, p = _bound(model, params, options)
    return engine.implementation_for(apply_fn, p, x1, x2)
