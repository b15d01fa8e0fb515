"""Distillation of linear and deep linear classifiers (Phuong & Lampert, ICML 2019).

Reference: M. Phuong, C. H. Lampert, "Towards Understanding Knowledge
Distillation", ICML 2019, PMLR 97:5142-5151 (arXiv 2105.13093).

Setting. A linear teacher ``w_star`` (d,) labels unlabeled inputs ``x`` (n, d)
with soft labels ``sigmoid(x @ w_star)``. A linear student ``w`` (or deep linear
student with end-to-end weight ``W_N ... W_1``) minimises the soft-label binary
cross-entropy. Every per-sample loss is minimised exactly where the student's
logit equals the teacher's, so the global minimisers form ``w_star + span(X)^⊥``
and gradient descent from ``w0`` stops at ``w0 + P_X (w_star - w0)``.

The polynomial-angle task (a generator proposed for this toolkit, docs/theory.md) has ``w_star = e_1`` and inputs on
the unit sphere whose angle ``phi`` to the teacher's decision hyperplane obeys
``P[phi <= theta] = (2 theta / pi) ** kappa``. For it, the transfer risk of any
student depends only on the angle ``alpha`` between student and teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from scipy import special

__all__ = [
    "angle",
    "angular_margin_cdf",
    "distillation_loss",
    "fit_deep_linear_gd",
    "fit_linear_gd",
    "minimiser_at_angle",
    "polynomial_angle_inputs",
    "projection_solution",
    "risk_bound",
    "risk_increases",
    "transfer_risk",
    "transfer_risk_closed_form",
]


def _check_kappa(kappa: float) -> None:
    if not kappa > 0:
        raise ValueError(
            f"kappa must be > 0 (degree of p(theta) = (2 theta/pi)^kappa), got {kappa!r}"
        )


def polynomial_angle_inputs(rng: np.random.Generator, n: int, d: int, kappa: float) -> np.ndarray:
    """Sample inputs of the polynomial-angle task with teacher ``w_star = e_1``.

    ``x = s (sin(phi) e_1 + cos(phi) v)`` with ``phi = (pi/2) U^(1/kappa)``,
    ``U ~ Unif(0, 1)``, a random sign ``s`` and ``v`` uniform on the unit sphere
    of ``e_1^⊥``, so that ``P[phi <= theta] = (2 theta / pi) ** kappa``.

    Args:
      rng: NumPy random generator.
      n: number of inputs.
      d: input dimension, >= 3.
      kappa: degree of the margin distribution, > 0. Larger is better separated.

    Returns:
      x: (n, d) float64 unit vectors.

    >>> x = polynomial_angle_inputs(np.random.default_rng(0), 5, 10, kappa=2.0)
    >>> x.shape
    (5, 10)
    """
    _check_kappa(kappa)
    if d < 3:
        raise ValueError(f"d must be >= 3 for the polynomial-angle task, got {d}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    phi = 0.5 * np.pi * rng.uniform(size=n) ** (1.0 / kappa)
    sign = rng.choice([-1.0, 1.0], size=n)
    v = rng.standard_normal((n, d - 1))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    x = np.concatenate([np.sin(phi)[:, None], np.cos(phi)[:, None] * v], axis=1)
    return sign[:, None] * x


def angular_margin_cdf(theta: ArrayLike, kappa: float) -> np.ndarray:
    """``p(theta) = P[phi <= theta] = (2 theta / pi) ** kappa``, clipped to [0, 1].

    Args:
      theta: angles in radians, any shape.
      kappa: degree of the polynomial, > 0.

    Returns:
      Probabilities with the shape of ``theta``.
    """
    _check_kappa(kappa)
    t = np.clip(np.asarray(theta, dtype=np.float64) / (0.5 * np.pi), 0.0, 1.0)
    return t**kappa


def risk_bound(n: int, kappa: float, num_beta: int = 20001) -> float:
    """Phuong-Lampert bound ``min_beta p(beta) + p(pi/2 - beta) ** n``.

    Bounds the expected transfer risk of the gradient-descent distilled linear
    student trained on ``n`` points; it does not depend on the dimension.

    Args:
      n: transfer-set size, >= 0.
      kappa: degree of ``p(theta) = (2 theta/pi)^kappa``.
      num_beta: size of the uniform grid of beta on [0, pi/2].

    Returns:
      The bound, in [0, 1].
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    beta = np.linspace(0.0, 0.5 * np.pi, num_beta)
    values = angular_margin_cdf(beta, kappa) + angular_margin_cdf(0.5 * np.pi - beta, kappa) ** n
    return float(min(values.min(), 1.0))


