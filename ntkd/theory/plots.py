"""Figures of the theory experiments, drawn from their saved JSON alone.

:func:`ntkd.theory.run_experiment` writes ``theory_<name>.json`` and calls the
plotter of :data:`PLOTTERS`; ``plot_all(results_dir, figures_dir)`` redraws
every figure without recomputing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from ntkd import _io


def plot_all(results_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Redraws every ``theory_<name>.png`` whose ``theory_<name>.json`` exists.

    Returns:
      Paths of the figures written.
    """
    written = []
    for name in PLOTTERS:
        path = Path(results_dir) / f"theory_{name}.json"
        if path.is_file():
            out = Path(figures_dir) / f"theory_{name}.png"
            PLOTTERS[name](_io.read_json(path), out)
            written.append(out)
    return written


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        ax.title.set_fontsize(10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_linear(results: dict, path: str | Path) -> None:
    """Four panels: learning curves with bound, optimisation bias, monotonicity."""
    cfg = results["config"]
    ns = np.asarray(cfg["ns"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))

    ax = axes[0, 0]
    positive = [v for c in results["learning_curves"].values() for v in c["mean_risk"] if v > 0]
    floor = min(positive, default=1e-9) / 3
    for i, (kappa, c) in enumerate(results["learning_curves"].items()):
        color = f"C{i}"
        mean = np.maximum(np.asarray(c["mean_risk"]), floor)
        ax.plot(ns, mean, "o-", color=color, label=f"κ={kappa}: E[risk] of GD student")
        ax.plot(ns, c["bound"], "--", color=color, alpha=0.7, label=f"κ={kappa}: bound")
    ax.set(
        xscale="log",
        yscale="log",
        ylim=(floor, 1.5),
        xlabel="transfer-set size n",
        ylabel="expected transfer risk",
        title=f"(a) Data geometry, d={cfg['d']}, {cfg['draws']} draws",
    )
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0, 1]
    ob = results["optimisation_bias"]
    deltas = ob["deltas_deg"]
    s, dg = ob["synthetic"], ob["digits01"]
    ax.errorbar(
        deltas,
        s["mean_risk"],
        yerr=s["sem_risk"],
        fmt="o-",
        label=f"synthetic κ=1, d={s['d']}, n={s['n']}",
    )
    ax.errorbar(
        deltas,
        dg["mean_risk"],
        yerr=dg["sem_risk"],
        fmt="s-",
        label=f"digits 0/1, d={dg['d']}, n={dg['n']}",
    )
    ax.set(
        xlabel="angle δ between minimiser and GD solution (degrees)",
        ylabel="transfer risk (disagreement with teacher)",
        title="(b) Optimisation bias: equal-loss global minimisers",
    )
    ax.legend(fontsize=8)

    mono = results["monotonicity"]
    n_axis = np.arange(1, mono["n_max"] + 1)
    ax = axes[1, 0]
    for name, curve in mono["example_curves"].items():
        y = np.asarray([np.nan if v is None else v for v in curve], dtype=float)
        ax.plot(n_axis, y, "o-", ms=3, label=name.replace("_", " "))
    ax.set(
        xlabel="number of training points n (added one at a time)",
        ylabel="transfer risk",
        yscale="log",
        title=f"(c) One sequence, κ={mono['kappa']}, d={mono['d']}",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    names = list(mono["increases"])
    counts = [np.asarray(mono["increases"][k]) for k in names]
    ax.bar(
        range(len(names)),
        [c.mean() for c in counts],
        yerr=[c.std() / np.sqrt(len(c)) for c in counts],
        color=["C0", "C1", "C2"],
    )
    ax.set_xticks(range(len(names)), [k.replace("_", "\n") for k in names], fontsize=8)
    ax.set(
        ylabel=f"risk increases per sequence (n = 1…{mono['n_max']})",
        title=f"(d) Monotonicity over {mono['sequences']} sequences",
    )
    fig.suptitle("Phuong & Lampert 2019: distilling a linear teacher into a linear student")
    _save(fig, Path(path))


def _method_label(key: str) -> str:
    """``kd_lam0.7`` -> ``KD λ=0.7``, ``kd_unbiased_lam0.7`` -> ``unbiased KD λ=0.7``, ``svrg`` -> ``SVRG``."""
    names = {
        "sgd": "SGD",
        "svrg": "SVRG (full-gradient correction)",
        "kd_lam_star_var": "KD λ=λ*_var",
    }
    if key in names:
        return names[key]
    if key.startswith("kd_unbiased_lam"):
        return f"unbiased KD λ={key.removeprefix('kd_unbiased_lam')}"
    if key.startswith("kd_lam"):
        return f"KD λ={key.removeprefix('kd_lam')}"
    return key.replace("_", " ")


def plot_variance(results: dict, path: str | Path) -> None:
    """Six panels: V(lam), lam sweep, training curves (2 datasets), plateau vs lr and vs teacher."""
    cfg = results["config"]
    mn, dg = results["datasets"]["mnist1d"], results["datasets"]["digits"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))

    ax = axes[0, 0]
    v = mn["variance"]
    stats = mn["teachers"][mn["main_teacher"]]
    ax.plot(v["lams"], v["formula"], "-", label="formula σ*² − 2λC + λ²σ_T²")
    ax.plot(v["lams"], v["empirical"], "o", ms=4, label="empirical variance of KD gradients")
    ax.axvline(
        stats["lam_star_var"],
        color="k",
        ls=":",
        label=f"λ*_var = C/σ_T² = {stats['lam_star_var']:.3f}",
    )
    ax.set(
        xlabel="KD weight λ",
        ylabel="per-sample gradient variance at θ*",
        yscale="log",
        title=f"(a) Gradient noise V(λ), MNIST-1D, teacher @ {mn['main_teacher']} GD steps",
    )
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    sweep = mn["lam_sweep"]
    for i, (key, s) in enumerate(sweep["teachers"].items()):
        gap = mn["teachers"][key]["loss_gap"]
        label = f"teacher {key}{'' if key == 'optimum' else ' GD steps'} (gap {gap:.1e})"
        style = "s--" if key == "optimum" else "o-"
        ax.plot(
            sweep["lams"],
            np.maximum(s["plateau"], 1e-8),
            style,
            color=f"C{i}",
            label=label,
            ms=8 - 2 * i,
            alpha=0.85,
        )
        ax.axvline(s["lam_star_var"], color=f"C{i}", ls=":", alpha=0.7)
    ax.set(
        xlabel="KD weight λ (dotted: λ*_var)",
        ylabel="final f(θ) − f*",
        yscale="log",
        title="(b) KD-SGD final loss gap vs λ, MNIST-1D",
    )
    ax.legend(fontsize=8)

    for ax, ds, name, tag in ((axes[0, 2], mn, "MNIST-1D", "c"), (axes[1, 0], dg, "digits", "d")):
        for method, curve in ds["curves"].items():
            epochs = np.arange(1, len(curve) + 1)
            ax.plot(epochs, np.maximum(curve, 1e-10), label=_method_label(method))
        ax.set(
            xlabel="epoch",
            ylabel="training loss gap f(θ) − f*",
            yscale="log",
            title=f"({tag}) {name}: γ={ds['learning_rate']:.3g}, B={cfg['batch_size']}, "
            f"teacher @ {ds['main_teacher']} GD steps",
        )
        ax.legend(fontsize=8)

    ax = axes[1, 1]
    pl = mn["plateau_vs_lr"]
    for key in [k for k in pl if k != "learning_rates"]:
        ax.plot(pl["learning_rates"], np.maximum(pl[key], 1e-10), "o-", label=_method_label(key))
    ax.set(
        xlabel="step size γ",
        ylabel=f"plateau: mean f − f* over last {cfg['plateau_last_epochs']} epochs",
        xscale="log",
        yscale="log",
        title="(e) Plateau vs step size, MNIST-1D",
    )
    ax.set_xticks(pl["learning_rates"], [f"{g:.3g}" for g in pl["learning_rates"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    pt = mn["plateau_vs_teacher"]
    gaps = np.maximum(pt["teacher_loss_gap"], 1e-8)
    for key in ("kd_lam" + str(cfg["lam_kd"]), "kd_lam_star_var"):
        ax.plot(gaps, np.maximum(pt[key], 1e-10), "o-", label=_method_label(key))
    ax.axhline(pt["sgd"], color="k", ls="--", label="SGD (no teacher)")
    ax.set(
        xlabel="teacher quality f(θ_T) − f* (GD checkpoints; leftmost = θ*)",
        ylabel="plateau f − f*",
        xscale="log",
        yscale="log",
        title="(f) Plateau vs teacher quality, MNIST-1D",
    )
    ax.legend(fontsize=8)
    fig.suptitle(
        "Safaryan et al. 2023: KD as partial variance reduction (linear softmax student, τ = 1)"
    )
    _save(fig, Path(path))


def plot_knowledge(results: dict, path: str | Path) -> None:
    """Six panels: accuracy ladders, NLL, rescaling factors, logit-layer geometry, teacher similarity."""
    cfg = results["config"]
    datasets = results["datasets"]
    variants = list(next(iter(datasets.values()))["ladder"])
    labels = [v.replace("_", "-") for v in variants]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))

    sqrt_n = np.sqrt(len(cfg["seeds"]))  # error bars are standard errors of the seed mean
    for ax, (name, ds) in zip(axes[0, :2], datasets.items()):
        acc = [ds["ladder"][v]["test_acc"] for v in variants]
        ax.bar(
            range(len(variants)),
            [a["mean"] for a in acc],
            yerr=[a["std"] / sqrt_n for a in acc],
            color=[f"C{i}" for i in range(len(variants))],
            capsize=4,
        )
        ax.axhline(ds["teacher_test_acc"], color="k", ls="--", lw=1, label="teacher")
        ax.set_ylim(0, 1)  # full axis: gaps of a point or two are not made to look large
        ax.legend(fontsize=8, loc="upper right")
        ax.set_xticks(range(len(variants)), labels)
        ref = f"teacher {ds['teacher_test_acc']:.3f}"
        if "bayes_test_acc" in ds:
            ref += f", Bayes {ds['bayes_test_acc']:.3f}"
        ax.set(
            ylabel=f"student test accuracy (mean ± s.e., {len(cfg['seeds'])} seeds)",
            title=f"({'ab'[list(datasets).index(name)]}) {name}: n_student={ds['n_student']} ({ref})",
        )

    ax = axes[0, 2]
    width = 0.8 / len(datasets)
    for j, (name, ds) in enumerate(datasets.items()):
        ece = [ds["ladder"][v]["test_ece"] for v in variants]
        ax.bar(
            np.arange(len(variants)) + j * width,
            [e["mean"] for e in ece],
            width,
            yerr=[e["std"] / sqrt_n for e in ece],
            label=name,
            capsize=3,
        )
    ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2, labels)
    ax.set(ylabel="test expected calibration error (15 bins; mean ± s.e.)", title="(c) Calibration")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for j, (name, ds) in enumerate(datasets.items()):
        item = ds["instance"][0]
        sc = item["scatter"]
        ax.scatter(
            sc["teacher_conf"],
            sc["w"],
            s=6,
            alpha=0.5,
            color=f"C{j}",
            label=f"{name}: Spearman {item['spearman_w_vs_teacher_conf']:.2f}",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set(
        xlabel="teacher confidence p_T[true class]",
        ylabel="rescaling factor w_i (early CE student)",
        title=f"(d) Instance level: gradient rescaling, λ={cfg['lam']}",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for j, (name, ds) in enumerate(datasets.items()):
        corr = [ds["ladder"][v]["corr_head_cosine_vs_teacher_similarity"] for v in variants]
        ax.bar(
            np.arange(len(variants)) + j * width,
            [c["mean"] for c in corr],
            width,
            yerr=[c["std"] / sqrt_n for c in corr],
            label=name,
            capsize=3,
        )
    gauss = datasets.get("gaussian")
    if gauss is not None and "head_cosine_within_minus_across" in gauss["ladder"][variants[0]]:
        diff = [gauss["ladder"][v]["head_cosine_within_minus_across"]["mean"] for v in variants]
        ax.plot(
            np.arange(len(variants)) + 0.4 - width / 2,
            diff,
            "kD-",
            label="gaussian: cos within − across super-class",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(top=1.5 * ax.get_ylim()[1])
    ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2, labels)
    ax.set(
        ylabel="Spearman(student head cosines, teacher similarity; mean ± s.e.)",
        title="(e) Domain level: student logit-layer geometry",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    if gauss is not None:
        s_mat = np.asarray(gauss["teacher_class_similarity"])
        im = ax.imshow(s_mat, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, label="S_jk (symmetrised)")
        ax.set(
            xlabel="class k",
            ylabel="class j",
            title=f"(f) gaussian teacher similarity; super-class = class mod {max(gauss['superclass']) + 1}",
        )
    fig.suptitle("Tang et al. 2020: universe (LS), instance (KD-pt) and domain (KD-sim) knowledge")
    _save(fig, Path(path))


PLOTTERS = {  # experiment name -> plot_<name>(results, path)
    "linear": plot_linear,
    "variance": plot_variance,
    "knowledge": plot_knowledge,
}
