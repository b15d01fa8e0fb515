"""The report, the figures and the findings of a matrix-free study show its certified intervals.

Built from synthetic results (seconds): a complexity step with ``complexity_path="matfree"``
carries ``*_lower`` / ``*_upper`` and per-kernel ``max_relative_gap`` / ``certified``, as
``Study._complexities`` records them; the same results without them are a dense study, which
must render exactly as before (checked against the committed report too).
"""

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from ntkd import plotting
from ntkd.findings import Bounds, evaluate_findings, write_findings
from ntkd.report import write_report

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2, 3]
EPOCHS = [0, 1, 2]
TEMPS = [1.0, 4.0]


def _entry(value: float, half: float | None, ls: bool) -> dict:
    """A, Â (and the label-smoothing control) of one target; ``half``: the interval's relative half-width."""
    out = {"A": 0.5 * value, "A_hat": value, "A_identity": 0.5}
    if ls:
        out.update(ls_A=0.6 * value, ls_A_hat=1.2 * value, ls_epsilon=0.1)
    if half is not None:
        for key in [k for k in out if k in ("A", "A_hat", "ls_A", "ls_A_hat")]:
            out[f"{key}_lower"], out[f"{key}_upper"] = out[key] * (1 - half), out[key] * (1 + half)
    return out


def _kernel(half: float | None, certified: bool = True) -> dict:
    if half is None:
        return {"condition_number": 10.0}
    gap = (1 + half) ** 2 / (1 - half) ** 2 - 1  # of C = (n A)² / tr K
    return {
        "trace": 100.0,
        "trace_source": "exact (eNTK diagonal)",
        "shift": 1.0,
        "matvecs": 40,
        "max_relative_gap": gap,
        "certified": certified,
    }


def _teacher_checkpoints(half=None, drop=0.3, certified=True) -> dict:
    """Â of the final teacher is ``drop`` higher at τ=1 than at τ=4 (plus seed noise)."""
    panels = []
    for seed in SEEDS:
        eps = 0.01 * (seed - 1.5)
        rows = [
            {"target": "labels", "temperature": None, **_entry(2.0, half, False)},
            {"target": "random", "temperature": None, **_entry(2.5, half, False)},
        ]
        for e in EPOCHS:
            for t in TEMPS:
                v = 1.0 + 0.1 * e + (drop + eps if t == 1.0 else 0.0)
                rows.append(
                    {
                        "target": f"epoch {e}",
                        "teacher_epoch": e,
                        "temperature": t,
                        "teacher_test_acc": 0.5 + 0.1 * e,
                        "teacher_train_acc": 0.5 + 0.1 * e,
                        **_entry(v, half, True),
                    }
                )
        cert = certified or seed != SEEDS[-1]
        panels.append({"seed": seed, **_kernel(half, cert), "rows": rows})
    out = {"n": 50, "mode": "trace", "kernel": "student NTK at initialisation"}
    out.update(seeds=SEEDS, temperatures=TEMPS, panels=panels)
    if half is not None:
        out["complexity_path"] = "matfree"
    return out


def _student_complexity(half=None) -> dict:
    panels = []
    for seed in SEEDS:
        rows = []
        for e in EPOCHS:
            targets = {
                "labels": _entry(2.0 - 0.1 * e, half, False),
                "random": _entry(2.5 - 0.1 * e, half, False),
            }
            for t in (1.0, 4.0):
                targets[f"offline_teacher_t{t:g}"] = _entry(1.0 + 0.01 * seed, half, True)
                targets[f"online_teacher_t{t:g}"] = _entry(0.5 + 0.2 * e, half, True)
            rows.append(
                {
                    "epoch": e,
                    "fraction": e / EPOCHS[-1],
                    "online_teacher_epoch": e,
                    **_kernel(half),
                    "targets": targets,
                }
            )
        panels.append({"regime": "online τ=1", "seed": seed, "rows": rows})
    out = {"n": 50, "mode": "trace", "temperatures": [1.0, 4.0], "regimes": ["online τ=1"]}
    out.update(seeds=SEEDS, epochs=EPOCHS[-1], panels=panels)
    if half is not None:
        out["complexity_path"] = "matfree"
    return out


