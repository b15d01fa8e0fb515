"""Supervision complexity of targets in a student's kernel, and the margin bound.

For a student kernel matrix K on n training points and targets Y (docs/definitions.md#supervision-complexity):

    C(Y; K) = tr(Yᵀ K⁻¹ Y)                 (supervision complexity)
    A(Y; K) = sqrt(C(Y; K) · tr K) / n      (adjusted, invariant to K → cK)
    Â(Y; K) = A(Y; K) / A(Y; I)             (normalised, also invariant to Y → cY)
            = sqrt(C · tr K / (N · ‖Y‖_F²))  (N = side of the kernel matrix)

A mixes the *size* of the targets with their alignment to K: with K = I it is
the RMS row norm of Y, which falls with the temperature whatever the network.
Â is 1 for K ∝ I and any Y, so a claim about the kernel must hold under Â.

Kernel layouts:

* scalar kernel ``K: (n, n)`` (modes ``trace``, ``logit``, ``sum``) with
  ``Y: (n, k)`` or ``(n,)``; C sums the k per-column complexities.
* full kernel ``K: (n, n, k, k)`` with ``K[i, j, a, b] = Θ(x_i, x_j)[a, b]``.
  It is flattened to an ``(n·k, n·k)`` matrix with row index ``i·k + a``,
  the same order as ``Y.reshape(-1)`` for ``Y: (n, k)`` (C-order), and
  ``C = vec(Y)ᵀ K_full⁻¹ vec(Y)``. Its trace is ``Σ_i Σ_a K[i, i, a, a]`` and n
  in A is the number of examples, so ``K_full = c·I`` with one-hot Y gives
  ``A = sqrt(k)`` (the scalar trace kernel of that network, ``c·k·I``, gives 1).

Dense solves run on the host in float64 through a Cholesky factorisation
(never an explicit inverse), see :func:`factor_kernel`. For kernels too large
to form, :func:`supervision_complexity_cg` needs only kernel-vector products.

Reference: Harutyunyan, Rawat, Menon, Kim, Kumar, "Supervision Complexity and
its Role in Knowledge Distillation", ICLR 2023, arXiv 2301.12245.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import scipy.linalg
from jax.typing import ArrayLike

from ntkd import _io, metrics, ntk
from ntkd import targets as targets_lib

__all__ = [
    "IllConditionedKernelWarning",
    "KernelFactor",
    "MarginBound",
    "SolveInfo",
    "adjusted_supervision_complexity",
    "compare_teachers",
    "factor_kernel",
    "KernelMarginBound",
    "format_table",
    "kernel_margin_bound",
    "margin_bound",
    "normalized_adjusted_complexity",
    "supervision_complexity",
    "supervision_complexity_cg",
    "write_table",
]

# Condition numbers above this lose more than ~6 of float64's 16 digits in C.
COND_WARN = 1e10
# Relative asymmetry max|K - Kᵀ| / max|K| accepted as round-off (float32
# kernels computed as J Jᵀ are symmetric to ~1e-7); K is then symmetrised.
SYMMETRY_RTOL = 1e-5


class IllConditionedKernelWarning(UserWarning):
    """The kernel is so ill-conditioned that the complexity is unreliable."""


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """How a linear solve with the kernel was done.

    Attributes:
      method: ``"cholesky"`` or ``"cg"``.
      relative_ridge: λ as passed by the caller.
      ridge: the absolute amount added to the diagonal, ``λ · tr K / N``, where
        N is the side of the (flattened) kernel matrix.
      jitter: extra diagonal added because round-off made the kernel slightly
        indefinite (0 when none was needed).
      condition_number: 1-norm condition number estimate of the factorised
        matrix (LAPACK ``dpocon``); None for CG.
      iterations: CG iterations (None for Cholesky).
      residual: largest relative residual ``‖b − A x‖ / ‖b‖`` over right-hand
        sides, from the CG recurrence (None for Cholesky).
      converged: False when CG stopped at ``maxiter`` above ``tol``.
    """

    method: str
    relative_ridge: float
    ridge: float
    jitter: float = 0.0
    condition_number: float | None = None
    iterations: int | None = None
    residual: float | None = None
    converged: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _locate(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _kernel_matrix(K: ArrayLike, name: str = "K") -> tuple[np.ndarray, int, int | None, float]:
    """Validates K and returns (matrix (N, N) float64, n, k or None, input eps).

    Asymmetry within ``SYMMETRY_RTOL`` is accepted as round-off; the solvers
    then read only the lower triangle (LAPACK ``potrf``/``syevr`` convention).
    """
    K_in = np.asarray(K)
    eps = (
        np.finfo(K_in.dtype).eps
        if np.issubdtype(K_in.dtype, np.floating)
        else np.finfo(np.float64).eps
    )
    K_np = K_in.astype(np.float64, copy=False)
    if K_np.ndim == 2 and K_np.shape[0] == K_np.shape[1]:
        n, k, mat = K_np.shape[0], None, K_np
    elif K_np.ndim == 4 and K_np.shape[0] == K_np.shape[1] and K_np.shape[2] == K_np.shape[3]:
        n, k = K_np.shape[0], K_np.shape[2]
        mat = K_np.transpose(0, 2, 1, 3).reshape(n * k, n * k)
    else:
        raise ValueError(
            f"{name} must be a scalar kernel (n, n) or a full kernel (n, n, k, k), "
            f"got shape {K_np.shape}."
        )
    if not np.all(np.isfinite(K_np)):
        where = _locate(~np.isfinite(K_np))
        raise ValueError(
            f"{name} has a non-finite entry {name}{list(where)} = {K_np[where]}; "
            "recompute the kernel (in float64 if it overflowed)."
        )
    scale = float(np.max(np.abs(mat))) if mat.size else 0.0
    asym, (i, j) = _max_asymmetry(mat)
    if asym > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} is not symmetric: |K[{i}, {j}] - K[{j}, {i}]| = {asym:.3g} "
            f"(max |K| = {scale:.3g}, tolerance {SYMMETRY_RTOL:g} relative). Pass the "
            "Gram matrix of one input set with itself, or symmetrise (K + K.T) / 2."
        )
    return mat, n, k, float(eps)


def _max_asymmetry(mat: np.ndarray, block: int = 512) -> tuple[float, tuple[int, int]]:
    """max |K - Kᵀ| and its location, tile by tile (no n² temporary, cache friendly)."""
    worst, where = 0.0, (0, 0)
    size = mat.shape[0]
    for r in range(0, size, block):
        for c in range(r, size, block):
            diff = np.abs(mat[r : r + block, c : c + block] - mat[c : c + block, r : r + block].T)
            if diff.size and diff.max() > worst:
                a, b = np.unravel_index(np.argmax(diff), diff.shape)
                worst, where = float(diff[a, b]), (r + int(a), c + int(b))
    return worst, where


def _target_matrix(Y: ArrayLike, n: int, k: int | None) -> np.ndarray:
    """Validates Y and returns the right-hand sides, shape (N, m), float64."""
    Y_np = np.asarray(Y, dtype=np.float64)
    if Y_np.ndim == 1:
        Y_np = Y_np[:, None]
    if Y_np.ndim != 2 or Y_np.shape[0] != n:
        raise ValueError(
            f"Y must have shape ({n}, k) or ({n},) to match K with n={n} "
            f"examples, got {np.asarray(Y).shape}."
        )
    if k is not None and Y_np.shape[1] != k:
        raise ValueError(
            f"a full kernel with k={k} outputs needs Y of shape ({n}, {k}), got {Y_np.shape}."
        )
    if not np.all(np.isfinite(Y_np)):
        where = _locate(~np.isfinite(Y_np))
        raise ValueError(f"Y has a non-finite entry Y{list(where)} = {Y_np[where]}.")
    return Y_np.reshape(-1, 1) if k is not None else Y_np


def _float32_valued(mat: np.ndarray, block: int = 512) -> bool:
    """Whether every entry of a float64 matrix is exactly a float32 value (row blocks, no n² temporary)."""
    for r in range(0, mat.shape[0], block):
        rows = mat[r : r + block]
        if not np.array_equal(rows.astype(np.float32).astype(np.float64), rows):
            return False
    return True


class KernelFactor:
    """A Cholesky factorisation of ``K + ridge·I``, reusable across targets.

    Build it with :func:`factor_kernel`; the complexity of many targets (e.g.
    every teacher and temperature) then costs one triangular solve each.

    Attributes:
      n: number of examples.
      k: number of outputs of a full kernel, None for a scalar kernel.
      trace: tr K of the kernel as given (no ridge, no jitter).
      info: :class:`SolveInfo` with the ridge, jitter and condition number.
    """

    def __init__(self, K: ArrayLike, *, ridge: float = 0.0):
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}.")
        mat, self.n, self.k, eps_in = _kernel_matrix(K)
        size = mat.shape[0]
        self.trace = float(np.trace(mat))
        mean_diag = self.trace / size
        if not mean_diag > 0:
            raise ValueError(
                f"K has trace {self.trace:.3g} <= 0; a kernel matrix has a positive "
                "diagonal. Check the kernel computation."
            )
        ridge_abs = ridge * mean_diag
        # Round-off in K (float32 kernels especially) can push the smallest
        # eigenvalues of a PSD kernel slightly below zero; up to this tolerance
        # that is corrected by jitter, beyond it K is declared indefinite.
        roundoff = size * eps_in * float(np.max(np.diag(mat)))
        jitter = 0.0
        for _ in range(4):
            chol = mat.copy()
            chol.flat[:: size + 1] += ridge_abs + jitter
            try:
                chol = _cho_factor(chol)
                break
            except np.linalg.LinAlgError:
                lam_min = float(
                    scipy.linalg.eigvalsh(mat, subset_by_index=[0, 0], check_finite=False)[0]
                )
                if eps_in == np.finfo(np.float64).eps and _float32_valued(mat):
                    # A float32 kernel cast to float64 on its way here (the CLI and Study do)
                    # carries float32's round-off, not float64's.
                    eps_in = float(np.finfo(np.float32).eps)
                    roundoff = size * eps_in * float(np.max(np.diag(mat)))
                if lam_min + ridge_abs < -roundoff:
                    needed = -lam_min / mean_diag
                    raise ValueError(
                        f"K is not positive semi-definite: its smallest eigenvalue is "
                        f"{lam_min:.3g} ({lam_min / mean_diag:.3g} of the mean diagonal "
                        f"{mean_diag:.3g}), beyond the round-off tolerance "
                        f"{roundoff:.3g}. Check the kernel computation; a ridge of at "
                        f"least ridge={needed:.1e} (relative to tr K / N) would make it "
                        "positive definite."
                    ) from None
                jitter = max(
                    2 * jitter,
                    2 * max(-lam_min - ridge_abs, 0.0)
                    + size * np.finfo(np.float64).eps * mean_diag,
                )
        else:
            raise ValueError(
                f"Cholesky failed even with jitter {jitter:.3g}; K is numerically "
                "singular. Add a ridge, e.g. ridge=1e-6."
            )
        self._chol = chol
        # 1-norm of K + shift: the shift only adds to the (non-negative) diagonal.
        anorm = float(np.max(np.sum(np.abs(mat), axis=0))) + ridge_abs + jitter
        rcond, _ = scipy.linalg.lapack.dpocon(chol, anorm, uplo="L")
        cond = float(1.0 / rcond) if rcond > 0 else math.inf
        self.info = SolveInfo(
            method="cholesky",
            relative_ridge=float(ridge),
            ridge=float(ridge_abs),
            jitter=float(jitter),
            condition_number=cond,
        )
        if cond > COND_WARN:
            warnings.warn(
                f"K is near singular: condition number ~{cond:.3g} (1-norm estimate, "
                f"ridge={ridge:g}, jitter={jitter:.3g}); the supervision complexity is "
                "dominated by the smallest eigenvalues and round-off. Consider "
                "ridge=1e-6 or larger.",
                IllConditionedKernelWarning,
                stacklevel=3,
            )

    def complexity(self, Y: ArrayLike) -> float:
        """Supervision complexity ``tr(Yᵀ (K + ridge·I)⁻¹ Y)``.

        Args:
          Y: targets ``(n, k)`` or ``(n,)`` (``(n, k)`` for a full kernel).

        Returns:
          C as a Python float.
        """
        rhs = _target_matrix(Y, self.n, self.k)
        half = scipy.linalg.solve_triangular(self._chol, rhs, lower=True, check_finite=False)
        return float(np.sum(half * half))

    def adjusted_complexity(self, Y: ArrayLike) -> float:
        """Adjusted supervision complexity ``sqrt(C · tr K) / n``."""
        return math.sqrt(self.complexity(Y) * self.trace) / self.n

    def normalized_complexity(self, Y: ArrayLike) -> float:
        """Scale-free complexity ``Â = sqrt(C · tr K / (N · ‖Y‖_F²))`` (1 for K ∝ I)."""
        rhs = _target_matrix(Y, self.n, self.k)
        norm2 = float(np.sum(rhs * rhs))
        if not norm2 > 0:
            raise ValueError(
                "the normalised complexity of all-zero targets is undefined (‖Y‖_F = 0)"
            )
        return math.sqrt(self.complexity(Y) * self.trace / (rhs.shape[0] * norm2))

    def solve(self, Y: ArrayLike) -> np.ndarray:
        """``(K + ridge·I)⁻¹ Y`` in float64, shaped like the flattened targets ``(N, m)``."""
        rhs = _target_matrix(Y, self.n, self.k)
        return scipy.linalg.cho_solve((self._chol, True), rhs, check_finite=False)

    @property
    def shift(self) -> float:
        """The absolute diagonal shift of the factorised matrix (ridge plus jitter)."""
        return self.info.ridge + self.info.jitter


SERIAL_CHOLESKY_SIZE = 8192
"""From this size the Cholesky factorisation runs OpenBLAS on one thread.

