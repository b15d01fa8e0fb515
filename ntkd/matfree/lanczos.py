"""Block Lanczos with full reorthogonalisation on a user matvec, in float64.

The building block of :mod:`ntkd.matfree.bounds` (quadrature bounds on
``tr(Yᵀ (K + ρI)⁻¹ Y)``) and :mod:`ntkd.matfree.spectra` (top eigenpairs).
``matvec(V)`` must return ``K @ V`` for ``V`` of shape ``(n, m)``; every call
is checked for shape and finiteness, and counted.

After s steps from an orthonormal block Q_1 the process holds an orthonormal
basis V = [Q_1, …, Q_s] (n × N) of the block Krylov space, the block
tridiagonal T = Vᵀ A V (N × N) and the next block and its coupling,
A V = V T + Q_{s+1} F with F = [0, …, 0, B_s]. Full reorthogonalisation (two
Gram–Schmidt passes against all of V) keeps V orthonormal to round-off, so T
stays the true projection of A (Golub & Meurant, "Matrices, Moments and
Quadrature with Applications", 2010, ch. 4 and ch. 7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["MatvecError", "NotPSDError", "Operator", "BlockLanczos", "orthonormal_block"]


class MatvecError(ValueError):
    """The user's matvec returned something that is not ``K @ V``."""


class NotPSDError(ValueError):
    """The operator showed negative curvature (it is not positive semi-definite)."""


class Operator:
    """A validated, counted ``V (n, m) -> K @ V (n, m)`` in float64.

    Attributes:
      n: side of K.
      matvecs: kernel–vector products so far (columns of all V passed).
      calls: calls to the user's matvec.
      eps: machine epsilon of the dtype the matvec returns (float32 results
        set the round-off tolerances of the callers).
    """

    def __init__(self, matvec: Callable[[Any], Any], n: int, *, name: str = "matvec"):
        self._matvec, self.n, self.name = matvec, int(n), name
        self.matvecs = 0
        self.calls = 0
        self.eps = float(np.finfo(np.float64).eps)

    def __call__(self, V: np.ndarray) -> np.ndarray:
        V = np.ascontiguousarray(V, dtype=np.float64)
        out = self._matvec(V)
        arr = np.asarray(out)
        if arr.shape != V.shape:
            hint = ""
            if arr.shape == (V.shape[0],) or arr.ndim == 1:
                hint = (
                    " A matvec of single vectors can be wrapped as "
                    "`lambda V: np.stack([mv(v) for v in V.T], axis=1)`."
                )
            raise MatvecError(
                f"{self.name} returned an array of shape {arr.shape} for V of shape "
                f"{V.shape}; it must return K @ V with the same shape (n, m) = "
                f"{V.shape}.{hint}"
            )
        if np.issubdtype(arr.dtype, np.floating):
            self.eps = max(self.eps, float(np.finfo(arr.dtype).eps))
        arr = arr.astype(np.float64, copy=False)
        if not np.all(np.isfinite(arr)):
            i, j = (int(t) for t in np.argwhere(~np.isfinite(arr))[0])
            raise MatvecError(
                f"{self.name} returned a non-finite value (K @ V)[{i}, {j}] = {arr[i, j]} "
                f"(call {self.calls + 1}, V of shape {V.shape}, finite input). Check the "
                "kernel computation (params and inputs finite? overflow in float32? "
                "compute the matvec in float64)."
            )
        self.calls += 1
        self.matvecs += V.shape[1]
        return arr


