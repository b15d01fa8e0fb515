"""report.md of a study, written from its saved results alone.

The verdicts come from ``results/findings.json`` (:mod:`ntkd.findings`): each
pre-registered criterion with its effect, 95% CI, p-value and Holm-adjusted
p-value. The report lists the findings that go against the paper or are
inconclusive first, then the tables behind them (paper values beside ntkd's
where the paper reports them), the capacity-gap regression, the bound and the
NTK similarities, all with their uncertainty.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ntkd._io import read_json, write_text
from ntkd.findings import capacity_points, capacity_temperature, checkpoint_at, complexity_kernels

# Harutyunyan et al. (ICLR 2023), Fig. of complexity along student training (CIFAR-100, ResNet-56 → LeNet-5x8):
# online / offline teacher ratio of the adjusted complexity at fractions of student training.
PAPER_ONLINE_OFFLINE = {
    0.0: "0.044 (0.17 / 3.90)",
    0.1: "0.35",
    0.2: "–",
    0.5: "–",
    0.9: "≈ 0.9 (only after ~80%)",
    1.0: "≈ 1",
}
FRACTIONS = (0.0, 0.1, 0.2, 0.5, 0.9, 1.0)
COMPLEXITY_STEPS = ("teacher_checkpoints", "student_complexity")  # the steps with a complexity path


def _pct(row: dict, key: str, err: str = "se", scale: float = 100.0) -> str:
    if f"{key}_mean" not in row:
        return "–"
    return f"{scale * row[f'{key}_mean']:.1f} ± {scale * row.get(f'{key}_{err}', 0.0):.1f}"


def distillation_markdown(result: dict) -> str:
    """The distillation table as Markdown (accuracies and fidelities in %, mean ± standard error)."""
    lines = [
        "| regime | student | seeds | test acc (%) | train fidelity (%) | test fidelity (%) | test KL(T‖S) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['regime']} | {r.get('student', 'main')} | {r['seeds']} | {_pct(r, 'test_acc')} | "
            f"{_pct(r, 'train_fidelity')} | {_pct(r, 'test_fidelity')} | {_pct(r, 'test_kl', scale=1.0)} |"
        )
    lines.append(
        f"\nMean ± standard error over seeds. Teacher: test accuracy {100 * result['teacher_test_acc']:.1f}%, "
        f"train accuracy {100 * result['teacher_train_acc']:.1f}%."
    )
    return "\n".join(lines) + "\n"


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _p(v) -> str:
    if v is None:
        return "–"
    return f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}"


def _ci(ci) -> str:
    return "–" if not ci else f"[{_num(ci[0])}, {_num(ci[1])}]"


def _interval(lo, hi, digits: int = 3) -> str:
    return f"[{_num(lo, digits)}, {_num(hi, digits)}]"


def _bounds_cell(f: dict) -> str:
    """The effect's certified interval of a matrix-free finding, flagged when it does not decide."""
    b = f.get("bounds")
    if not b:
        return "–"
    out = _interval(*b["effect"])
    if not b.get("certified", True):
        out += " ⚠ upper bounds not certified"
    if not b.get("verdict_holds", True):
        out += (
            f" ⚠ **undecided**: {b.get('verdict_at_lower') or 'no verdict'} at the lower end, "
            f"{b.get('verdict_at_upper') or 'no verdict'} at the upper end"
        )
    return out


def _findings_table(findings: list[dict]) -> list[str]:
    intervals = any(f.get("bounds") for f in findings)
    lines = [
        "| finding | verdict | effect [95% CI] | "
        + ("effect, certified bounds | " if intervals else "")
        + "p | p (Holm) | under A | identity kernel | equal-norm label smoothing |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if intervals else ""),
    ]
    for f in findings:
        c = f.get("controls", {})
        ctl = [
            (
                "–"
                if k not in c
                else f"{_num(c[k]['effect'])} (exact: no seed changes it)"
                if c[k].get("method", "").startswith("all differences equal")
                else f"{_num(c[k]['effect'])} (p {_p(c[k]['p'])})"
            )
            + (
                f" bounds {_interval(*c[k]['effect_bounds'])}"
                if "effect_bounds" in c.get(k, {})
                else ""
            )
            for k in ("A", "identity_kernel", "label_smoothing_matched")
        ]
        flag = " (size effect only)" if f.get("size_effect_only") else ""
        if not f.get("bounds", {}).get("verdict_holds", True):
            flag += " (not decided by the certified intervals)"
        bounds = f"{_bounds_cell(f)} | " if intervals else ""
        lines.append(
            f"| {f['name']} | **{f['verdict']}**{flag} | {_num(f['effect'])} {_ci(f['ci'])} | {bounds}{_p(f['p'])} | "
            f"{_p(f['p_adjusted'])} | {' | '.join(ctl)} |"
        )
    return lines


