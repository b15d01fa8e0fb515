"""Figures of a study, drawn from its saved ``results/*.json`` alone.

``plot_study(study_dir)`` writes one PNG per analysis into
``study_dir/figures``; ``ntkd figures STUDY_DIR`` calls it.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntkd._io import read_json, write_bytes  # noqa: E402

_STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
          "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8}
_TARGET_STYLE = {"random": ("random labels", "tab:red", ":"), "labels": ("true labels", "tab:blue", "-"),
                 "offline_teacher": ("offline teacher (final)", "tab:green", "--"),
                 "online_teacher": ("online teacher (same epoch)", "tab:purple", "-.")}


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def plot_teacher_checkpoints(res: dict, path: Path, title: str = "") -> Path:
    rows = [r for r in res["rows"] if r.get("teacher_epoch") is not None]
    temps = sorted({r["temperature"] for r in rows})
    refs = {r["target"]: r["adjusted_complexity"] for r in res["rows"] if r["target"] in ("labels", "random")}
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    colors = plt.cm.viridis(np.linspace(0.05, 0.85, len(temps)))
    for t, c in zip(temps, colors):
        pts = sorted((r["teacher_epoch"], r["adjusted_complexity"]) for r in rows if r["temperature"] == t)
        ax.plot(*zip(*pts), "o-", ms=3, color=c, label=f"teacher τ={t:g}")
    ax.axhline(refs["labels"], color="tab:blue", ls="-", lw=1, label="true labels")
    ax.axhline(refs["random"], color="tab:red", ls=":", lw=1, label="random labels")
    ax.set_xlabel("teacher epoch (checkpoint)")
    ax.set_ylabel("adjusted supervision complexity")
    ax2 = ax.twinx()
    acc = sorted({(r["teacher_epoch"], r["teacher_test_acc"]) for r in rows})
    ax2.plot(*zip(*acc), color="gray", ls="--", lw=1.2, label="teacher test acc.")
    ax2.set_ylabel("teacher test accuracy", color="gray")
    ax2.set_ylim(0, 1)
    ax2.grid(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", ncol=1)
    ax.set_title(f"{title}: teacher checkpoints in the student's NTK at init (n={res['n']})")
    return _save(fig, path)


def plot_student_complexity(res: dict, path: Path, title: str = "") -> Path:
    panels = res["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        epochs = [r["epoch"] for r in panel["rows"]]
        for key, (label, color, ls) in _TARGET_STYLE.items():
            ax.plot(epochs, [r[key] for r in panel["rows"]], ls, marker="o", ms=3, color=color, label=label)
        ax.set_title(f"student trained: {panel['regime']}")
        ax.set_xlabel("student epoch (checkpoint)")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("adjusted supervision complexity")
    axes[0][-1].legend(loc="upper right")
    fig.suptitle(f"{title}: complexity of targets in the student's NTK along its training (n={res['n']})")
    return _save(fig, path)


def plot_distillation(res: dict, path: Path, title: str = "") -> Path:
    rows = res["rows"]
    names = [r["regime"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    ax.bar(x, [100 * r["test_acc_mean"] for r in rows], yerr=[100 * r["test_acc_std"] for r in rows],
           color="tab:blue", alpha=0.8, capsize=3)
    ax.axhline(100 * res["teacher_test_acc"], color="k", ls="--", lw=1, label="teacher")
    lo = min(100 * r["test_acc_mean"] for r in rows)
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_ylabel("student test accuracy (%)")
    ax.legend(loc="upper left")
    ax = axes[1]
    kd = [r for r in rows if "test_fidelity_mean" in r]
    xk = np.arange(len(kd))
    for off, key, color in ((-0.2, "train_fidelity", "tab:green"), (0.2, "test_fidelity", "tab:purple")):
        ax.bar(xk + off, [100 * r[f"{key}_mean"] for r in kd], 0.4, yerr=[100 * r[f"{key}_std"] for r in kd],
               color=color, alpha=0.8, capsize=3, label=key.replace("_", " "))
    ax.set_ylabel("top-1 agreement with teacher (%)")
    ax.set_ylim(max(0, min(100 * r["test_fidelity_mean"] for r in kd) - 10), 101)
    ax.legend(loc="lower right")
    for a, labels in ((axes[0], names), (axes[1], [r["regime"] for r in kd])):
        a.set_xticks(np.arange(len(labels)))
        a.set_xticklabels(labels, rotation=30, ha="right")
    fig.suptitle(f"{title}: students by KD regime (mean ± std over {rows[0]['seeds']} seeds)")
    return _save(fig, path)


def plot_ntk_similarity(res: dict, path: Path, title: str = "") -> Path:
    rows = res["rows"]
    names = [r["regime"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    bars = [("cka_vs_init", "CKA vs own NTK at init", "tab:blue"), ("cka_vs_teacher", "CKA vs teacher NTK", "tab:orange"),
            ("alignment_vs_teacher", "alignment vs teacher NTK", "tab:gray")]
    for i, (key, label, color) in enumerate(bars):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=label, color=color, alpha=0.85)
    ax.axhline(rows[0]["init_cka_vs_teacher"], color="tab:orange", ls=":", lw=1, label="CKA init vs teacher")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("similarity of trained student NTK")
    ax.legend(loc="lower left", fontsize=7)
    ax = axes[1]
    mat = np.array(res["pairwise_cka"]["matrix"])
    im = ax.imshow(mat, vmin=min(0.5, mat.min()), vmax=1, cmap="magma")
    ax.set_xticks(x)
    ax.set_yticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    ax.grid(False)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if mat[i, j] < 0.85 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="CKA between trained students")
    fig.suptitle(f"{title}: NTK similarity (n={res['n']}, seed {res['seed']})")
    return _save(fig, path)


def plot_margins(res: dict, path: Path, title: str = "") -> Path:
    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    colors = plt.cm.tab10(np.arange(len(rows)))
    for r, c in zip(rows, colors):
        m = np.sort(np.asarray(r["margins"]))
        ax.plot(m, np.arange(1, len(m) + 1) / len(m), color=c, label=r["regime"])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("student margin w.r.t. teacher prediction (logits)")
    ax.set_ylabel("fraction of training points ≤ margin")
    ax.legend(fontsize=7)
    ax = axes[1]
    terms = [("teacher_error", "teacher train error"), ("margin_error", "student γ-margin error"),
             ("complexity_term", "complexity term"), ("confidence_term", "confidence term")]
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key, label in terms:
        vals = np.array([r["best_bound"][key] for r in rows])
        ax.bar(x, vals, bottom=bottom, label=label, alpha=0.85)
        bottom += vals
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"γ={r['best_bound']['gamma']:g}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([r["regime"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("bound on P(error), at its best γ")
    ax.legend(fontsize=7)
    fig.suptitle(f"{title}: margins and the generalisation bound (seed {res['seed']}, n={res['n']})")
    return _save(fig, path)


_PLOTS = {"teacher_checkpoints": plot_teacher_checkpoints, "student_complexity": plot_student_complexity,
          "distillation": plot_distillation, "ntk_similarity": plot_ntk_similarity, "margins": plot_margins}


def plot_study(study_dir: str | os.PathLike, figures_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draws every figure whose results exist; returns the PNG paths."""
    study_dir = Path(study_dir)
    results = study_dir / "results"
    if not results.is_dir():
        raise FileNotFoundError(f"{results} does not exist; run `ntkd reproduce --out {study_dir}` first")
    figures = Path(figures_dir) if figures_dir else study_dir / "figures"
    title = read_json(study_dir / "study.json")["name"] if (study_dir / "study.json").exists() else ""
    with plt.rc_context(_STYLE):
        return [fn(read_json(results / f"{step}.json"), figures / f"{step}.png", title)
                for step, fn in _PLOTS.items() if (results / f"{step}.json").exists()]