def _criteria() -> list[dict]:
    c = {"direction": 1, "alpha": 0.05, "kind": "complexity", "criterion": "test."}
    return [
        {
            **c,
            "name": "temperature",
            "statistic": "temperature",
            "params": {"t_low": 1.0, "t_high": 4.0},
        },
        {
            **c,
            "name": "labels gap",
            "statistic": "target_gap",
            "params": {"high": "random", "low": "labels"},
        },
        {
            **c,
            "name": "rise",
            "statistic": "relative_change",
            "params": {"keys": ["labels", "online_teacher_t1"], "sign": 1, "from": 0.0, "to": 1.0},
        },
    ]


def _study(folder: Path, half=None, certified=True, drop=0.3) -> Path:
    (folder / "results").mkdir(parents=True)
    cfg = {
        "name": "synthetic",
        "teacher": {"model": "cnn1d"},
        "student": {"model": "mlp"},
        "seeds": SEEDS,
        "analysis_seeds": SEEDS,
        "n_kernel": 50,
        "ntk_mode": "trace",
        "criteria": _criteria(),
        "criteria_sha256": "0" * 64,
    }
    if half is not None:
        cfg.update(complexity_path="matfree", complexity_rtol=0.25)
    (folder / "study.json").write_text(json.dumps(cfg))
    results = {
        "teacher_checkpoints": _teacher_checkpoints(half, drop=drop, certified=certified),
        "student_complexity": _student_complexity(half),
    }
    for step, res in results.items():
        (folder / "results" / f"{step}.json").write_text(json.dumps(res))
    write_findings(folder)
    write_report(folder)
    return folder


# ----------------------------------------------------------------------------- findings


def test_bounds_arithmetic_has_no_midpoint():
    a, b = Bounds(1.0, 2.0), Bounds(0.5, 1.0)
    d = a - b
    assert (d.lo, d.hi) == (0.0, 1.5)
    r = -1 * (a / b - 1)
    assert (r.lo, r.hi) == pytest.approx((-3.0, 0.0))
    with pytest.raises(TypeError):
        float(a)
    with pytest.raises(TypeError):
        a < b  # noqa: B015  (no ordering of intervals)


def test_dense_findings_have_no_bounds_and_matfree_ones_bracket_the_statistic():
    dense = evaluate_findings(
        _criteria(),
        {
            "teacher_checkpoints": _teacher_checkpoints(),
            "student_complexity": _student_complexity(),
        },
    )
    assert not any("bounds" in f or "effect_bounds" in str(f) for f in dense)
    free = evaluate_findings(
        _criteria(),
        {
            "teacher_checkpoints": _teacher_checkpoints(half=0.01),
            "student_complexity": _student_complexity(half=0.01),
        },
    )
    for d, f in zip(dense, free):
        # the verdict and its statistic are the midpoint values', as on the dense path
        assert (f["verdict"], f["effect"], f["p"], f["p_adjusted"]) == (
            d["verdict"],
            d["effect"],
            d["p"],
            d["p_adjusted"],
        )
        b = f["bounds"]
        assert b["effect"][0] <= f["effect"] <= b["effect"][1] and b["certified"]
        for s, (lo, hi) in b["per_seed"].items():
            assert lo <= f["per_seed"][s] <= hi
        assert (
            "effect_bounds" in f["controls"]["A"]
            and "effect_bounds" not in f["controls"]["identity_kernel"]
        )
    # temperature: Â(τ=1) − Â(τ=4), each Â ± 1%: by hand for seed 0
    hi_t1, lo_t4 = (1.2 + 0.3 - 0.015) * 1.01, 1.2 * 0.99
    assert free[0]["bounds"]["per_seed"]["0"][1] == pytest.approx(hi_t1 - lo_t4)
    assert free[0]["verdict"] == "reproduced" and free[0]["bounds"]["verdict_holds"]
    assert free[0]["bounds"]["undecided_seeds"] == []


def test_overlapping_intervals_make_the_verdict_undecided():
    """Â(τ=1) − Â(τ=4) ≈ 0.05 per seed, each Â known to ±5%: the ordering is not decided."""
    results = {"teacher_checkpoints": _teacher_checkpoints(half=0.05, drop=0.05)}
    [f] = evaluate_findings(_criteria()[:1], results)
    b = f["bounds"]
    assert f["verdict"] == "reproduced"  # on the midpoints (tiny spread over seeds)
    assert b["effect"][0] < 0 < b["effect"][1]
    assert b["undecided_seeds"] == [str(s) for s in SEEDS]
    assert b["verdict_at_upper"] == "reproduced" and b["verdict_at_lower"] == "not reproduced"
    assert not b["verdict_holds"]


# ----------------------------------------------------------------------------- report


