"""Pre-registered findings: statistics on results, controls, Holm across findings, refusal of changed criteria."""

import json

import numpy as np
import pytest
import scipy.stats

from ntkd.configs import STANDARD_NAMES, get_config
from ntkd.findings import evaluate_findings, paper_criteria
from ntkd.stats import holm


def _distillation(acc: dict[str, list[float]], teacher=0.95, students=None):
    runs, rows = [], []
    for name, vals in acc.items():
        student, kind, t = (students or {}).get(name, ("main", None, None))
        kind = kind or (
            "none"
            if name.startswith("no-KD")
            else name.split(" ")[0].replace("early-stopped", "early_stopped")
        )
        for seed, v in enumerate(vals):
            runs.append(
                {
                    "regime": name,
                    "student": student,
                    "seed": seed,
                    "test_acc": v,
                    "test_fidelity": v + 0.01,
                }
            )
        rows.append(
            {
                "regime": name,
                "student": student,
                "kind": kind,
                "temperature": t,
                "test_acc_mean": float(np.mean(vals)),
            }
        )
    return {"runs": runs, "rows": rows, "teacher_test_acc": teacher}


def _criteria():
    return paper_criteria(regimes=STANDARD_NAMES)


def test_paired_metric_is_the_paired_t_test_of_seed_differences():
    rng = np.random.default_rng(0)
    off = rng.normal(0.7, 0.02, 8)
    on = off + 0.01 + rng.normal(0, 0.004, 8)
    crit = [
        c for c in _criteria() if c["name"] == "online KD beats offline KD in test accuracy (τ=1)"
    ]
    [f] = evaluate_findings(
        crit, {"distillation": _distillation({"online τ=1": list(on), "offline τ=1": list(off)})}
    )
    ref = scipy.stats.ttest_rel(on, off)
    assert f["effect"] == pytest.approx(np.mean(on - off)) and f["p"] == pytest.approx(ref.pvalue)
    assert f["p_adjusted"] == pytest.approx(ref.pvalue) and f["verdict"] == "reproduced"
    assert set(f) >= {"name", "verdict", "effect", "ci", "p_adjusted", "criterion"}
    # the same numbers with the conditions swapped are significant against the paper
    [g] = evaluate_findings(
        crit, {"distillation": _distillation({"online τ=1": list(off), "offline τ=1": list(on)})}
    )
    assert g["verdict"] == "not reproduced"


def test_holm_is_applied_across_all_findings_of_a_run():
    rng = np.random.default_rng(1)
    base = rng.normal(0.7, 0.02, 8)
    acc = {
        "no-KD": list(base),
        "offline τ=1": list(base + 0.004 + rng.normal(0, 0.005, 8)),
        "offline τ=4": list(base + 0.02 + rng.normal(0, 0.005, 8)),
        "early-stopped τ=1": list(base + rng.normal(0, 0.005, 8)),
        "online τ=1": list(base + 0.006 + rng.normal(0, 0.005, 8)),
        "online τ=4": list(base + 0.021 + rng.normal(0, 0.005, 8)),
    }
    found = evaluate_findings(_criteria(), {"distillation": _distillation(acc)})
    tested = [f for f in found if f["p"] is not None]
    assert (
        len(tested) == 7
    )  # 7 paired accuracy/fidelity findings; capacity slope needs 3 students: not tested
    assert holm([f["p"] for f in tested]) == pytest.approx([f["p_adjusted"] for f in tested])
    assert all(f["verdict"] == "not tested" for f in found if f["p"] is None)
    slope = next(f for f in found if f["name"].startswith("online KD helps most"))
    assert slope["verdict"] == "not tested" and "3 students" in slope["reason"]


def test_capacity_slope_from_five_students():
    rng = np.random.default_rng(2)
    acc, students = {}, {}
    for label, base in (("main", 0.65), ("A", 0.72), ("B", 0.80), ("C", 0.87), ("D", 0.92)):
        gap = 0.95 - base
        sfx = "" if label == "main" else f" · {label}"
        noise = rng.normal(0, 0.003, 4)
        acc[f"no-KD{sfx}"] = list(base + noise)
        acc[f"offline τ=4{sfx}"] = list(base + 0.01 + noise)
        acc[f"online τ=4{sfx}"] = list(base + 0.01 + 0.2 * gap + noise + rng.normal(0, 0.003, 4))
        for kind, name in (
            ("none", f"no-KD{sfx}"),
            ("offline", f"offline τ=4{sfx}"),
            ("online", f"online τ=4{sfx}"),
        ):
            students[name] = (label, kind, None if kind == "none" else 4.0)
    crit = [c for c in _criteria() if c["statistic"] == "capacity_slope"]
    [f] = evaluate_findings(crit, {"distillation": _distillation(acc, students=students)})
    assert f["ci"][0] < 0.2 < f["ci"][1] and f["verdict"] == "reproduced"


