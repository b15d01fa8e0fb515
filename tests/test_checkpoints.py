"""Checkpoints: atomic saves with a SHA-256 manifest, verified on every load."""

import hashlib

import numpy as np
import pytest

from ntkd import checkpoints as ckpt


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    }


def test_save_writes_a_manifest_of_every_file_and_load_round_trips(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _variables(), metadata={"model": "mlp"})
    assert path == ckpt.checkpoint_dir(tmp_path) / "3" and ckpt.list_epochs(tmp_path) == [3]
    lines = (path / ckpt.MANIFEST).read_text().splitlines()
    files = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name != ckpt.MANIFEST
    )
    assert sorted(line.split("  ")[1] for line in lines) == files
    for line in lines:  # independent oracle: hashlib over each file
        digest, name = line.split("  ")
        assert digest == hashlib.sha256((path / name).read_bytes()).hexdigest()
    loaded = ckpt.load_checkpoint(tmp_path, 3)
    np.testing.assert_array_equal(loaded.variables["params"]["w"], _variables()["params"]["w"])
    assert loaded.metadata == {"model": "mlp", "epoch": 3}
    assert not (tmp_path / ".checkpoint-staging").exists()


def test_overwriting_an_epoch_replaces_it_completely(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _variables(0))
    ckpt.save_checkpoint(tmp_path, 1, _variables(1))
    np.testing.assert_array_equal(
        ckpt.load_checkpoint(tmp_path, 1).variables["params"]["w"], _variables(1)["params"]["w"]
    )
    assert ckpt.list_epochs(tmp_path) == [1]


@pytest.mark.parametrize(
    "change, problem",
    [
        ("delete", "is missing"),
        ("add", "is not in its manifest"),
        ("flip", "does not match its SHA-256"),
    ],
)
def test_any_change_to_the_files_is_a_checkpoint_error_naming_the_file(tmp_path, change, problem):
    path = ckpt.save_checkpoint(tmp_path, 0, _variables())
    victim = max(
        (p for p in (path / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    if change == "delete":
        victim.unlink()
    elif change == "add":
        victim = path / "variables" / "extra"
        victim.write_bytes(b"x")
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01  # a single bit
        victim.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="delete it") as err:
        ckpt.load_checkpoint(tmp_path, 0)
    assert f"checkpoint file {victim} {problem}" in str(err.value)
    ckpt.read_metadata(tmp_path, 0)  # the metadata alone is still intact and readable


def test_a_checkpoint_without_manifest_is_refused_until_adopted(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 2, _variables())
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"has no manifest.sha256.*write_manifest"):
        ckpt.load_checkpoint(tmp_path)
    ckpt.write_manifest(path)
    assert ckpt.load_checkpoint(tmp_path).epoch == 2


def test_stale_files_of_interrupted_saves_are_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, 0, _variables())
    stale = [
        tmp_path / ".checkpoint-staging" / "1-123" / "variables",
        ckpt.checkpoint_dir(tmp_path) / "1.orbax-checkpoint-tmp-99" / "meta",
    ]
    for p in stale:
        p.mkdir(parents=True)
    (tmp_path / ".history.json.abcd.tmp").write_text("[")
    ckpt.remove_stale_files(tmp_path)
    assert not any(p.exists() for p in stale) and not (tmp_path / ".history.json.abcd.tmp").exists()
    assert ckpt.list_epochs(tmp_path) == [0] and ckpt.load_checkpoint(tmp_path).epoch == 0
