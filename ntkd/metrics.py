"""Prediction metrics: accuracy, fidelity, KL, margins (docs/definitions.md#margins,
docs/definitions.md#fidelity).

All functions take logits ``(n, k)`` and are jittable.

Example:
    >>> z = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    >>> float(accuracy(z, jnp.array([0, 2])))
    0.5
    >>> margins(z, jnp.array([0, 2])).tolist()
    [1.0, -2.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def _check_logits(name: str, logits: ArrayLike) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (n, k), got {logits.shape}")
    return logits


def _check_labels(labels: ArrayLike, logits: jax.Array) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits {logits.shape}, "
            f"got {labels.shape}"
        )
    return labels


def accuracy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Top-1 accuracy of ``logits`` (n, k) against integer ``labels`` (n,)."""
    logits = _check_logits("logits", logits)
    return jnp.mean(jnp.argmax(logits, -1) == _check_labels(labels, logits))


def fidelity(student_logits: ArrayLike, teacher_logits: ArrayLike) -> jax.Array:
    """Top-1 agreement between student and teacher predictions, both (n, k)."""
    s = _check_logits("student_logits", student_logits)
    t = _check_logits("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"student logits {s.shape} and teacher logits {t.shape} differ in shape")
    return jnp.mean(jnp.argmax(s, -1) == jnp.argmax(t, -1))


def mean_kl(
    teacher_logits: ArrayLike, student_logits: ArrayLike, temperature: float = 1.0
) -> jax.Array:
    """Mean over examples of KL(softmax(z_T/τ) ‖ softmax(z_S/τ))."""
    t = _check_logits("teacher_logits", teacher_logits) / temperature
    s = _check_logits("student_logits", student_logits) / temperature
    log_pt, log_ps = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
    return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1))


def margins(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Per-example margins ρ = f[t] − max_{c≠t} f[c], shape (n,).

    ``labels`` are the reference classes t: true labels, or the teacher's argmax
    for margins "with respect to the teacher".
    """
    logits = _check_logits("logits", logits)
    labels = _check_labels(labels, logits)
    true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true - jnp.max(others, -1)


def margin_error(margin_values: ArrayLike, gamma: float = 0.0) -> jax.Array:
    """Fraction of examples with margin ≤ γ (the γ-margin error)."""
    return jnp.mean(jnp.asarray(margin_values) <= gamma)


def margin_summary(margin_values: ArrayLike, gammas=(0.0, 1.0)) -> dict[str, float]:
    """Distribution summary of margins: mean, quartiles and γ-margin errors."""
    m = np.asarray(margin_values, np.float64)
    q = np.quantile(m, [0.1, 0.25, 0.5, 0.75, 0.9])
    out = {
        "mean": float(m.mean()),
        "p10": q[0],
        "p25": q[1],
        "median": q[2],
        "p75": q[3],
        "p90": q[4],
    }
    out.update({f"error@{g:g}": float(np.mean(m <= g)) for g in gammas})
    return {k: float(v) for k, v in out.items()}
