"""Matrix-free top eigenpairs of a PSD kernel and the target–kernel alignment curve.

Block Lanczos (full reorthogonalisation, float64) from a random block on
``matvec(V) = K @ V``; Ritz pairs of the projected T are accepted when their
residual ``‖K z − θ z‖ = ‖F s‖`` is at most ``tol · θ_max``. For a symmetric K
each accepted θ lies within its residual of an eigenvalue, and within
residual² / gap when the eigenvalue is separated by ``gap`` from the rest
(Parlett, "The Symmetric Eigenvalue Problem", §11.7).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from ntkd.matfree.bounds import _rng
from ntkd.matfree.lanczos import BlockLanczos, Operator, orthonormal_block

__all__ = ["Eigenpairs", "top_eigenpairs", "alignment_curve"]


@dataclasses.dataclass(frozen=True, eq=False)
class Eigenpairs:
    """Top eigenpairs of K.

    Attributes:
      values: (m,) decreasing Ritz values.
      vectors: (n, m) orthonormal Ritz vectors.
      residuals: (m,) ``‖K z_i − θ_i z_i‖``.
      converged: every residual ``<= tol · values[0]``.
      iterations: block steps; matvecs: kernel–vector products.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    converged: bool
    iterations: int
    matvecs: int


def top_eigenpairs(
    matvec: Callable[[Any], ArrayLike],
    n: int,
    num: int,
    *,
    block_size: int | None = None,
    tol: float = 1e-8,
    max_iters: int | None = None,
    key: jax.Array | None = None,
) -> Eigenpairs:
    """The ``num`` largest eigenpairs of a symmetric PSD K by block Lanczos.

    Args:
      matvec: ``V (n, m) -> K @ V``.
      n: side of K.
      num: eigenpairs wanted (``num <= n``).
      block_size: Lanczos block (default ``min(max(num, 8), 64, n)``).
      tol: relative residual ``‖Kz − θz‖ / θ_1`` at which a pair is accepted.
      max_iters: cap on block steps (default enough to span n).
      key: ``jax.random`` key of the random start (default seed 0).

    Returns:
      :class:`Eigenpairs`.

    >>> K = np.diag([5.0, 3.0, 1.0, 0.5])
    >>> np.round(top_eigenpairs(lambda V: K @ V, 4, 2).values, 10)
    array([5., 3.])
    """
    if not 1 <= num <= n:
        raise ValueError(f"num must be in [1, n={n}], got {num}.")
    op = Operator(matvec, n)
    p = block_size or min(max(num, 8), 64, n)
    Q1, _ = orthonormal_block(_rng(key).standard_normal((n, p)))
    lz = BlockLanczos(op, Q1, eps=lambda: op.eps)
    max_iters = math.ceil(n / p) + 1 if max_iters is None else int(max_iters)
    while True:
        lz.step()
        theta, S = np.linalg.eigh(lz.T)
        theta, S = theta[::-1][:num], S[:, ::-1][:, :num]
        res = np.zeros(theta.shape) if lz.F is None else np.linalg.norm(lz.F @ S, axis=0)
        done = theta.size == num and bool(np.all(res <= tol * max(theta[0], 0.0)))
        if done or lz.exhausted or lz.steps >= max_iters:
            break
    return Eigenpairs(
        values=theta,
        vectors=lz.V @ S,
        residuals=res,
        converged=done or lz.exhausted,
        iterations=lz.steps,
        matvecs=op.matvecs,
    )


def alignment_curve(Y: ArrayLike, eigenpairs: Eigenpairs) -> np.ndarray:
    """Fraction of ``‖Y‖_F²`` in the top-m eigenvectors of K, for m = 1 … num.

    ``curve[m-1] = Σ_{i≤m} ‖z_iᵀ Y‖² / ‖Y‖_F²`` with z_i from
    :func:`top_eigenpairs`; equals ``ntkd.kernels.alignment_spectrum(K, Y)[:num]``
    up to the eigenvectors' accuracy, but needs only matvecs. Harutyunyan et
    al., ICLR 2023, arXiv 2301.12245 (the student's NTK aligning with the task).

    Args:
      Y: targets ``(n, k)`` or ``(n,)``.
      eigenpairs: from :func:`top_eigenpairs` on the same K.

    Returns:
      ``(num,)`` non-decreasing curve in [0, 1].
    """
    Y_np = np.asarray(Y, dtype=np.float64)
    Y_np = Y_np[:, None] if Y_np.ndim == 1 else Y_np
    Z = eigenpairs.vectors
    if Y_np.ndim != 2 or Y_np.shape[0] != Z.shape[0]:
        raise ValueError(
            f"Y must have shape ({Z.shape[0]}, k) or ({Z.shape[0]},) to match "
            f"the eigenvectors, got {np.shape(Y)}."
        )
    total = float(np.sum(Y_np * Y_np))
    if total == 0:
        raise ValueError("Y is all zeros; its alignment curve is undefined.")
    return np.cumsum(np.sum((Z.T @ Y_np) ** 2, axis=1)) / total
