"""Projected eNTK: per-example gradients through a random projection.

For a Jacobian J (rows (example, logit), P parameters) and a random Π (d × P)
with i.i.d. entries of variance 1/d (Rademacher ±1/√d or Gaussian), the
features Φ = J Πᵀ give the unbiased kernel K̂ = Φ Φᵀ, E[K̂] = J Jᵀ = K
(Johnson–Lindenstrauss; the TRAK idea of Park et al., ICML 2023, and the
projected NTK of Arora et al. / "Fast finite width NTK" §5). For Gaussian Π,

    E ‖K̂ − K‖_F² = (‖K‖_F² + (tr K)²) / d     (one logit),

so the relative Frobenius error falls like 1/sqrt(d):
``rel ≈ sqrt((1 + (tr K)² / ‖K‖_F²) / d)``; Rademacher entries have a
slightly smaller variance. Φ is computed with d JVPs per block of examples
(vmapped over chunks of directions, each direction drawn inside the compiled
function from ``fold_in(key, j)``), so neither J nor Π is ever materialised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from ntkd import ntk

__all__ = ["ProjectedNTK", "projected_ntk"]


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectedNTK:
    """Projected eNTK features and their measured error.

    Attributes:
      features: (n, k, d) for ``trace`` / ``full``, (n, d) for ``sum`` / ``logit``.
      mode: kernel mode; dim: d; kind: ``"rademacher"`` or ``"gaussian"``.
      error: relative Frobenius error ``‖K̂ − K‖_F / ‖K‖_F`` against the exact
        eNTK on the first ``check_n`` examples (None if not measured).
      max_error: ``max |K̂ − K| / max |K|`` there.
      predicted_error: ``sqrt((1 + (tr K)²/‖K‖_F²) / d)`` on the same subset
        (the Gaussian-Π expectation; None if not measured).
      check_n: examples in the check.
    """

    features: np.ndarray
    mode: str
    dim: int
    kind: str
    error: float | None
    max_error: float | None
    predicted_error: float | None
    check_n: int

    def kernel(self, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """K̂ on examples ``rows`` × ``cols``: (n1, n2) or (n1·k, n2·k) for ``full``."""
        A = self.features[rows or slice(None)]
        B = self.features[cols or slice(None)]
        if self.mode == "trace":
            return np.einsum("iad,jad->ij", A, B)
        if self.mode == "full":
            return np.einsum("iad,jbd->iajb", A, B).reshape(A.shape[0] * A.shape[1], -1)
        return A @ B.T

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """K̂ @ V in O(n·k·d·m), for :func:`supervision_complexity_bounds`."""
        F = self.features
        if self.mode == "trace":
            return np.einsum("iad,adm->im", F, np.einsum("iad,im->adm", F, V))
        if self.mode == "full":
            Fm = F.reshape(-1, F.shape[-1])
            return Fm @ (Fm.T @ V)
        return F @ (F.T @ V)


def projected_ntk(
    apply_fn: Callable,
    params: Any,
    x: ArrayLike,
    *,
    dim: int,
    mode: str = "trace",
    logit: int = 0,
    kind: str = "rademacher",
    key: jax.Array | None = None,
    block_size: int = 512,
    chunk: int = 64,
    check_n: int = 256,
    dtype: DTypeLike | None = None,
) -> ProjectedNTK:
    """Random-projection eNTK features Φ = J Πᵀ, block by block, with their error.

    Args:
      apply_fn: ``apply_fn(params, x) -> (batch, k)`` (eval mode).
      params: parameter pytree.
      x: (n, ...) inputs.
      dim: projection dimension d.
      mode: ``"trace"`` (K̂ = Σ_a Φ_a Φ_aᵀ), ``"full"``, ``"sum"`` or ``"logit"``.
      logit: the logit of ``mode="logit"``.
      kind: ``"rademacher"`` (±1/√d) or ``"gaussian"`` (N(0, 1/d)).
      key: ``jax.random`` key (default ``jax.random.key(0)``).
      block_size: examples per block.
      chunk: directions per vmapped JVP.
      check_n: measure the error against ``ntkd.ntk.empirical_ntk`` on the first
        ``check_n`` examples (0: skip).
      dtype: cast params and inputs.

    Returns:
      :class:`ProjectedNTK` (``.kernel()``, ``.matvec(V)``, ``.error``).

    Example:
      >>> proj = projected_ntk(apply_fn, params, x, dim=2048)
      >>> proj.error, proj.predicted_error     # measured vs expected ~1/sqrt(d)
    """
    if mode not in ("trace", "full", "sum", "logit"):
        raise ValueError(f"mode must be trace, full, sum or logit, got {mode!r}.")
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}.")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}.")
    key = jax.random.key(0) if key is None else key
    x = np.asarray(x)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        x = x.astype(dtype)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    chunk = min(chunk, dim)
    nchunks = math.ceil(dim / chunk)

    def direction(j):
        kj = jax.random.fold_in(key, j)
        out = []
        for i, leaf in enumerate(leaves):
            ki = jax.random.fold_in(kj, i)
            if kind == "rademacher":
                r = jax.random.rademacher(ki, leaf.shape, dtype=leaf.dtype)
            else:
                r = jax.random.normal(ki, leaf.shape, dtype=leaf.dtype)
            out.append(r / math.sqrt(dim))
        return jax.tree_util.tree_unflatten(treedef, out)

    @jax.jit
    def block_features(params, xb, c):
        js = c * chunk + jnp.arange(chunk)
        tangents = jax.vmap(direction)(js)
        f = lambda p: apply_fn(p, xb)  # noqa: E731
        outs = jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(tangents)  # (chunk, b, k)
        if mode == "sum":
            outs = outs.sum(-1, keepdims=True)
        elif mode == "logit":
            outs = outs[:, :, logit : logit + 1]
        return jnp.transpose(outs, (1, 2, 0))  # (b, k', chunk)

    n = x.shape[0]
    feats = []
    for s in range(0, n, block_size):
        xb = x[s : s + block_size]
        real = xb.shape[0]
        if real < block_size and n > block_size:  # one compiled shape
            xb = np.concatenate([xb, np.zeros((block_size - real, *xb.shape[1:]), xb.dtype)])
        parts = [np.asarray(block_features(params, jnp.asarray(xb), c)) for c in range(nchunks)]
        feats.append(np.concatenate(parts, axis=-1)[:real, :, :dim])
    F = np.concatenate(feats).astype(np.float64)
    if mode in ("sum", "logit"):
        F = F[:, 0]
    result = ProjectedNTK(
        features=F,
        mode=mode,
        dim=int(dim),
        kind=kind,
        error=None,
        max_error=None,
        predicted_error=None,
        check_n=0,
    )
    m = min(check_n, n)
    if m:
        K = np.asarray(
            ntk.empirical_ntk(apply_fn, params, jnp.asarray(x[:m]), mode=mode, logit=logit),
            np.float64,
        )
        if mode == "full":
            K = K.transpose(0, 2, 1, 3).reshape(m * K.shape[2], -1)
        Kh = result.kernel(slice(0, m), slice(0, m))
        fro = float(np.linalg.norm(K))
        result = dataclasses.replace(
            result,
            check_n=m,
            error=float(np.linalg.norm(Kh - K) / fro),
            max_error=float(np.max(np.abs(Kh - K)) / np.max(np.abs(K))),
            predicted_error=float(math.sqrt((1.0 + np.trace(K) ** 2 / fro**2) / dim)),
        )
    return result
