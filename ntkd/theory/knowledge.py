"""Three levels of teacher knowledge (Tang et al., 2020).

Reference: J. Tang, R. Shivanna, Z. Zhao, D. Lin, A. Singh, E. H. Chi, S. Jain,
"Understanding and Improving Knowledge Distillation", arXiv 2002.03532.

With KD weight ``lam`` at temperature 1 the student trains on the mixed target
``q = (1 - lam) y + lam p_T``. Three pieces of the teacher's ``p_T`` act on it:

- universe: the mass ``1 - p_T[t]`` moved off the true class smooths labels like
  label smoothing (LS) with per-example ``eps_i = lam K (1 - p_T[t_i]) / (K - 1)``;
- instance: the true-class gradient of example i is the cross-entropy gradient
  times ``w_i = 1 - lam (1 - p_T[t_i]) / (1 - p_S[t_i])``, so examples the teacher
  finds hard are down-weighted;
- domain: which wrong classes get the mass, i.e. class similarities, shape the
  geometry of the student's logit layer.

The ablation ladder isolates them: CE, LS with the matched mean ``eps``, KD-pt
(keeps only ``p_T[t]``, spreads the rest uniformly), KD-sim (class-level
similarity targets from the teacher's logit-layer cosines, no per-example
information) and full KD. The exact definitions in the paper could not be
checked here (the paper's text was not available); these are the definitions of
docs/theory.md#3-knowledge-decomposition-tang-et-al-2020-ntkdtheoryknowledge.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike
from scipy import stats

__all__ = [
    "LADDER",
    "calibrate_sim_temperature",
    "class_cosine",
    "effective_smoothing",
    "expected_calibration_error",
    "ladder_targets",
    "offdiag_correlation",
    "rescaling_factors",
    "run_experiment",
    "sim_distributions",
    "superclass_contrast",
    "teacher_class_similarity",
]

LADDER = ("ce", "ls", "kd_pt", "kd_sim", "kd")


def _probs_and_labels(
    probs: ArrayLike, labels: ArrayLike, what: str
) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(
            f"{what} must be (n, k) with labels (n,); got {probs.shape} and {labels.shape}"
        )
    return probs, labels


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (KD weight) must be in [0, 1], got {lam!r}")


def rescaling_factors(
    student_probs: ArrayLike, teacher_probs: ArrayLike, labels: ArrayLike, lam: float
) -> np.ndarray:
    """Per-example gradient rescaling ``w_i = 1 - lam (1 - p_T[t_i]) / (1 - p_S[t_i])``.

    The ratio of the true-class logit gradient of ``(1 - lam) CE + lam KL(p_T||p_S)``
    (tau = 1) to that of CE.

    Args:
      student_probs: (n, k) student probabilities.
      teacher_probs: (n, k) teacher probabilities.
      labels: (n,) true classes t_i.
      lam: KD weight in [0, 1].

    Returns:
      (n,) factors; 1 for teacher-confident examples, smaller (even negative) for hard ones.
    """
    _check_lam(lam)
    p_s, labels = _probs_and_labels(student_probs, labels, "student_probs")
    p_t, _ = _probs_and_labels(teacher_probs, labels, "teacher_probs")
    rows = np.arange(len(labels))
    return 1.0 - lam * (1.0 - p_t[rows, labels]) / (1.0 - p_s[rows, labels])


def effective_smoothing(teacher_probs: ArrayLike, labels: ArrayLike, lam: float) -> np.ndarray:
    """Per-example label-smoothing coefficient ``eps_i = lam K (1 - p_T[t_i]) / (K - 1)`` of KD-pt.

    Args:
      teacher_probs: (n, K) teacher probabilities.
      labels: (n,) true classes.
      lam: KD weight in [0, 1].

    Returns:
      (n,) coefficients; KD-pt's target equals ``(1 - eps_i) y + eps_i / K``.
    """
    _check_lam(lam)
    p_t, labels = _probs_and_labels(teacher_probs, labels, "teacher_probs")
    k = p_t.shape[1]
    return lam * k * (1.0 - p_t[np.arange(len(labels)), labels]) / (k - 1)


def teacher_class_similarity(
    teacher_probs: ArrayLike, labels: ArrayLike, num_classes: int
) -> np.ndarray:
    """Teacher-implied class similarity ``S_jk = mean_{i: t_i = j} p_T[i, k]``, symmetrised.

    Args:
      teacher_probs: (n, k) teacher probabilities.
      labels: (n,) true classes; every class must occur.
      num_classes: k.

    Returns:
      (k, k) symmetric matrix with zero diagonal; off-diagonal rows renormalised
      to sum to 1 before symmetrising.
    """
    p_t, labels = _probs_and_labels(teacher_probs, labels, "teacher_probs")
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no examples; S needs every class")
    s = np.stack([p_t[labels == j].mean(0) for j in range(num_classes)])
    np.fill_diagonal(s, 0.0)
    s /= s.sum(1, keepdims=True)
    return 0.5 * (s + s.T)


def class_cosine(head_kernel: ArrayLike) -> np.ndarray:
    """Cosine similarity of the logit-layer class vectors (the columns of a Dense kernel).

    Args:
      head_kernel: (width, k) kernel of the last ``nn.Dense``.

    Returns:
      (k, k) cosine matrix.
    """
    w = np.asarray(head_kernel, dtype=np.float64)
    w = w / np.linalg.norm(w, axis=0, keepdims=True)
    return w.T @ w


def offdiag_correlation(a: ArrayLike, b: ArrayLike, method: str = "spearman") -> float:
    """Correlation of the off-diagonal entries (upper triangle) of two (k, k) matrices."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need two square matrices of the same shape, got {a.shape} and {b.shape}")
    iu = np.triu_indices(a.shape[0], 1)
    if method == "spearman":
        return float(stats.spearmanr(a[iu], b[iu]).statistic)
    if method == "pearson":
        return float(np.corrcoef(a[iu], b[iu])[0, 1])
    raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")