SciPy's and NumPy's bundled OpenBLAS (0.3.30 here) crashed the process with a
segmentation fault in the threaded ``potrf`` at n = 16,000 and 20,000 on 2
threads (random SPD matrices and a real eNTK alike), while one thread
factorised n = 20,000 in 80 s; n = 10,000 and 12,000 were fine threaded. A crash would
lose the run, so large kernels pay the single-thread time instead.
"""


def _cho_factor(a: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``a`` (overwritten), single-threaded BLAS for large a."""
    from threadpoolctl import threadpool_limits

    serial = a.shape[0] >= SERIAL_CHOLESKY_SIZE
    with threadpool_limits(limits=1, user_api="blas") if serial else contextlib.nullcontext():
        return scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)[0]


def factor_kernel(K: ArrayLike, *, ridge: float = 0.0) -> KernelFactor:
    """Factorises a student kernel once for many supervision-complexity queries.

    The factorised matrix is ``K + (ridge · tr K / N + jitter) · I`` in float64,
    with N the side of the (flattened) kernel matrix (N = n for a scalar kernel,
    n·k for a full one). ``jitter`` is 0 unless round-off made a PSD K slightly
    indefinite: when the smallest eigenvalue is above ``-N · eps · max diag K``
    (eps of K's input dtype; float32's for a float64 K whose entries are all
    float32 values, i.e. a float32 kernel cast up) it is lifted to about
    ``+|λ_min|``; below that K
    is reported as indefinite. A condition number above ``COND_WARN`` = 1e10
    issues an :class:`IllConditionedKernelWarning`. C and A are defined in
    Harutyunyan et al., ICLR 2023, arXiv 2301.12245.

    Args:
      K: scalar kernel ``(n, n)`` or full kernel ``(n, n, k, k)``; must be
        symmetric (to 1e-5 relative; the lower triangle is used), finite and
        positive semi-definite.
      ridge: relative ridge λ ≥ 0.

    Returns:
      A :class:`KernelFactor` with ``complexity(Y)``, ``adjusted_complexity(Y)``,
      ``trace`` and ``info``.

    Raises:
      ValueError: on a bad shape, a non-finite or non-symmetric entry, or an
        indefinite K; the message names the offending value and the fix.

    >>> f = factor_kernel(2.0 * np.eye(3))
    >>> round(f.complexity(np.eye(3)), 12), round(f.adjusted_complexity(np.eye(3)), 12)
    (1.5, 1.0)
    """
    return KernelFactor(K, ridge=ridge)


