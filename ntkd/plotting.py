"""Figures of a study, drawn from its saved ``results/*.json`` alone.

``plot_study(study_dir)`` writes one PNG per analysis into
``study_dir/figures``; ``ntkd figures STUDY_DIR`` calls it.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ntkd._io import read_json, write_bytes
from ntkd.findings import capacity_points, capacity_temperature, complexity_kernels

_STYLE = {
    "figure.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "legend.fontsize": 8,
}
_TARGET_STYLE = {
    "random": ("random labels", "tab:red", ":"),
    "labels": ("true labels", "tab:blue", "-"),
    "offline_teacher": ("offline teacher (final)", "tab:green", "--"),
    "online_teacher": ("online teacher (same epoch)", "tab:purple", "-."),
}


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _band(ax, x, vals, **kw):
    """Mean line with a ± standard-error band over seeds; vals: (seeds, len(x))."""
    vals = np.asarray(vals, dtype=float)
    m = vals.mean(0)
    se = vals.std(0, ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else np.zeros_like(m)
    (line,) = ax.plot(x, m, marker="o", ms=2.5, **kw)
    ax.fill_between(
        x, m - se, m + se, color=line.get_color(), alpha=0.2 * kw.get("alpha", 1.0), lw=0
    )
    return line


def _interval_bars(ax, x, mid, lower, upper, **kw):
    """Error bars from the mean over seeds of each certified lower bound to that of each upper
    bound (the interval of the mean), around the plotted mean ``mid``; lower, upper: (seeds, len(x))."""
    mid = np.asarray(mid, dtype=float)
    lo, hi = np.asarray(lower, dtype=float).mean(0), np.asarray(upper, dtype=float).mean(0)
    err = [np.clip(mid - lo, 0, None), np.clip(hi - mid, 0, None)]
    return ax.errorbar(x, mid, yerr=err, fmt="none", capsize=2.5, lw=1, **kw)


def _has_intervals(rows, measure: str) -> bool:
    """Whether result entries carry the matrix-free path's certified interval of ``measure``."""
    return all(f"{measure}_lower" in r and f"{measure}_upper" in r for r in rows)


def _interval_note(res: dict) -> str:
    """The title line that says the bars are certified intervals (matrix-free results), else ''."""
    kernels = [k for _, k in complexity_kernels(res)]
    if not kernels:
        return ""
    gap = max(k["max_relative_gap"] for k in kernels)
    note = (
        "\nerror bars: certified intervals of the matrix-free path (mean over seeds of each bound; "
        f"largest relative gap of C {gap:.2g})"
    )
    if not all(k["certified"] for k in kernels):
        note += "; ⚠ not every upper bound is certified"
    return note


_MEASURE_LABEL = {"A": "adjusted complexity A", "A_hat": "normalised complexity Â = A / A(Y; I)"}


def plot_teacher_checkpoints(res: dict, path: Path, title: str = "") -> Path:
    panels = res["panels"]
    temps = res["temperatures"]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.8), gridspec_kw={"wspace": 0.5})
    colors = plt.cm.viridis(np.linspace(0.05, 0.85, len(temps)))
    for ax, measure in zip(axes, ("A", "A_hat")):
        intervals = all(_has_intervals(p["rows"], measure) for p in panels)
        for t, c in zip(temps, colors):
            epochs = sorted(
                {r["teacher_epoch"] for r in panels[0]["rows"] if r.get("temperature") == t}
            )
            rows = [
                [
                    next(
                        r
                        for r in p["rows"]
                        if r.get("teacher_epoch") == e and r["temperature"] == t
                    )
                    for e in epochs
                ]
                for p in panels
            ]
            vals = [[r[measure] for r in pr] for pr in rows]
            _band(ax, epochs, vals, color=c, label=f"teacher τ={t:g}")
            if intervals:
                _interval_bars(
                    ax,
                    epochs,
                    np.mean(vals, axis=0),
                    [[r[f"{measure}_lower"] for r in pr] for pr in rows],
                    [[r[f"{measure}_upper"] for r in pr] for pr in rows],
                    color=c,
                )
        for key, color, ls, label in (
            ("labels", "tab:blue", "-", "true labels"),
            ("random", "tab:red", ":", "random labels"),
        ):
            fixed = [next(r for r in p["rows"] if r["target"] == key) for p in panels]
            m, se = _mean_se([r[measure] for r in fixed])
            if intervals:
                lo = float(np.mean([r[f"{measure}_lower"] for r in fixed]))
                hi = float(np.mean([r[f"{measure}_upper"] for r in fixed]))
                ax.axhspan(lo, hi, color=color, alpha=0.15, lw=0)
                label = f"{label} ({m:.2f} ± {se:.2f}; bounds [{lo:.2f}, {hi:.2f}])"
            else:
                label = f"{label} ({m:.2f} ± {se:.2f})"
            ax.axhline(m, color=color, ls=ls, lw=1, label=label)
        if measure == "A_hat":
            ax.axhline(1.0, color="k", lw=0.8, ls="--", label="identity kernel (Â = 1)")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("teacher epoch (checkpoint)")
        ax.set_ylabel(_MEASURE_LABEL[measure])
    ax2 = axes[0].twinx()
    acc = sorted(
        {
            (r["teacher_epoch"], r["teacher_test_acc"])
            for r in panels[0]["rows"]
            if r.get("teacher_epoch") is not None
        }
    )
    ax2.plot(*zip(*acc), color="gray", ls="--", lw=1.2, label="teacher test acc. (right axis)")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("teacher test accuracy", color="gray")
    ax2.grid(False)
    h1, l1 = axes[1].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    axes[1].legend(h1 + h2, l1 + l2, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"{title}: teacher checkpoints in the student's NTK at init "
        f"(n={res['n']}; mean ± s.e. over seeds {res['seeds']})" + _interval_note(res)
    )
    return _save(fig, path)