def superclass_contrast(matrix: ArrayLike, superclass: ArrayLike) -> dict[str, float]:
    """Mean off-diagonal entry within vs across super-classes.

    Args:
      matrix: (k, k) similarity (e.g. :func:`class_cosine`).
      superclass: (k,) super-class of each class.

    Returns:
      ``within``, ``across`` and ``difference`` (within - across).
    """
    m = np.asarray(matrix)
    sc = np.asarray(superclass)
    same = sc[:, None] == sc[None, :]
    off = ~np.eye(len(sc), dtype=bool)
    within, across = float(m[same & off].mean()), float(m[~same].mean())
    return {"within": within, "across": across, "difference": within - across}


def sim_distributions(teacher_head: ArrayLike, temperature: float) -> np.ndarray:
    """KD-sim class targets ``rho^sim_t = softmax(cos(w_t, w_.) / temperature)``.

    Args:
      teacher_head: (width, k) teacher logit-layer kernel.
      temperature: alpha > 0.

    Returns:
      (k, k) row-stochastic matrix; row t is the target for every example of class t.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    z = class_cosine(teacher_head) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def calibrate_sim_temperature(teacher_head: ArrayLike, true_class_prob: float) -> float:
    """Temperature at which KD-sim's mean true-class probability equals ``true_class_prob``.

    Matching the teacher's mean ``p_T[t]`` gives KD-sim the same universe-level
    smoothing as KD, so the ladder compares class relationships only.
    """
    k = np.asarray(teacher_head).shape[1]
    if not 1.0 / k < true_class_prob < 1.0:
        raise ValueError(
            f"true_class_prob must be in (1/k, 1) = ({1.0 / k:.3g}, 1), got {true_class_prob!r}"
        )
    lo, hi = np.log(1e-4), np.log(1e3)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.mean(np.diag(sim_distributions(teacher_head, np.exp(mid)))) > true_class_prob:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def ladder_targets(
    variant: str,
    labels: ArrayLike,
    teacher_probs: ArrayLike,
    *,
    lam: float,
    sim: ArrayLike | None = None,
) -> np.ndarray:
    """Training targets of one rung of the ablation ladder (tau = 1).

    - ``ce``: one-hot ``y``;
    - ``ls``: ``(1 - eps) y + eps / K`` with ``eps`` the mean of :func:`effective_smoothing`;
    - ``kd_pt``: ``(1 - lam) y + lam rho^pt`` with ``rho^pt_t = p_T[t]`` and
      ``(1 - p_T[t]) / (K - 1)`` on every other class;
    - ``kd_sim``: ``(1 - lam) y + lam sim[t]`` (class-level targets);
    - ``kd``: ``(1 - lam) y + lam p_T``.

    Cross-entropy on these targets has the same gradient as the corresponding
    ``(1 - lam) CE + lam KL`` loss.

    Args:
      variant: one of :data:`LADDER`.
      labels: (n,) true classes.
      teacher_probs: (n, K) teacher probabilities.
      lam: KD weight in [0, 1].
      sim: (K, K) row-stochastic class targets, required for ``kd_sim``.

    Returns:
      (n, K) float32 probability targets.
    """
    _check_lam(lam)
    p_t, labels = _probs_and_labels(teacher_probs, labels, "teacher_probs")
    n, k = p_t.shape
    y = np.eye(k)[labels]
    if variant == "ce":
        q = y
    elif variant == "ls":
        eps = float(np.mean(effective_smoothing(p_t, labels, lam)))
        q = (1.0 - eps) * y + eps / k
    elif variant == "kd_pt":
        pt = p_t[np.arange(n), labels][:, None]
        rho = np.where(y == 1.0, pt, (1.0 - pt) / (k - 1))
        q = (1.0 - lam) * y + lam * rho
    elif variant == "kd_sim":
        if sim is None:
            raise ValueError(
                "variant 'kd_sim' needs sim=(K, K) class targets, see sim_distributions"
            )
        q = (1.0 - lam) * y + lam * np.asarray(sim)[labels]
    elif variant == "kd":
        q = (1.0 - lam) * y + lam * p_t
    else:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(LADDER)}")
    return q.astype(np.float32)


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, num_bins: int = 15) -> float:
    """Top-1 expected calibration error with equal-width confidence bins."""
    p, labels = _probs_and_labels(probs, labels, "probs")
    conf, pred = p.max(1), p.argmax(1)
    bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(np.mean(pred[m] == labels[m]) - conf[m].mean())
    return float(ece)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))


DATASET_CONFIGS = {
    "gaussian": {
        "options": {
            "num_classes": 12,
            "num_superclasses": 4,
            "dim": 32,
            "similarity": 0.7,
            "separation": 3.0,
            "noise": 1.0,
            "n_train": 5000,
            "n_test": 2000,
        },
        "teacher": ("mlp", {"widths": (256, 256)}),
        "n_student": 300,
    },
    "mnist1d": {
        "options": {},
        "teacher": ("cnn1d", {}),
        "n_student": 1000,
    },
}


def _run_dataset(name: str, *, quick: bool, seeds: list[int], lam: float) -> dict:
    from ntkd.data import gaussian_bayes_logits, load_dataset
    from ntkd.models import get_model
    from ntkd.training import fit, predict

    cfg = DATASET_CONFIGS[name]
    options = dict(cfg["options"])
    if quick and name == "gaussian":
        options.update(n_train=1500, n_test=500)
    ds = load_dataset(name, seed=seeds[0], **options)
    k = ds.num_classes
    x_train = ds.x_train[:1500] if quick else ds.x_train
    y_train = ds.y_train[: len(x_train)]
    teacher_epochs, student_epochs = (3, 5) if quick else (40, 60)
    n_student = min(cfg["n_student"], 200 if quick else cfg["n_student"])

    teacher_name, teacher_kwargs = cfg["teacher"]
    teacher = get_model(teacher_name, k, **teacher_kwargs)
    t_vars, _ = fit(
        teacher,
        x_train,
        y_train,
        epochs=teacher_epochs,
        batch_size=128,
        learning_rate=1e-3,
        seed=seeds[0],
    )
    p_teacher_train = _softmax(predict(teacher, t_vars, ds.x_train))
    p_teacher_test = _softmax(predict(teacher, t_vars, ds.x_test))
    teacher_head = np.asarray(t_vars["params"]["head"]["kernel"])
    s_teacher = teacher_class_similarity(p_teacher_train, ds.y_train, k)
    superclass = ds.meta.get("superclass")
    bayes = _softmax(gaussian_bayes_logits(ds, ds.x_train)) if name == "gaussian" else None

    out: dict = {
        "num_classes": k,
        "n_teacher_train": int(len(x_train)),
        "n_student": n_student,
        "teacher": f"{teacher_name} {teacher_kwargs}",
        "student": "mlp {'widths': (64,)}",
        "teacher_epochs": teacher_epochs,
        "student_epochs": student_epochs,
        "teacher_test_acc": float(np.mean(p_teacher_test.argmax(1) == ds.y_test)),
        "teacher_test_nll": _nll(p_teacher_test, ds.y_test),
        "teacher_class_similarity": s_teacher.tolist(),
        "teacher_head_cosine": class_cosine(teacher_head).tolist(),
    }
    if superclass is not None:
        out["superclass"] = np.asarray(superclass).tolist()
        out["teacher_similarity_contrast"] = superclass_contrast(s_teacher, superclass)
        means = ds.meta["class_means"]
        out["true_mean_cosine"] = (means @ means.T).tolist()
        out["corr_teacher_similarity_vs_true_geometry"] = offdiag_correlation(
            s_teacher, means @ means.T
        )
    if bayes is not None:
        out["bayes_test_acc"] = float(
            np.mean(gaussian_bayes_logits(ds, ds.x_test).argmax(1) == ds.y_test)
        )

    runs = {v: [] for v in LADDER}
    instance = []
    for seed in seeds:
        idx = np.random.default_rng(seed).choice(len(ds.x_train), n_student, replace=False)
        x, y, p_t = ds.x_train[idx], ds.y_train[idx], p_teacher_train[idx]
        mean_pt = float(np.mean(p_t[np.arange(len(y)), y]))
        alpha = calibrate_sim_temperature(teacher_head, min(max(mean_pt, 1.0 / k + 1e-3), 1 - 1e-3))
        sim = sim_distributions(teacher_head, alpha)
        student = get_model("mlp", k, widths=(64,))
        for variant in LADDER:
            q = ladder_targets(variant, y, p_t, lam=lam, sim=sim)
            s_vars, _ = fit(
                student, x, q, epochs=student_epochs, batch_size=32, learning_rate=1e-3, seed=seed
            )
            p_s = _softmax(predict(student, s_vars, ds.x_test))
            cos = class_cosine(np.asarray(s_vars["params"]["head"]["kernel"]))
            row = {
                "seed": seed,
                "test_acc": float(np.mean(p_s.argmax(1) == ds.y_test)),
                "test_nll": _nll(p_s, ds.y_test),
                "test_ece": expected_calibration_error(p_s, ds.y_test),
                "corr_head_cosine_vs_teacher_similarity": offdiag_correlation(cos, s_teacher),
            }
            if superclass is not None:
                row["head_cosine_contrast"] = superclass_contrast(cos, superclass)
            runs[variant].append(row)

        # Instance level: rescaling factors seen by an early-stopped CE student.
        early, _ = fit(
            student,
            x,
            y,
            epochs=max(1, student_epochs // 10),
            batch_size=32,
            learning_rate=1e-3,
            seed=seed,
        )
        p_s_train = _softmax(predict(student, early, x))
        w = rescaling_factors(p_s_train, p_t, y, lam)
        rows = np.arange(len(y))
        item = {
            "seed": seed,
            "sim_temperature": alpha,
            "mean_teacher_true_prob": mean_pt,
            "eps_bar": float(np.mean(effective_smoothing(p_t, y, lam))),
            "w_quantiles": np.quantile(w, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist(),
            "fraction_negative": float(np.mean(w < 0)),
            "spearman_w_vs_teacher_conf": float(stats.spearmanr(w, p_t[rows, y]).statistic),
        }
        if bayes is not None:
            item["spearman_w_vs_bayes_conf"] = float(
                stats.spearmanr(w, bayes[idx][rows, y]).statistic
            )
        if seed == seeds[0]:
            item["scatter"] = {"teacher_conf": p_t[rows, y].tolist(), "w": w.tolist()}
        instance.append(item)

    def summary(key, sub=None):
        vals = [r[key] if sub is None else r[key][sub] for r in runs[v]]
        return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}

    out["ladder"] = {}
    for v in LADDER:
        entry = {
            key: summary(key)
            for key in (
                "test_acc",
                "test_nll",
                "test_ece",
                "corr_head_cosine_vs_teacher_similarity",
            )
        }
        if superclass is not None:
            entry["head_cosine_within_minus_across"] = summary("head_cosine_contrast", "difference")
        out["ladder"][v] = entry
    acc = {v: np.asarray(out["ladder"][v]["test_acc"]["values"]) for v in LADDER}
    out["attribution"] = {
        "universe (ls - ce)": float(np.mean(acc["ls"] - acc["ce"])),
        "instance (kd_pt - ls)": float(np.mean(acc["kd_pt"] - acc["ls"])),
        "domain (kd_sim - ls)": float(np.mean(acc["kd_sim"] - acc["ls"])),
        "full (kd - ce)": float(np.mean(acc["kd"] - acc["ce"])),
    }
    out["instance"] = instance
    return out


def run_experiment(*, quick: bool = False, seed: int = 0) -> dict:
    """Tang et al. measurements on a hierarchical ``gaussian`` task and MNIST-1D.

    Per dataset: a teacher trained on the full training set, students (MLP
    with one hidden layer of 64) trained on a small subset with each rung of
    :data:`LADDER` for 3 seeds; test accuracy/NLL/ECE, logit-layer geometry
    against the teacher's class similarity, and the rescaling factors ``w_i``
    seen by an early-stopped CE student.

    Args:
      quick: tiny sizes for tests and CI.
      seed: first seed; seeds ``seed, seed+1, seed+2`` are used.

    Returns:
      JSON-ready dict.
    """
    lam = 0.7
    seeds = [seed] if quick else [seed, seed + 1, seed + 2]
    results = {
        "config": {
            "quick": quick,
            "seeds": seeds,
            "lam": lam,
            "datasets": {
                k: {**v, "teacher": list(v["teacher"])} for k, v in DATASET_CONFIGS.items()
            },
        },
        "datasets": {},
    }
    for name in DATASET_CONFIGS:
        results["datasets"][name] = _run_dataset(name, quick=quick, seeds=seeds, lam=lam)
    return results