def supervision_complexity(
    K: ArrayLike, Y: ArrayLike, *, ridge: float = 0.0, return_info: bool = False
) -> float | tuple[float, SolveInfo]:
    """Supervision complexity ``C(Y; K) = tr(Yᵀ K⁻¹ Y)`` (docs/definitions.md#supervision-complexity).

    The squared RKHS norm of the minimum-norm interpolant of Y in the kernel K
    (Harutyunyan et al., ICLR 2023, arXiv 2301.12245). See
    :func:`factor_kernel` for the ridge, jitter and conditioning rules, and the
    module docstring for the full-kernel index order.

    Args:
      K: scalar kernel ``(n, n)`` or full kernel ``(n, n, k, k)``.
      Y: targets ``(n, k)`` or ``(n,)``; ``(n, k)`` for a full kernel, where
        ``vec(Y) = Y.reshape(-1)``.
      ridge: relative ridge λ; ``λ · tr K / N`` is added to the diagonal.
      return_info: also return the :class:`SolveInfo`.

    Returns:
      C as a float, or ``(C, info)`` if ``return_info``.

    >>> round(supervision_complexity(2.0 * np.eye(3), np.eye(3)), 12)
    1.5
    """
    factor = KernelFactor(K, ridge=ridge)
    value = factor.complexity(Y)
    return (value, factor.info) if return_info else value


