"""Supervision targets whose complexity ntkd measures.

The conventions (docs/definitions.md#targets-and-temperature): one-hot labels,
random labels, and teacher soft labels softmax(z / τ), optionally centred by
subtracting 1/k so that every row sums to zero; these return float32
``jax.Array`` targets of shape ``(n, k)``. Label smoothing, the size control,
returns float64 NumPy targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "label_smoothing",
    "matched_label_smoothing",
    "one_hot",
    "random_labels",
    "softmax_targets",
]


def one_hot(labels: ArrayLike, k: int) -> jax.Array:
    """One-hot encodes integer class labels.

    Args:
        labels: ``(n,)`` integer class indices in ``[0, k)``.
        k: number of classes.

    Returns:
        ``(n, k)`` float32 targets with a single 1 per row.

    Raises:
        ValueError: if ``labels`` is not 1-D, not integer, or out of range.

    >>> one_hot(jnp.array([0, 2]), 3)
    Array([[1., 0., 0.],
           [0., 0., 1.]], dtype=float32)
    """
    labels_np = np.asarray(labels)
    if labels_np.ndim != 1:
        raise ValueError(f"labels must have shape (n,), got {labels_np.shape}.")
    if not np.issubdtype(labels_np.dtype, np.integer):
        raise ValueError(
            f"labels must be integers, got dtype {labels_np.dtype}; cast with "
            "labels.astype(int) or use softmax_targets for soft labels."
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= k):
        bad = labels_np[(labels_np < 0) | (labels_np >= k)][0]
        raise ValueError(f"label {bad} is outside [0, {k}); check k={k}.")
    return jax.nn.one_hot(jnp.asarray(labels), k, dtype=jnp.float32)


def random_labels(key: jax.Array, n: int, k: int) -> jax.Array:
    """One-hot targets of classes drawn uniformly at random.

    The reference "random labels" curve of Harutyunyan et al. (ICLR 2023,
    arXiv 2301.12245): its supervision complexity is the ceiling that
    learnable targets should stay well below.

    Args:
        key: a ``jax.random`` key.
        n: number of examples.
        k: number of classes.

    Returns:
        ``(n, k)`` float32 one-hot targets.

    >>> random_labels(jax.random.key(0), 4, 10).shape
    (4, 10)
    """
    classes = jax.random.randint(key, (n,), 0, k)
    return jax.nn.one_hot(classes, k, dtype=jnp.float32)


def softmax_targets(
    logits: ArrayLike, temperature: float = 1.0, *, center: bool = False
) -> jax.Array:
    """Teacher soft labels ``softmax(logits / temperature)``.

    Higher temperatures give smoother targets and, in the student's NTK, lower
    supervision complexity (docs/definitions.md#supervision-complexity; Harutyunyan et al., ICLR 2023,
    arXiv 2301.12245).

    Args:
        logits: ``(n, k)`` teacher logits.
        temperature: softmax temperature τ > 0.
        center: if True subtract ``1/k`` from every entry, so rows sum to zero
            (removes the constant component shared by all targets).

    Returns:
        ``(n, k)`` float32 targets.

    Raises:
        ValueError: on a non-positive temperature or logits that are not 2-D.

    >>> softmax_targets(jnp.zeros((1, 2)), 4.0)
    Array([[0.5, 0.5]], dtype=float32)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = jnp.asarray(logits, dtype=jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (n, k), got {logits.shape}.")
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    if center:
        probs = probs - 1.0 / logits.shape[-1]
    return probs


def label_smoothing(labels: ArrayLike, k: int, epsilon: float) -> np.ndarray:
    """Label-smoothed targets ``(1 − ε)·one_hot + ε / k``.

    Args:
        labels: ``(n,)`` integer class indices.
        k: number of classes.
        epsilon: smoothing ε in [0, 1].

    Returns:
        ``(n, k)`` float64 targets.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"label smoothing epsilon must lie in [0, 1], got {epsilon}")
    return (1.0 - epsilon) * np.asarray(one_hot(labels, k), np.float64) + epsilon / k


def matched_label_smoothing(
    labels: ArrayLike, k: int, frobenius_norm: float
) -> tuple[np.ndarray, float]:
    """Label smoothing whose targets have a given Frobenius norm.

    The control for "is this a property of the targets' shape or only of their
    size?": teacher targets ``Y_T`` are compared with smoothed labels of the same
    ‖·‖_F. Each smoothed row has squared norm ``a² + (1 − a)² / (k − 1)`` with
    ``a = 1 − ε(k − 1)/k``, decreasing in ε from 1 (one-hot) to 1/k (uniform);
    ε solves ``k a² − 2a + 1 − s(k − 1) = 0`` for the mean squared row norm s.

    Args:
        labels: ``(n,)`` integer class indices.
        k: number of classes (≥ 2).
        frobenius_norm: the norm to match, in ``[sqrt(n / k), sqrt(n)]``.

    Returns:
        ``(targets (n, k) float64, ε)``.

    >>> Y, eps = matched_label_smoothing(np.array([0, 1, 2]), 3, np.sqrt(3.0))
    >>> eps
    0.0
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    s = float(frobenius_norm) ** 2 / n
    if not 1.0 / k - 1e-12 <= s <= 1.0 + 1e-12:
        raise ValueError(
            f"a norm of {frobenius_norm:.6g} for {n} rows of {k} classes cannot come from label "
            f"smoothing: the mean squared row norm {s:.6g} must lie in [1/k, 1] = [{1 / k:.6g}, 1]"
        )
    a = (1.0 + np.sqrt(max(1.0 - k + s * k * (k - 1), 0.0))) / k
    eps = float(min(max((1.0 - a) * k / (k - 1), 0.0), 1.0))
    return label_smoothing(labels, k, eps), eps