def angle(u: ArrayLike, v: ArrayLike) -> float:
    """Angle in radians between two nonzero vectors (d,)."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return 0.5 * np.pi
    return float(np.arccos(np.clip(u @ v / (nu * nv), -1.0, 1.0)))


def transfer_risk(w: ArrayLike, w_star: ArrayLike, x: ArrayLike) -> float:
    """Monte Carlo transfer risk ``P[sign(w.x) != sign(w_star.x)]`` on inputs ``x`` (m, d)."""
    x = np.asarray(x)
    return float(np.mean(np.sign(x @ np.asarray(w)) != np.sign(x @ np.asarray(w_star))))


def transfer_risk_closed_form(
    alpha: ArrayLike, d: int, kappa: float, num_nodes: int = 256
) -> np.ndarray | float:
    """Exact transfer risk on the polynomial-angle task at student angle ``alpha``.

    With ``t = u.v`` for independent uniform unit vectors of ``e_1^⊥``,
    ``(t + 1)/2 ~ Beta((d-2)/2, (d-2)/2)``, and a point at margin ``phi`` is
    misclassified iff ``t < -tan(phi) cot(alpha)``. Conditioning on ``s = -t``
    instead of ``phi`` gives a one-dimensional integral

    ``R(alpha) = int_0^1 p(arctan(s tan(alpha))) g(s) ds``

    with ``g(s) = (1 - s^2)^(a-1) / (2^(2a-1) B(a, a))``, ``a = (d-2)/2``, the
    density of ``-t`` (equivalently ``E_phi[F_Beta((1 - tan(phi) cot(alpha))/2)]``).
    The substitution ``s = sin(pi w^2 / 2)`` removes the endpoint singularities
    and Gauss-Legendre quadrature in ``w`` evaluates it; for large ``d`` the
    range stops at ``s = 12/sqrt(d-1)``, beyond which ``g < e^-70``.

    Args:
      alpha: angle(s) between student and teacher in [0, pi] radians, any shape.
      d: input dimension, >= 3.
      kappa: degree of the margin distribution.
      num_nodes: quadrature nodes.

    Returns:
      Risk in [0, 1] with the shape of ``alpha`` (a float for scalar input);
      0 at ``alpha = 0``, 0.5 at ``pi/2`` and ``R(pi - alpha) = 1 - R(alpha)``.
    """
    _check_kappa(kappa)
    if d < 3:
        raise ValueError(f"d must be >= 3, got {d}")
    alpha_arr = np.asarray(alpha, dtype=np.float64)
    if np.any((alpha_arr < 0) | (alpha_arr > np.pi)) or np.any(np.isnan(alpha_arr)):
        raise ValueError(f"alpha must be in [0, pi] radians, got {alpha!r}")
    flip = alpha_arr > 0.5 * np.pi
    acute = np.where(flip, np.pi - alpha_arr, alpha_arr)

    a = 0.5 * (d - 2)
    s_max = min(1.0, 12.0 / math.sqrt(d - 1))
    w_max = math.sqrt(2.0 / np.pi * math.asin(s_max))
    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
    w = 0.5 * w_max * (nodes + 1.0)
    u = 0.5 * np.pi * w**2
    s = np.sin(u)
    # g(s) ds = 2^(1-2a)/B(a,a) * cos(u)^(2a-1) * pi w dw.
    log_g = (1 - 2 * a) * math.log(2.0) - float(special.betaln(a, a))
    jac = np.exp(log_g) * np.cos(u) ** (2 * a - 1) * np.pi * w * 0.5 * w_max * weights
    margin = np.arctan(s[None, :] * np.tan(np.minimum(acute.reshape(-1, 1), 0.5 * np.pi)))
    risk = angular_margin_cdf(margin, kappa) @ jac
    risk = np.clip(risk.reshape(acute.shape), 0.0, 1.0)
    risk = np.where(acute == 0.0, 0.0, np.where(acute == 0.5 * np.pi, 0.5, risk))
    risk = np.where(flip, 1.0 - risk, risk)
    return float(risk) if risk.ndim == 0 else risk


def projection_solution(x: ArrayLike, w_star: ArrayLike, w0: ArrayLike | None = None) -> np.ndarray:
    """Closed-form limit of gradient descent: ``w0 + P_X (w_star - w0)``.

    ``P_X`` projects onto the span of the rows of ``x``; from zero init this is
    the minimum-norm interpolant of the teacher's logits.

    Args:
      x: (n, d) transfer inputs.
      w_star: (d,) teacher weights.
      w0: (d,) initialisation; zeros if None.

    Returns:
      (d,) float64 weights.
    """
    x = np.asarray(x, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    w0 = np.zeros_like(w_star) if w0 is None else np.asarray(w0, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != w_star.shape[0]:
        raise ValueError(
            f"x must be (n, d) with d = len(w_star) = {w_star.shape[0]}, got {x.shape}"
        )
    delta = w_star - w0
    coef, *_ = np.linalg.lstsq(x, x @ delta, rcond=None)
    return w0 + coef


def distillation_loss(w: ArrayLike, x: ArrayLike, soft_labels: ArrayLike) -> jax.Array:
    """Soft-label binary cross-entropy ``mean_i[softplus(z_i) - y_i z_i]``, ``z = x @ w``.

    Args:
      w: (d,) student weights.
      x: (n, d) inputs.
      soft_labels: (n,) teacher probabilities ``sigmoid(x @ w_star)``.

    Returns:
      Scalar loss.
    """
    z = jnp.asarray(x) @ jnp.asarray(w)
    return jnp.mean(jax.nn.softplus(z) - jnp.asarray(soft_labels) * z)


def _smoothness(x: np.ndarray) -> float:
    # sigmoid' <= 1/4, so the BCE Hessian is below X^T X / (4 n).
    return float(np.linalg.norm(x, 2) ** 2 / (4 * x.shape[0]))


@jax.jit
def _gd_linear(w0, x, soft_labels, learning_rate, grad_tol, max_steps):
    grad_fn = jax.grad(distillation_loss)

    def cond(state):
        _, g_norm, step = state
        return (g_norm > grad_tol) & (step < max_steps)

    def body(state):
        w, _, step = state
        g = grad_fn(w, x, soft_labels)
        return w - learning_rate * g, jnp.linalg.norm(g), step + 1

    w, _, steps = jax.lax.while_loop(cond, body, (w0, jnp.asarray(jnp.inf, w0.dtype), 0))
    return w, steps


def fit_linear_gd(
    x: ArrayLike,
    soft_labels: ArrayLike,
    *,
    w0: ArrayLike | None = None,
    learning_rate: float | None = None,
    grad_tol: float = 1e-12,
    max_steps: int = 200_000,
) -> tuple[np.ndarray, int]:
    """Full-batch gradient descent on the soft-label distillation loss.

    Run under ``jax.enable_x64(True)`` for float64 precision.

    Args:
      x: (n, d) transfer inputs.
      soft_labels: (n,) teacher probabilities.
      w0: (d,) initialisation; zeros if None.
      learning_rate: step size; ``1/L`` with ``L = ||X||_2^2 / (4n)`` if None.
      grad_tol: stop when the gradient norm falls below this.
      max_steps: hard cap on the number of steps.

    Returns:
      w: (d,) final weights.
      steps: number of steps taken.
    """
    x_np = np.asarray(x)
    if x_np.ndim != 2 or np.shape(soft_labels) != (x_np.shape[0],):
        raise ValueError(
            f"x must be (n, d) and soft_labels (n,); got {x_np.shape} and {np.shape(soft_labels)}"
        )
    lr = 1.0 / _smoothness(x_np) if learning_rate is None else learning_rate
    if not lr > 0:
        raise ValueError(f"learning_rate must be > 0, got {lr!r}")
    dtype = jnp.asarray(x_np).dtype
    w_init = jnp.zeros(x_np.shape[1], dtype) if w0 is None else jnp.asarray(w0, dtype)
    w, steps = _gd_linear(
        w_init, jnp.asarray(x_np, dtype), jnp.asarray(soft_labels, dtype), lr, grad_tol, max_steps
    )
    return np.asarray(w), int(steps)


def _end_to_end(layers):
    w = layers[0]
    for layer in layers[1:]:
        w = layer @ w
    return w[0]


def fit_deep_linear_gd(
    x: ArrayLike,
    soft_labels: ArrayLike,
    *,
    depth: int,
    width: int,
    init_scale: float,
    key: jax.Array,
    learning_rate: float | None = None,
    steps: int = 20_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient descent for a deep linear student ``f(x) = W_N ... W_1 x``.

    Layer shapes: ``W_1`` (width, d), ``W_j`` (width, width), ``W_N`` (1, width).
    Entries start at ``init_scale * N(0, 1/fan_in)``; from a small init the
    end-to-end weight approaches ``P_X w_star`` up to O(init_scale) (the part of
    ``W_1`` outside ``span(X)`` never receives gradient).

    Args:
      x: (n, d) transfer inputs.
      soft_labels: (n,) teacher probabilities.
      depth: number of layers N >= 2.
      width: hidden width.
      init_scale: multiplier of the standard init.
      key: PRNG key for the init.
      learning_rate: step size; ``1/(depth L)`` with ``L`` the linear problem's if None.
      steps: number of full-batch steps.

    Returns:
      w: (d,) end-to-end weights ``(W_N ... W_1)^T``.
      losses: (steps,) training loss per step.
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2 for a deep linear student, got {depth}")
    x = jnp.asarray(x)
    soft_labels = jnp.asarray(soft_labels, x.dtype)
    d = x.shape[1]
    shapes = [(width, d)] + [(width, width)] * (depth - 2) + [(1, width)]
    keys = jax.random.split(key, depth)
    layers = [
        init_scale * jax.random.normal(k, s, x.dtype) / np.sqrt(s[1]) for k, s in zip(keys, shapes)
    ]
    # Deeper products amplify the end-to-end step, so shrink it with depth.
    lr = 1.0 / (depth * _smoothness(np.asarray(x))) if learning_rate is None else learning_rate

    def loss_fn(layers):
        return distillation_loss(_end_to_end(layers), x, soft_labels)

    @jax.jit
    def run(layers):
        def step(layers, _):
            loss, grads = jax.value_and_grad(loss_fn)(layers)
            return [w - lr * g for w, g in zip(layers, grads)], loss

        return jax.lax.scan(step, layers, None, length=steps)

    layers, losses = run(layers)
    return np.asarray(_end_to_end(layers)), np.asarray(losses)


def minimiser_at_angle(
    w_hat: ArrayLike,
    x: ArrayLike,
    delta: float,
    rng: np.random.Generator,
    support: ArrayLike | None = None,
) -> np.ndarray:
    """Another global minimiser of the distillation loss, at angle ``delta`` from ``w_hat``.

    Returns ``w_hat + tan(delta) ||w_hat|| u`` with ``u`` a random unit vector in
    ``span(X)^⊥``: it leaves every training logit unchanged, hence the loss too.

    Args:
      w_hat: (d,) GD solution, which lies in ``span(X)``.
      x: (n, d) transfer inputs.
      delta: angle in radians, in [0, pi/2).
      rng: NumPy random generator for ``u``.
      support: optional (m, d) inputs; ``u`` is drawn inside their span (minus
        ``span(X)``), e.g. to avoid pixels that are zero in every image.

    Returns:
      (d,) weights with ``angle(w, w_hat) == delta``.
    """
    if not 0.0 <= delta < 0.5 * np.pi:
        raise ValueError(f"delta must be in [0, pi/2) radians, got {delta!r}")
    x = np.asarray(x, dtype=np.float64)
    w_hat = np.asarray(w_hat, dtype=np.float64)
    u = rng.standard_normal(x.shape[1])
    if support is not None:
        u = projection_solution(np.asarray(support, dtype=np.float64), u)
    u = u - projection_solution(x, u)
    norm_u = np.linalg.norm(u)
    if norm_u < 1e-10:
        raise ValueError("span(X)^⊥ is empty inside the support: no other minimisers exist")
    return w_hat + math.tan(delta) * np.linalg.norm(w_hat) * u / norm_u


def risk_increases(risks: Sequence[float], tol: float = 1e-12) -> int:
    """Number of steps ``n -> n+1`` where a learning curve goes up by more than ``tol``.

    NaN entries (learner undefined at that n) are skipped.
    """
    r = np.asarray(risks, dtype=np.float64)
    r = r[~np.isnan(r)]
    return int(np.sum(np.diff(r) > tol))


def _soft_labels(x: np.ndarray, w_star: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ w_star)))


def _hard_label_learners(x: np.ndarray, w_star: np.ndarray) -> dict[str, np.ndarray | None]:
    """Hard-label baselines on ``sign(x @ w_star)``; None where undefined (one class only)."""
    from sklearn.linear_model import LogisticRegression

    y = np.sign(x @ w_star)
    out: dict[str, np.ndarray | None] = {"min_norm_least_squares": np.linalg.pinv(x) @ y}
    if len(np.unique(y)) < 2:
        out["logistic_regression"] = None
    else:
        clf = LogisticRegression(C=1.0, fit_intercept=False, max_iter=1000)
        out["logistic_regression"] = clf.fit(x, y).coef_[0]
    return out


def _nanmean_columns(a: np.ndarray) -> list[float | None]:
    """Column means over non-NaN entries; None for all-NaN columns."""
    return [float(np.mean(c[~np.isnan(c)])) if np.any(~np.isnan(c)) else None for c in a.T]


def _digits_binary(seed: int) -> dict[str, np.ndarray]:
    """Digits 0 vs 1 of sklearn ``digits`` with a constant feature, and a logistic teacher."""
    from sklearn.linear_model import LogisticRegression

    from ntkd.data import load_dataset

    ds = load_dataset("digits", seed=seed)

    def pick(x, y):
        keep = y <= 1
        x = x[keep].reshape(int(keep.sum()), -1).astype(np.float64)
        return np.concatenate([x, np.ones((len(x), 1))], axis=1), y[keep]

    x_train, y_train = pick(ds.x_train, ds.y_train)
    x_test, y_test = pick(ds.x_test, ds.y_test)
    teacher = LogisticRegression(C=1.0, fit_intercept=False, max_iter=5000).fit(x_train, y_train)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "w_star": teacher.coef_[0],
    }


def run_experiment(*, quick: bool = False, seed: int = 0) -> dict:
    """All Phuong-Lampert measurements; returns a JSON-ready dict.

    Parts: ``gd_check`` (GD and deep-linear GD vs ``P_X w*``), ``learning_curves``
    (E[risk] vs n per kappa with the bound), ``mc_check`` (closed-form vs Monte
    Carlo risk), ``optimisation_bias`` (synthetic and digits 0/1), and
    ``monotonicity`` (risk increases when points are added one at a time).

    Args:
      quick: tiny sizes for tests and CI (seconds instead of minutes).
      seed: master seed.

    Returns:
      Nested dict of configs and measured numbers.
    """
    with jax.enable_x64(True):
        return _run(quick, seed)


def _run(quick: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    kappas = [0.5, 1.0, 2.0, 4.0]
    d = 100 if quick else 1000
    ns = [1, 5, 20] if quick else [1, 2, 3, 5, 10, 20, 50, 100, 200]
    draws = 5 if quick else 100
    w_star = np.eye(d)[0]
    results: dict = {
        "config": {"quick": quick, "seed": seed, "d": d, "kappas": kappas, "ns": ns, "draws": draws}
    }

    # GD (linear and deep linear) against the closed-form limit.
    x = polynomial_angle_inputs(rng, 20, d, 1.0)
    soft = _soft_labels(x, w_star)
    w_proj = projection_solution(x, w_star)
    w_gd, steps = fit_linear_gd(x, soft)
    deep = []
    for depth in (2, 3):
        for scale in (1e-3, 1e-2, 1e-1):
            w_deep, losses = fit_deep_linear_gd(
                x,
                soft,
                depth=depth,
                width=16,
                init_scale=scale,
                key=jax.random.PRNGKey(seed),
                steps=2000 if quick else 20000,
            )
            deep.append(
                {
                    "depth": depth,
                    "init_scale": scale,
                    "rel_dist_to_projection": float(
                        np.linalg.norm(w_deep - w_proj) / np.linalg.norm(w_proj)
                    ),
                    "loss_gap": float(losses[-1] - distillation_loss(w_proj, x, soft)),
                    "angle_to_teacher_deg": math.degrees(angle(w_deep, w_star)),
                }
            )
    results["gd_check"] = {
        "n": 20,
        "kappa": 1.0,
        "linear_steps": steps,
        "linear_rel_dist_to_projection": float(
            np.linalg.norm(w_gd - w_proj) / np.linalg.norm(w_proj)
        ),
        "projection_angle_to_teacher_deg": math.degrees(angle(w_proj, w_star)),
        "deep_linear": deep,
    }

    # Learning curves from the closed-form GD limit, with the d-free bound.
    curves = {}
    for kappa in kappas:
        risks = np.zeros((len(ns), draws))
        for i, n in enumerate(ns):
            for r in range(draws):
                x = polynomial_angle_inputs(rng, n, d, kappa)
                risks[i, r] = transfer_risk_closed_form(
                    angle(projection_solution(x, w_star), w_star), d, kappa
                )
        curves[str(kappa)] = {
            "mean_risk": risks.mean(1).tolist(),
            "sem_risk": (risks.std(1) / np.sqrt(draws)).tolist(),
            "bound": [risk_bound(n, kappa) for n in ns],
        }
    results["learning_curves"] = curves

    mc = []
    chunks, chunk = (2, 10_000) if quick else (5, 10_000)
    for kappa in kappas:
        x = polynomial_angle_inputs(rng, 5, d, kappa)
        w = projection_solution(x, w_star)
        mc_risk = np.mean(
            [
                transfer_risk(w, w_star, polynomial_angle_inputs(rng, chunk, d, kappa))
                for _ in range(chunks)
            ]
        )
        mc.append(
            {
                "kappa": kappa,
                "n": 5,
                "closed_form": transfer_risk_closed_form(angle(w, w_star), d, kappa),
                "monte_carlo": float(mc_risk),
                "num_test": chunks * chunk,
            }
        )
    results["mc_check"] = mc

    # Optimisation bias: other global minimisers at angle delta from the GD solution.
    deltas = [0, 10, 20, 30, 40, 50, 60, 70, 80, 89]
    bias_draws = 3 if quick else 20
    synth = np.zeros((len(deltas), bias_draws))
    loss_gap = 0.0
    for r in range(bias_draws):
        x = polynomial_angle_inputs(rng, 20, d, 1.0)
        soft = _soft_labels(x, w_star)
        w_hat = projection_solution(x, w_star)
        base = float(distillation_loss(w_hat, x, soft))
        for j, delta in enumerate(deltas):
            w = minimiser_at_angle(w_hat, x, math.radians(delta), rng)
            synth[j, r] = transfer_risk_closed_form(angle(w, w_star), d, 1.0)
            loss_gap = max(loss_gap, abs(float(distillation_loss(w, x, soft)) - base))
    digits = _digits_binary(seed)
    n_digits = 20
    dig = np.zeros((len(deltas), bias_draws))
    dig_err = np.zeros((len(deltas), bias_draws))
    dig_gap = 0.0
    for r in range(bias_draws):
        idx = rng.choice(len(digits["x_train"]), n_digits, replace=False)
        x = digits["x_train"][idx]
        soft = _soft_labels(x, digits["w_star"])
        w_hat = projection_solution(x, digits["w_star"])
        base = float(distillation_loss(w_hat, x, soft))
        for j, delta in enumerate(deltas):
            w = minimiser_at_angle(w_hat, x, math.radians(delta), rng, support=digits["x_train"])
            dig[j, r] = transfer_risk(w, digits["w_star"], digits["x_test"])
            dig_err[j, r] = np.mean((digits["x_test"] @ w > 0) != (digits["y_test"] == 1))
            dig_gap = max(dig_gap, abs(float(distillation_loss(w, x, soft)) - base))
    results["optimisation_bias"] = {
        "deltas_deg": deltas,
        "draws": bias_draws,
        "synthetic": {
            "d": d,
            "n": 20,
            "kappa": 1.0,
            "mean_risk": synth.mean(1).tolist(),
            "sem_risk": (synth.std(1) / np.sqrt(bias_draws)).tolist(),
            "max_abs_loss_gap": loss_gap,
        },
        "digits01": {
            "n": n_digits,
            "d": int(digits["x_train"].shape[1]),
            "mean_risk": dig.mean(1).tolist(),
            "sem_risk": (dig.std(1) / np.sqrt(bias_draws)).tolist(),
            "mean_test_error": dig_err.mean(1).tolist(),
            "max_abs_loss_gap": dig_gap,
            "teacher_test_error": float(
                np.mean((digits["x_test"] @ digits["w_star"] > 0) != (digits["y_test"] == 1))
            ),
        },
    }

    # Monotonicity: add points one at a time.
    d_mono, n_max, sequences = 100, (15 if quick else 30), (5 if quick else 30)
    w_mono = np.eye(d_mono)[0]
    learners = ["distillation", "logistic_regression", "min_norm_least_squares"]
    curves_mono = {name: np.full((sequences, n_max), np.nan) for name in learners}
    for s in range(sequences):
        x_all = polynomial_angle_inputs(rng, n_max, d_mono, 1.0)
        for n in range(1, n_max + 1):
            x = x_all[:n]
            ws = {"distillation": projection_solution(x, w_mono), **_hard_label_learners(x, w_mono)}
            for name, w in ws.items():
                if w is not None:
                    curves_mono[name][s, n - 1] = transfer_risk_closed_form(
                        angle(w, w_mono), d_mono, 1.0
                    )
    results["monotonicity"] = {
        "d": d_mono,
        "kappa": 1.0,
        "n_max": n_max,
        "sequences": sequences,
        "increases": {k: [risk_increases(c) for c in v] for k, v in curves_mono.items()},
        "example_curves": {k: v[0].tolist() for k, v in curves_mono.items()},
        "mean_curves": {k: _nanmean_columns(v) for k, v in curves_mono.items()},
    }
    return results