def test_matfree_report_shows_intervals_and_certification(tmp_path):
    report = (_study(tmp_path / "mf", half=0.01) / "report.md").read_text()
    assert '**Complexity path** (`complexity_path = "matfree"`)' in report
    assert "`teacher_checkpoints`: matrix-free (4 kernels" in report
    assert "`student_complexity`: matrix-free (12 kernels" in report
    gap = (1.01 / 0.99) ** 2 - 1
    assert "rtol = 0.25" in report and f"largest relative gap in this study: {gap:.3g}" in report
    assert "**Every upper bound is certified.**" in report and "⚠" not in report
    assert "| effect, certified bounds |" in report
    # the ratio table: online / offline (A) at 0% is 0.5 / 1.015 (mean over seeds), each ±1%
    row = next(line for line in report.splitlines() if line.startswith("| 0% |"))
    lo, hi = (
        np.mean([0.5 * 0.99 / ((1 + 0.01 * s) * 1.01) for s in SEEDS]),
        np.mean([0.5 * 1.01 / ((1 + 0.01 * s) * 0.99) for s in SEEDS]),
    )
    assert f"[{lo:.3f}, {hi:.3f}]" in row.split("|")[3]
    assert "Certified bounds per seed (matrix-free path): 0: [" in report


def test_matfree_report_flags_uncertified_and_undecided(tmp_path):
    report = (
        _study(tmp_path / "mf", half=0.05, certified=False, drop=0.05) / "report.md"
    ).read_text()
    assert "**⚠ Upper bounds not certified in 1 kernel: seed 3 (`teacher_checkpoints`)." in report
    assert "## Findings (1 of 3 reproduced; ⚠ 1 not decided by the certified intervals)" in report
    assert (
        "*temperature* (reproduced; not reproduced at the lower end, reproduced at the upper)"
        in report
    )
    row = next(line for line in report.splitlines() if line.startswith("| temperature |"))
    assert "(not decided by the certified intervals)" in row
    assert "⚠ upper bounds not certified" in row
    assert "⚠ **undecided**: not reproduced at the lower end, reproduced at the upper end" in row
    assert "they do not order the two sides for seeds 0, 1, 2, 3" in report


def test_dense_report_has_no_intervals(tmp_path):
    report = (_study(tmp_path / "dense") / "report.md").read_text()
    for marker in ("Complexity path", "certified", "bounds", "⚠", "Matrix-free"):
        assert marker not in report


def test_committed_dense_reports_are_unchanged(tmp_path):
    """The committed results of a dense study regenerate their committed report byte for byte."""
    for folder, report in (("study", "report.md"), ("study_seeds8", "study_seeds8/report.md")):
        copy = tmp_path / folder
        shutil.copytree(REPO / "figures" / folder, copy)
        assert write_report(copy).read_bytes() == (REPO / "figures" / report).read_bytes(), folder


# ----------------------------------------------------------------------------- figures


@pytest.fixture
def drawn(monkeypatch):
    """The figures a plot function draws, kept open instead of saved."""
    figs = []
    monkeypatch.setattr(plotting, "_save", lambda fig, path: figs.append(fig) or path)
    yield figs
    for fig in figs:
        plotting.plt.close(fig)


def _errorbars(fig) -> list:
    return [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]


@pytest.mark.parametrize(
    "plot, make, curves",
    [
        (plotting.plot_teacher_checkpoints, _teacher_checkpoints, 2 * len(TEMPS)),
        (plotting.plot_student_complexity, _student_complexity, 2 * 6),
    ],
)
def test_plots_draw_the_intervals_of_matfree_results(drawn, tmp_path, plot, make, curves):
    plot(make(half=0.05), tmp_path / "mf.png", "t")
    plot(make(), tmp_path / "dense.png", "t")
    free, dense = drawn
    bars = _errorbars(free)
    assert len(bars) == curves  # one set of bars per curve and measure (A, Â)
    assert "certified intervals of the matrix-free path" in free.get_suptitle()
    assert _errorbars(dense) == [] and "certified" not in dense.get_suptitle()
    segments = [seg for c in bars for seg in c.lines[2][0].get_segments()]
    assert all(seg[1, 1] > seg[0, 1] for seg in segments)  # every bar spans an interval


def test_teacher_plot_marks_uncertified_bounds(drawn, tmp_path):
    plotting.plot_teacher_checkpoints(
        _teacher_checkpoints(half=0.05, certified=False), tmp_path / "x.png"
    )
    assert "not every upper bound is certified" in drawn[0].get_suptitle()
