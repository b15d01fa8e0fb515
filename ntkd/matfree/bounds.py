"""Certified bounds on the supervision complexity without forming the kernel.

For a PSD kernel K (n × n) given only through ``matvec(V) = K @ V``, targets
Y (n × m) and a diagonal shift ρ ≥ 0, block Lanczos on A = K + ρI started
from Y gives, after s steps (T = Vᵀ A V on the block Krylov space, Y = Q_1 R_0):

* Gauss quadrature, a certified LOWER bound (T⁻¹ is a compression of A⁻¹)::

      L_s = tr(R_0ᵀ [T_s⁻¹]_{11} R_0) ≤ C = tr(Yᵀ A⁻¹ Y)

* Gauss–Radau quadrature with a node a ≤ λ_min(A) prescribed, a certified
  UPPER bound: the last block of T_{s+1} is replaced by Ω = aI + B_s δ B_sᵀ,
  δ = E_sᵀ(T_s − aI)⁻¹E_s, so that a is an eigenvalue of multiplicity p, and::

      U_s = tr(R_0ᵀ [T̃_{s+1}⁻¹]_{11} R_0) = L_s + tr(Wᵀ (aI + a·F T⁻¹(T − aI)⁻¹Fᵀ)⁻¹ W)

  with W = F T⁻¹ E_1 R_0 (‖W‖_F is the block-CG residual norm). Proof sketch:
  by Schur complements, [J⁻¹]_{11} of the full block Jacobi matrix J equals
  (T − F ᵀG F)⁻¹ with G = [J_rest⁻¹]_{11}; J − aI ⪰ 0 gives J_rest ⪰ aI +
  B δ Bᵀ ⊕ aI, hence G ⪯ Ω⁻¹, and the map G ↦ (T − FᵀGF)⁻¹ is monotone.

Golub & Meurant, "Matrices, Moments and Quadrature with Applications",
Princeton 2010 (ch. 6–7, block quadrature; ch. 12, bounds on uᵀA⁻¹u);
Zimmerling, Druskin & Simoncini (2024) prove the same matrix-sense
monotonicity of block Gauss / Gauss–Radau for Stieltjes functions.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import scipy.linalg
from jax.typing import ArrayLike

from ntkd.matfree.lanczos import BlockLanczos, NotPSDError, Operator, orthonormal_block

__all__ = [
    "ComplexityBounds",
    "NystromPreconditioner",
    "nystrom_preconditioner",
    "shift_from_ridge",
    "supervision_complexity_bounds",
]

NEG_CURVATURE_TOL = 100.0
"""Negative curvature is reported when a Ritz value falls below the certified
floor by more than this many machine epsilons (of the matvec's dtype) times
the operator's size ‖T‖∞."""


def _rng(key) -> np.random.Generator:
    if key is None:
        return np.random.default_rng(0)
    try:
        import jax

        data = np.asarray(jax.random.key_data(key))
    except (TypeError, ValueError):
        data = np.asarray(key)
    return np.random.default_rng(data.astype(np.uint64).ravel().tolist())


def shift_from_ridge(ridge: float, trace: float, n: int) -> float:
    """The absolute shift ρ = λ · tr K / n of the library's relative ridge λ.

    >>> shift_from_ridge(1e-3, 500.0, 100)
    0.005
    """
    if not ridge >= 0 or not trace > 0 or n < 1:
        raise ValueError(f"need ridge >= 0, trace > 0, n >= 1; got {ridge}, {trace}, {n}.")
    return float(ridge) * float(trace) / int(n)


def _interval(value: float | tuple[float, float], name: str) -> tuple[float, float]:
    lo, hi = (value, value) if np.isscalar(value) else tuple(float(v) for v in value)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be > 0 (or an interval 0 < lo <= hi), got {value}.")
    return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class ComplexityBounds:
    """A certified interval on ``C = tr(Yᵀ (K + ρI)⁻¹ Y)``.

    Attributes:
      lower: Gauss lower bound (certified whenever K is PSD and the matvec is
        exact, up to float64 round-off of the Lanczos process).
      upper: Gauss–Radau upper bound with node ``eig_lower``; certified only if
        ``upper_certified`` (the node is a proven lower bound on the smallest
        eigenvalue of the operator the quadrature ran on).
      estimate: midpoint of the interval (``|estimate − C| ≤ (upper − lower)/2``
        when certified); ``lower`` if ``upper`` is infinite.
      iterations: block Lanczos steps.
      matvecs: kernel–vector products (columns) in total, preconditioner
        sketch included.
      converged: ``(upper − lower) / lower ≤ rtol`` at return.
      upper_certified: whether ``upper`` is a proven bound.
      eig_lower: the Gauss–Radau node a.
      eig_lower_source: where a comes from: ``"shift"`` (λ_min(K + ρI) ≥ ρ for
        PSD K), ``"nystrom"`` (λ_min ≥ 1 − margin/ρ of the Nyström-
        preconditioned operator, since a Nyström approximation never exceeds
        K), ``"user"`` (``eig_lower=`` passed), ``"ritz/2 (not certified)"``
        (ρ = 0: half the smallest Ritz value, a heuristic) or ``"exact"``
        (Krylov space exhausted: lower = upper = C).
      shift: ρ.
      rtol: requested relative gap.
      n: examples; block_size: rank of Y (columns kept);
      target_norm2: ‖Y‖_F².
      exhausted: the Krylov space became invariant, the value is exact.
      preconditioner: ``None`` or ``"nystrom(rank=r)"``.
      preconditioner_matvecs: products spent on its sketch.
      history: ``(iteration, matvecs, lower, upper)`` after every step.
    """

    lower: float
    upper: float
    estimate: float
    iterations: int
    matvecs: int
    converged: bool
    upper_certified: bool
    eig_lower: float
    eig_lower_source: str
    shift: float
    rtol: float
    n: int
    block_size: int
    target_norm2: float
    exhausted: bool = False
    preconditioner: str | None = None
    preconditioner_matvecs: int = 0
    history: tuple = ()

    @property
    def relative_gap(self) -> float:
        """``(upper − lower) / lower`` (0 for an exact value)."""
        if self.lower <= 0:
            return 0.0 if self.upper == self.lower else math.inf
        return (self.upper - self.lower) / self.lower

    def adjusted(self, trace: float | tuple[float, float]) -> tuple[float, float]:
        """Interval on the adjusted complexity ``A = sqrt(C · tr K) / n``.

        Args:
          trace: tr K (exact, e.g. ``ntk_matvec(...).trace()``), or an interval
            ``(lo, hi)`` on it (e.g. a Hutch++ estimate ± z · stderr, then the
            result holds with that interval's confidence only).
        """
        lo, hi = _interval(trace, "trace")
        return (math.sqrt(self.lower * lo) / self.n, math.sqrt(self.upper * hi) / self.n)

    def normalized(self, trace: float | tuple[float, float]) -> tuple[float, float]:
        """Interval on ``Â = sqrt(C · tr K / (n · ‖Y‖_F²))`` (1 for K ∝ I)."""
        lo, hi = _interval(trace, "trace")
        d = self.n * self.target_norm2
        return (math.sqrt(self.lower * lo / d), math.sqrt(self.upper * hi / d))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["relative_gap"] = self.relative_gap
        return d


@dataclasses.dataclass(frozen=True, eq=False)
class NystromPreconditioner:
    """P = U diag(λ̂) Uᵀ + ρI from a randomized Nyström sketch of K.

    Attributes:
      U: (n, r) orthonormal; eigenvalues: (r,) λ̂ ≥ 0, decreasing.
      shift: ρ.
      margin: proven ``P ⪯ K + ρI + margin·I`` (Nyström approximations of a PSD
        matrix never exceed it; margin covers the stabilising shift ν and the
        modelled round-off of the sketch, ``10·sqrt(n)·eps·‖KΩ‖``).
      eig_lower: ``1 − margin/ρ ≤ λ_min(P^{-1/2}(K + ρI)P^{-1/2})``.
      matvecs: products spent on the sketch.
    """

    U: np.ndarray
    eigenvalues: np.ndarray
    shift: float
    margin: float
    eig_lower: float
    matvecs: int

    def inv_sqrt(self, V: np.ndarray) -> np.ndarray:
        """P^{-1/2} V for V (n, m)."""
        rho = self.shift
        d = 1.0 / np.sqrt(self.eigenvalues + rho) - 1.0 / math.sqrt(rho)
        return self.U @ (d[:, None] * (self.U.T @ V)) + V / math.sqrt(rho)


def nystrom_preconditioner(
    op: Callable[[np.ndarray], np.ndarray],
    n: int,
    rank: int,
    shift: float,
    *,
    key: jax.Array | None = None,
    eps: float = np.finfo(np.float64).eps,
    chunk: int = 64,
) -> NystromPreconditioner:
    """Randomized Nyström preconditioner (Frangella, Tropp & Udell, SIMAX 2023).

    Stable construction of Tropp, Yurtsever, Udell & Cevher (2017): sketch
    Yν = (K + νI)Ω with an orthonormal Gaussian Ω (n × r), then
    K̂ = Yν(ΩᵀYν)⁻¹Yνᵀ − νI, truncated at 0. Unlike their scaled form, P is
    ``K̂ + ρI`` so that ``P ⪯ K + ρI + margin·I`` holds and bounds the
    preconditioned spectrum from below.

    Args:
      op: validated ``V -> K V`` (float64).
      n: side of K.
      rank: sketch size r.
      shift: ρ > 0.
      key: ``jax.random`` key (or None: seed 0).
      eps: machine epsilon of the matvec's results.
      chunk: columns per matvec call.

    Returns:
      A :class:`NystromPreconditioner`.
    """
    if not shift > 0:
        raise ValueError(f"a Nyström preconditioner needs shift > 0, got {shift}.")
    rank = int(min(rank, n))
    Omega, _ = np.linalg.qr(_rng(key).standard_normal((n, rank)))
    Yn = np.concatenate([op(Omega[:, i : i + chunk]) for i in range(0, rank, chunk)], axis=1)
    norm = float(np.linalg.norm(Yn, 2))
    sketch_err = 10.0 * math.sqrt(n) * eps * norm
    nu = max(math.sqrt(n) * np.finfo(np.float64).eps * norm, 3.0 * sketch_err)
    Ynu = Yn + nu * Omega
    core = Omega.T @ Ynu
    core = 0.5 * (core + core.T)
    try:
        chol = scipy.linalg.cholesky(core, lower=True)
    except np.linalg.LinAlgError:
        lam = float(scipy.linalg.eigvalsh(core, subset_by_index=[0, 0])[0]) - nu
        raise NotPSDError(
            f"the Nyström sketch found negative curvature ΩᵀKΩ with eigenvalue "
            f"{lam:.3g} < 0: K is not positive semi-definite. Check the kernel "
            "computation."
        ) from None
    B = scipy.linalg.solve_triangular(chol, Ynu.T, lower=True).T
    U, sig, _ = np.linalg.svd(B, full_matrices=False)
    lam = np.maximum(sig**2 - nu, 0.0)
    margin = nu + 3.0 * sketch_err + 10.0 * rank * np.finfo(np.float64).eps * float(sig[0] ** 2)
    return NystromPreconditioner(
        U=U,
        eigenvalues=lam,
        shift=float(shift),
        margin=float(margin),
        eig_lower=float(1.0 - margin / shift),
        matvecs=rank,
    )


def _chol(M: np.ndarray):
    try:
        return scipy.linalg.cho_factor(M, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def _gauss_radau(
    T: np.ndarray, Z: np.ndarray, F: np.ndarray | None, a: float, chol_T
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (lower, upper) from T (N, N), Z = E_1 R_0 (N, M), coupling F, node a.

    Column sums of the matrix-sense bounds, so any group of columns can be
    summed into the bounds of that group's trace.
    """
    X = scipy.linalg.cho_solve(chol_T, Z, check_finite=False)
    lower = np.sum(Z * X, axis=0)
    if F is None:
        return lower, lower.copy()
    if not a > 0:
        return lower, np.full_like(lower, math.inf)
    W = F @ X
    G = scipy.linalg.cho_solve(chol_T, F.T, check_finite=False)
    N = T.shape[0]
    for rel in (0.0, 1e-10, 1e-6, 1e-3):
        # any node below a certified floor is certified too; shrink it only when
        # round-off makes T − aI lose definiteness
        node = a * (1.0 - rel)
        chol_m = _chol(T - node * np.eye(N))
        if chol_m is not None:
            break
    else:
        return lower, np.full_like(lower, math.inf)
    S = node * (G.T @ scipy.linalg.cho_solve(chol_m, F.T, check_finite=False))
    S = 0.5 * (S + S.T) + node * np.eye(S.shape[0])
    chol_s = _chol(S)
    if chol_s is None:
        return lower, np.full_like(lower, math.inf)
    gap = np.sum(W * scipy.linalg.cho_solve(chol_s, W, check_finite=False), axis=0)
    return lower, lower + np.maximum(gap, 0.0)


def _targets(Y) -> tuple[dict[str, np.ndarray], bool]:
    single = not isinstance(Y, Mapping)
    items = {"Y": Y} if single else dict(Y)
    if not items:
        raise ValueError("Y is an empty mapping; pass an (n, k) array or {name: (n, k_i)}.")
    out, n = {}, None
    for name, value in items.items():
        label = "Y" if single else f"Y[{name!r}]"
        arr = np.asarray(value, dtype=np.float64)
        arr = arr[:, None] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[0] < 1:
            raise ValueError(f"{label} must have shape (n, k) or (n,), got {np.shape(value)}.")
        if n is not None and arr.shape[0] != n:
            raise ValueError(f"{label} has {arr.shape[0]} rows, the other targets {n}.")
        n = arr.shape[0]
        if not np.all(np.isfinite(arr)):
            i, j = (int(t) for t in np.argwhere(~np.isfinite(arr))[0])
            raise ValueError(f"{label} has a non-finite entry [{i}, {j}] = {arr[i, j]}.")
        out[name] = arr
    return out, single


def supervision_complexity_bounds(
    matvec: Callable[[Any], ArrayLike],
    Y: ArrayLike | Mapping[str, ArrayLike],
    *,
    shift: float = 0.0,
    rtol: float = 1e-2,
    max_iters: int | None = None,
    key: jax.Array | None = None,
    eig_lower: float | None = None,
    nystrom_rank: int = 0,
    preconditioner: NystromPreconditioner | None = None,
) -> ComplexityBounds | dict[str, ComplexityBounds]:
    """Certified lower and upper bounds on ``C = tr(Yᵀ (K + ρI)⁻¹ Y)``, matrix-free.

    Block Lanczos with full reorthogonalisation (float64, on the host) on
    A = K + ρI, started from the range of Y, gives after every step a Gauss
    (lower) and a Gauss–Radau (upper) quadrature value of C (Golub & Meurant,
    "Matrices, Moments and Quadrature with Applications", 2010); it stops when
    ``(upper − lower) / lower ≤ rtol``. The upper bound needs a ≤ λ_min(A):

    * ``shift > 0``: a = ρ, certified because K is PSD (a matvec that shows
      negative curvature raises :class:`NotPSDError`);
    * ``nystrom_rank = r > 0`` (needs ``shift > 0``): Lanczos runs on the
      preconditioned P^{-1/2} A P^{-1/2}, P = K̂_nys + ρI; since a Nyström
      approximation never exceeds K, λ_min ≥ 1 − margin/ρ (``margin`` ≈
      round-off, see :func:`nystrom_preconditioner`). Worth it when K has a
      few large eigenvalues far above ρ (costs r products up front, so it pays
      when the same kernel serves several targets: build it once with
      :func:`nystrom_preconditioner` and pass ``preconditioner=``). On the
      MNIST-1D MLP eNTK it did not lower the step count (benchmarks/README.md);
    * ``eig_lower=``: a lower bound on λ_min(K + ρI) you can prove (used
      instead of ρ when larger; ignored with a preconditioner);
    * otherwise (ρ = 0): half the smallest Ritz value, a heuristic; the result
      then says ``upper_certified=False``. Only the lower bound is certified.

    Relative ridge: the library's ridge λ adds λ · tr K / n to the diagonal,
    so pass ``shift=shift_from_ridge(λ, trace, n)``. With the exact trace
    (``ntk_matvec(...).trace()``, from dense diagonal blocks) the bounds are
    on exactly the dense path's quantity; with a Hutch++ estimate
    (``ntkd.kernels.hutchpp_trace``) they are still certified for the ρ used,
    only ρ's relation to λ is then approximate.

    Round-off: the bounds are proven for the operator the matvec applies
    (assumed symmetric PSD and deterministic); float64 Lanczos round-off is
    far below the tolerance. A float32 matvec is itself a perturbation of K
    of relative size ~1e-7 · λ_max, so certification at small ρ needs a
    float64 matvec (``ntk_matvec(..., dtype=jnp.float64)`` under x64).

    Args:
      matvec: ``V (n, m) -> K @ V (n, m)`` (NumPy or JAX arrays).
      Y: targets ``(n, k)`` or ``(n,)``; or a mapping ``{name: (n, k_i)}`` of
        several targets sharing ONE block Krylov space (started from all their
        columns), each bounded separately; stops when every gap is ≤ rtol.
      shift: ρ ≥ 0, added to K's diagonal.
      rtol: stop at this relative gap.
      max_iters: cap on block steps (default ``ceil(n / rank Y) + 1``, at most 2000).
      key: ``jax.random`` key for the Nyström sketch (default seed 0).
      eig_lower: optional proven lower bound on λ_min(K + ρI).
      nystrom_rank: sketch size of the Nyström preconditioner (0: none).
      preconditioner: a :class:`NystromPreconditioner` of this K and shift,
        reused (its sketch products are not counted again).

    Returns:
      A :class:`ComplexityBounds` (a dict of them for a mapping Y, with the
      shared iterations and matvecs); ``.adjusted(trace)`` and
      ``.normalized(trace)`` give the intervals on A and Â.

    Raises:
      MatvecError: the matvec returned a wrong shape, a non-finite value, or
        showed asymmetry.
      NotPSDError: negative curvature (K not PSD), or a violated ``eig_lower``.
      ValueError: bad Y, shift, rtol.

    >>> K = np.diag([1.0, 2.0, 4.0, 8.0])
    >>> b = supervision_complexity_bounds(lambda V: K @ V, np.ones(4), shift=0.5)
    >>> round(b.lower, 10), round(b.upper, 10), b.exhausted   # 1/1.5 + 1/2.5 + 1/4.5 + 1/8.5
    (1.4065359477, 1.4065359477, True)
    """
    targets, single = _targets(Y)
    Y_np = np.concatenate(list(targets.values()), axis=1)
    cols, start_col = {}, 0
    for name, arr in targets.items():
        cols[name] = slice(start_col, start_col + arr.shape[1])
        start_col += arr.shape[1]
    if not (np.isfinite(shift) and shift >= 0):
        raise ValueError(
            f"shift must be a finite ρ >= 0, got {shift}; "
            "a relative ridge λ converts with shift_from_ridge(λ, trace, n)."
        )
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol}.")
    if eig_lower is not None and not eig_lower > 0:
        raise ValueError(
            f"eig_lower must be > 0 (a lower bound on λ_min(K + ρI)), got {eig_lower}."
        )
    n = Y_np.shape[0]
    rho = float(shift)
    op = Operator(matvec, n)

    precond = preconditioner
    if precond is not None and (precond.shift != rho or precond.U.shape[0] != n):
        raise ValueError(
            f"the preconditioner was built for shift={precond.shift:g} and n={precond.U.shape[0]}, "
            f"not shift={rho:g} and n={n}; build one for this shift."
        )
    if precond is None and nystrom_rank:
        if rho <= 0:
            raise ValueError(
                f"nystrom_rank={nystrom_rank} needs shift > 0: the preconditioner is "
                "K̂ + ρI. Use a (relative) ridge, or nystrom_rank=0."
            )
        precond = nystrom_preconditioner(op, n, nystrom_rank, rho, key=key, eps=op.eps)
    if precond is not None and precond.eig_lower < 0.5:
        warnings.warn(
            f"the Nyström preconditioner cannot be certified at shift={rho:.3g}: its "
            f"round-off margin {precond.margin:.3g} is not small against ρ (matvec eps "
            f"{op.eps:.2g}); running without it. Use a float64 matvec or a larger shift.",
            stacklevel=2,
        )
        precond = None

    if precond is not None:
        start = precond.inv_sqrt(Y_np)

        def lanczos_op(V):
            PV = precond.inv_sqrt(V)
            return precond.inv_sqrt(op(PV) + rho * PV)

        add = 0.0
        a, source, certified = precond.eig_lower, "nystrom", True
        floor = precond.eig_lower
    else:
        start, lanczos_op, add = Y_np, op, rho
        if rho > 0:
            a, source, certified = rho, "shift", True
        elif eig_lower is not None:
            a, source, certified = float(eig_lower), "user", True
        else:
            a, source, certified = math.nan, "ritz/2 (not certified)", False
        floor = rho
    if eig_lower is not None and precond is None and rho > 0 and eig_lower > rho:
        a, source = float(eig_lower), "user"
    if eig_lower is not None and source == "user":
        floor = a

    Q1, R0 = orthonormal_block(start)
    p = Q1.shape[1]
    common = dict(
        shift=rho,
        rtol=float(rtol),
        n=n,
        block_size=p,
        preconditioner=None if precond is None else f"nystrom(rank={precond.U.shape[1]})",
        preconditioner_matvecs=0
        if precond is None or preconditioner is not None
        else precond.matvecs,
    )

    def result(lower, upper, **kw):
        out = {}
        for name, sl in cols.items():
            lo, hi = float(np.sum(lower[sl])), float(np.sum(upper[sl]))
            out[name] = ComplexityBounds(
                lower=lo,
                upper=hi,
                estimate=0.5 * (lo + hi) if math.isfinite(hi) else lo,
                converged=bool(kw["exhausted"] or hi - lo <= rtol * lo),
                target_norm2=float(np.sum(targets[name] ** 2)),
                history=tuple(
                    (it, mv, float(np.sum(l[sl])), float(np.sum(u[sl]))) for it, mv, l, u in history
                ),
                **kw,
                **common,
            )
        return out["Y"] if single else out

    history = []
    if p == 0:
        zero = np.zeros(Y_np.shape[1])
        return result(
            zero,
            zero,
            iterations=0,
            matvecs=op.matvecs,
            upper_certified=True,
            eig_lower=0.0,
            eig_lower_source="exact",
            exhausted=True,
        )
    max_iters = min(math.ceil(n / p) + 1, 2000) if max_iters is None else int(max_iters)
    lz = BlockLanczos(lanczos_op, Q1, eps=lambda: op.eps)
    lower = np.zeros(Y_np.shape[1])
    upper = np.full(Y_np.shape[1], math.inf)
    while lz.steps < max_iters:
        lz.step()
        N = lz.T.shape[0]
        T = lz.T + add * np.eye(N)
        tol = NEG_CURVATURE_TOL * op.eps * lz.scale
        if _chol(T - (floor - tol) * np.eye(N)) is None:
            theta = float(scipy.linalg.eigvalsh(T, subset_by_index=[0, 0])[0])
            if source == "user":
                raise NotPSDError(
                    f"Lanczos found a Rayleigh quotient {theta:.6g} of K + ρI below "
                    f"eig_lower={a:.6g} at step {lz.steps}: eig_lower is not a lower bound "
                    "on λ_min(K + ρI) (or K is not PSD). Pass a smaller eig_lower."
                )
            what = "K" if precond is None else "the Nyström-preconditioned operator"
            raise NotPSDError(
                f"negative curvature at Lanczos step {lz.steps}: {what} has a Rayleigh "
                f"quotient {theta - add:.6g} below the floor {floor - add:.6g} that a PSD "
                f"kernel guarantees (tolerance {tol:.3g}). K is not positive "
                "semi-definite; check the kernel computation (symmetric? the matvec of a "
                "Gram matrix JJᵀ?)."
            )
        chol_T = _chol(T)
        if chol_T is None:
            raise NotPSDError(
                f"K restricted to the Krylov space is numerically singular at step "
                f"{lz.steps} with shift={rho:g}: C is infinite or dominated by round-off. "
                "Use a shift (e.g. shift_from_ridge(1e-6, trace, n))."
            )
        Z = np.zeros((N, R0.shape[1]))
        Z[:p] = R0
        if lz.exhausted:
            lower, upper = _gauss_radau(T, Z, None, a, chol_T)
            a, source, certified = a if math.isfinite(a) else 0.0, "exact", True
        else:
            if source.startswith("ritz"):
                a = 0.5 * float(scipy.linalg.eigvalsh(T, subset_by_index=[0, 0])[0])
            lower, upper = _gauss_radau(T, Z, lz.F, a, chol_T)
        history.append((lz.steps, op.matvecs, lower, upper))
        if lz.exhausted or all(
            np.sum(upper[sl]) - np.sum(lower[sl]) <= rtol * np.sum(lower[sl])
            for sl in cols.values()
        ):
            break
    return result(
        lower,
        upper,
        iterations=lz.steps,
        matvecs=op.matvecs,
        upper_certified=bool(certified),
        eig_lower=float(a),
        eig_lower_source=source,
        exhausted=lz.exhausted,
    )
