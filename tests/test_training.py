"""Training pipeline: online schedule, exact resume, KD regimes, errors, CLI."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import TINY_MNIST1D

from ntkd import checkpoints as ckpt
from ntkd.cli import main as cli_main
from ntkd.training import TrainConfig, fit, online_teacher_epoch, predict, train, train_student


def small_config(**kw):
    base = dict(
        dataset="mnist1d",
        dataset_options=TINY_MNIST1D,
        model="mlp",
        model_options={"widths": [16]},
        epochs=3,
        batch_size=64,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_online_schedule():
    saved = [0, 2, 5, 9]
    assert [online_teacher_epoch(e, saved) for e in range(1, 12)] == [
        0,
        2,
        2,
        2,
        5,
        5,
        5,
        5,
        9,
        9,
        9,
    ]
    assert online_teacher_epoch(3, [1, 2, 3]) == 3
    with pytest.raises(ValueError, match="no teacher checkpoint at or before epoch 1"):
        online_teacher_epoch(1, [2, 4])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("regime", ["none", "online"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, tiny_teacher_dir, regime):
    kw = dict(regime=regime, teacher_dir=str(tiny_teacher_dir)) if regime != "none" else {}
    cfg = small_config(epochs=4, checkpoint_every=2, **kw)
    full = train(cfg, tmp_path / "full", progress=False)

    def stop_at_3(epoch, row):
        if epoch == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "cut", progress=False, on_epoch_end=stop_at_3)
    assert ckpt.list_epochs(tmp_path / "cut") == [0, 2]  # epoch 3 not yet checkpointed
    resumed = train(cfg, tmp_path / "cut", progress=False)
    leaves_full = jax.tree_util.tree_leaves(full["variables"])
    leaves_resumed = jax.tree_util.tree_leaves(resumed["variables"])
    for a, b in zip(leaves_full, leaves_resumed):
        np.testing.assert_array_equal(a, b)
    assert [r["epoch"] for r in resumed["history"]] == [0, 1, 2, 3, 4]
    assert resumed["history"][-1]["loss"] == full["history"][-1]["loss"]


def test_kd_regimes_use_the_right_teacher(tmp_path, tiny_teacher_dir):
    online = train_student(
        small_config(regime="online", teacher_dir=str(tiny_teacher_dir), epochs=5),
        tmp_path / "online",
        progress=False,
    )
    # teacher saved epochs 0..4; student epoch 5 falls back to the latest (4)
    assert [r["teacher_epoch"] for r in online["history"][1:]] == [1, 2, 3, 4, 4]
    es = train_student(
        small_config(
            regime="early_stopped",
            teacher_dir=str(tiny_teacher_dir),
            teacher_epoch=2,
            temperature=4.0,
        ),
        tmp_path / "es",
        progress=False,
    )
    assert {r["teacher_epoch"] for r in es["history"][1:]} == {2}
    off = train_student(
        small_config(regime="offline", teacher_dir=str(tiny_teacher_dir)),
        tmp_path / "off",
        progress=False,
    )
    assert {r["teacher_epoch"] for r in off["history"][1:]} == {4}
    # fidelity is measured against the final teacher's predictions
    model, tvars, _ = ckpt.restore_model(tiny_teacher_dir)
    ds = __import__("ntkd.data", fromlist=["x"]).load_dataset("mnist1d", **TINY_MNIST1D)
    zt = predict(model, tvars, ds.x_test)
    zs = predict(off["model"], off["variables"], ds.x_test)
    assert off["history"][-1]["test_fidelity"] == pytest.approx(
        np.mean(zs.argmax(1) == zt.argmax(1))
    )


def test_kd_student_matches_teacher_better_than_chance(tmp_path, tiny_teacher_dir):
    out = train_student(
        small_config(
            regime="offline",
            teacher_dir=str(tiny_teacher_dir),
            epochs=8,
            model_options={"widths": [64]},
        ),
        tmp_path / "s",
        progress=False,
    )
    assert out["history"][-1]["train_fidelity"] > 0.5


def test_config_mismatch_and_missing_teacher(tmp_path):
    train(small_config(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different configuration.*learning_rate"):
        train(small_config(epochs=1, learning_rate=0.5), tmp_path / "run", progress=False)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="no checkpoints"):
        train(
            small_config(regime="offline", teacher_dir=str(tmp_path / "empty")),
            tmp_path / "s2",
            progress=False,
        )
    with pytest.raises(ValueError, match="needs teacher_dir"):
        train(small_config(regime="online"), tmp_path / "s3", progress=False)
    with pytest.raises(ValueError, match="unknown regime"):
        train(small_config(regime="bogus"), tmp_path / "s4", progress=False)


def test_corrupt_checkpoint_is_named_and_earlier_work_kept(tmp_path):
    train(small_config(epochs=2), tmp_path / "run", progress=False)
    target = tmp_path / "run" / "checkpoints" / "2"
    for f in (target / "variables").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"checkpoints/2/variables/\S+ does not match its SHA-256.*delete",
    ):
        ckpt.load_checkpoint(tmp_path / "run", 2)
    (target / "manifest.sha256").write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/2/manifest.sha256 is corrupt"):
        ckpt.load_checkpoint(tmp_path / "run", 2)
    # the earlier checkpoint is untouched, and deleting the corrupt one lets the run resume
    assert ckpt.load_checkpoint(tmp_path / "run", 1).epoch == 1
    shutil.rmtree(target)
    out = train(small_config(epochs=2), tmp_path / "run", progress=False)
    assert ckpt.list_epochs(tmp_path / "run") == [0, 1, 2] and out["history"][-1]["epoch"] == 2


def test_teacher_of_another_dataset_is_rejected(tmp_path, tiny_teacher_dir):
    cfg = small_config(
        dataset="digits", dataset_options={}, regime="offline", teacher_dir=str(tiny_teacher_dir)
    )
    with pytest.raises(ValueError, match=r"teacher .* inputs \(40, 1\).*\(8, 8, 1\)"):
        train(cfg, tmp_path / "s", progress=False)


def test_wrong_input_shape_and_nan_inputs(tmp_path, tiny_mnist1d):
    bad = tiny_mnist1d.__class__(**{**tiny_mnist1d.__dict__, "x_test": tiny_mnist1d.x_test[:, :30]})
    with pytest.raises(ValueError, match=r"test inputs has example shape \(30, 1\)"):
        train(small_config(), tmp_path / "a", dataset=bad, progress=False)
    x = tiny_mnist1d.x_train.copy()
    x[3, 5, 0] = np.nan
    bad = tiny_mnist1d.__class__(**{**tiny_mnist1d.__dict__, "x_train": x})
    with pytest.raises(ValueError, match="NaN"):
        train(small_config(), tmp_path / "b", dataset=bad, progress=False)


def test_fit_on_soft_targets(tiny_mnist1d):
    from ntkd.models import get_model

    ds = tiny_mnist1d
    model = get_model("mlp", 10, widths=(32,))
    soft = np.full((len(ds.y_train), 10), 0.01, np.float32)
    soft[np.arange(len(soft)), ds.y_train] = 0.91
    variables, hist = fit(
        model,
        ds.x_train,
        soft,
        epochs=30,
        batch_size=32,
        learning_rate=3e-3,
        x_test=ds.x_test,
        y_test=ds.y_test,
    )
    assert hist[-1]["loss"] < hist[0]["loss"]
    train_acc = np.mean(predict(model, variables, ds.x_train).argmax(1) == ds.y_train)
    assert train_acc > 0.6


def test_cli_end_to_end(tmp_path, capsys):
    common = [
        "--dataset-options",
        json.dumps(TINY_MNIST1D),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--no-progress",
    ]
    assert (
        cli_main(
            [
                "train-teacher",
                "--out",
                str(tmp_path / "t"),
                "--model-options",
                '{"features": [4, 4, 4]}',
                *common,
            ]
        )
        == 0
    )
    for regime in ("offline", "online"):
        assert (
            cli_main(
                [
                    "distill",
                    "--teacher",
                    str(tmp_path / "t"),
                    "--regime",
                    regime,
                    "-T",
                    "4",
                    "--out",
                    str(tmp_path / regime),
                    "--model-options",
                    '{"widths": [8]}',
                    *common,
                ]
            )
            == 0
        )
    assert (
        cli_main(
            [
                "distill",
                "--teacher",
                str(tmp_path / "t"),
                "--regime",
                "early_stopped",
                "--teacher-epoch",
                "1",
                "--out",
                str(tmp_path / "es"),
                "--model-options",
                '{"widths": [8]}',
                *common,
            ]
        )
        == 0
    )
    hist = json.loads((tmp_path / "online" / "history.json").read_text())
    assert [r["teacher_epoch"] for r in hist[1:]] == [1, 2]
    # an unsaved teacher epoch is a clear error, not a crash
    assert (
        cli_main(
            [
                "distill",
                "--teacher",
                str(tmp_path / "t"),
                "--regime",
                "early_stopped",
                "--teacher-epoch",
                "7",
                "--out",
                str(tmp_path / "bad"),
                *common,
            ]
        )
        == 2
    )
    assert "teacher_epoch 7 not saved" in capsys.readouterr().err


def test_student_on_other_data_than_its_teacher_is_warned(tmp_path, tiny_teacher_dir):
    cfg = small_config(
        dataset_options={"num_samples": 700},
        regime="offline",
        teacher_dir=str(tiny_teacher_dir),
        epochs=1,
    )
    with pytest.warns(
        UserWarning,
        match=r"data differ from those of teacher .*'dataset_options': "
        r"\(\{'num_samples': 600\}, \{'num_samples': 700\}\)",
    ):
        train_student(cfg, tmp_path / "s", progress=False)


def test_missing_teacher_message_names_the_folder(tmp_path):
    cfg = small_config(regime="offline", teacher_dir=str(tmp_path / "nowhere"))
    with pytest.raises(
        ckpt.CheckpointError, match=rf"`ntkd train-teacher --out {tmp_path / 'nowhere'}` first"
    ):
        train_student(cfg, tmp_path / "s", progress=False)


def test_predict_on_inputs_of_another_shape_names_the_shape(tiny_teacher_dir):
    model, variables, meta = ckpt.restore_model(tiny_teacher_dir)
    assert tuple(meta["input_shape"]) == (40, 1)
    with pytest.raises(
        ValueError, match=r"inputs of example shape \(7,\) do not fit the model's parameters"
    ):
        predict(model, variables, np.ones((6, 7), np.float32))
    with pytest.raises(ValueError, match=r"must have a batch axis, got shape \(40,\)"):
        predict(model, variables, np.ones(40, np.float32))
