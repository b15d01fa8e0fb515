"""Supervision complexity of many targets in one eNTK, on the dense or the matrix-free path.

The toolkit's tables (``ntkd.complexity.compare_teachers``, ``ntkd complexity``,
the study's complexity steps) measure many targets (teacher checkpoints ×
temperatures, labels) in one student kernel. :func:`resolve_path` decides
whether that kernel is formed (dense Cholesky) or only applied
(:func:`ntkd.matfree.ntk_matvec` + certified block-Lanczos bounds), and
:func:`matfree_complexity` computes every target's certified interval from
ONE streaming operator whose exact trace is computed once.

The ridge convention is the dense path's: the relative ridge λ adds
ρ = λ · tr K / N to the diagonal (N = side of K), with the exact tr K, so a
matrix-free interval brackets the value the dense path computes for the same
λ (up to the dense kernel's own round-off).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ntkd.matfree.bounds import ComplexityBounds, shift_from_ridge, supervision_complexity_bounds
from ntkd.matfree.matvec import ntk_matvec
from ntkd.matfree.plan import available_bytes, choose_path, dense_kernel_bytes

__all__ = [
    "GROUP_COLUMNS",
    "PATHS",
    "MatfreeComplexity",
    "matfree_complexity",
    "parse_bytes",
    "resolve_path",
]

PATHS = ("auto", "dense", "matfree")
GROUP_COLUMNS = 64
"""Targets share one block Krylov space in groups of at most this many columns:
the Lanczos basis is n × columns × steps float64, which this keeps to ~0.5 GiB
at n = 50,000 and 20 steps, while targets with few columns still share steps."""
TRACE_SOURCE = "exact (eNTK diagonal)"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """A memory size in bytes from an int or a string such as ``"8GiB"``, ``"512MiB"``, ``"2e9"``.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (kB,
    MB, GB, TB) powers of 1000; case and a space before the unit do not matter.

    >>> parse_bytes("8GiB"), parse_bytes("512 MiB"), parse_bytes(1000)
    (8589934592, 536870912, 1000)
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, float):
        number, unit = value, ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{value!r} is not a memory size; use bytes or a number with a unit, "
                "e.g. 8GiB, 512MiB, 16GB or 2e9."
            )
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"a memory size must be an int or a string like '8GiB', got {value!r}.")
    size = number * _UNITS[unit]
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(f"a memory size must be at least 1 byte, got {value!r}.")
    return int(size)


def resolve_path(
    path: str,
    n: int,
    *,
    k: int = 1,
    mode: str = "trace",
    memory_budget: int | str | None = None,
) -> str:
    """``"dense"`` or ``"matfree"``: the path that computes the complexity of an n-example kernel.

    Args:
      path: ``"dense"``, ``"matfree"`` or ``"auto"`` (dense when the dense kernel
        and its Cholesky factor, :func:`ntkd.matfree.dense_kernel_bytes`, fit
        ``memory_budget``).
      n: examples; k: logits (for ``mode="full"``); mode: eNTK mode.
      memory_budget: bytes (or a size string, see :func:`parse_bytes`);
        default half of the available host memory (:func:`ntkd.matfree.choose_path`).

    >>> resolve_path("auto", 1000, memory_budget="1GiB"), resolve_path("auto", 50_000, memory_budget="8GiB")
    ('dense', 'matfree')
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    if path != "auto":
        return path
    return choose_path(n, k=k, mode=mode, memory_budget=budget)


def require_ridge(ridge: float, n: int, *, k: int = 1, mode: str = "trace") -> None:
    """Raises the matrix-free path's error for ridge <= 0 (no certified λ_min bound)."""
    if ridge > 0:
        return
    size = f"about {dense_kernel_bytes(n, k=k, mode=mode) / 2**30:.3g} GiB at n={n}"
    raise ValueError(
        f"the matrix-free path needs a relative ridge > 0, got ridge={ridge}: its certified "
        "upper bound uses λ_min(K + ρI) >= ρ = ridge · tr K / n, and with ρ = 0 no lower bound "
        "on λ_min(K) follows from kernel products. Pass ridge=1e-2 (or any ridge > 0), or use "
        f"path='dense' if the dense kernel fits ({size}); with a proven eigenvalue bound call "
        "ntkd.matfree.supervision_complexity_bounds(..., eig_lower=) directly."
    )


