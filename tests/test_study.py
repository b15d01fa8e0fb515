"""The study pipeline: results, determinism, resume, figures from results alone, report logic."""

import filecmp
import json
import shutil

import numpy as np
import pytest
from conftest import TINY_MNIST1D

from ntkd.cli import main as cli_main
from ntkd.configs import get_config, standard_criteria, standard_regimes
from ntkd.study import STEPS, Study, StudyConfig, run_study


def tiny_config():
    return StudyConfig(
        name="tiny",
        dataset="mnist1d",
        dataset_options=TINY_MNIST1D,
        teacher={
            "model": "cnn1d",
            "model_options": {"features": [8, 8, 8]},
            "epochs": 4,
            "batch_size": 64,
        },
        student={
            "model": "mlp",
            "model_options": {"widths": [16]},
            "epochs": 4,
            "batch_size": 64,
            "checkpoint_every": 2,
        },
        regimes=[
            r
            for r in standard_regimes(early_stop_epoch=2)
            if r["name"] in ("no-KD", "offline τ=1", "online τ=1")
        ],
        seeds=[0, 1],
        n_kernel=48,
        complexity_regimes=["no-KD", "online τ=1"],
        criteria=standard_criteria(),
    )


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run_study(tiny_config(), out, progress=False)
    return out


def test_results_figures_and_report_exist(study_dir):
    for step in STEPS:
        assert (study_dir / "results" / f"{step}.json").is_file()
        assert (study_dir / "figures" / f"{step}.png").stat().st_size > 10_000
    assert (study_dir / "results" / "distillation.csv").is_file()
    findings = json.loads((study_dir / "results" / "findings.json").read_text())
    assert len(findings) == len(tiny_config().criteria)
    for f in findings:
        assert set(f) >= {"name", "verdict", "effect", "ci", "p_adjusted", "criterion"}
        assert f["verdict"] in ("reproduced", "not reproduced", "inconclusive", "not tested")
        if f["kind"] == "complexity" and f["verdict"] != "not tested":
            assert set(f["controls"]) == {"A", "identity_kernel", "label_smoothing_matched"}
    report = (study_dir / "report.md").read_text()
    assert "## Findings" in report and tiny_config().criteria_sha256 in report
    assert (
        json.loads((study_dir / "study.json").read_text())["criteria_sha256"]
        == tiny_config().criteria_sha256
    )


def test_results_are_consistent_with_runs(study_dir):
    res = json.loads((study_dir / "results" / "distillation.json").read_text())
    runs = {(r["regime"], r["seed"]): r for r in res["runs"]}
    for row in res["rows"]:
        accs = [runs[row["regime"], s]["test_acc"] for s in (0, 1)]
        assert row["test_acc_mean"] == pytest.approx(np.mean(accs))
        assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
        assert row["test_acc_se"] == pytest.approx(np.std(accs, ddof=1) / np.sqrt(2))
    tc = json.loads((study_dir / "results" / "teacher_checkpoints.json").read_text())
    assert [p["seed"] for p in tc["panels"]] == [
        0,
        1,
    ]  # every analysis seed has its own student-at-init kernel
    for panel in tc["panels"]:
        epochs = [r["teacher_epoch"] for r in panel["rows"] if r.get("teacher_epoch") is not None]
        assert sorted(set(epochs)) == [0, 1, 2, 3, 4] and len(epochs) == 5 * 4
        for r in panel["rows"]:
            assert r["A_hat"] * r["A_identity"] == pytest.approx(
                r["A"], rel=1e-9
            )  # Â = A(Y; K) / A(Y; I)
    sc = json.loads((study_dir / "results" / "student_complexity.json").read_text())
    online = [p for p in sc["panels"] if p["regime"] == "online τ=1"]
    assert [p["seed"] for p in online] == [0, 1]
    rows = online[0]["rows"]
    assert [r["epoch"] for r in rows] == [0, 2, 4] and rows[-1]["fraction"] == 1.0
    # at the last student epoch the online teacher is the final teacher
    for t in ("1", "4"):
        last = rows[-1]["targets"]
        assert last[f"online_teacher_t{t}"]["A_hat"] == pytest.approx(
            last[f"offline_teacher_t{t}"]["A_hat"]
        )
        # equal-norm label smoothing: the control has the teacher targets' size
        assert last[f"offline_teacher_t{t}"]["ls_epsilon"] >= 0
    mar = json.loads((study_dir / "results" / "margins.json").read_text())
    assert {(r["regime"], r["seed"]) for r in mar["rows"]} == {
        (r["name"], s) for r in tiny_config().main_regimes for s in (0, 1)
    }