def adjusted_supervision_complexity(
    K: ArrayLike, Y: ArrayLike, *, ridge: float = 0.0, return_info: bool = False
) -> float | tuple[float, SolveInfo]:
    """Adjusted supervision complexity ``A = sqrt(C(Y; K) · tr K) / n``.

    Invariant to rescaling K (ridge is relative, so it scales too); K ∝ I with
    one-hot Y gives exactly 1 (docs/definitions.md#adjusted-supervision-complexity, Harutyunyan et al., ICLR 2023, arXiv
    2301.12245). ``tr K`` is the trace of K as given, without ridge; for a full
    kernel it is ``Σ_i Σ_a K[i, i, a, a]`` and n is the number of examples.

    Args:
      K: scalar kernel ``(n, n)`` or full kernel ``(n, n, k, k)``.
      Y: targets ``(n, k)`` or ``(n,)``.
      ridge: relative ridge λ.
      return_info: also return the :class:`SolveInfo`.

    Returns:
      A as a float, or ``(A, info)`` if ``return_info``.

    >>> round(adjusted_supervision_complexity(5.0 * np.eye(4), np.eye(4)), 12)
    1.0
    """
    factor = KernelFactor(K, ridge=ridge)
    value = factor.adjusted_complexity(Y)
    return (value, factor.info) if return_info else value


def normalized_adjusted_complexity(K: ArrayLike, Y: ArrayLike, *, ridge: float = 0.0) -> float:
    """Scale-free supervision complexity ``Â(Y; K) = A(Y; K) / A(Y; I)``.

    ``Â = sqrt(C(Y; K) · tr K / (N · ‖Y‖_F²))`` with N the side of the
    (flattened) kernel matrix. It is 1 for K ∝ I and any Y, and unchanged by
    Y → cY and K → cK; below 1 the targets lie in K's large-eigenvalue
    directions (easier to learn than for an identity kernel), above 1 in its
    small ones. Harutyunyan et al. (ICLR 2023) plot A; compare settings with Â
    when the targets differ in size (temperatures, teachers of different
    confidence).

    Args:
        K: scalar ``(n, n)`` or full ``(n, n, k, k)`` kernel, see :func:`factor_kernel`.
        Y: targets ``(n, k)`` or ``(n,)``, not all zero.
        ridge: relative ridge λ (the same solve as :func:`supervision_complexity`).

    Returns:
        Â as a Python float.

    >>> Y = np.random.default_rng(0).normal(size=(5, 3))
    >>> round(normalized_adjusted_complexity(3.0 * np.eye(5), Y), 12)
    1.0
    """
    return factor_kernel(K, ridge=ridge).normalized_complexity(Y)


def supervision_complexity_cg(
    matvec: Callable[[Any], ArrayLike],
    Y: ArrayLike,
    *,
    full: bool = False,
    ridge: float = 0.0,
    trace: float | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    return_info: bool = False,
) -> float | tuple[float, SolveInfo]:
    """Matrix-free supervision complexity by conjugate gradients.

    Solves ``(K + ρ I) X = Y`` for every column with CG on the host in float64,
    calling ``matvec`` once per active right-hand side and iteration, and
    returns ``C = Σ Y ⊙ X``. The error in C is quadratic in the CG error, so a
    moderate ``tol`` already gives C to several digits. Each matvec's own
    precision (float32 for a default JAX eNTK) bounds the reachable residual.
    C as in Harutyunyan et al., ICLR 2023, arXiv 2301.12245; CG as in Hestenes
    and Stiefel, 1952.

    Args:
      matvec: for a scalar kernel ``v (n,) -> K v (n,)``; with ``full=True``
        ``v (n, k) -> K v (n, k)`` in the layout of
        ``ntkd.ntk.ntk_vp_fn(..., mode="full")``.
      Y: targets ``(n, k)`` or ``(n,)``.
      full: whether ``matvec`` is a full-kernel product on ``(n, k)`` arrays.
      ridge: relative ridge λ; ρ = λ · tr K / N needs ``trace``.
      trace: tr K, required when ``ridge > 0`` (exact, or e.g.
        ``hutchpp_trace(matvec, n).value``).
      tol: stop when every ``‖r‖ / ‖y‖ <= tol``.
      maxiter: iteration cap, default ``10 · N``.
      return_info: also return the :class:`SolveInfo` (iterations, residual).

    Returns:
      C as a float, or ``(C, info)``. The adjusted value is
      ``sqrt(C · trace) / n``.

    Raises:
      ValueError: on a bad ridge/trace or if ``matvec`` shows a non-positive
        curvature ``pᵀ K p <= 0`` (K not positive definite; add a ridge).

    >>> K = np.diag([1.0, 2.0, 4.0])
    >>> round(supervision_complexity_cg(lambda v: K @ v, np.ones(3)), 6)
    1.75
    """
    Y_np = np.asarray(Y, dtype=np.float64)
    if Y_np.ndim == 1:
        Y_np = Y_np[:, None]
    if Y_np.ndim != 2:
        raise ValueError(f"Y must have shape (n, k) or (n,), got {np.asarray(Y).shape}.")
    if not np.all(np.isfinite(Y_np)):
        where = _locate(~np.isfinite(Y_np))
        raise ValueError(f"Y has a non-finite entry Y{list(where)} = {Y_np[where]}.")
    n, k = Y_np.shape
    if full:
        rhs = Y_np.reshape(-1, 1)

        def op(V):
            cols = [np.asarray(matvec(v.reshape(n, k)), np.float64).reshape(-1) for v in V.T]
            return np.stack(cols, axis=1)
    else:
        rhs = Y_np

        def op(V):
            return np.stack([np.asarray(matvec(v), np.float64).reshape(n) for v in V.T], axis=1)

    size = rhs.shape[0]
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    if ridge > 0 and trace is None:
        raise ValueError(
            f"ridge={ridge} is relative to tr K / N, so pass trace= (tr K exactly, or "
            "ntkd.kernels.hutchpp_trace(matvec, shape).value)."
        )
    rho = ridge * trace / size if ridge > 0 else 0.0
    maxiter = 10 * size if maxiter is None else maxiter

    X = np.zeros_like(rhs)
    R = rhs.copy()
    P = R.copy()
    rs = np.sum(R * R, axis=0)
    bnorm = np.sqrt(rs)
    active = bnorm > 0
    it = 0
    while np.any(active) and it < maxiter:
        idx = np.flatnonzero(active)
        AP = op(P[:, idx]) + rho * P[:, idx]
        curvature = np.sum(P[:, idx] * AP, axis=0)
        if np.any(curvature <= 0):
            raise ValueError(
                f"CG met non-positive curvature pᵀKp = {curvature.min():.3g} at "
                f"iteration {it}: K is not positive definite. Add a ridge, e.g. "
                "ridge=1e-6 with trace=."
            )
        alpha = rs[idx] / curvature
        X[:, idx] += alpha * P[:, idx]
        R[:, idx] -= alpha * AP
        rs_new = np.sum(R[:, idx] ** 2, axis=0)
        P[:, idx] = R[:, idx] + (rs_new / rs[idx]) * P[:, idx]
        rs[idx] = rs_new
        active[idx] = np.sqrt(rs_new) > tol * bnorm[idx]
        it += 1
    rel = np.sqrt(rs) / np.where(bnorm > 0, bnorm, 1.0)
    converged = not np.any(active)
    if not converged:
        warnings.warn(
            f"CG stopped at maxiter={maxiter} with relative residual {rel.max():.3g} > "
            f"tol={tol:g}; K is probably ill-conditioned. Add a ridge or raise maxiter.",
            IllConditionedKernelWarning,
            stacklevel=2,
        )
    value = float(np.sum(rhs * X))
    info = SolveInfo(
        method="cg",
        relative_ridge=float(ridge),
        ridge=float(rho),
        iterations=it,
        residual=float(rel.max()),
        converged=converged,
    )
    return (value, info) if return_info else value