@dataclasses.dataclass(frozen=True)
class MatfreeComplexity:
    """Certified complexities of named targets in one eNTK, from :func:`matfree_complexity`.

    Attributes:
      bounds: target name -> :class:`ntkd.matfree.ComplexityBounds` on
        C = tr(Yᵀ(K + ρI)⁻¹Y) (``iterations`` and ``matvecs`` are those of the
        Krylov space the target shared with the others of its group).
      trace: tr K; trace_source: how it was computed (exact: the eNTK's
        diagonal, from cached Jacobians or features, or dense diagonal blocks).
      relative_ridge: λ; shift: ρ = λ · tr K / N.
      n: examples; size: N, the side of K (n·k for ``mode="full"``).
      target_norm2: target name -> ‖Y‖_F².
      groups: the target names of each shared Krylov space, in order.
      matvec_cache: what the products ran on: ``"jacobian"`` or ``"features"``
        (cached per block) or None (streamed through the network).
    """

    bounds: dict[str, ComplexityBounds]
    trace: float
    trace_source: str
    relative_ridge: float
    shift: float
    n: int
    size: int
    target_norm2: dict[str, float]
    groups: tuple[tuple, ...]
    matvec_cache: str | None = None

    @property
    def matvecs(self) -> int:
        """Kernel–vector products (columns) of all groups together (the trace costs none)."""
        return sum(self.bounds[g[0]].matvecs for g in self.groups)

    def columns(self, name: str) -> dict[str, Any]:
        """Table columns of one target (the dense path's names plus the intervals).

        ``complexity``, ``adjusted_complexity`` and ``normalized_complexity`` are
        the midpoint estimate of C and the A, Â it implies; each ``*_lower`` /
        ``*_upper`` pair is the certified interval (when ``upper_certified``).
        """
        b = self.bounds[name]
        a = lambda c: math.sqrt(max(c, 0.0) * self.trace) / self.n  # noqa: E731
        norm2 = self.target_norm2[name]
        a_hat = lambda c: math.sqrt(max(c, 0.0) * self.trace / (self.size * norm2))  # noqa: E731
        return {
            "complexity": b.estimate,
            "complexity_lower": b.lower,
            "complexity_upper": b.upper,
            "relative_gap": b.relative_gap,
            "adjusted_complexity": a(b.estimate),
            "adjusted_lower": a(b.lower),
            "adjusted_upper": a(b.upper),
            "normalized_complexity": a_hat(b.estimate),
            "normalized_lower": a_hat(b.lower),
            "normalized_upper": a_hat(b.upper),
            "iterations": b.iterations,
            "matvecs": b.matvecs,
            "converged": b.converged,
            "upper_certified": b.upper_certified,
            "eig_lower_source": b.eig_lower_source,
            "ridge": self.shift,
            "trace": self.trace,
            "trace_source": self.trace_source,
            "matvec_cache": self.matvec_cache,
        }


def _target_columns(Y: ArrayLike, n: int, size: int, name: str) -> np.ndarray:
    arr = np.asarray(Y, np.float64)
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"target {name!r} must have shape ({n}, k) or ({n},), got {np.shape(Y)}.")
    return arr.reshape(size, -1) if size != n else arr