def orthonormal_block(Y: np.ndarray, *, rtol: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank-revealing ``Y = Q R`` by SVD: Q (n, r) orthonormal, R (r, m).

    Directions with singular value ``<= rtol · σ_max`` (default ``m · n · eps``)
    are dropped, so a rank-deficient Y (repeated or zero columns) starts a
    smaller block without changing ``tr(Yᵀ f(A) Y)`` beyond round-off.
    """
    n, m = Y.shape
    U, s, Wt = np.linalg.svd(Y, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((n, 0)), np.zeros((0, m))
    rtol = max(n, m) * np.finfo(np.float64).eps if rtol is None else rtol
    keep = s > rtol * s[0]
    return U[:, keep], s[keep, None] * Wt[keep]


class BlockLanczos:
    """Block Lanczos on ``op`` from an orthonormal block, with deflation.

    ``step()`` applies ``op`` once to the newest block, appends its diagonal
    block to T, orthogonalises the residual against all previous blocks (twice)
    and factors it by SVD. Residual directions with singular value at most
    ``deflation_tol`` are dropped (the block shrinks); when none is left the
    Krylov space is invariant (``exhausted``) and T holds the exact restriction
    of the operator to it. Dropping a direction of norm σ makes the process
    exact for an operator within σ of ``op``; the default tolerance is the
    round-off level of the products.

    Attributes:
      T: (N, N) projected matrix Vᵀ op V so far.
      F: (p_next, N) coupling of the next block (zeros except its last block),
        i.e. ``op V = V T + Q_next F``; None once exhausted.
      V: (n, N) orthonormal basis.
      sizes: block sizes.
      exhausted: the Krylov space became invariant.
      steps: steps done.
    """

    def __init__(
        self,
        op: Callable[[np.ndarray], np.ndarray],
        Q1: np.ndarray,
        *,
        eps: Callable[[], float] | float = np.finfo(np.float64).eps,
        symmetry_check: bool = True,
    ):
        self._op = op
        self._eps = eps if callable(eps) else (lambda e=eps: e)
        n, p = Q1.shape
        self.n = n
        self._V = np.empty((n, max(4 * p, 16)))
        self._N = 0
        self._Q = Q1
        self._Bprev = None  # coupling of the newest block to the one before
        self.T = np.zeros((0, 0))
        self.F: np.ndarray | None = None
        self.sizes: list[int] = []
        self.exhausted = p == 0
        self.steps = 0
        self.scale = 0.0  # running max |T| (Gershgorin-type size of op)
        self._symmetry_check = symmetry_check

    @property
    def V(self) -> np.ndarray:
        return self._V[:, : self._N]

    def _append(self, Q: np.ndarray) -> None:
        need = self._N + Q.shape[1]
        if need > self._V.shape[1]:
            grown = np.empty((self.n, max(2 * self._V.shape[1], need)))
            grown[:, : self._N] = self._V[:, : self._N]
            self._V = grown
        self._V[:, self._N : need] = Q
        self._N = need

    def step(self) -> None:
        if self.exhausted:
            raise RuntimeError("the Krylov space is exhausted; no further step.")
        Q = self._Q
        p = Q.shape[1]
        W = self._op(Q)
        Aj = Q.T @ W
        asym = float(np.max(np.abs(Aj - Aj.T))) if p else 0.0
        Aj = 0.5 * (Aj + Aj.T)
        W = W - Q @ Aj
        N0 = self._N
        if self._Bprev is not None:
            prev = self._V[:, N0 - self._Bprev.shape[1] : N0]
            W = W - prev @ self._Bprev.T
        self._append(Q)
        self.sizes.append(p)
        N = self._N
        # grow T with the new diagonal block and the previous coupling
        T = np.zeros((N, N))
        T[:N0, :N0] = self.T
        T[N0:, N0:] = Aj
        if self._Bprev is not None:
            pp = self._Bprev.shape[1]
            T[N0:, N0 - pp : N0] = self._Bprev
            T[N0 - pp : N0, N0:] = self._Bprev.T
        self.T = T
        self.scale = max(self.scale, float(np.max(np.sum(np.abs(T), axis=1))) if N else 0.0)
        V = self.V
        first = V.T @ W
        if self._symmetry_check and N0 > 0:
            # For a symmetric operator the residual is already orthogonal to the
            # previous blocks (up to round-off); a large component betrays asymmetry.
            old = first[:N0]
            leak = max(float(np.max(np.abs(old))) if old.size else 0.0, asym)
            if leak > 1e2 * np.sqrt(self._eps()) * max(self.scale, np.finfo(float).tiny):
                raise MatvecError(
                    f"the matvec is not symmetric: Q_iᵀ K Q_j differs from (Q_jᵀ K Q_i)ᵀ "
                    f"by up to {leak:.3g} (operator size ~{self.scale:.3g}) at Lanczos step "
                    f"{self.steps + 1}. Pass a symmetric K (e.g. the Gram matrix of one "
                    "input set with itself, or (K + Kᵀ)/2)."
                )
        W = W - V @ first
        W = W - V @ (V.T @ W)
        U, s, Wt = np.linalg.svd(W, full_matrices=False)
        tol = 10.0 * np.sqrt(self.n) * self._eps() * max(self.scale, np.finfo(float).tiny)
        keep = s > tol
        self.steps += 1
        if not np.any(keep):
            self.exhausted = True
            self.F = None
            self._Q = np.zeros((self.n, 0))
            self._Bprev = None
            return
        Qn = U[:, keep]
        B = s[keep, None] * Wt[keep]  # (p_next, p): W = Qn B
        F = np.zeros((B.shape[0], N))
        F[:, N - p :] = B
        self.F = F
        self._Q = Qn
        self._Bprev = B