def _target_curves(res: dict):
    """(key, label, color, linestyle, alpha) of every curve in a student-complexity panel."""
    curves = [
        (k, label, c, ls, 1.0)
        for k, (label, c, ls) in _TARGET_STYLE.items()
        if k in ("random", "labels")
    ]
    for i, t in enumerate(res["temperatures"]):
        for kind in ("offline_teacher", "online_teacher"):
            label, c, ls = _TARGET_STYLE[kind]
            curves.append((f"{kind}_t{t:g}", f"{label}, τ={t:g}", c, ls, 1.0 if i == 0 else 0.45))
    return curves


def plot_student_complexity(res: dict, path: Path, title: str = "") -> Path:
    regimes = res["regimes"]
    fig, axes = plt.subplots(
        2, len(regimes), figsize=(3.6 * len(regimes), 6.0), sharex=True, squeeze=False
    )
    for j, name in enumerate(regimes):
        panels = [p for p in res["panels"] if p["regime"] == name]
        epochs = [r["epoch"] for r in panels[0]["rows"]]
        for i, measure in enumerate(("A", "A_hat")):
            ax = axes[i][j]
            for key, label, color, ls, alpha in _target_curves(res):
                entries = [[r["targets"][key] for r in p["rows"]] for p in panels]
                vals = [[e[measure] for e in pe] for pe in entries]
                _band(ax, epochs, vals, color=color, ls=ls, alpha=alpha, label=label)
                if all(_has_intervals(pe, measure) for pe in entries):
                    _interval_bars(
                        ax,
                        epochs,
                        np.mean(vals, axis=0),
                        [[e[f"{measure}_lower"] for e in pe] for pe in entries],
                        [[e[f"{measure}_upper"] for e in pe] for pe in entries],
                        color=color,
                        alpha=alpha,
                    )
            if measure == "A_hat":
                ax.axhline(1.0, color="k", lw=0.8, ls="--", label="identity kernel (Â = 1)")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_ylim(bottom=0)
            if i == 0:
                ax.set_title(f"student trained: {name}")
            if j == 0:
                ax.set_ylabel(_MEASURE_LABEL[measure])
            if i == 1:
                ax.set_xlabel("student epoch (symlog)")
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(
        f"{title}: complexity of targets in the student's NTK along its training "
        f"(n={res['n']}; mean ± s.e. over seeds {res['seeds']})" + _interval_note(res),
        y=1.01,
    )
    return _save(fig, path)