@dataclasses.dataclass(frozen=True)
class MarginBound:
    """Terms of the v0.1 margin bound on the student's error probability.

    See docs/definitions.md#the-v01-margin-bound.

    Attributes:
      teacher_error: teacher's training error against the true labels.
      margin_error: fraction of training points where the student's margin
        w.r.t. the teacher's argmax is ``<= gamma``.
      complexity_term: ``multiclass_factor · (2 / (γ n)) · sqrt(C · tr K)``.
      confidence_term: ``3 · sqrt(ln(2/δ) / (2n))``.
      total: the sum of the four terms.
      gamma, delta, n: the inputs, kept for tables.
    """

    teacher_error: float
    margin_error: float
    complexity_term: float
    confidence_term: float
    total: float
    gamma: float
    delta: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _margins(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.asarray(metrics.margins(logits, reference), dtype=np.float64)


def margin_bound(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    complexity: float,
    kernel_trace: float,
    gamma: float,
    delta: float = 0.05,
    multiclass_factor: float = 1.0,
) -> MarginBound:
    """The v0.1 margin bound (docs/definitions.md#the-v01-margin-bound), split into its terms.

    ``P(error) <= teacher_error + margin_error
    + (2 / (γ n)) sqrt(C · tr K) + 3 sqrt(ln(2/δ) / (2n))``, where the first
    two terms bound the empirical γ-margin error against the true labels
    (Harutyunyan et al., ICLR 2023, arXiv 2301.12245). The bound is proved for
    binary kernel classifiers; for k classes it holds only up to a factor
    depending on k (vector-contraction arguments give factors between sqrt(k)
    and k). That factor is the convention ``multiclass_factor`` (default 1,
    i.e. the binary form), applied to the complexity term only.

    Args:
      student_logits: ``(n, k)`` student outputs on the training subset.
      teacher_logits: ``(n, k)`` teacher outputs (or targets) on it.
      labels: ``(n,)`` true integer labels.
      complexity: C of the teacher targets in the student kernel.
      kernel_trace: tr K of that kernel.
      gamma: margin γ > 0, in logit units.
      delta: failure probability δ in (0, 1).
      multiclass_factor: multiplies the complexity term.

    Returns:
      A :class:`MarginBound`; ``as_dict()`` gives a table row.

    >>> z = np.array([[2.0, 0.0], [0.0, 2.0]])
    >>> b = margin_bound(z, z, np.array([0, 0]), complexity=2.0, kernel_trace=2.0,
    ...                  gamma=1.0, delta=0.1)
    >>> b.teacher_error, b.margin_error, b.complexity_term
    (0.5, 0.0, 2.0)
    """
    s = np.asarray(student_logits, dtype=np.float64)
    t = np.asarray(teacher_logits, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 2 or s.shape != t.shape or y.shape != (s.shape[0],):
        raise ValueError(
            f"need student_logits (n, k), teacher_logits (n, k) and labels (n,) with "
            f"equal n and k; got {s.shape}, {t.shape}, {y.shape}."
        )
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if complexity < 0 or kernel_trace <= 0:
        raise ValueError(
            f"need complexity >= 0 and kernel_trace > 0, got {complexity}, {kernel_trace}."
        )
    n = s.shape[0]
    teacher_pred = t.argmax(axis=1)
    teacher_error = float(np.mean(teacher_pred != y))
    margin_error = float(np.mean(_margins(s, teacher_pred) <= gamma))
    complexity_term = multiclass_factor * 2.0 / (gamma * n) * math.sqrt(complexity * kernel_trace)
    confidence_term = 3.0 * math.sqrt(math.log(2.0 / delta) / (2.0 * n))
    total = teacher_error + margin_error + complexity_term + confidence_term
    return MarginBound(
        teacher_error=teacher_error,
        margin_error=margin_error,
        complexity_term=complexity_term,
        confidence_term=confidence_term,
        total=total,
        gamma=float(gamma),
        delta=float(delta),
        n=n,
    )


# Radii 2^j, j ∈ [RADIUS_EXP_MIN, RADIUS_EXP_MAX], of the union bound in kernel_margin_bound.
RADIUS_EXP_MIN, RADIUS_EXP_MAX = -30, 30


@dataclasses.dataclass(frozen=True)
class KernelMarginBound:
    """A multiclass margin bound for the kernel student ``f = K (K + λI)⁻¹ Y``.

    Every term belongs to the one function f, in the units of the targets Y.

    Attributes:
      total: the bound on P(error) of f at the best γ (≥ 1 means vacuous).
      vacuous: ``total >= 1``.
      gamma: the γ that minimises the bound (any γ may be chosen, see
        :func:`kernel_margin_bound`).
      margin_error: fraction of training points with ``ρ_f(x_i, y_i) <= γ``
        against the true labels.
      teacher_error: fraction where argmax Y differs from the label (how much of
        ``margin_error`` the targets themselves cause).
      margin_error_vs_targets: fraction where f's margin against argmax Y is ``<= γ``.
      complexity_term: ``4k · R · sqrt(tr K) / n`` with R the grid radius.
      confidence_term: ``3 sqrt(ln(2 J / δ) / (2n))`` (J radii in the union bound).
      radius: smallest grid radius ``2^j`` ≥ ``max_c ‖f_c‖_K / γ``.
      rkhs_norm_max: ``max_c ‖f_c‖_K`` (per-class RKHS norms of f).
      rkhs_norm_sq: ``Σ_c ‖f_c‖²_K`` (= C(Y; K) when λ = 0).
      multiclass_constant: 4k, the factor of the Rademacher term.
      n, k, delta, ridge: the inputs.
      per_gamma: ``[{gamma, margin_error, radius, complexity_term, total}, …]``.
    """

    total: float
    vacuous: bool
    gamma: float
    margin_error: float
    teacher_error: float
    margin_error_vs_targets: float
    complexity_term: float
    confidence_term: float
    radius: float
    rkhs_norm_max: float
    rkhs_norm_sq: float
    multiclass_constant: float
    n: int
    k: int
    delta: float
    ridge: float
    per_gamma: tuple

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_gamma"] = [dict(g) for g in self.per_gamma]
        return d


def kernel_margin_bound(
    K: ArrayLike,
    Y: ArrayLike,
    labels: ArrayLike,
    *,
    gammas: Sequence[float],
    delta: float = 0.05,
    ridge: float = 0.0,
) -> KernelMarginBound:
    """Margin bound on the test error of the kernel student fitted to targets Y.

    The function is ``f = K (K + λ·(tr K / n)·I)⁻¹ Y`` on the n training points
    (λ = 0: the minimum-norm interpolant, f(x_i) = Y_i), with per-class RKHS
    norms ``‖f_c‖²_K = α_cᵀ K α_c``, α = (K + λ'I)⁻¹ Y. For a k-class hypothesis
    whose class scores lie in an RKHS ball of radius Λ, with probability ≥ 1 − δ
    (Mohri, Rostamizadeh, Talwalkar, *Foundations of Machine Learning*, 2nd ed.,
    Thm. 9.2 with the kernel Rademacher bound R̂_S ≤ Λ sqrt(tr K) / n, Thm. 6.12):

        P(error) ≤ (1/n) Σ 1[ρ_f(x_i, y_i) ≤ γ] + (4k / γ) · Λ sqrt(tr K) / n
                   + 3 sqrt(ln(2/δ) / (2n)),

    where ρ_f(x, y) = f_y(x) − max_{c≠y} f_c(x). γ enters only through f/γ
    (margin threshold 1, radius Λ/γ), so the bound is applied to f/γ with Λ/γ
    rounded up to a fixed grid of radii 2^j, j = -30…30 (J = 61), and a union
    bound over the grid (δ → δ/J). It then holds simultaneously for every γ and
    every f; the γ of ``gammas`` that minimises it is reported, at no further
    cost. The total is unchanged under Y → cY with γ → cγ. The binary form
    (Harutyunyan et al., ICLR 2023) has 2 in place of 4k; with k = 10 the
    multiclass constant makes the bound 20 times larger.

    Args:
      K: scalar student kernel ``(n, n)``.
      Y: targets ``(n, k)`` (e.g. a teacher's softmax at temperature τ, or one-hot labels).
      labels: ``(n,)`` true labels.
      gammas: margins γ > 0 to try, in the units of Y (for probabilities, ≤ 1).
      delta: failure probability δ in (0, 1).
      ridge: relative ridge λ ≥ 0.

    Returns:
      A :class:`KernelMarginBound`.

    >>> b = kernel_margin_bound(np.eye(4), np.eye(4), np.arange(4), gammas=[0.5])
    >>> b.margin_error, b.rkhs_norm_max
    (0.0, 1.0)
    """
    Y = np.asarray(Y, dtype=np.float64)
    y = np.asarray(labels)
    if Y.ndim != 2 or Y.shape[1] < 2:
        raise ValueError(
            f"kernel_margin_bound needs targets (n, k) with k >= 2, got shape {Y.shape}"
        )
    n, k = Y.shape
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) like the targets' rows, got {y.shape}")
    gammas = [float(g) for g in gammas]
    if not gammas or not all(g > 0 for g in gammas):
        raise ValueError(f"gammas must be a non-empty list of values > 0, got {gammas}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    factor = factor_kernel(K, ridge=ridge)
    if factor.k is not None or factor.n != n:
        raise ValueError(
            f"kernel_margin_bound needs a scalar kernel ({n}, {n}) on the targets' rows"
        )
    alpha = factor.solve(Y)
    f = Y - factor.shift * alpha  # K α = Y − shift·α
    norms_sq = np.maximum(np.einsum("nc,nc->c", alpha, f), 0.0)
    norm_max = float(np.sqrt(norms_sq.max()))
    margins = _margins(f, y)
    target_pred = Y.argmax(axis=1)
    margins_vs_targets = _margins(f, target_pred)
    n_radii = RADIUS_EXP_MAX - RADIUS_EXP_MIN + 1
    confidence = 3.0 * math.sqrt(math.log(2.0 * n_radii / delta) / (2.0 * n))
    rows = []
    for g in gammas:
        ratio = norm_max / g
        exp = max(RADIUS_EXP_MIN, math.ceil(math.log2(ratio))) if ratio > 0 else RADIUS_EXP_MIN
        radius = 2.0**exp
        complexity_term = 4.0 * k * radius * math.sqrt(factor.trace) / n
        err = float(np.mean(margins <= g))
        total = err + complexity_term + confidence if exp <= RADIUS_EXP_MAX else math.inf
        rows.append(
            {
                "gamma": g,
                "margin_error": err,
                "margin_error_vs_targets": float(np.mean(margins_vs_targets <= g)),
                "radius": radius,
                "complexity_term": complexity_term,
                "total": total,
            }
        )
    best = min(rows, key=lambda r: r["total"])
    return KernelMarginBound(
        total=best["total"],
        vacuous=bool(best["total"] >= 1.0),
        gamma=best["gamma"],
        margin_error=best["margin_error"],
        teacher_error=float(np.mean(target_pred != y)),
        margin_error_vs_targets=best["margin_error_vs_targets"],
        complexity_term=best["complexity_term"],
        confidence_term=confidence,
        radius=best["radius"],
        rkhs_norm_max=norm_max,
        rkhs_norm_sq=float(norms_sq.sum()),
        multiclass_constant=4.0 * k,
        n=n,
        k=k,
        delta=float(delta),
        ridge=float(ridge),
        per_gamma=tuple(rows),
    )


def compare_teachers(
    student_apply_fn: Callable | None,
    student_params: Any,
    x: ArrayLike,
    labels: ArrayLike,
    teachers: Mapping[str, ArrayLike],
    *,
    temperatures: Sequence[float] = (1, 2, 4, 8),
    mode: str = "trace",
    ridge: float = 0.0,
    gamma: float = 0.0,
    center: bool = False,
    kernel: ArrayLike | None = None,
    student_logits: ArrayLike | None = None,
    seed: int = 0,
    path: str = "auto",
    memory_budget: int | str | None = None,
    rtol: float = 1e-2,
) -> list[dict[str, Any]]:
    """Supervision complexity of several teachers' targets in one student NTK.

    Dense path: the student's eNTK on x is computed with
    :func:`ntkd.ntk.empirical_ntk` (or taken from ``kernel=``) and factorised
    once; every target then costs one triangular solve. Matrix-free path
    (``path="matfree"``, or ``"auto"`` when the dense kernel would not fit
    ``memory_budget``): every target gets a certified interval from one
    streaming eNTK operator (:func:`ntkd.matfree.matfree_complexity`; needs
    ``ridge > 0``, the same relative ridge, so both paths measure the same C). Rows:

    * one per (teacher, temperature) with targets ``softmax(z / τ)``;
    * ``"labels"``: one-hot true labels (temperature None);
    * ``"random"``: one-hot uniformly random labels (temperature None).

    Columns: ``target``, ``temperature``, ``path`` (``"dense"`` or
    ``"matfree"``), ``complexity`` (C), ``adjusted_complexity`` (A),
    ``normalized_complexity`` (Â), ``teacher_accuracy`` (argmax of the targets
    vs the true labels), ``margin_mean``, ``margin_median`` and
    ``margin_error`` (fraction of student margins ``<= gamma``) of the student
    w.r.t. the targets' argmax, and ``ridge`` (the absolute shift
    λ · tr K / N), ``jitter``, ``condition_number`` of the dense solve. On the
    matrix-free path C, A, Â are the interval midpoints and each has its
    certified interval (``complexity_lower`` / ``complexity_upper``,
    ``adjusted_lower`` / ``adjusted_upper``, ``normalized_lower`` /
    ``normalized_upper``), with ``relative_gap``, ``iterations`` and
    ``matvecs`` (of the Krylov space the row shared), ``converged``,
    ``upper_certified``, ``eig_lower_source``, ``trace`` and ``trace_source``
    instead of ``jitter`` and ``condition_number`` (see
    :meth:`ntkd.matfree.MatfreeComplexity.columns`). Margins do not depend on
    the temperature. Harutyunyan et al., ICLR 2023, arXiv 2301.12245, Fig. 1
    and §5.

    Args:
      student_apply_fn: ``f(params, x) -> logits (n, k)`` (for Flax models
        ``ntkd.ntk.flax_apply_fn``); may be None when both ``kernel`` and
        ``student_logits`` are given.
      student_params: the student's parameters (PyTree).
      x: ``(n, ...)`` inputs of the training subset.
      labels: ``(n,)`` true integer labels.
      teachers: name (e.g. ``"epoch 5"``) → teacher logits on x, ``(n, k)``.
      temperatures: softmax temperatures τ.
      mode: eNTK mode (``"trace"``, ``"logit"``, ``"sum"`` or ``"full"``) used
        when the kernel is computed here.
      ridge: relative ridge λ, see :func:`factor_kernel`.
      gamma: margin threshold of ``margin_error``; the default 0 makes it the
        student's disagreement (ties count as errors) with the targets.
      center: centre soft targets (subtract 1/k; one-hot rows are not centred).
      kernel: precomputed student kernel on x, ``(n, n)`` or ``(n, n, k, k)``;
        when given no eNTK is computed.
      student_logits: precomputed ``(n, k)`` student logits on x.
      seed: seed of the random-label row.
      path: ``"auto"`` (dense when :func:`ntkd.matfree.dense_kernel_bytes`
        fits ``memory_budget``), ``"dense"`` or ``"matfree"`` (not with ``kernel=``).
      memory_budget: bytes or a size such as ``"8GiB"`` for ``path="auto"``
        (default: half the available host memory).
      rtol: relative gap at which the matrix-free intervals stop.

    Returns:
      A list of dict rows, ready for :func:`write_table` / :func:`format_table`.

    Raises:
      ValueError: bad shapes, ``path="matfree"`` with ``kernel=``, or ridge = 0
        on the matrix-free path (the message names the fix).

    Examples:
      >>> rows = compare_teachers(None, None, np.zeros((2, 1)), np.array([0, 1]),
      ...                         {"t": np.eye(2)}, temperatures=(1,),
      ...                         kernel=np.eye(2), student_logits=np.eye(2))
      >>> [r["target"] for r in rows]
      ['t', 'labels', 'random']
    """
    from ntkd.matfree.measure import PATHS, matfree_complexity, require_ridge, resolve_path

    labels_np = np.asarray(labels)
    n = labels_np.shape[0]
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    if kernel is not None and path == "matfree":
        raise ValueError(
            "kernel= is a dense kernel, but path='matfree' computes kernel products from "
            "student_apply_fn; pass path='dense' (or 'auto'), or leave kernel=None."
        )
    if student_logits is None:
        student_logits = student_apply_fn(student_params, x)
    s_logits = np.asarray(student_logits, dtype=np.float64)
    if s_logits.ndim != 2 or s_logits.shape[0] != n:
        raise ValueError(f"student logits must be ({n}, k), got {s_logits.shape}.")
    k = s_logits.shape[1]
    chosen = "dense"
    if kernel is None:
        chosen = resolve_path(path, n, k=k, mode=mode, memory_budget=memory_budget)
    if chosen == "matfree":
        require_ridge(ridge, n, k=k, mode=mode)

    specs = []  # (target, temperature, Y, reference argmax)
    for name, logits in teachers.items():
        t_logits = np.asarray(logits, dtype=np.float64)
        if t_logits.shape != (n, k):
            raise ValueError(
                f"teacher {name!r} logits must have shape ({n}, {k}), got {t_logits.shape}."
            )
        reference = t_logits.argmax(axis=1)
        for tau in temperatures:
            Y = targets_lib.softmax_targets(t_logits, float(tau), center=center)
            specs.append((name, float(tau), Y, reference))
    specs.append(("labels", None, targets_lib.one_hot(labels_np, k), labels_np))
    random_Y = np.asarray(targets_lib.random_labels(jax.random.key(seed), n, k))
    specs.append(("random", None, random_Y, random_Y.argmax(axis=1)))

    if chosen == "dense":
        if kernel is None:
            kernel = ntk.empirical_ntk(student_apply_fn, student_params, x, mode=mode)
        factor = factor_kernel(kernel, ridge=ridge)
        if factor.n != n:
            raise ValueError(f"kernel covers {factor.n} examples but labels has {n}.")
        solve_cols = {
            "ridge": factor.info.ridge,
            "jitter": factor.info.jitter,
            "condition_number": factor.info.condition_number,
        }
        measured = [
            {
                "complexity": factor.complexity(Y),
                "adjusted_complexity": factor.adjusted_complexity(Y),
                "normalized_complexity": factor.normalized_complexity(Y),
                **solve_cols,
            }
            for _, _, Y, _ in specs
        ]
    else:
        res = matfree_complexity(
            student_apply_fn,
            student_params,
            x,
            {str(i): spec[2] for i, spec in enumerate(specs)},
            mode=mode,
            ridge=ridge,
            rtol=rtol,
            memory_budget=memory_budget,
        )
        measured = [res.columns(str(i)) for i in range(len(specs))]

    rows = []
    for (name, temperature, _, reference), cols in zip(specs, measured):
        margins = _margins(s_logits, reference)
        rows.append(
            {
                "target": name,
                "temperature": temperature,
                "path": chosen,
                **cols,
                "teacher_accuracy": float(np.mean(reference == labels_np)),
                "margin_mean": float(np.mean(margins)),
                "margin_median": float(np.median(margins)),
                "margin_error": float(np.mean(margins <= gamma)),
            }
        )
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return list(columns)


def _json_value(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_table(rows: Sequence[Mapping[str, Any]], path_stem: str) -> tuple[str, str]:
    """Atomically writes rows to ``path_stem.csv`` and ``path_stem.json``.

    Each file is written to a temporary file in the same directory and moved
    into place with ``os.replace`` (``ntkd._io``), so readers never see a
    partial table. Non-finite floats become empty CSV cells and JSON ``null``.

    Args:
      rows: dict rows, e.g. from :func:`compare_teachers`; columns are the
        union of keys in order of first appearance.
      path_stem: output path without extension; missing folders are created.

    Returns:
      ``(csv_path, json_path)``.

    Examples:
      >>> import tempfile, os
      >>> d = tempfile.mkdtemp()
      >>> [os.path.basename(p) for p in write_table([{"a": 1}], os.path.join(d, "t"))]
      ['t.csv', 't.json']
    """
    columns = _columns(rows)
    clean = [{c: _json_value(r.get(c)) for c in columns} for r in rows]
    csv_path, json_path = f"{path_stem}.csv", f"{path_stem}.json"
    _io.write_csv(csv_path, clean)
    _io.write_json(json_path, clean)
    return csv_path, json_path


def format_table(rows: Sequence[Mapping[str, Any]], *, digits: int = 4) -> str:
    """Formats rows as a Markdown table (floats to ``digits`` significant digits).

    Args:
      rows: dict rows.
      digits: significant digits of floats.

    Returns:
      The table as a string.

    >>> print(format_table([{"target": "labels", "complexity": 12.3456}]))
    | target | complexity |
    |---|---|
    | labels | 12.35 |
    """
    columns = _columns(rows)

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