def _teacher_result(A_hat_drop: float, A_drop: float):
    """Teacher-checkpoint rows for 3 seeds where τ changes A by A_drop and Â by A_hat_drop."""
    panels = []
    for seed in range(3):
        eps, wobble = 0.001 * seed, 0.01 * (seed - 1)  # per-seed variation of the τ effect
        rows = []
        for e in (0, 1, 5):
            for t in (1.0, 4.0):
                hi = t == 1.0
                rows.append(
                    {
                        "target": f"epoch {e}",
                        "teacher_epoch": e,
                        "temperature": t,
                        "A": 1.0 + e + (A_drop + wobble if hi else 0) + eps,
                        "A_hat": 1.0 + e + (A_hat_drop + wobble if hi else 0) + eps,
                        "A_identity": 0.5 + (A_drop if hi else 0),
                        "ls_A_hat": 1.0 + (A_drop if hi else 0) + eps,
                    }
                )
        panels.append({"seed": seed, "rows": rows})
    return {"teacher_checkpoints": {"panels": panels}}


def test_complexity_findings_are_decided_on_the_normalised_form_with_controls():
    crit = [c for c in _criteria() if c["statistic"] == "temperature"]
    [f] = evaluate_findings(crit, _teacher_result(A_hat_drop=0.0, A_drop=0.5))
    assert f["verdict"] == "inconclusive" and f["size_effect_only"]
    assert f["controls"]["A"]["effect"] == pytest.approx(0.5) and f["controls"]["A"]["p"] < 0.01
    assert f["controls"]["identity_kernel"]["effect"] == pytest.approx(0.5)
    assert f["controls"]["label_smoothing_matched"]["effect"] == pytest.approx(0.5)
    [g] = evaluate_findings(crit, _teacher_result(A_hat_drop=0.3, A_drop=0.5))
    assert g["effect"] == pytest.approx(0.3) and not g["size_effect_only"]


def test_the_preset_holds_and_hashes_its_criteria():
    cfg = get_config("mnist1d")
    assert len(cfg.criteria) >= 15 and len(cfg.seeds) >= 8 and len(cfg.analysis_seeds) >= 3
    other = get_config("mnist1d")
    other.criteria[0]["alpha"] = 0.1
    assert other.criteria_sha256 != cfg.criteria_sha256
    students = {r.get("student", "main") for r in cfg.regimes}
    assert len(students) >= 5


def _fake_study(folder, seeds, verdicts, criteria_sha="abc"):
    (folder / "results").mkdir(parents=True)
    (folder / "study.json").write_text(
        json.dumps({"seeds": seeds, "criteria_sha256": criteria_sha})
    )
    (folder / "results" / "findings.json").write_text(
        json.dumps(
            [{"name": f"f{i}", "verdict": v, "effect": 0.1 * i} for i, v in enumerate(verdicts)]
        )
    )
    return folder


def test_compare_findings_across_disjoint_seed_sets(tmp_path):
    from ntkd.findings import compare_findings

    a = _fake_study(tmp_path / "a", [0, 1, 2], ["reproduced", "inconclusive", "not reproduced"])
    b = _fake_study(tmp_path / "b", [8, 9, 10], ["reproduced", "reproduced", "not reproduced"])
    stab = json.loads(compare_findings(a, b).read_text())
    assert stab["unchanged"] == 2 and stab["total"] == 3
    assert [r["same"] for r in stab["rows"]] == [True, False, True] and stab["other_seeds"] == [
        8,
        9,
        10,
    ]
    with pytest.raises(ValueError, match="share seeds"):
        compare_findings(a, _fake_study(tmp_path / "c", [2, 3], ["reproduced"] * 3))
    with pytest.raises(ValueError, match="different criteria"):
        compare_findings(
            a, _fake_study(tmp_path / "d", [5], ["reproduced"] * 3, criteria_sha="xyz")
        )


def test_capacity_points_are_what_the_criterion_regresses():
    """Report table, figure and criterion read one capacity_points; the slope matches its OLS."""
    from ntkd.findings import capacity_points, capacity_temperature

    runs, rows = [], []
    for student, gap in (("a", 0.1), ("b", 0.3), ("c", 0.5)):
        for kind, name in (
            ("none", f"{student} none"),
            ("offline", f"{student} off"),
            ("online", f"{student} on"),
        ):
            rows.append(
                {
                    "regime": name,
                    "kind": kind,
                    "student": student,
                    "temperature": None if kind == "none" else 4.0,
                }
            )
            for seed in (0, 1):
                acc = 0.9 - gap + (0.02 * gap if kind == "online" else 0.0) + 0.001 * seed
                runs.append({"regime": name, "seed": seed, "test_acc": acc})
    dist = {"rows": rows, "runs": runs, "teacher_test_acc": 0.9}
    pts = capacity_points(dist, 4.0)
    assert sorted(pts) == ["a", "b", "c"]
    gaps = [np.mean([v[0] for v in pts[s].values()]) for s in "abc"]
    gains = [np.mean([v[1] for v in pts[s].values()]) for s in "abc"]
    np.testing.assert_allclose(np.polyfit(gaps, gains, 1)[0], 0.02, rtol=1e-6)
    assert capacity_points(dist, 1.0) == {}  # no KD run at τ = 1
    assert capacity_temperature([], dist) == 4.0  # results without params: the largest KD τ
    found = [{"statistic": "capacity_slope", "params": {"temperature": 1.0}}]
    assert capacity_temperature(found, dist) == 1.0