def _criteria_list(findings: list[dict]) -> list[str]:
    out = []
    for f in findings:
        seeds = ""
        if f.get("per_seed"):
            seeds = (
                " Per seed: " + ", ".join(f"{s}: {_num(v)}" for s, v in f["per_seed"].items()) + "."
            )
        why = f" Not tested: {f['reason']}" if f.get("reason") else ""
        b = f.get("bounds")
        if b:
            seeds += (
                " Certified bounds per seed (matrix-free path): "
                + ", ".join(f"{s}: {_interval(*v)}" for s, v in b["per_seed"].items())
                + "; "
                + (
                    f"they do not order the two sides for seed{'s' if len(b['undecided_seeds']) > 1 else ''} "
                    f"{', '.join(b['undecided_seeds'])}"
                    if b["undecided_seeds"]
                    else "every seed's bounds are on one side of 0"
                )
                + f"; verdict with every seed at its lower end: {b.get('verdict_at_lower') or 'none'}, at "
                f"its upper end: {b.get('verdict_at_upper') or 'none'}."
            )
        out.append(
            f"- **{f['name']}** — {f['criterion']} Test: {f.get('method', '–')}; α = {f['alpha']} after "
            f"Holm.{seeds}{why}"
        )
    return out


def _ratio_table(sc: dict) -> list[str]:
    """online/offline and offline/labels ratios at fractions of training, mean ± SE over panels and seeds;
    on the matrix-free path also [lower, upper], the mean over runs of each run's certified interval."""
    intervals = sc.get("complexity_path") == "matfree"
    flagged = False
    out = []
    for t in sc["temperatures"]:
        on, off = f"online_teacher_t{t:g}", f"offline_teacher_t{t:g}"
        out += [
            f"τ = {t:g} (mean ± standard error over {len(sc['panels'])} runs: regimes {sc['regimes']} × seeds "
            f"{sc['seeds']}):",
            "",
            "| fraction of student training | epoch | online / offline (A) | online / offline (Â) | "
            "offline / labels (A) | offline / labels (Â) | paper: online / offline (A) |",
            "|---|---|---|---|---|---|---|",
        ]
        ratios = (("oa", on, off, "A"), ("oh", on, off, "A_hat"))
        ratios += (("la", off, "labels", "A"), ("lh", off, "labels", "A_hat"))
        for frac in FRACTIONS:
            vals = {k: [] for k, *_ in ratios}
            lows = {k: [] for k, *_ in ratios}
            highs = {k: [] for k, *_ in ratios}
            epochs, certified = set(), True
            for p in sc["panels"]:
                r = checkpoint_at(p["rows"], frac)
                epochs.add(r["epoch"])
                certified &= r.get("certified", True)
                tg = r["targets"]
                for k, num, den, m in ratios:
                    vals[k].append(tg[num][m] / tg[den][m])
                    if intervals:  # each run's certified interval on the ratio
                        lows[k].append(tg[num][f"{m}_lower"] / tg[den][f"{m}_upper"])
                        highs[k].append(tg[num][f"{m}_upper"] / tg[den][f"{m}_lower"])
            flagged |= intervals and not certified
            cells = [
                f"{np.mean(v):.3f} ± {np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0:.3f}"
                + (
                    f" [{np.mean(lows[k]):.3f}, {np.mean(highs[k]):.3f}]{'' if certified else ' ⚠'}"
                    if intervals
                    else ""
                )
                for k, v in vals.items()
            ]
            paper = PAPER_ONLINE_OFFLINE.get(frac, "–") if t == 1 else "–"
            out.append(
                f"| {100 * frac:.0f}% | {', '.join(map(str, sorted(epochs)))} | {' | '.join(cells)} | {paper} |"
            )
        out.append("")
    if intervals:
        out += [
            "Matrix-free path: [lower, upper] after each ratio is the mean over the runs of each run's "
            "certified interval on it (the numerator's lower bound over the denominator's upper bound, and "
            "the reverse), so it holds the mean of the exact ratios"
            + (
                "; ⚠ marks a cell with a kernel whose upper bounds are not certified."
                if flagged
                else "."
            ),
            "",
        ]
    return out


