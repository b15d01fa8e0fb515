"""Kernel similarity: alignment, CKA, target–kernel alignment spectrum, and
their matrix-free estimators (docs/definitions.md#ntk-similarity).

Dense functions take kernel matrices (``(n, n)`` or full ``(n, n, k, k)``,
flattened in the order described in :mod:`ntkd.complexity`) and compute in
float64 on the host. The estimators need only kernel-vector products
``matvec(v) -> K v`` such as ``ntkd.ntk.ntk_vp_fn``, and return an
:class:`Estimate` with a standard error.

References: Harutyunyan et al., "Supervision Complexity and its Role in
Knowledge Distillation", ICLR 2023, arXiv 2301.12245 (alignment of the
student's NTK with the targets); Cristianini et al., "On kernel-target
alignment", NeurIPS 2001; Cortes, Mohri, Rostamizadeh, "Algorithms for
learning kernels based on centered alignment", JMLR 2012 (CKA); Hutchinson,
1989; Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal stochastic trace
estimation", SOSA 2021.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from ntkd.complexity import _kernel_matrix, _target_matrix

__all__ = [
    "Estimate",
    "alignment_spectrum",
    "estimate_alignment",
    "hutchinson_trace",
    "hutchpp_trace",
    "kernel_alignment",
]


def _centered(mat: np.ndarray, n: int, k: int | None) -> np.ndarray:
    """H K H with H = I − 11ᵀ/n acting on the example axes (⊗ I_k for full)."""
    blocks = mat.reshape(n, k or 1, n, k or 1)
    blocks = blocks - blocks.mean(axis=0, keepdims=True)
    blocks = blocks - blocks.mean(axis=2, keepdims=True)
    return blocks.reshape(mat.shape)


def kernel_alignment(K1: ArrayLike, K2: ArrayLike, *, centered: bool = False) -> float:
    """Kernel alignment ``⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)``, or CKA if centred.

    Centred alignment (CKA) replaces each K by ``H K H`` with
    ``H = I − 11ᵀ/n`` over examples (``H ⊗ I_k`` for full kernels), which
    makes it invariant to adding a constant ``c·11ᵀ``. Both forms are
    invariant to positive rescaling of either kernel, and a kernel is aligned
    with itself at 1 (Cristianini et al., NeurIPS 2001; Cortes, Mohri,
    Rostamizadeh, JMLR 2012; see docs/definitions.md#ntk-similarity).

    Args:
      K1: ``(n, n)`` or ``(n, n, k, k)`` kernel.
      K2: kernel of the same shape on the same inputs.
      centered: compute CKA.

    Returns:
      The alignment in ``[-1, 1]`` as a float.

    Raises:
      ValueError: on mismatched shapes, bad entries, or a zero (centred) kernel.

    >>> round(kernel_alignment(np.eye(3), 2.0 * np.eye(3)), 12)
    1.0
    """
    m1, n1, k1, _ = _kernel_matrix(K1, "K1")
    m2, n2, k2, _ = _kernel_matrix(K2, "K2")
    if np.shape(K1) != np.shape(K2):
        raise ValueError(
            f"K1 and K2 must have the same shape, got {np.shape(K1)} and {np.shape(K2)}."
        )
    if centered:
        m1, m2 = _centered(m1, n1, k1), _centered(m2, n2, k2)
    norm1, norm2 = np.linalg.norm(m1), np.linalg.norm(m2)
    if norm1 == 0 or norm2 == 0:
        which = "K1" if norm1 == 0 else "K2"
        raise ValueError(
            f"{which} has zero{' centred' if centered else ''} Frobenius norm; its "
            "alignment is undefined (a constant kernel has zero centred norm)."
        )
    return float(np.sum(m1 * m2) / (norm1 * norm2))


def alignment_spectrum(K: ArrayLike, Y: ArrayLike) -> np.ndarray:
    """Fraction of ``‖Y‖²_F`` captured by the top-m eigenvectors of K.

    ``curve[m-1] = Σ_{i<=m} ‖u_iᵀ Y‖² / ‖Y‖²_F`` with ``u_1, u_2, ...`` the
    eigenvectors of K by decreasing eigenvalue. A curve rising fast means
    the targets live in the kernel's top eigenspace, i.e. are easy to learn
    (docs/definitions.md#targetkernel-alignment-spectrum; Harutyunyan et al., ICLR 2023,
    arXiv 2301.12245).

    Args:
      K: ``(n, n)`` or full ``(n, n, k, k)`` kernel.
      Y: ``(n, k)`` or ``(n,)`` targets (``(n, k)`` for a full kernel).

    Returns:
      ``(N,)`` float64 non-decreasing curve ending at 1, N = n (n·k if full).

    >>> alignment_spectrum(np.diag([1.0, 3.0]), np.array([1.0, 1.0]))
    array([0.5, 1. ])
    """
    mat, n, k, _ = _kernel_matrix(K)
    rhs = _target_matrix(Y, n, k)
    total = np.sum(rhs * rhs)
    if total == 0:
        raise ValueError("Y is all zeros; its alignment spectrum is undefined.")
    _, vecs = np.linalg.eigh(mat)
    energy = np.sum((vecs[:, ::-1].T @ rhs) ** 2, axis=1)
    return np.cumsum(energy) / total


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error.

    Attributes:
      value: the estimate.
      stderr: its standard error (sample standard deviation of the probe
        terms over sqrt(#probes); delta method for ratios).
      num_matvecs: kernel-vector products used (per kernel).
    """

    value: float
    stderr: float
    num_matvecs: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Normal confidence interval ``value ± z · stderr`` (z=1.96: 95%)."""
        return self.value - z * self.stderr, self.value + z * self.stderr

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _operator(matvec: Callable, shape: tuple[int, ...]):
    """Turns matvec on ``shape`` arrays into a float64 map on (N, m) columns."""

    def op(V: np.ndarray) -> np.ndarray:
        cols = [np.asarray(matvec(v.reshape(shape)), np.float64).reshape(-1) for v in V.T]
        return np.stack(cols, axis=1)

    return op


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)


def _rademacher(key: jax.Array, size: int, m: int) -> np.ndarray:
    return np.asarray(jax.random.rademacher(key, (size, m)), dtype=np.float64)


def _mean_and_stderr(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.size))


def hutchinson_trace(
    matvec: Callable,
    shape: int | tuple[int, int],
    *,
    num_probes: int = 32,
    key: jax.Array | None = None,
) -> Estimate:
    """Hutchinson's estimate of ``tr K`` from Rademacher probes ``zᵀ K z``.

    Unbiased; the standard error is the probe terms' sample standard deviation
    over ``sqrt(num_probes)`` (Hutchinson, 1989).

    Args:
      matvec: ``v -> K v`` on arrays of ``shape``.
      shape: ``n`` (scalar kernel) or ``(n, k)`` (full kernel).
      num_probes: probes (= matvecs), at least 2.
      key: ``jax.random`` key; default ``jax.random.key(0)``.

    Returns:
      An :class:`Estimate` of tr K.

    >>> est = hutchinson_trace(lambda v: 2.0 * v, 10, num_probes=8)
    >>> est.value, est.stderr
    (20.0, 0.0)
    """
    shape = _shape(shape)
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 for an error bar, got {num_probes}.")
    key = jax.random.key(0) if key is None else key
    Z = _rademacher(key, math.prod(shape), num_probes)
    samples = np.sum(Z * _operator(matvec, shape)(Z), axis=0)
    value, stderr = _mean_and_stderr(samples)
    return Estimate(value, stderr, num_probes)


def hutchpp_trace(
    matvec: Callable,
    shape: int | tuple[int, int],
    *,
    num_matvecs: int = 48,
    key: jax.Array | None = None,
) -> Estimate:
    """Hutch++ estimate of ``tr K`` (Meyer, Musco, Musco, Woodruff, SOSA 2021).

    A third of the matvecs sketch the top range Q of K, whose trace
    ``tr(Qᵀ K Q)`` is taken exactly (another third); the last third runs
    Hutchinson on the deflated ``(I − QQᵀ) K (I − QQᵀ)``. The standard error is
    that of the Hutchinson part, conditional on Q. Far more accurate than
    Hutchinson for the fast-decaying spectra of eNTKs.

    Args:
      matvec: ``v -> K v`` on arrays of ``shape``.
      shape: ``n`` or ``(n, k)``.
      num_matvecs: total matvecs, at least 6.
      key: ``jax.random`` key; default ``jax.random.key(0)``.

    Returns:
      An :class:`Estimate` of tr K.

    >>> K = np.diag(np.arange(1.0, 7.0))
    >>> round(hutchpp_trace(lambda v: K @ v, 6, num_matvecs=18).value, 6)
    21.0
    """
    shape = _shape(shape)
    if num_matvecs < 6:
        raise ValueError(f"num_matvecs must be >= 6, got {num_matvecs}.")
    key = jax.random.key(0) if key is None else key
    size = math.prod(shape)
    op = _operator(matvec, shape)
    sketch = num_matvecs // 3
    num_probes = num_matvecs - 2 * sketch
    key_s, key_g = jax.random.split(key)
    Q, _ = np.linalg.qr(op(_rademacher(key_s, size, sketch)))
    top = float(np.sum(Q * op(Q)))
    G = _rademacher(key_g, size, num_probes)
    G = G - Q @ (Q.T @ G)
    value, stderr = _mean_and_stderr(np.sum(G * op(G), axis=0))
    return Estimate(top + value, stderr, num_matvecs)


def estimate_alignment(
    matvec1: Callable,
    matvec2: Callable,
    shape: int | tuple[int, int],
    *,
    centered: bool = False,
    method: str = "hutchpp",
    num_probes: int = 32,
    key: jax.Array | None = None,
) -> Estimate:
    """Matrix-free kernel alignment ``tr(K1 K2) / sqrt(tr(K1²) tr(K2²))``.

    Each probe z gives ``a = K1 z`` and ``b = K2 z``, and ``a·b``, ``a·a``,
    ``b·b`` are unbiased for the three traces (K symmetric). ``"hutchpp"``
    first takes the traces exactly on the range Q of ``[K1 S, K2 S]`` for a
    sketch S of ``num_probes // 2`` columns, then probes the complement
    ``(I − QQᵀ) z``. The ratio's standard error is propagated by the delta
    method (first order; the ratio has a small bias of order 1/num_probes).
    With ``centered=True`` both kernels are replaced by ``H K H`` (CKA).
    Cf. Hazelden, arXiv 2511.10796, for matrix-free NTK alignment.

    Args:
      matvec1: ``v -> K1 v`` on arrays of ``shape``.
      matvec2: ``v -> K2 v``.
      shape: ``n`` or ``(n, k)``; centring acts on the first axis.
      centered: estimate CKA.
      method: ``"hutchpp"`` or ``"hutchinson"``.
      num_probes: Hutchinson probes; Hutch++ also uses ``num_probes // 2``
        sketch columns and ``2·(num_probes // 2)`` more exact products.
      key: ``jax.random`` key; default ``jax.random.key(0)``.

    Returns:
      An :class:`Estimate`; ``num_matvecs`` counts products with each kernel.

    >>> K = np.diag([1.0, 2.0, 3.0])
    >>> est = estimate_alignment(lambda v: K @ v, lambda v: K @ v, 3, num_probes=4)
    >>> round(est.value, 6)
    1.0
    """
    shape = _shape(shape)
    if method not in ("hutchpp", "hutchinson"):
        raise ValueError(f"method must be 'hutchpp' or 'hutchinson', got {method!r}.")
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 for an error bar, got {num_probes}.")
    key = jax.random.key(0) if key is None else key
    size = math.prod(shape)
    ops = [_operator(f, shape) for f in (matvec1, matvec2)]
    if centered:

        def center(V):
            blocks = V.reshape(shape[0], -1, V.shape[1])
            return (blocks - blocks.mean(axis=0, keepdims=True)).reshape(V.shape)

        ops = [lambda V, op=op: center(op(center(V))) for op in ops]

    key_s, key_g = jax.random.split(key)
    exact = np.zeros(3)
    used = num_probes
    G = _rademacher(key_g, size, num_probes)
    if method == "hutchpp":
        S = _rademacher(key_s, size, max(num_probes // 2, 1))
        Q, _ = np.linalg.qr(np.concatenate([ops[0](S), ops[1](S)], axis=1))
        A, B = ops[0](Q), ops[1](Q)
        exact = np.array([np.sum(A * B), np.sum(A * A), np.sum(B * B)])
        G = G - Q @ (Q.T @ G)
        used += S.shape[1] + Q.shape[1]
    A, B = ops[0](G), ops[1](G)
    samples = np.stack([np.sum(A * B, 0), np.sum(A * A, 0), np.sum(B * B, 0)])
    t12, t11, t22 = exact + samples.mean(axis=1)
    if t11 <= 0 or t22 <= 0:
        raise ValueError("an estimated ‖K‖²_F is zero; the alignment is undefined.")
    value = t12 / math.sqrt(t11 * t22)
    grad = np.array([1.0 / math.sqrt(t11 * t22), -0.5 * value / t11, -0.5 * value / t22])
    var = grad @ np.cov(samples) @ grad / num_probes
    return Estimate(float(value), float(math.sqrt(max(var, 0.0))), used)