def matfree_complexity(
    apply_fn: Callable,
    params: Any,
    x: ArrayLike,
    targets: Mapping[str, ArrayLike],
    *,
    mode: str = "trace",
    ridge: float,
    rtol: float = 1e-2,
    max_iters: int | None = None,
    block_size: int = 512,
    group_columns: int = GROUP_COLUMNS,
    memory_budget: int | str | None = None,
) -> MatfreeComplexity:
    """Certified intervals on the complexity of every target in the eNTK of ``apply_fn`` on x.

    One streaming operator (:func:`ntkd.matfree.ntk_matvec`, float64 products
    under a local ``jax.enable_x64``, as certification needs) serves every
    target; its exact trace (``NtkMatvec.trace``) is computed once and gives
    ρ = λ · tr K / N (:func:`ntkd.matfree.shift_from_ridge`), the dense path's
    ridge. Targets are bounded by :func:`ntkd.matfree.supervision_complexity_bounds`
    in groups sharing one block Krylov space (at most ``group_columns``
    columns per group).

    Args:
      apply_fn: ``apply_fn(params, x) -> (batch, k)`` (e.g. ``ntkd.ntk.flax_apply_fn``).
      params: parameter pytree.
      x: (n, ...) inputs.
      targets: name -> Y (n, k) or (n,); for ``mode="full"`` Y (n, k) is
        flattened to vec(Y) (row i·k + a), as the dense full kernel does.
      mode: eNTK mode (``trace``, ``sum``, ``logit`` or ``full``).
      ridge: relative ridge λ > 0 (ρ = 0 certifies no upper bound).
      rtol: stop when (upper − lower) / lower ≤ rtol for every target of a group.
      max_iters: cap on block Lanczos steps per group.
      block_size: examples per device per streamed block.
      group_columns: columns per shared Krylov space.
      memory_budget: bytes (or a size string, :func:`parse_bytes`); half of it
        may hold cached per-example Jacobians or structured features
        (``ntk_matvec(cache="auto", cache_bytes=...)``), which make every
        product a pass over memory instead of two passes through the network.
        Default: a quarter of the available host memory.

    Returns:
      A :class:`MatfreeComplexity`; ``.columns(name)`` gives a table row's columns.

    Raises:
      ValueError: ridge ≤ 0 (with the fix), a target of the wrong shape.

    A linear model f(x) = xW with k = 2 logits has the trace kernel K = 2·xxᵀ,
    here diag(2, 2, 2, 0), so ρ = 0.1 · 6 / 4 and C = 3/2.15 + 1/0.15:

    >>> res = matfree_complexity(
    ...     lambda p, x: x @ p["w"], {"w": np.ones((3, 2))}, np.eye(4, 3), {"y": np.ones(4)},
    ...     ridge=0.1)
    >>> b = res.bounds["y"]
    >>> res.trace, round(b.lower, 6), round(b.upper, 6), b.exhausted
    (6.0, 8.062016, 8.062016, True)
    """
    if not targets:
        raise ValueError("targets is empty; pass {name: (n, k) array}.")
    n = int(np.shape(x)[0])
    k = 1
    if mode == "full":
        probe = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), np.asarray(x).dtype)
        k = int(jax.eval_shape(apply_fn, params, probe).shape[1])
    require_ridge(ridge, n, k=k, mode=mode)
    with jax.enable_x64(True):
        cache_bytes = (
            available_bytes() // 4 if memory_budget is None else parse_bytes(memory_budget) // 2
        )
        mv = ntk_matvec(
            apply_fn,
            params,
            x,
            mode=mode,
            block_size=block_size,
            dtype=jnp.float64,
            cache_bytes=cache_bytes,
        )
        cols = {name: _target_columns(Y, n, mv.size, name) for name, Y in targets.items()}
        trace = mv.trace()
        shift = shift_from_ridge(ridge, trace, mv.size)
        groups, current, width = [], {}, 0
        for name, Y in cols.items():
            if current and width + Y.shape[1] > group_columns:
                groups.append(current)
                current, width = {}, 0
            current[name] = Y
            width += Y.shape[1]
        groups.append(current)
        bounds = {}
        for group in groups:
            bounds.update(
                supervision_complexity_bounds(
                    mv, dict(group), shift=shift, rtol=rtol, max_iters=max_iters
                )
            )
    return MatfreeComplexity(
        bounds=bounds,
        trace=float(trace),
        trace_source=TRACE_SOURCE,
        relative_ridge=float(ridge),
        shift=float(shift),
        n=n,
        size=mv.size,
        target_norm2={name: float(np.sum(Y * Y)) for name, Y in cols.items()},
        groups=tuple(tuple(g) for g in groups),
        matvec_cache=mv.cache_kind,
    )
