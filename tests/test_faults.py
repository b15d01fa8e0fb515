"""Fault injection: a run folder is never silently wrong (issue 18).

Crashes are real SIGKILLs of a child process at chosen points of training and
of checkpoint saves (every rename, replace, fsync, mkdir, unlink and rmtree
under the run folder is a possible kill point, before or after the call); the
oracle is an uninterrupted run of the same configuration in this process,
compared bit for bit. Damaged bytes, concurrent starts, deleted files and a
diverging run must end in a named error or a correct folder, never in a folder
whose contents disagree with its config.json.
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_MNIST1D

from ntkd import checkpoints as ckpt
from ntkd._io import write_json
from ntkd._lock import LOCK_NAME, FolderInUseError, lock_folder
from ntkd.cli import main as cli_main
from ntkd.training import TrainConfig, train, train_student

REPO = Path(__file__).resolve().parents[1]

CONFIG = dict(
    dataset="mnist1d",
    dataset_options=TINY_MNIST1D,
    model="mlp",
    model_options={"widths": [16]},
    epochs=4,
    batch_size=64,
    checkpoint_every=2,
)

# Shared by the child (which SIGKILLs itself) and this process (which only counts).
HOOKS = textwrap.dedent("""
    import os, shutil, signal

    def install(root, kill_before=0, kill_after=0, kill_after_rename_into=None):
        '''Counts file-system calls under ``root``; SIGKILLs the process at the chosen one.'''
        count = [0]
        root = os.path.realpath(root)

        def path_of(arg):
            if isinstance(arg, int):
                try:
                    return os.readlink(f"/proc/self/fd/{arg}")
                except OSError:
                    return ""
            return os.path.realpath(os.fspath(arg))

        def hook(module, name):
            original = getattr(module, name)

            def wrapper(*args, **kwargs):
                mine = path_of(args[0]).startswith(root)
                if mine:
                    count[0] += 1
                    if count[0] == kill_before:
                        os.kill(os.getpid(), signal.SIGKILL)
                result = original(*args, **kwargs)
                if mine and (count[0] == kill_after or (
                        name == "rename" and kill_after_rename_into
                        and os.fspath(args[1]).endswith(kill_after_rename_into))):
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            setattr(module, name, wrapper)
            return original

        originals = {(m, n): hook(m, n) for m, n in [(os, "rename"), (os, "replace"), (os, "fsync"),
                                                     (os, "mkdir"), (os, "unlink"), (shutil, "rmtree")]}
        return count, originals
""")

CHILD = HOOKS + textwrap.dedent("""
    import json, sys, time
    spec = json.loads(sys.argv[1])
    from ntkd.training import TrainConfig, train
    if spec.get("go"):  # start together with the other children
        open(spec["go"] + f".ready{os.getpid()}", "w").close()
        while not os.path.exists(spec["go"]):
            time.sleep(0.002)
    install(spec["out"], spec.get("kill_before", 0), spec.get("kill_after", 0), spec.get("kill_after_rename_into"))
    train(TrainConfig(**spec["config"]), spec["out"], progress=False)
