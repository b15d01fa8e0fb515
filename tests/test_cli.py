"""CLI input checking: bad values are refused up front with the flag and the fix, never a traceback."""

import numpy as np
import pytest
from conftest import TINY_MNIST1D

from ntkd import complexity as cx
from ntkd.cli import main as cli_main
from ntkd.training import TrainConfig, train


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--model-options", "--dataset-options"])
def test_options_must_be_a_json_object(tmp_path, capsys, flag):
    err = _usage_error(capsys, ["train-teacher", "--out", str(tmp_path / "t"), flag, "[64, 64]"])
    assert (
        f"argument {flag}: '[64, 64]' is JSON but not an object" in err and "Traceback" not in err
    )
    err = _usage_error(capsys, ["train-teacher", "--out", str(tmp_path / "t"), flag, "{widths"])
    assert f"argument {flag}: not valid JSON" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train-teacher", "--lr", "-0.01"],
            "argument --lr: must be a finite number > 0, got -0.01",
        ),
        (["train-teacher", "--lr", "0"], "argument --lr: must be a finite number > 0"),
        (["train-teacher", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["distill", "--batch-size", "-4"], "argument --batch-size: must be >= 1, got -4"),
        (
            ["complexity", "--student", "s", "--teacher", "t", "--n", "0"],
            "argument --n: must be >= 1, got 0",
        ),
    ],
)
def test_out_of_range_numbers_name_the_flag(tmp_path, capsys, argv, message):
    assert message in _usage_error(capsys, [*argv, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", -1e-3, "learning_rate must be a finite number > 0, got -0.001"),
        ("learning_rate", float("nan"), "learning_rate must be a finite number > 0, got nan"),
        ("model_options", [64, 64], r"model_options must be a JSON object .* got \[64, 64\]"),
        ("momentum", -0.5, "momentum, weight_decay and warmup_epochs must be >= 0, got -0.5"),
    ],
)
def test_library_refuses_the_same_values(tmp_path, field, value, message):
    cfg = TrainConfig(dataset_options=TINY_MNIST1D, model="mlp", epochs=1, **{field: value})
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_dataset_option_errors_are_clear_through_the_cli(tmp_path, capsys):
    out = str(tmp_path / "t")
    assert (
        cli_main(
            [
                "train-teacher",
                "--out",
                out,
                "--dataset-options",
                '{"num_samples": 0}',
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "mnist1d num_samples must be an integer >= 20" in err
        and "got 0" in err
        and "Traceback" not in err
    )


def test_complexity_accepts_a_float32_kernel_cast_to_float64():
    """`ntkd complexity` and Study cast the float32 eNTK to float64 before factorising; the PSD
    tolerance must still be float32's round-off, as when the float32 kernel itself is passed."""
    rng = np.random.default_rng(0)
    n, rank = 60, 12
    A = rng.normal(size=(n, rank))
    K32 = (A @ A.T).astype(
        np.float32
    )  # rank-deficient: round-off leaves eigenvalues slightly below 0
    K64 = K32.astype(np.float64)
    lam_min = np.linalg.eigvalsh(K64)[0]
    scale = float(np.max(np.diag(K64)))
    assert (
        -n * np.finfo(np.float32).eps * scale
        < lam_min
        < -1e3 * n * np.finfo(np.float64).eps * scale
    )
    Y = rng.normal(size=(n, 3))
    expected = cx.factor_kernel(K32).complexity(Y)
    assert cx.factor_kernel(K64).complexity(Y) == pytest.approx(expected, rel=1e-6)
    # a genuine float64 kernel (not float32 values) with that eigenvalue is still indefinite
    noise = rng.normal(size=(n, n)) * 1e-9 * scale
    with pytest.raises(ValueError, match="not positive semi-definite"):
        cx.factor_kernel(K64 + (noise + noise.T) / 2)


# ---------------------------------------------------------------- flags from TrainConfig
@pytest.mark.parametrize("command, distill", [("train-teacher", False), ("distill", True)])
def test_train_flags_are_the_config_fields_with_their_defaults(tmp_path, command, distill):
    """Every TrainConfig field is a flag; parsing no flags gives the dataclass's defaults
    (distill: an MLP student and offline KD)."""
    import dataclasses

    from ntkd.cli import _config_from_args, build_parser

    args = build_parser().parse_args([command, "--out", str(tmp_path)])
    got = _config_from_args(args, distill=distill)
    want = TrainConfig(**({"model": "mlp", "regime": "offline"} if distill else {}))
    assert got == want
    dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices[command]._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kd = {"regime", "teacher_dir", "teacher_epoch", "temperature", "alpha"}
    assert fields - (set() if distill else kd) <= dests
    assert distill or not kd & dests


def test_train_flags_reach_the_config(tmp_path):
    from ntkd.cli import _config_from_args, build_parser

    argv = ["distill", "--out", str(tmp_path), "--lr", "0.5", "-T", "4", "--augment"]
    argv += [
        "--teacher",
        "t",
        "--checkpoint-epochs",
        "1",
        "2",
        "--model-options",
        '{"widths": [8]}',
    ]
    cfg = _config_from_args(build_parser().parse_args(argv), distill=True)
    assert (cfg.learning_rate, cfg.temperature, cfg.augment) == (0.5, 4.0, True)
    assert cfg.checkpoint_epochs == [1, 2] and cfg.model_options == {"widths": [8]}
    assert cfg.teacher_dir == str((tmp_path.cwd() / "t").resolve())


# ---------------------------------------------------------------- reproduce --set
def test_set_parses_json_literals_and_words():
    from ntkd.cli import build_parser

    args = build_parser().parse_args(
        ["reproduce", "--set", "seeds=[0,1]", "--set", "ntk_mode=sum", "--set", "ridge=1e-6"]
        + ["--set", "teacher.augment=False"]
    )
    assert args.overrides == [
        ("seeds", [0, 1]),
        ("ntk_mode", "sum"),
        ("ridge", 1e-6),
        ("teacher.augment", False),
    ]


def test_set_without_equals_is_a_usage_error(capsys):
    assert "argument --set: 'seeds' is not KEY=VALUE" in _usage_error(
        capsys, ["reproduce", "--set", "seeds"]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochz=3", "unknown key 'epochz' in override 'epochz'; valid StudyConfig keys: name,"),
        ("teacher.lr=0.1", "unknown key 'lr' in override 'teacher.lr'; valid TrainConfig keys"),
        ("n_kernel=1.5", "override n_kernel=1.5: expected int, got float"),
        ("seeds=3", "override seeds=3: expected list, got int"),
        ("epochs=many", "override epochs='many': expected int, got str"),
        (
            "teacher_epochs=[0,99]",
            "teacher epochs [99] (teacher_epochs, or a regime's teacher_epoch)",
        ),
    ],
)
def test_a_bad_override_names_the_key_and_writes_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "study"
    assert cli_main(["reproduce", "--quick", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_overrides_are_applied_and_recorded_and_a_changed_set_is_refused(tmp_path):
    import json

    from ntkd.configs import get_config
    from ntkd.study import Study

    preset = get_config("mnist1d", quick=True)
    preset.dataset_options = TINY_MNIST1D
    overrides = {
        "epochs": 2,
        "seeds": [0, 1],
        "analysis_seeds": [0],
        "student.model_options.widths": [8],
    }
    cfg = preset.with_overrides(overrides)
    assert cfg.teacher["epochs"] == cfg.student["epochs"] == 2 and preset.teacher["epochs"] == 12
    assert cfg.student["model_options"] == {"widths": [8]} and cfg.seeds == [0, 1]
    assert "overrides" not in preset.to_dict()  # study folders written before --set still match
    out = tmp_path / "study"
    study = Study(cfg, out, progress=False)
    study._lock.release()
    saved = json.loads((out / "study.json").read_text())
    assert saved["overrides"] == overrides and saved["criteria_sha256"] == preset.criteria_sha256
    again = Study(preset.with_overrides(overrides), out, progress=False)  # same: resumes
    again._lock.release()
    changed = cfg.with_overrides({"criteria.0.alpha": 0.5})
    assert changed.criteria_sha256 != cfg.criteria_sha256
    with pytest.raises(ValueError, match="holds a study with another configuration"):
        Study(changed, out, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        Study(preset, out, progress=False)  # dropping the overrides is a change too


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--memory-budget", "8 parsecs", "argument --memory-budget: '8 parsecs' is not a memory"),
        ("--memory-budget", "0", "argument --memory-budget: a memory size must be at least 1"),
        ("--n", "abc", "argument --n: 'abc' is not an integer (or 'all' for the whole"),
        ("--n", "-3", "argument --n: must be >= 1, got -3 (or 'all'"),
        ("--path", "fast", "argument --path: invalid choice: 'fast'"),
        ("--rtol", "0", "argument --rtol: must be a finite number > 0"),
    ],
)
def test_complexity_path_flags_are_checked(tmp_path, capsys, flag, value, message):
    argv = ["complexity", "--student", "s", "--teacher", "t", flag, value]
    err = _usage_error(capsys, [*argv, "--out", str(tmp_path / "o")])
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_complexity_matfree_path_writes_intervals(tiny_teacher_dir, tmp_path, capsys):
    import csv

    run = str(tiny_teacher_dir)
    common = ["complexity", "--student", run, "--teacher", run, "--teacher-epochs", "4"]
    common += ["--temperatures", "2", "--n", "64", "--ridge", "1e-2"]
    out = tmp_path / "cx"
    assert cli_main([*common, "--memory-budget", "1KiB", "--rtol", "0.01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "C interval" in printed and "A interval" in printed and "path: matfree (n=64)" in printed
    with open(out / "complexity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["path"] for r in rows} == {"matfree"}
    for r in rows:
        assert (
            float(r["complexity_lower"]) <= float(r["complexity"]) <= float(r["complexity_upper"])
        )
        assert float(r["relative_gap"]) <= 0.01 and r["eig_lower_source"] in ("shift", "exact")
        assert int(r["matvecs"]) > 0 and r["trace_source"].startswith("exact")
    assert cli_main([*common, "--path", "dense", "--out", str(tmp_path / "d")]) == 0
    assert "C interval" not in capsys.readouterr().out


def test_complexity_matfree_without_ridge_says_what_to_do(tiny_teacher_dir, tmp_path, capsys):
    run = str(tiny_teacher_dir)
    argv = ["complexity", "--student", run, "--teacher", run, "--n", "all", "--path", "matfree"]
    assert cli_main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs a relative ridge > 0, got ridge=0.0" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
