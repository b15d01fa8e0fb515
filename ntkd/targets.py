"""Supervision targets whose complexity ntkd measures.

SPEC §2 names the conventions: one-hot labels, random labels, and teacher
soft labels softmax(z / τ), optionally centred by subtracting 1/k so that every
row sums to zero. All functions return float32 ``jax.Array`` targets of shape
``(n, k)``.

Reference: Harutyunyan, Rawat, Menon, Kim, Kumar, "Supervision Complexity and
its Role in Knowledge Distillation", ICLR 2023, arXiv 2301.12245.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["one_hot", "random_labels", "softmax_targets"]


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
                "labels.astype(int) or use softmax_targets for soft labels.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= k):
        bad = labels_np[(labels_np < 0) | (labels_np >= k)][0]
        raise ValueError(f"label {bad} is outside [0, {k}); check k={k}.")
    return jax.nn.one_hot(jnp.asarray(labels), k, dtype=jnp.float32)


def random_labels(key: jax.Array, n: int, k: int) -> jax.Array:
    """One-hot targets of classes drawn uniformly at random.

    The reference "random labels" curve of the paper: its supervision
    complexity is the ceiling that learnable targets should stay well below.

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


def softmax_targets(logits: ArrayLike,
                                        temperature: float = 1.0,
                                        *,
                                        center: bool = False) -> jax.Array:
    """Teacher soft labels ``softmax(logits / temperature)``.

    Higher temperatures give smoother targets and, in the student's NTK, lower
    supervision complexity (SPEC §2, §5).

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
