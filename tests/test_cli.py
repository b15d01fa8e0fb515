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