def test_rerun_is_identical_and_resumes_without_recomputing(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    (copy / "results" / "margins.json").unlink()
    steps = [copy / "results" / f"{s}.json" for s in STEPS if s != "margins"]
    before = {p.name: p.stat().st_mtime_ns for p in steps}
    run_study(tiny_config(), copy, progress=False, figures=False)
    after = {p.name: p.stat().st_mtime_ns for p in steps}
    assert after == before  # finished steps untouched; findings.json is derived and re-evaluated
    assert filecmp.cmp(
        copy / "results" / "findings.json", study_dir / "results" / "findings.json", shallow=False
    )
    assert filecmp.cmp(
        copy / "results" / "margins.json", study_dir / "results" / "margins.json", shallow=False
    )
    first = json.loads((study_dir / "timings" / "training.json").read_text())
    both = json.loads((copy / "timings" / "training.json").read_text())
    assert (
        both["history"][0] == first["seconds"] and len(both["history"]) == 2
    )  # the first run's time is kept
    assert both["seconds"] == pytest.approx(sum(both["history"]))


def test_second_run_from_scratch_gives_identical_results(study_dir, tmp_path):
    run_study(tiny_config(), tmp_path / "again", progress=False, figures=False)
    for step in STEPS:
        assert filecmp.cmp(
            tmp_path / "again" / "results" / f"{step}.json",
            study_dir / "results" / f"{step}.json",
            shallow=False,
        ), step


def test_figures_regenerate_from_results_alone(study_dir, tmp_path):
    copy = tmp_path / "only_results"
    copy.mkdir()
    shutil.copytree(study_dir / "results", copy / "results")
    shutil.copy(study_dir / "study.json", copy / "study.json")
    assert cli_main(["figures", str(copy)]) == 0
    assert sorted(p.name for p in (copy / "figures").glob("*.png")) == sorted(
        f"{s}.png" for s in STEPS
    )


def test_figures_folder_layout_redraws_study_and_theory(study_dir, tmp_path):
    """The repository's figures/ layout: study results under study/, theory results as theory_*.json."""
    from pathlib import Path

    figures = tmp_path / "figures"
    shutil.copytree(study_dir / "results", figures / "study" / "results")
    shutil.copy(study_dir / "study.json", figures / "study" / "study.json")
    repo_figures = Path(__file__).resolve().parents[1] / "figures"
    theory = sorted(repo_figures.glob("theory_*.json"))
    for path in theory:
        shutil.copy(path, figures / path.name)
    assert cli_main(["figures", str(figures)]) == 0
    expected = [f"{s}.png" for s in STEPS] + [p.with_suffix(".png").name for p in theory]
    assert sorted(p.name for p in figures.glob("*.png")) == sorted(expected)
    assert cli_main(["figures", str(tmp_path / "missing")]) == 2
    assert cli_main(["figures", str(tmp_path / "figures" / "study" / "results")]) == 2


def test_another_config_in_the_same_folder_is_refused(study_dir):
    cfg = tiny_config()
    cfg.seeds = [5]
    cfg.analysis_seeds = [5]
    with pytest.raises(ValueError, match="another configuration"):
        Study(cfg, study_dir)


def test_a_changed_criterion_is_refused_in_the_same_folder(study_dir):
    cfg = tiny_config()
    cfg.criteria[3] = {
        **cfg.criteria[3],
        "alpha": 0.2,
    }  # loosening a threshold after seeing the results
    with pytest.raises(ValueError, match="another configuration"):
        Study(cfg, study_dir)
    cfg = tiny_config()
    cfg.criteria = cfg.criteria[1:]  # dropping an inconvenient finding
    with pytest.raises(ValueError, match="another configuration"):
        Study(cfg, study_dir)


def test_shifted_seeds_are_disjoint():
    cfg = get_config("mnist1d")
    other = cfg.shifted_seeds(8)
    assert not set(cfg.seeds) & set(other.seeds) and not set(cfg.analysis_seeds) & set(
        other.analysis_seeds
    )
    for a, b in zip(cfg.regimes, other.regimes):
        assert not set(cfg.regime_seeds(a)) & set(other.regime_seeds(b))
    assert other.criteria_sha256 == cfg.criteria_sha256


def test_presets_are_consistent():
    for name in ("mnist1d", "digits", "cifar10", "cifar100"):
        for quick in (False, True):
            cfg = get_config(name, quick=quick)
            names = [r["name"] for r in cfg.regimes]
            assert set(cfg.complexity_regimes) <= set(names)
            assert len(cfg.seeds) >= (1 if quick else 3)
    with pytest.raises(ValueError, match="no study preset"):
        get_config("imagenet")


def test_reproduce_quick_cli(tmp_path):
    """The CI smoke run of the main job (`ntkd reproduce --quick`)."""
    out = tmp_path / "quick"
    assert cli_main(["reproduce", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert (out / "report.md").is_file() and len(list((out / "figures").glob("*.png"))) == 5
    findings = json.loads((out / "results" / "findings.json").read_text())
    assert len(findings) == len(get_config("mnist1d", quick=True).criteria)
    assert all(
        f["verdict"] != "not tested" for f in findings
    )  # the quick preset exercises every criterion


@pytest.mark.slow
def test_reproduce_quick_digits_writes_findings_in_the_same_format(tmp_path):
    out = tmp_path / "digits"
    assert (
        cli_main(
            ["reproduce", "--quick", "--dataset", "digits", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    findings = json.loads((out / "results" / "findings.json").read_text())
    mnist = get_config("mnist1d", quick=True).criteria
    assert [f["name"] for f in findings] == [c["name"] for c in mnist]
    keys = {"name", "verdict", "effect", "ci", "p_adjusted", "criterion"}
    for f in findings:
        assert keys <= set(f)
        if f["kind"] == "complexity":
            assert set(f["controls"]) == {"A", "identity_kernel", "label_smoothing_matched"}


def test_complexity_path_option_matfree_brackets_dense(study_dir, tmp_path):
    """StudyConfig.complexity_path: the matrix-free steps' intervals hold the dense values."""
    import dataclasses

    small = dict(analysis_seeds=[0], complexity_regimes=["online τ=1"], ridge=1e-2)
    results = {}
    for path in ("dense", "matfree"):
        cfg = dataclasses.replace(tiny_config(), complexity_path=path, **small)
        out = tmp_path / path
        shutil.copytree(study_dir / "runs", out / "runs")  # trained runs, reused as they are
        study = Study(cfg, out, progress=False)
        assert study.complexity_path == path and cfg.to_dict()["complexity_path"] == path
        results[path] = {
            s: study.run_step(s) for s in ("teacher_checkpoints", "student_complexity")
        }
    tol = 1e-5  # the dense path's float32 kernel against float64 products
    d, f = results["dense"]["teacher_checkpoints"], results["matfree"]["teacher_checkpoints"]
    assert d["complexity_path"] == "dense" and f["complexity_path"] == "matfree"
    assert f["panels"][0]["certified"] and f["panels"][0]["trace_source"].startswith("exact")
    pairs = list(zip(d["panels"][0]["rows"], f["panels"][0]["rows"]))
    d, f = results["dense"]["student_complexity"], results["matfree"]["student_complexity"]
    for rd, rf in zip(d["panels"][0]["rows"], f["panels"][0]["rows"]):
        pairs += [(rd["targets"][key], rf["targets"][key]) for key in rd["targets"]]
    assert len(pairs) == 2 + 5 * 4 + 3 * (2 + 2 * 2)  # teacher rows; checkpoints × targets
    for rd, rf in pairs:
        for key in ("A", "A_hat", "ls_A", "ls_A_hat"):
            if key in rd:
                lo, hi = rf[f"{key}_lower"], rf[f"{key}_upper"]
                assert lo * (1 - tol) <= rd[key] <= hi * (1 + tol), (key, rd[key], lo, hi)
        assert rf["A_identity"] == rd["A_identity"]


def test_matfree_study_report_and_figures_show_the_intervals(study_dir, tmp_path):
    """A study on the matrix-free path (its two complexity steps on study_dir's trained runs):
    report.md states the path, rtol, largest gap and certification and gives intervals; the
    findings carry bounds; the dense study's report has none of it."""
    import dataclasses
    import re

    from ntkd.findings import write_findings
    from ntkd.plotting import plot_study
    from ntkd.report import write_report

    cfg = dataclasses.replace(
        tiny_config(),
        complexity_path="matfree",
        ridge=1e-2,
        complexity_rtol=0.2,
        complexity_regimes=["online τ=1"],
    )
    out = tmp_path / "matfree"
    shutil.copytree(study_dir / "runs", out / "runs")
    (out / "results").mkdir()
    for step in ("distillation", "margins", "ntk_similarity"):  # dense on every path: reused
        shutil.copy(study_dir / "results" / f"{step}.json", out / "results")
    study = Study(cfg, out, progress=False)
    for step in ("teacher_checkpoints", "student_complexity"):
        study.run_step(step)
    write_findings(out)
    assert {p.stem for p in plot_study(out)} == set(STEPS)
    report = write_report(out).read_text()
    assert (
        '**Complexity path** (`complexity_path = "matfree"`): `teacher_checkpoints`: matrix-free'
        in report
    )
    assert "rtol = 0.2 " in report and "largest relative gap in this study: " in report
    assert "`margins` and `ntk_similarity` use the dense kernel on every path" in report
    assert "**Every upper bound is certified.**" in report
    assert "| effect, certified bounds |" in report
    assert re.search(r"\| \d\.\d{3} ± \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", report)  # a ratio
    for f in json.loads((out / "results" / "findings.json").read_text()):
        tested = f["kind"] == "complexity" and f["verdict"] != "not tested"
        assert ("bounds" in f) == tested, f["name"]
        if tested:
            assert f["bounds"]["effect"][0] <= f["effect"] + 1e-12
            assert f["effect"] <= f["bounds"]["effect"][1] + 1e-12
    dense = (study_dir / "report.md").read_text()
    for marker in ("Complexity path", "certified bounds", "Matrix-free path"):
        assert marker not in dense


def test_complexity_path_defaults_keep_the_config_and_refuse_matfree_without_ridge(tmp_path):
    import dataclasses

    cfg = tiny_config()
    assert not {"complexity_path", "memory_budget", "complexity_rtol"} & set(cfg.to_dict())
    with pytest.raises(ValueError, match="complexity_path must be one of"):
        dataclasses.replace(cfg, complexity_path="fast")
    with pytest.raises(ValueError, match="memory size"):
        dataclasses.replace(cfg, memory_budget="lots")
    tiny_budget = dataclasses.replace(cfg, memory_budget=1000)  # auto: 48² · 20 bytes > 1000
    with pytest.raises(ValueError, match=r"needs a relative ridge > 0, got ridge=0\.0"):
        Study(tiny_budget, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # refused before anything was written
    assert Study(cfg, tmp_path / "d", progress=False).complexity_path == "dense"
