"""Knowledge distillation as partial variance reduction (Safaryan, Peste & Alistarh, 2023).

Reference: M. Safaryan, A. Peste, D. Alistarh, "Knowledge Distillation Performs
Partial Variance Reduction", NeurIPS 2023 (arXiv 2305.17581); official code
github.com/IST-DASLab/KDVR.

Setting. A linear softmax student ``theta`` (d, k) on features ``a`` (n, d)
(include a constant feature for a bias) and a teacher ``theta_T`` (d, k) in the
same parameter space. Per-sample loss ``f_xi(theta) = CE(softmax(a_xi theta),
y_xi) + (l2/2) ||theta||^2`` and ``f = mean_xi f_xi``. At temperature 1 the KD
loss ``(1 - lam) CE + lam KL(p_T || p_S)`` has per-sample gradient

    grad f_xi(theta) - lam grad f_xi(theta_T)          (exact for l2 = 0)

i.e. the teacher is an SVRG-type control variate without the full-gradient
correction ``+ lam grad f(theta_T)``. With ``l2 > 0`` the training loops below
use this control-variate form with ridge inside ``f`` (the official code's
"modified" KD gradient).

Gradient noise at the optimum ``theta*`` (centred, batch size 1):

    V(lam) = sigma*^2 - 2 lam C + lam^2 sigma_T^2,   lam*_var = C / sigma_T^2,

with ``sigma*^2 = E||g*_xi - g*||^2``, ``sigma_T^2 = E||g^T_xi - g^T||^2`` and
``C = E<g*_xi - g*, g^T_xi - g^T>``; KD adds the bias ``-lam grad f(theta_T)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from scipy import optimize

from ntkd.training import kd_loss, softmax_cross_entropy

__all__ = [
    "METHODS",
    "control_variate_grads",
    "full_loss",
    "kd_per_sample_grads",
    "minimise",
    "noise_statistics",
    "per_sample_grads",
    "run_experiment",
    "run_sgd",
    "variance_curve",
]

METHODS = ("sgd", "kd", "kd_unbiased", "svrg")


def _sample_loss(theta, a, y, l2):
    logits = (a @ theta)[None]
    return softmax_cross_entropy(logits, y[None]) + 0.5 * l2 * jnp.sum(theta**2)


def full_loss(theta: ArrayLike, a: ArrayLike, y: ArrayLike, l2: float = 0.0) -> jax.Array:
    """Empirical risk ``f(theta)``: mean cross-entropy of ``a @ theta`` plus ``(l2/2)||theta||^2``.

    Args:
      theta: (d, k) weights.
      a: (n, d) features.
      y: (n,) integer labels.
      l2: ridge coefficient.

    Returns:
      Scalar loss.
    """
    theta = jnp.asarray(theta)
    return softmax_cross_entropy(jnp.asarray(a) @ theta, y) + 0.5 * l2 * jnp.sum(theta**2)


@jax.jit
def per_sample_grads(theta: ArrayLike, a: ArrayLike, y: ArrayLike, l2: float = 0.0) -> jax.Array:
    """Per-sample gradients ``grad f_xi(theta)`` by ``vmap(grad)``.

    Args:
      theta: (d, k) weights.
      a: (n, d) features.
      y: (n,) integer labels.
      l2: ridge coefficient.

    Returns:
      (n, d, k) gradients.
    """
    return jax.vmap(jax.grad(_sample_loss), in_axes=(None, 0, 0, None))(theta, a, y, l2)


@jax.jit
def kd_per_sample_grads(
    theta: ArrayLike,
    theta_teacher: ArrayLike,
    a: ArrayLike,
    y: ArrayLike,
    lam: float,
    temperature: float = 1.0,
) -> jax.Array:
    """Per-sample gradients of ``(1 - lam) CE + lam tau^2 KL(p_T^tau || p_S^tau)`` (Hinton KD).

    Args:
      theta: (d, k) student weights.
      theta_teacher: (d, k) teacher weights.
      a: (n, d) features.
      y: (n,) integer labels.
      lam: KD weight.
      temperature: tau.

    Returns:
      (n, d, k) gradients with respect to ``theta``.
    """

    def loss(th, a_i, y_i):
        z_s, z_t = (a_i @ th)[None], (a_i @ theta_teacher)[None]
        ce = softmax_cross_entropy(z_s, y_i[None])
        return (1.0 - lam) * ce + lam * kd_loss(z_s, z_t, temperature)

    return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(theta, a, y)


def control_variate_grads(
    theta: ArrayLike,
    theta_teacher: ArrayLike,
    a: ArrayLike,
    y: ArrayLike,
    lam: float,
    l2: float = 0.0,
) -> jax.Array:
    """``grad f_xi(theta) - lam grad f_xi(theta_T)`` for every sample: (n, d, k)."""
    return per_sample_grads(theta, a, y, l2) - lam * per_sample_grads(theta_teacher, a, y, l2)


def minimise(
    a: ArrayLike, y: ArrayLike, num_classes: int, l2: float, *, tol: float = 1e-12
) -> np.ndarray:
    """``theta* = argmin f`` by L-BFGS in float64 (call under ``jax.enable_x64(True)``).

    Args:
      a: (n, d) features.
      y: (n,) labels.
      num_classes: k.
      l2: ridge coefficient; must be > 0 when the data are separable.
      tol: gradient tolerance.

    Returns:
      (d, k) minimiser.
    """
    a = jnp.asarray(a, jnp.float64)
    y = jnp.asarray(y)
    shape = (a.shape[1], num_classes)
    value_and_grad = jax.jit(jax.value_and_grad(lambda t: full_loss(t.reshape(shape), a, y, l2)))

    def fun(t):
        v, g = value_and_grad(jnp.asarray(t))
        return float(v), np.asarray(g, np.float64)

    res = optimize.minimize(
        fun,
        np.zeros(math.prod(shape)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20000, "gtol": tol, "ftol": 0.0},
    )
    return res.x.reshape(shape)


def noise_statistics(
    theta_star: ArrayLike, theta_teacher: ArrayLike, a: ArrayLike, y: ArrayLike, l2: float = 0.0
) -> dict[str, float]:
    """Control-variate statistics of KD at the optimum (batch size 1).

    Args:
      theta_star: (d, k) minimiser of ``f``.
      theta_teacher: (d, k) teacher.
      a: (n, d) features.
      y: (n,) labels.
      l2: ridge coefficient.

    Returns:
      ``sigma_star2``, ``sigma_teacher2``, ``covariance`` (C), ``correlation``
      (rho), ``lam_star_var = C / sigma_T^2``, ``variance_at_lam_star =
      sigma*^2 (1 - rho^2)``, ``bias_norm = ||grad f(theta_T)||`` (KD bias per
      unit lam), ``lam_star_smooth = sigma*^2 / (sigma*^2 + L^2 ||theta_T -
      theta*||^2)`` with ``L = max ||a||^2 / 2 + l2``, and ``teacher_distance``.
    """
    g_star = np.asarray(per_sample_grads(theta_star, a, y, l2)).reshape(len(y), -1)
    g_t = np.asarray(per_sample_grads(theta_teacher, a, y, l2)).reshape(len(y), -1)
    c_star, c_t = g_star - g_star.mean(0), g_t - g_t.mean(0)
    s2 = float(np.mean(np.sum(c_star**2, 1)))
    t2 = float(np.mean(np.sum(c_t**2, 1)))
    cov = float(np.mean(np.sum(c_star * c_t, 1)))
    rho = cov / math.sqrt(s2 * t2)
    smooth = float(np.max(np.sum(np.asarray(a) ** 2, 1)) / 2 + l2)
    dist = float(np.linalg.norm(np.asarray(theta_teacher) - np.asarray(theta_star)))
    return {
        "sigma_star2": s2,
        "sigma_teacher2": t2,
        "covariance": cov,
        "correlation": rho,
        "lam_star_var": cov / t2,
        "variance_at_lam_star": s2 * (1 - rho**2),
        "bias_norm": float(np.linalg.norm(g_t.mean(0))),
        "lam_star_smooth": s2 / (s2 + smooth**2 * dist**2),
        "teacher_distance": dist,
    }


def variance_curve(stats: dict[str, float], lams: ArrayLike) -> np.ndarray:
    """``V(lam) = sigma*^2 - 2 lam C + lam^2 sigma_T^2`` from :func:`noise_statistics`; shape of ``lams``."""
    lams = np.asarray(lams, dtype=np.float64)
    return stats["sigma_star2"] - 2 * lams * stats["covariance"] + lams**2 * stats["sigma_teacher2"]


@functools.partial(jax.jit, static_argnames=("method",))
def _sgd_scan(theta0, theta_teacher, a, y, batches, lam, lr, l2, method):
    def batch_grad(theta, idx):
        return jax.grad(lambda t: full_loss(t, a[idx], y[idx], l2))(theta)

    def epoch(carry, epoch_batches):
        theta, teacher = carry
        if method == "svrg":
            teacher = theta
        correction = (
            jax.grad(full_loss)(teacher, a, y, l2) if method in ("kd_unbiased", "svrg") else 0.0
        )

        def step(theta, idx):
            g = batch_grad(theta, idx)
            if method != "sgd":
                g = g - lam * batch_grad(teacher, idx) + lam * correction
            return theta - lr * g, None

        theta, _ = jax.lax.scan(step, theta, epoch_batches)
        return (theta, teacher), full_loss(theta, a, y, l2)

    _, losses = jax.lax.scan(epoch, (theta0, theta_teacher), batches)
    return losses


def run_sgd(
    a: ArrayLike,
    y: ArrayLike,
    theta_teacher: ArrayLike,
    *,
    method: str,
    lam: float = 0.0,
    learning_rate: float,
    epochs: int,
    batch_size: int = 10,
    l2: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Minibatch SGD / KD-SGD on the linear softmax student from zero init.

    Gradients per step (``B`` a minibatch, without replacement within an epoch):

    - ``sgd``: ``grad f_B(theta)``;
    - ``kd``: ``grad f_B(theta) - lam grad f_B(theta_T)`` (KD at tau = 1);
    - ``kd_unbiased``: the KD gradient plus ``lam grad f(theta_T)``;
    - ``svrg``: ``kd_unbiased`` with ``lam = 1`` and the teacher reset to the
      current student at the start of every epoch.

    Args:
      a: (n, d) features.
      y: (n,) labels.
      theta_teacher: (d, k) teacher.
      method: one of :data:`METHODS`.
      lam: KD weight (ignored by ``sgd``; forced to 1 for ``svrg``).
      learning_rate: constant step size.
      epochs: passes over the data.
      batch_size: minibatch size.
      l2: ridge coefficient inside ``f``.
      seed: data order.

    Returns:
      (epochs,) full training loss ``f(theta)`` after each epoch.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    a = jnp.asarray(a)
    n = a.shape[0]
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the number of samples {n}")
    rng = np.random.default_rng(seed)
    batches = np.stack(
        [rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size) for _ in range(epochs)]
    )
    theta_teacher = jnp.asarray(theta_teacher, a.dtype)
    lam = 1.0 if method == "svrg" else lam
    losses = _sgd_scan(
        jnp.zeros_like(theta_teacher),
        theta_teacher,
        a,
        jnp.asarray(y),
        jnp.asarray(batches),
        lam,
        learning_rate,
        l2,
        method,
    )
    return np.asarray(losses)


def gd_checkpoints(
    a: ArrayLike,
    y: ArrayLike,
    num_classes: int,
    *,
    l2: float,
    learning_rate: float,
    steps: list[int],
) -> dict[int, np.ndarray]:
    """Teacher checkpoints along full-batch gradient descent from zero.

    Args:
      a: (n, d) features.
      y: (n,) labels.
      num_classes: k.
      l2: ridge coefficient.
      learning_rate: GD step size.
      steps: sorted step counts at which to snapshot.

    Returns:
      ``{step: theta (d, k)}``.
    """
    a = jnp.asarray(a)
    grad = jax.jit(jax.grad(full_loss), static_argnames=())
    theta = jnp.zeros((a.shape[1], num_classes), a.dtype)
    out, done = {}, 0

    @jax.jit
    def advance(theta, count):
        return jax.lax.fori_loop(
            0, count, lambda _, t: t - learning_rate * grad(t, a, y, l2), theta
        )

    for s in sorted(steps):
        theta = advance(theta, s - done)
        done = s
        out[s] = np.asarray(theta)
    return out


def linear_features(name: str, seed: int = 0) -> dict:
    """Standardised flattened inputs of a dataset plus a constant feature (float64).

    Returns:
      ``{"a": (n, d+1), "y": (n,), "num_classes": k, "name": name}`` for the
      training split of ``ntkd.data.load_dataset(name, seed=seed)``.
    """
    from ntkd.data import load_dataset

    ds = load_dataset(name, seed=seed)
    x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return {"a": a, "y": ds.y_train.astype(np.int32), "num_classes": ds.num_classes, "name": name}


def run_experiment(*, quick: bool = False, seed: int = 0) -> dict:
    """All Safaryan et al. measurements on MNIST-1D and digits; JSON-ready dict.

    Parts: ``identity`` (KD gradient vs control variate), per-dataset
    ``teachers`` (noise statistics of GD teacher checkpoints), ``variance``
    (V(lam) formula vs empirical), ``lam_sweep`` (final loss gap of KD-SGD vs
    lam), ``curves`` (SGD, KD, unbiased KD, SVRG), ``plateau_vs_lr`` and
    ``plateau_vs_teacher``.

    Args:
      quick: tiny sizes for tests and CI.
      seed: master seed (data split, data order).

    Returns:
      Nested dict of configs and measured numbers.
    """
    with jax.enable_x64(True):
        return _run(quick, seed)


def _plateau(losses: np.ndarray, f_star: float, last: int) -> float:
    return float(np.mean(losses[-last:]) - f_star)


def _run(quick: bool, seed: int) -> dict:
    l2, batch_size, lam_kd = 1e-2, 10, 0.7
    epochs = 3 if quick else 25
    last = 1 if quick else 5
    lams = [round(0.1 * i, 1) for i in range(11)] + [1.2, 1.5]
    teacher_steps = [3, 30, 300] if quick else [1, 3, 10, 30, 100, 300, 1000, 3000]
    results: dict = {
        "config": {
            "quick": quick,
            "seed": seed,
            "l2": l2,
            "batch_size": batch_size,
            "epochs": epochs,
            "lam_kd": lam_kd,
            "plateau_last_epochs": last,
        }
    }

    data = linear_features("mnist1d", seed)
    a, y, k = data["a"], data["y"], data["num_classes"]
    rng = np.random.default_rng(seed)
    sub = rng.choice(len(y), 200, replace=False)
    theta = 0.1 * rng.standard_normal((a.shape[1], k))
    theta_t = 0.1 * rng.standard_normal((a.shape[1], k))
    identity = {}
    for lam in (0.3, 0.7):
        kd = np.asarray(kd_per_sample_grads(theta, theta_t, a[sub], y[sub], lam))
        cv = np.asarray(control_variate_grads(theta, theta_t, a[sub], y[sub], lam))
        identity[f"max_abs_diff_lam{lam}"] = float(np.max(np.abs(kd - cv)))
    kd_tau = np.asarray(kd_per_sample_grads(theta, theta_t, a[sub], y[sub], 0.7, 2.0))
    cv = np.asarray(control_variate_grads(theta, theta_t, a[sub], y[sub], 0.7))
    identity["rel_diff_tau2"] = float(np.linalg.norm(kd_tau - cv) / np.linalg.norm(cv))
    identity["max_abs_grad"] = float(np.max(np.abs(cv)))
    results["identity"] = identity

    results["datasets"] = {}
    # The sweeps run on MNIST-1D only, to keep the run within minutes on 2 CPU cores.
    for name, sweeps in (("mnist1d", True), ("digits", False)):
        data = linear_features(name, seed)
        a, y, k = data["a"], data["y"], data["num_classes"]
        if quick:
            a, y = a[:1000], y[:1000]
        theta_star = minimise(a, y, k, l2)
        f_star = float(full_loss(theta_star, a, y, l2))
        smooth_full = float(np.linalg.norm(a, 2) ** 2 / (2 * len(y)) + l2)
        mean_smooth = float(np.mean(np.sum(a**2, 1)) / 2 + l2)
        lr = 0.5 / mean_smooth
        checkpoints = gd_checkpoints(
            a, y, k, l2=l2, learning_rate=1.0 / smooth_full, steps=teacher_steps
        )
        checkpoints["optimum"] = theta_star

        teachers = {}
        for step, theta_t in checkpoints.items():
            stats = noise_statistics(theta_star, theta_t, a, y, l2)
            stats["loss_gap"] = float(full_loss(theta_t, a, y, l2)) - f_star
            teachers[str(step)] = stats
        main_key = str(teacher_steps[len(teacher_steps) // 2])
        theta_main = checkpoints[int(main_key)]
        main_stats = teachers[main_key]

        lam_grid = np.linspace(0.0, 1.5, 16)
        empirical = []
        for lam in lam_grid:
            g = np.asarray(kd_per_sample_grads(theta_star, theta_main, a, y, float(lam))).reshape(
                len(y), -1
            )
            empirical.append(float(np.mean(np.sum((g - g.mean(0)) ** 2, 1))))

        def run(method, lam, teacher=theta_main, learning_rate=lr, run_seed=seed):
            return run_sgd(
                a,
                y,
                teacher,
                method=method,
                lam=lam,
                learning_rate=learning_rate,
                epochs=epochs,
                batch_size=batch_size,
                l2=l2,
                seed=run_seed,
            )

        sweep_teachers = [main_key, str(teacher_steps[-1]), "optimum"] if sweeps else []
        sweep = {}
        for key in sweep_teachers:
            teacher = checkpoints["optimum" if key == "optimum" else int(key)]
            gaps = [_plateau(run("kd", lam, teacher), f_star, last) for lam in lams]
            sweep[key] = {
                "plateau": [float(g) for g in gaps],
                "best_lam": lams[int(np.argmin(gaps))],
                "lam_star_var": teachers[key]["lam_star_var"],
            }

        curves = {
            "sgd": run("sgd", 0.0),
            f"kd_lam{lam_kd}": run("kd", lam_kd),
            "kd_lam_star_var": run("kd", main_stats["lam_star_var"]),
            f"kd_unbiased_lam{lam_kd}": run("kd_unbiased", lam_kd),
            "svrg": run("svrg", 1.0),
        }
        lrs = [lr * f for f in (0.25, 0.5, 1.0, 2.0)] if sweeps else []
        plateau_lr = {
            "learning_rates": lrs,
            "sgd": [_plateau(run("sgd", 0.0, learning_rate=g), f_star, last) for g in lrs],
            f"kd_lam{lam_kd}": [
                _plateau(run("kd", lam_kd, learning_rate=g), f_star, last) for g in lrs
            ],
        }
        plateau_teacher = {
            "teachers": list(teachers) if sweeps else [],
            "teacher_loss_gap": [teachers[t]["loss_gap"] for t in teachers],
            f"kd_lam{lam_kd}": [
                _plateau(
                    run("kd", lam_kd, checkpoints["optimum" if t == "optimum" else int(t)]),
                    f_star,
                    last,
                )
                for t in teachers
                if sweeps
            ],
            "kd_lam_star_var": [
                _plateau(
                    run(
                        "kd",
                        teachers[t]["lam_star_var"],
                        checkpoints["optimum" if t == "optimum" else int(t)],
                    ),
                    f_star,
                    last,
                )
                for t in teachers
                if sweeps
            ],
            "sgd": _plateau(curves["sgd"], f_star, last),
        }
        results["datasets"][name] = {
            "n": int(len(y)),
            "d": int(a.shape[1]),
            "num_classes": k,
            "f_star": f_star,
            "learning_rate": lr,
            "mean_smoothness": mean_smooth,
            "main_teacher": main_key,
            "teachers": teachers,
            "variance": {
                "lams": lam_grid.tolist(),
                "formula": variance_curve(main_stats, lam_grid).tolist(),
                "empirical": empirical,
            },
            "lam_sweep": {"lams": lams, "teachers": sweep},
            "curves": {m: (c - f_star).tolist() for m, c in curves.items()},
            "plateau_vs_lr": plateau_lr,
            "plateau_vs_teacher": plateau_teacher,
        }
    return results