def _capacity_lines(dist: dict, findings: list[dict]) -> list[str]:
    f = next((x for x in findings if x["name"].startswith("online KD helps most")), None)
    t = capacity_temperature(findings, dist)
    out = [
        "| student | capacity gap (points) | online − offline test acc (points) | seeds |",
        "|---|---|---|---|",
    ]
    points: dict[str, tuple[float, float]] = {}
    for student, per_seed in (capacity_points(dist, t) if t is not None else {}).items():
        if not per_seed:
            continue
        gaps, gains = (np.array(v) for v in zip(*per_seed.values()))
        se = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else 0.0
        points[student] = (gaps.mean(), gains.mean())
        out.append(
            f"| {student} | {100 * gaps.mean():.1f} | {100 * gains.mean():+.1f} ± {100 * se:.1f} "
            f"| {len(gains)} |"
        )
    if f is not None and f.get("effect") is not None:
        out.append(
            f"\nSlope of the gain on the gap (τ = {t:g}): {f['effect']:.3f} points per point, 95% CI "
            f"{_ci(f['ci'])}, p = {_p(f['p'])} (Holm {_p(f['p_adjusted'])}) — **{f['verdict']}**. The "
            "bootstrap resamples seeds, so this interval is conditional on these students; which students "
            "are chosen is a further source of variation it does not contain."
        )
    if len(points) >= 4:
        loo = []
        for left in points:
            rest = [v for k, v in points.items() if k != left]
            loo.append(f"without {left}: {np.polyfit(*zip(*rest), 1)[0]:.3f}")
        out.append(
            f"Leave-one-student-out slopes (descriptive, not part of the criterion): {'; '.join(loo)}."
        )
    return out