""")


def _env():
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS="cpu",
    )


def _child(spec: dict, **popen):
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], env=_env(), **popen)


def _leaves(variables):
    return jax.tree_util.tree_leaves(variables)


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _assert_complete(run_dir: Path, reference: dict):
    """Final checkpoint, history.json and config.json all match the uninterrupted run."""
    _, variables, _ = ckpt.restore_model(run_dir)
    _assert_same_params(variables, reference["variables"])
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(CONFIG["epochs"] + 1))
    assert _without_seconds(history) == _without_seconds(reference["history"])
    assert json.loads((run_dir / "config.json").read_text()) == TrainConfig(**CONFIG).to_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and how many file-system calls under its folder it makes."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ns = {}
    exec(HOOKS, ns)
    count, originals = ns["install"](out)
    try:
        result = train(TrainConfig(**CONFIG), out, progress=False)
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    return dict(result, events=count[0], dir=out)


def _kill_and_resume(tmp_path, reference, **kill):
    out = tmp_path / "run"
    proc = _child(dict(config=CONFIG, out=str(out), **kill))
    assert proc.wait(timeout=300) == -signal.SIGKILL, "the child was not killed at the chosen point"
    train(TrainConfig(**CONFIG), out, progress=False)
    _assert_complete(out, reference)
    leftovers = [
        p
        for p in out.rglob("*")
        if p.name.endswith(".tmp")
        or "orbax-checkpoint-tmp" in p.name
        or ".checkpoint-staging" in p.parts
    ]
    assert leftovers == [], leftovers


def _kill_points(seed: int, events: int) -> dict:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, events + 1))
    return {"kill_before": k} if rng.random() < 0.5 else {"kill_after": k}


@pytest.mark.parametrize("seed", [0])
def test_sigkill_at_a_random_file_operation_then_resume_is_bit_identical(tmp_path, reference, seed):
    _kill_and_resume(tmp_path, reference, **_kill_points(seed, reference["events"]))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 12))
def test_sigkill_at_random_file_operations_many_seeds(tmp_path, reference, seed):
    _kill_and_resume(tmp_path, reference, **_kill_points(seed, reference["events"]))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_time_then_resume_is_bit_identical(tmp_path, reference, seed):
    """Kills land anywhere, Orbax's own (C++) writes included."""
    out = tmp_path / "run"
    proc = _child(dict(config=CONFIG, out=str(out)))
    deadline = time.time() + 120
    while not (out / "checkpoints").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(float(np.random.default_rng(seed).uniform(0, 1.5)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    train(TrainConfig(**CONFIG), out, progress=False)
    _assert_complete(out, reference)


def test_kill_between_checkpoint_rename_and_history_write_keeps_the_row(tmp_path, reference):
    out = tmp_path / "run"
    proc = _child(dict(config=CONFIG, out=str(out), kill_after_rename_into="checkpoints/2"))
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert ckpt.list_epochs(out) == [0, 2]
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [
        0
    ]  # row 1, 2 not yet written
    train(TrainConfig(**CONFIG), out, progress=False)
    _assert_complete(out, reference)


def test_flipped_bytes_in_any_checkpoint_file_are_a_checkpoint_error_naming_it(tmp_path, reference):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    final = ckpt.checkpoint_dir(run) / str(CONFIG["epochs"])
    data = sorted(
        (final / "variables" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size
    )
    files = [data[-1]] + [
        p for p in final.rglob("*") if p.is_file() and p.name != "manifest.sha256"
    ]
    for victim in files[:6] + list(rng.choice(files[6:], 4, replace=False)):
        original = victim.read_bytes()
        flipped = bytearray(original)
        start = int(rng.integers(0, max(len(flipped) - 64, 1)))
        for i in range(start, min(start + 64, len(flipped))):
            flipped[i] ^= 0xFF
        victim.write_bytes(bytes(flipped))
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load_checkpoint(run)
        assert str(victim) in str(err.value) and "does not match its SHA-256" in str(err.value)
        victim.write_bytes(original)
    _assert_same_params(ckpt.load_checkpoint(run).variables, reference["variables"])


def test_distilling_from_a_corrupt_or_unfinished_teacher_is_refused(tmp_path, reference, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(reference["dir"], teacher)
    victim = max(
        (p for p in (ckpt.checkpoint_dir(teacher) / "4" / "variables").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    victim.write_bytes(victim.read_bytes()[:-8] + b"\x00" * 8)
    args = [
        "distill",
        "--teacher",
        str(teacher),
        "--regime",
        "offline",
        "--out",
        str(tmp_path / "s"),
        "--dataset-options",
        json.dumps(TINY_MNIST1D),
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert cli_main(args) == 2
    assert str(victim) in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing written before the inputs were checked
    shutil.rmtree(ckpt.checkpoint_dir(teacher) / "4")  # the advice for a corrupt checkpoint
    student = TrainConfig(
        **{**CONFIG, "regime": "offline", "teacher_dir": str(teacher), "epochs": 1}
    )
    with pytest.raises(
        ckpt.CheckpointError, match=r"teacher run .* is unfinished: .*4 epochs .*epoch 2"
    ):
        train_student(student, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_concurrent_starts_exactly_one_runs_and_the_folder_is_consistent(tmp_path, reference):
    out = tmp_path / "run"
    go = tmp_path / "go"
    lrs = [1e-2, 1e-3]
    procs = [
        _child(
            dict(config={**CONFIG, "learning_rate": lr}, out=str(out), go=str(go)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in lrs
    ]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    ok = [i for i, (rc, _) in enumerate(results) if rc == 0]
    assert len(ok) == 1, results
    loser_err = results[1 - ok[0]][1]
    assert "is in use by PID" in loser_err or "different configuration" in loser_err, loser_err
    assert "No such file" not in loser_err
    winner = TrainConfig(**{**CONFIG, "learning_rate": lrs[ok[0]]})
    assert json.loads((out / "config.json").read_text()) == winner.to_dict()
    expected = (
        reference["variables"]
        if ok[0] == 0
        else train(winner, tmp_path / "oracle", progress=False)["variables"]
    )
    _assert_same_params(ckpt.restore_model(out)[1], expected)


def _lock_holder(folder: Path) -> subprocess.Popen:
    """A child process that holds ``folder``'s lock until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ntkd._lock import lock_folder; "
            "l = lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(folder),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_held_lock_refuses_a_second_start_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _lock_holder(out)
    try:
        with pytest.raises(
            FolderInUseError, match=rf"run folder {out} is in use by PID {holder.pid}"
        ):
            train(TrainConfig(**CONFIG), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died holding the lock: its lock file is left behind, the lock is not
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    with lock_folder(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with lock_folder(out):  # the same process may take it again
            pass


def test_a_study_folder_in_use_is_refused_before_study_json_is_written(tmp_path):
    from ntkd.study import Study, StudyConfig

    holder = _lock_holder(tmp_path / "study")
    try:
        with pytest.raises(
            FolderInUseError,
            match=rf"study folder {tmp_path / 'study'} is in use by PID {holder.pid}",
        ):
            Study(StudyConfig(dataset_options=TINY_MNIST1D), tmp_path / "study")
        assert not (tmp_path / "study" / "study.json").exists()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "study" / "results").mkdir()
    stale = tmp_path / "study" / "results" / ".margins.json.k2j3.tmp"
    stale.write_text("{")
    Study(StudyConfig(dataset_options=TINY_MNIST1D), tmp_path / "study")
    assert (tmp_path / "study" / "study.json").is_file() and not stale.exists()


def test_deleted_config_is_rebuilt_for_the_same_run_and_another_config_is_refused(
    tmp_path, reference
):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    (run / "config.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in ckpt.checkpoint_dir(run).rglob("*")}
    with pytest.raises(
        ValueError,
        match=r"different configuration \{'learning_rate': \(0.01, 0.001\)\}.*"
        r"checkpoints/4",
    ):
        train(TrainConfig(**{**CONFIG, "learning_rate": 1e-3}), run, progress=False)
    assert not (run / "config.json").exists()
    train(TrainConfig(**CONFIG), run, progress=False)
    _assert_complete(run, reference)
    assert {
        p: p.stat().st_mtime_ns for p in ckpt.checkpoint_dir(run).rglob("*")
    } == before  # nothing retrained


def test_interrupted_run_without_config_cannot_resume_under_another(tmp_path, reference):
    run = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(epoch, row):
        if epoch == 3:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(**CONFIG), run, progress=False, on_epoch_end=stop)
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match="different configuration.*epochs"):
        train(TrainConfig(**{**CONFIG, "epochs": 6}), run, progress=False)
    train(TrainConfig(**CONFIG), run, progress=False)
    _assert_complete(run, reference)


@pytest.mark.parametrize("damage", ["delete", "empty", "behind", "corrupt"])
def test_history_is_rebuilt_from_the_checkpoints(tmp_path, reference, damage):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    path = run / "history.json"
    if damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_text("[]")
    elif damage == "behind":
        path.write_text(json.dumps(json.loads(path.read_text())[:2]))
    else:
        path.write_text('[{"epoch": 0,')
    out = train(TrainConfig(**CONFIG), run, progress=False)
    assert _without_seconds(out["history"]) == _without_seconds(reference["history"])
    _assert_complete(run, reference)


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    stale = [
        run / ".history.json.x1y2.tmp",
        run / ".config.json.abc.tmp",
        ckpt.checkpoint_dir(run) / "6.orbax-checkpoint-tmp-1234" / "variables",
        run / ".checkpoint-staging" / "6-999" / "meta",
    ]
    for p in stale:
        if p.suffix == ".tmp":
            p.write_text("partial")
        else:
            p.mkdir(parents=True)
    train(TrainConfig(**CONFIG), run, progress=False)
    assert not any(p.exists() for p in stale)
    assert ckpt.list_epochs(run) == [0, 2, 4]


def test_divergence_is_a_clear_error_and_the_remedy_continues_from_the_last_checkpoint(
    tmp_path, capsys
):
    run = tmp_path / "run"
    common = [
        "--dataset-options",
        json.dumps(TINY_MNIST1D),
        "--model",
        "mlp",
        "--model-options",
        '{"widths": [16]}',
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--optimizer",
        "sgd",
        "--schedule",
        "constant",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert cli_main(["train-teacher", "--lr", "1e6", *common]) == 2
    err = capsys.readouterr().err
    assert (
        re.search(r"training diverged: the loss became (nan|inf) at epoch 1", err)
        and "--amend-optimizer" in err
    )
    assert "Traceback" not in err
    assert ckpt.list_epochs(run) == [0]
    # a lower learning rate alone is refused (it would mix configurations) ...
    assert cli_main(["train-teacher", "--lr", "0.05", *common]) == 2
    assert "--amend-optimizer" in capsys.readouterr().err
    # ... and accepted, recorded, as an amendment
    assert cli_main(["train-teacher", "--lr", "0.05", "--amend-optimizer", *common]) == 0
    changes = json.loads((run / "config_history.json").read_text())
    assert [c["from_epoch"] for c in changes] == [0, 0]
    assert (
        changes[1]["changes"] == {"learning_rate": [1e6, 0.05]}
        and changes[1]["optimizer_state"] == "kept"
    )
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 0.05
    assert ckpt.read_metadata(run)["config"]["learning_rate"] == 0.05
    # continuing from the (initial) epoch-0 checkpoint equals training with the new rate from the start
    fresh = TrainConfig(
        dataset="mnist1d",
        dataset_options=TINY_MNIST1D,
        model="mlp",
        model_options={"widths": [16]},
        epochs=3,
        batch_size=64,
        optimizer="sgd",
        schedule="constant",
        learning_rate=0.05,
    )
    _assert_same_params(
        ckpt.restore_model(run)[1], train(fresh, tmp_path / "fresh", progress=False)["variables"]
    )
    assert (
        cli_main(["train-teacher", "--lr", "0.05", *common]) == 0
    )  # a plain rerun of the amended run


def test_an_amendment_that_changes_the_optimizer_state_structure_reinitialises_it(
    tmp_path, reference
):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    shutil.rmtree(ckpt.checkpoint_dir(run) / "4")
    cfg = TrainConfig(**{**CONFIG, "optimizer": "sgd"})
    with pytest.raises(ValueError, match="--amend-optimizer"):
        train(cfg, run, progress=False)
    with pytest.raises(ValueError, match=r"only optimizer, .* not \['epochs'\]"):
        train(
            TrainConfig(**{**CONFIG, "optimizer": "sgd", "epochs": 5}),
            run,
            progress=False,
            amend_optimizer=True,
        )
    out = train(cfg, run, progress=False, amend_optimizer=True)
    assert [r["epoch"] for r in out["history"]] == [0, 1, 2, 3, 4]
    changes = json.loads((run / "config_history.json").read_text())
    assert changes[-1]["from_epoch"] == 2 and changes[-1]["changes"] == {
        "optimizer": ["adam", "sgd"]
    }
    assert changes[-1]["optimizer_state"] == "reinitialised"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "x.json", {"a": 1})
        with lock_folder(tmp_path / "locked"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "locked" / LOCK_NAME).stat().st_mode) == 0o666 & ~umask


def test_run_files_are_readable_by_the_group(reference):
    run = reference["dir"]
    for path in [
        run / "config.json",
        run / "history.json",
        ckpt.checkpoint_dir(run) / "4" / "manifest.sha256",
    ]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o040, (path, oct(mode))


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--model", "nonsense"], "nonsense"),
        (["--dataset", "nonsense"], "unknown dataset 'nonsense'"),
        (["--dataset-options", '{"num_samples": 0}'], "num_samples must be an integer >= 20"),
        (
            ["--dataset-options", '{"num_samples": 600, "train_split": 1.0}'],
            "train_split must be in (0, 1)",
        ),
        (["--regime", "early_stopped", "--teacher-epoch", "9"], "teacher_epoch 9 not saved"),
        (["--teacher", "MISSING"], "has no checkpoints; train it with `ntkd train-teacher --out"),
    ],
)
def test_a_failed_start_writes_nothing_and_the_corrected_command_runs(
    tmp_path, reference, capsys, bad, message
):
    out = tmp_path / "s"
    teacher = str(tmp_path / "missing") if "MISSING" in bad else str(reference["dir"])
    bad = [teacher if b == "MISSING" else b for b in bad]
    base = {
        "--teacher": str(reference["dir"]),
        "--regime": "offline",
        "--dataset-options": json.dumps(TINY_MNIST1D),
        "--model": "mlp",
        "--model-options": '{"widths": [8]}',
        "--epochs": "1",
    }
    for flag, value in zip(bad[::2], bad[1::2]):
        base[flag] = value
    args = ["distill", "--out", str(out), "--no-progress", *[x for kv in base.items() for x in kv]]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "{self.dir}" not in err
    assert not out.exists()
    good = [
        "distill",
        "--out",
        str(out),
        "--no-progress",
        "--teacher",
        str(reference["dir"]),
        "--dataset-options",
        json.dumps(TINY_MNIST1D),
        "--model",
        "mlp",
        "--model-options",
        '{"widths": [8]}',
        "--epochs",
        "1",
    ]
    assert cli_main(good) == 0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"history": ["x"]}'])
def test_a_corrupt_training_timings_file_does_not_block_the_study(tmp_path, content):
    from ntkd.study import _record_training_time

    path = tmp_path / "timings" / "training.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.warns(UserWarning, match="training.json is unreadable"):
        _record_training_time(path, 2.5)
    assert json.loads(path.read_text()) == {"seconds": 2.5, "history": [2.5]}
    _record_training_time(path, 1.5)
    assert json.loads(path.read_text()) == {"seconds": 4.0, "history": [2.5, 1.5]}


def test_a_study_with_a_bad_run_config_writes_nothing(tmp_path):
    from ntkd.study import Study, StudyConfig

    bad = StudyConfig(dataset_options=TINY_MNIST1D, teacher={"model": "nonsense"})
    with pytest.raises(ValueError, match="unknown model 'nonsense'"):
        Study(bad, tmp_path / "study")
    assert not (tmp_path / "study").exists()
    Study(
        StudyConfig(dataset_options=TINY_MNIST1D), tmp_path / "study"
    )  # the corrected study starts