def plot_distillation(res: dict, path: Path, title: str = "", findings: list | None = None) -> Path:
    rows = res["rows"]
    students = list(dict.fromkeys(r.get("student", "main") for r in rows))
    colors = dict(zip(students, plt.cm.tab10(np.arange(len(students)))))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.6, 1.2, 1]})
    ax = axes[0]
    x = np.arange(len(rows))
    for student in students:
        idx = [i for i, r in enumerate(rows) if r.get("student", "main") == student]
        ax.bar(
            x[idx],
            [100 * rows[i]["test_acc_mean"] for i in idx],
            yerr=[100 * rows[i].get("test_acc_se", 0.0) for i in idx],
            color=colors[student],
            alpha=0.85,
            capsize=2,
            label=f"student {student}",
        )
    ax.axhline(100 * res["teacher_test_acc"], color="k", ls="--", lw=1, label="teacher")
    ax.set_ylim(0, 100)
    ax.set_xticks(x)
    ax.set_xticklabels([r["regime"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%), mean ± s.e.")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.set_title("test accuracy (full axis)")
    ax = axes[1]
    dist = [
        f
        for f in (findings or [])
        if f.get("kind") == "distillation"
        and f.get("effect") is not None
        and not f["name"].startswith("online KD helps most")
    ]
    for i, f in enumerate(dist):
        color = {"reproduced": "tab:green", "not reproduced": "tab:red"}.get(
            f["verdict"], "tab:gray"
        )
        ax.errorbar(
            100 * f["effect"],
            i,
            xerr=[[100 * (f["effect"] - f["ci"][0])], [100 * (f["ci"][1] - f["effect"])]],
            fmt="o",
            color=color,
            capsize=3,
        )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(dist)))
    ax.set_yticklabels(
        [f"{f['name']}\n[{f['verdict']}, Holm p={f['p_adjusted']:.2g}]" for f in dist], fontsize=6
    )
    ax.invert_yaxis()
    ax.set_xlabel("paired difference (points), 95% CI")
    ax.set_title(
        "paired comparisons (green: reproduced, red: against, grey: inconclusive)", fontsize=8
    )
    ax = axes[2]
    t = capacity_temperature(findings or [], res)
    points = capacity_points(res, t) if t is not None else {}
    pts = []
    for student in students:
        if not points.get(student):
            continue
        gaps, gains = zip(*points[student].values())
        gap = 100 * float(np.mean(gaps))
        gain, se = _mean_se([100 * g for g in gains])
        pts.append((gap, gain))
        ax.errorbar(
            gap,
            gain,
            yerr=se,
            fmt="o",
            color=colors[student],
            capsize=3,
            label=f"{student} (τ={t:g})",
        )
    slope = next(
        (
            f
            for f in (findings or [])
            if f["name"].startswith("online KD helps most") and f.get("effect") is not None
        ),
        None,
    )
    if len(pts) >= 2:
        g, y = np.array(pts).T
        b, a = np.polyfit(g, y, 1)
        xs = np.linspace(0, g.max() * 1.05, 10)
        label = "OLS fit" + (
            f": slope {slope['effect']:.2f} [{slope['ci'][0]:.2f}, {slope['ci'][1]:.2f}]"
            if slope
            else ""
        )
        ax.plot(xs, a + b * xs, color="k", lw=1, ls="--", label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(left=0)
    ax.set_xlabel("capacity gap: teacher − student no-KD accuracy (points)")
    ax.set_ylabel("online − offline test accuracy (points), ± s.e.")
    if ax.get_legend_handles_labels()[0]:  # a study without online KD has no points here
        ax.legend(fontsize=6)
    ax.set_title("capacity gap")
    fig.suptitle(f"{title}: students by KD regime")
    fig.tight_layout()
    return _save(fig, path)


def plot_ntk_similarity(res: dict, path: Path, title: str = "") -> Path:
    rows = res["summary"]
    names = [r["regime"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(
        1, 2, figsize=(11.5, 4.0), gridspec_kw={"width_ratios": [1.3, 1], "wspace": 0.5}
    )
    ax = axes[0]
    bars = [
        ("cka_vs_init", "CKA vs own NTK at init", "tab:blue"),
        ("cka_vs_teacher", "CKA vs teacher NTK", "tab:orange"),
        ("alignment_vs_teacher", "alignment vs teacher NTK", "tab:gray"),
    ]
    for i, (key, label, color) in enumerate(bars):
        ax.bar(
            x + (i - 1) * 0.27,
            [r[f"{key}_mean"] for r in rows],
            0.27,
            yerr=[r[f"{key}_se"] for r in rows],
            label=label,
            color=color,
            alpha=0.85,
            capsize=2,
        )
    m = np.mean([r["init_cka_vs_teacher_mean"] for r in rows])
    ax.axhline(m, color="tab:orange", ls=":", lw=1, label="CKA of the init NTK vs teacher NTK")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("similarity of trained student NTK (mean ± s.e.)")
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
            ax.text(
                j,
                i,
                f"{mat[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if mat[i, j] < 0.85 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, label="CKA between trained students (mean over seeds)")
    fig.suptitle(f"{title}: NTK similarity (n={res['n']}, seeds {res['seeds']})")
    return _save(fig, path)


def plot_margins(
    res: dict,
    path: Path,
    title: str = "",
    findings: list | None = None,
    distillation: dict | None = None,
) -> Path:
    by: dict[str, list[dict]] = {}
    for r in res["rows"]:
        by.setdefault(r["regime"], []).append(r)
    names = list(by)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.0), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    ax = axes[0]
    terms = [
        ("margin_error", "γ-margin error of f"),
        ("complexity_term", "complexity term"),
        ("confidence_term", "confidence term"),
        ("total", "bound total"),
    ]
    x = np.arange(len(names))
    floor = 1e-2
    for i, (key, label) in enumerate(terms):
        stats = [_mean_se([r["bound"][key] for r in by[n]]) for n in names]
        pos = x + (i - 1.5) * 0.2
        bars = ax.bar(
            pos,
            [m if m > 0 else np.nan for m, _ in stats],
            0.2,
            yerr=[se if m > 0 else np.nan for m, se in stats],
            label=label,
            alpha=0.85,
            capsize=2,
        )
        for xi, (m, _) in zip(pos, stats):
            if m == 0:  # a log axis cannot show 0: say it
                ax.text(
                    xi,
                    floor * 1.3,
                    "0",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color=bars.patches[0].get_facecolor(),
                )
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="1 (above: vacuous)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("bound on P(error) and its terms (log axis)")
    ax.legend(fontsize=7, loc="center left")
    ax.set_title("kernel-student bound, every term from f = K(K+λI)⁻¹Y", fontsize=8)
    ax = axes[1]
    colors = plt.cm.tab10(np.arange(len(names)))
    for n, c in zip(names, colors):
        vals = next(
            (r.get("network_margin_values") for r in by[n] if r.get("network_margin_values")), None
        )
        if vals:
            m = np.sort(np.asarray(vals))
            ax.plot(m, np.arange(1, len(m) + 1) / len(m), color=c, label=n)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("trained network's margin w.r.t. teacher (logits)")
    ax.set_ylabel("fraction of training points ≤ margin")
    ax.legend(fontsize=6)
    ax.set_title("network margins (seed 0; descriptive, not in the bound)", fontsize=8)
    ax = axes[2]
    if distillation:
        runs = {(r["regime"], r["seed"]): r for r in distillation["runs"]}
        for n, c in zip(names, colors):
            b = _mean_se([r["bound"]["total"] for r in by[n]])
            e = _mean_se(
                [
                    100 * (1 - runs[n, r["seed"]]["test_acc"])
                    for r in by[n]
                    if (n, r["seed"]) in runs
                ]
            )
            ax.errorbar(e[0], b[0], xerr=e[1], yerr=b[1], fmt="o", color=c, capsize=2, label=n)
        f = next(
            (
                f
                for f in (findings or [])
                if f.get("kind") == "bound" and f.get("effect") is not None
            ),
            None,
        )
        if f:
            ax.set_title(
                f"Spearman ρ = {f['effect']:.2f} [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}] — {f['verdict']}",
                fontsize=8,
            )
        ax.set_xlabel("test error (%), mean ± s.e.")
        ax.set_ylabel("bound total, mean ± s.e.")
        ax.legend(fontsize=6)
    fig.suptitle(f"{title}: the kernel-student margin bound (seeds {res['seeds']}, n={res['n']})")
    fig.tight_layout()
    return _save(fig, path)


_PLOTS = {
    "teacher_checkpoints": plot_teacher_checkpoints,
    "student_complexity": plot_student_complexity,
    "distillation": plot_distillation,
    "ntk_similarity": plot_ntk_similarity,
    "margins": plot_margins,
}


def plot_study(
    study_dir: str | os.PathLike, figures_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Draws every figure whose results exist; returns the PNG paths."""
    study_dir = Path(study_dir)
    results = study_dir / "results"
    if not results.is_dir():
        raise FileNotFoundError(
            f"{results} does not exist; run `ntkd reproduce --out {study_dir}` first"
        )
    figures = Path(figures_dir) if figures_dir else study_dir / "figures"
    title = (
        read_json(study_dir / "study.json")["name"] if (study_dir / "study.json").exists() else ""
    )
    findings = (
        read_json(results / "findings.json") if (results / "findings.json").exists() else None
    )
    extra = {
        "distillation": {"findings": findings},
        "margins": {
            "findings": findings,
            "distillation": read_json(results / "distillation.json")
            if (results / "distillation.json").exists()
            else None,
        },
    }
    with plt.rc_context(_STYLE):
        return [
            fn(
                read_json(results / f"{step}.json"),
                figures / f"{step}.png",
                title,
                **extra.get(step, {}),
            )
            for step, fn in _PLOTS.items()
            if (results / f"{step}.json").exists()
        ]