def _bound_lines(mar: dict, findings: list[dict]) -> list[str]:
    by: dict[str, list[dict]] = {}
    for r in mar["rows"]:
        by.setdefault(r["regime"], []).append(r)
    out = [
        "The kernel student f = K (K + λI)⁻¹ Y fitted to each regime's final supervision Y, in the trained "
        "student's NTK, every term from that one function in target units (probabilities); multiclass constant "
        "4k (Mohri et al., *Foundations of ML*, Thm. 9.2), union bound over a fixed grid of RKHS radii, "
        f"γ chosen from {mar['gammas']} (the bound holds for every γ), δ = {mar['delta']}. Mean ± standard "
        f"error over seeds {mar['seeds']}.",
        "",
        "| regime | bound total | margin error (vs labels) | of which targets' own error | complexity term | "
        "confidence term | best γ | ‖f‖ max class | A | Â | network median margin (logits) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(rows, fn):
        v = np.array([fn(r) for r in rows], dtype=float)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        return f"{_num(float(v.mean()))} ± {_num(float(se))}"

    vacuous = []
    for name, rows in by.items():
        vacuous += [r["bound"]["vacuous"] for r in rows]
        out.append(
            f"| {name} | {ms(rows, lambda r: r['bound']['total'])} | {ms(rows, lambda r: r['bound']['margin_error'])} | "
            f"{ms(rows, lambda r: r['bound']['teacher_error'])} | {ms(rows, lambda r: r['bound']['complexity_term'])} | "
            f"{_num(rows[0]['bound']['confidence_term'])} | "
            f"{'/'.join(sorted({format(r['bound']['gamma'], 'g') for r in rows}))} | "
            f"{ms(rows, lambda r: r['bound']['rkhs_norm_max'])} | {ms(rows, lambda r: r['A'])} | "
            f"{ms(rows, lambda r: r['A_hat'])} | {ms(rows, lambda r: r['network_margins']['median'])} |"
        )
    out.append("")
    out.append(
        "**The bound is vacuous (≥ 1) for every regime and seed.**"
        if all(vacuous)
        else f"The bound is below 1 for {sum(not v for v in vacuous)} of {len(vacuous)} (regime, seed) pairs."
    )
    f = (
        next((x for x in findings if x["statistic_name"] == "bound_spearman"), None)
        if findings
        else None
    )
    if f is not None and f.get("effect") is not None:
        out.append(
            f"Spearman ρ between the bound and the test error across regimes: {f['effect']:.2f}, 95% CI "
            f"{_ci(f['ci'])} — **{f['verdict']}**."
        )
    return out


def _similarity_lines(sim: dict) -> list[str]:
    out = [
        f"Mean ± standard error over seeds {sim['seeds']} (n = {sim['n']}, `{sim['mode']}` kernel).",
        "",
        "| regime | CKA vs own init | CKA vs teacher | alignment vs init | alignment vs teacher | init CKA vs teacher |",
        "|---|---|---|---|---|---|",
    ]
    for r in sim["summary"]:
        cells = [
            f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_se']:.3f}"
            for k in (
                "cka_vs_init",
                "cka_vs_teacher",
                "alignment_vs_init",
                "alignment_vs_teacher",
                "init_cka_vs_teacher",
            )
        ]
        out.append(f"| {r['regime']} | {' | '.join(cells)} |")
    return out


def _stability_lines(stab: dict) -> list[str]:
    out = [
        f"The same study on the disjoint seed set {stab['other_seeds']} (folder `{stab['other']}`), verdicts "
        f"side by side: **{stab['unchanged']} of {stab['total']} unchanged**.",
        "",
        "| finding | these seeds | disjoint seeds | effect here | effect there |",
        "|---|---|---|---|---|",
    ]
    for r in stab["rows"]:
        mark = "" if r["same"] else " ⚠"
        out.append(
            f"| {r['name']} | {r['verdict']} | {r['other_verdict']}{mark} | {_num(r['effect'])} | "
            f"{_num(r['other_effect'])} |"
        )
    return out


def _path_lines(cfg: dict, steps: dict[str, dict | None]) -> list[str]:
    """Which complexity path each step took and, on the matrix-free path, what its intervals are
    (nothing for a study whose complexities are all dense)."""
    ran = {step: r for step, r in steps.items() if r}
    if not any(r.get("complexity_path") == "matfree" for r in ran.values()):
        return []
    from ntkd.study import StudyConfig

    rtol = cfg.get("complexity_rtol", StudyConfig.complexity_rtol)
    parts, uncertified, gaps = [], [], []
    for step, r in ran.items():
        if step not in COMPLEXITY_STEPS:
            continue
        if r.get("complexity_path") != "matfree":
            parts.append(f"`{step}`: dense")
            continue
        kernels = complexity_kernels(r)
        gap = max(k["max_relative_gap"] for _, k in kernels)
        gaps.append(gap)
        uncertified += [f"{where} (`{step}`)" for where, k in kernels if not k["certified"]]
        parts.append(
            f"`{step}`: matrix-free ({len(kernels)} kernels, "
            f"{sum(k['matvecs'] for _, k in kernels)} kernel–vector products, largest relative gap "
            f"{gap:.3g})"
        )
    dense = [f"`{s}`" for s in ran if s not in COMPLEXITY_STEPS]
    return [
        f"**Complexity path** (`complexity_path = {json.dumps(cfg.get('complexity_path', 'auto'))}`): "
        + "; ".join(parts)
        + (f"; {' and '.join(dense)} use the dense kernel on every path" if dense else "")
        + ". On the matrix-free path every complexity is a certified interval on its exact value: "
        "Gauss (lower) and Gauss–Radau (upper) bounds on C from block Lanczos on streaming eNTK "
        f"products, stopped when the relative gap (upper − lower) / lower of C is at most rtol = {rtol:g} "
        f"(largest relative gap in this study: {max(gaps):.3g}"
        + (", above rtol: the step cap stopped some kernels first" if max(gaps) > rtol else "")
        + "; docs/matfree.md). The tables show such a complexity as `value [lower, upper]`, the value "
        "being the midpoint estimate, on which the verdicts are computed as on the dense path; each "
        "complexity finding shows the certified bounds of its effect and whether its verdict holds with "
        "every seed at the lower and at the upper end of its interval.",
        "",
        "**Every upper bound is certified.**"
        if not uncertified
        else f"**⚠ Upper bounds not certified in {len(uncertified)} kernel"
        f"{'s' if len(uncertified) > 1 else ''}: {'; '.join(uncertified)}. Their upper ends are "
        "estimates, not bounds; the cells that use them are marked ⚠.**",
        "",
    ]


def write_report(study_dir: str | os.PathLike) -> Path:
    """Writes ``report.md`` of a study folder from its saved results."""
    study_dir = Path(study_dir)
    results = study_dir / "results"
    cfg = read_json(study_dir / "study.json")

    def load(step):
        path = results / f"{step}.json"
        return read_json(path) if path.exists() else None

    findings = load("findings") or []
    names = {c["name"]: c["statistic"] for c in cfg.get("criteria", [])}
    for f in findings:
        f["statistic_name"] = names.get(f["name"])
    against = [f for f in findings if f["verdict"] != "reproduced"]
    overrides = cfg.get("overrides", {})
    criteria_origin = (
        "by `--set` overrides of the preset"
        if any(k.split(".")[0] == "criteria" for k in overrides)
        else "in the preset"
    )
    parts = [
        f"# ntkd study: {cfg['name']}",
        "",
        f"Teacher `{cfg['teacher'].get('model')}` {cfg['teacher'].get('model_options', {})}, student "
        f"`{cfg['student'].get('model')}` {cfg['student'].get('model_options', {})}; distillation seeds "
        f"{cfg['seeds']}, NTK analyses on seeds {cfg.get('analysis_seeds')} and the first {cfg['n_kernel']} "
        f"training examples, `{cfg['ntk_mode']}` kernel.",
        "",
        *(
            [
                "Overrides of the preset (`ntkd reproduce --set`): "
                + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides.items())
                + ".",
                "",
            ]
            if overrides
            else []
        ),
        f"The {len(cfg.get('criteria', []))} criteria below were fixed {criteria_origin} before any training; their "
        f"SHA-256 is `{cfg.get('criteria_sha256', '–')}` (in `study.json`, refused if changed in this folder). "
        "Verdicts: **reproduced** = Holm-adjusted p < α in the paper's direction; **not reproduced** = "
        "significant the other way; **inconclusive** = neither. Complexity findings are decided on the "
        "scale-free complexity Â = A(Y; K) / A(Y; I); the same statistic under A, under the identity kernel "
        "(target size alone) and with teacher targets replaced by label smoothing of equal norm (softening "
        'alone) is shown beside it, with its uncorrected p. "size effect only": significant under A but not under Â '
        "(both uncorrected).",
        "",
        *_path_lines(cfg, {s: load(s) for s in (*COMPLEXITY_STEPS, "margins", "ntk_similarity")}),
    ]
    if findings:
        n_rep = sum(f["verdict"] == "reproduced" for f in findings)
        undecided = [f for f in findings if not f.get("bounds", {}).get("verdict_holds", True)]
        note = f"; ⚠ {len(undecided)} not decided by the certified intervals" if undecided else ""
        parts += [f"## Findings ({n_rep} of {len(findings)} reproduced{note})", ""]
        if against:
            parts += [
                "Against the paper or not shown by this run: "
                + "; ".join(f"*{f['name']}* ({f['verdict']})" for f in against)
                + ".",
                "",
            ]
        if undecided:
            parts += [
                "⚠ Not decided by the certified intervals of the matrix-free path (the verdict, computed "
                "on the midpoints, changes with every seed at the lower or at the upper end of its "
                "interval): "
                + "; ".join(
                    f"*{f['name']}* ({f['verdict']}; {f['bounds'].get('verdict_at_lower') or 'no verdict'} "
                    f"at the lower end, {f['bounds'].get('verdict_at_upper') or 'no verdict'} at the upper)"
                    for f in undecided
                )
                + ". A smaller `complexity_rtol` narrows the intervals.",
                "",
            ]
        parts += (
            _findings_table(findings)
            + ["", "### Criteria (pre-registered)", ""]
            + _criteria_list(findings)
            + [""]
        )
    else:
        parts += ["_findings have not been evaluated yet (results/findings.json is missing)._", ""]
    stab = load("stability")
    if stab:
        parts += ["## Stability across seed sets", ""] + _stability_lines(stab) + [""]
    sc = load("student_complexity")
    if sc:
        parts += [
            "## Complexity along student training, beside the paper",
            "",
            "Ratios of the complexity of the online teacher's targets to the offline (final) teacher's, and of "
            "the offline teacher's to the true labels', in the student's NTK at checkpoints of its training. "
            "The paper reports A; Â removes the targets' size.",
            "",
        ] + _ratio_table(sc)
    dist = load("distillation")
    if dist:
        parts += ["## Distillation", "", distillation_markdown(dist), "### Capacity gap", ""]
        parts += _capacity_lines(dist, findings) + [""]
    mar = load("margins")
    if mar:
        parts += ["## The kernel-student margin bound", ""] + _bound_lines(mar, findings) + [""]
    sim = load("ntk_similarity")
    if sim:
        parts += ["## NTK similarity", ""] + _similarity_lines(sim) + [""]
    parts += [
        "## Conventions",
        "",
        "A(Y; K) = sqrt(C · tr K) / n with C = tr(Yᵀ K⁻¹ Y); Â(Y; K) = sqrt(C · tr K / (n ‖Y‖_F²)) = 1 for K ∝ I. "
        "The `trace` kernel sums the k logit kernels (neural-tangents' `trace_axes` gives the mean). "
        "Accuracies are final-epoch values. Training runs in float32, whose last digits differ across "
        "machines and XLA builds; see README for what that does to these numbers.",
        "",
    ]
    return write_text(study_dir / "report.md", "\n".join(parts))
