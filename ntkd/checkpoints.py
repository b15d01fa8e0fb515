"""Orbax-backed checkpoints with metadata, written atomically and verified on load.

A run folder holds ``checkpoints/<epoch>/`` (one Orbax checkpoint per saved
epoch, epoch 0 = initialisation). Each checkpoint has three items and a manifest:

- ``variables``: the model variables (``params`` and, for BatchNorm models,
  ``batch_stats``);
- ``opt_state``: the optimiser state, so a run can resume exactly;
- ``meta``: JSON metadata — epoch, model name and options, dataset, metrics;
  checkpoints written by :func:`ntkd.training.train` also hold the training
  configuration, its digest and the history up to that epoch;
- ``manifest.sha256``: the SHA-256 of every other file of the checkpoint.

A checkpoint is written completely (Orbax, then the manifest) in
``.checkpoint-staging/`` beside ``checkpoints/`` and renamed into place in one
step, so a folder ``checkpoints/<epoch>`` is always a finished checkpoint; an
interrupted save leaves only staging files, which :func:`remove_stale_files`
deletes. Loading checks every file against the manifest, so a damaged file is
a :class:`CheckpointError` naming it, never silently wrong weights.

Example:
    >>> save_checkpoint("runs/t", 3, variables, metadata={"model": "mlp", ...})
    >>> list_epochs("runs/t")
    [3]
    >>> model, variables, meta = restore_model("runs/t", epoch=3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import flax.linen
import jax
import numpy as np
import orbax.checkpoint as ocp

from ntkd._io import remove_stale_tmp, write_text


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One restored checkpoint.

    Attributes:
        epoch: training epoch after which it was saved (0 = initialisation).
        variables: model variables (``params`` and optional ``batch_stats``).
        opt_state: optimiser state, or None when not requested.
        metadata: the JSON metadata saved with it.
    """

    epoch: int
    variables: dict
    opt_state: Any
    metadata: dict


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(run_dir).expanduser().resolve() / "checkpoints"


MANIFEST = "manifest.sha256"
_STAGING = ".checkpoint-staging"


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _file_digests(folder: Path) -> dict[str, str]:
    digests = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digests[f.relative_to(folder).as_posix()] = h.hexdigest()
    return digests


def write_manifest(checkpoint: str | os.PathLike) -> Path:
    """Writes ``manifest.sha256`` (SHA-256 of every file) into a checkpoint folder.

    :func:`save_checkpoint` does this itself; call it only to adopt a checkpoint
    written by an older ntkd, after checking that the checkpoint is sound.
    """
    folder = Path(checkpoint)
    lines = [f"{digest}  {name}\n" for name, digest in _file_digests(folder).items()]
    return write_text(folder / MANIFEST, "".join(lines))


def _remedy(folder: Path) -> str:
    return (
        f"Do not use this checkpoint: restore the folder {folder} from a copy, or delete it; a rerun of "
        "its training command then resumes from the previous checkpoint (a teacher must be trained to its "
        "end again before students distil from it)."
    )


def verify_checkpoint(checkpoint: str | os.PathLike, *, only: str | None = None) -> None:
    """Checks a checkpoint folder against its manifest.

    Args:
        checkpoint: a ``checkpoints/<epoch>`` folder.
        only: check only the files under this item (e.g. ``"meta"``).

    Raises:
        CheckpointError: no manifest, or a file missing, added or changed; the
            message names the file.
    """
    folder = Path(checkpoint)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"checkpoint {folder} has no {MANIFEST}, so its files cannot be verified. A checkpoint of "
            f"this ntkd always has one; one written by an older ntkd can be adopted, once you trust it, "
            f"with ntkd.checkpoints.write_manifest({str(folder)!r})."
        )
    expected = {}
    try:
        lines = manifest.read_text().splitlines()
    except UnicodeDecodeError:
        lines = [""]
    for line in lines:
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(
                f"checkpoint file {manifest} is corrupt (line {line[:80]!r} is not 'SHA-256  file'), so the "
                "checkpoint cannot be verified. " + _remedy(folder)
            )
        expected[name] = digest
    actual = _file_digests(folder)
    if only is not None:
        keep = lambda names: {n for n in names if n.startswith(only + "/")}
        names_e, names_a = keep(expected), keep(actual)
    else:
        names_e, names_a = set(expected), set(actual)
    for name in sorted(names_e | names_a):
        if name not in actual:
            problem = "is missing"
        elif name not in expected:
            problem = "is not in its manifest"
        elif actual[name] != expected[name]:
            problem = "does not match its SHA-256 in the manifest (the file is corrupt)"
        else:
            continue
        raise CheckpointError(f"checkpoint file {folder / name} {problem}. " + _remedy(folder))


def save_checkpoint(
    run_dir: str | os.PathLike,
    epoch: int,
    variables: dict,
    *,
    opt_state: Any = None,
    metadata: dict | None = None,
) -> Path:
    """Saves one checkpoint atomically, with its manifest; overwrites one of the same epoch.

    Args:
        run_dir: the run folder.
        epoch: epoch number (0 = initialisation).
        variables: model variables.
        opt_state: optimiser state (saved when given, needed to resume).
        metadata: JSON-serialisable metadata; ``epoch`` is added.

    Returns:
        The checkpoint folder.
    """
    variables = jax.device_get(variables)
    items = {
        "variables": ocp.args.StandardSave(variables),
        "meta": ocp.args.JsonSave(dict(metadata or {}, epoch=int(epoch))),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(jax.device_get(opt_state))
    final = checkpoint_dir(run_dir) / str(int(epoch))
    staging = final.parent.parent / _STAGING
    staging.mkdir(parents=True, exist_ok=True)
    work = staging / f"{int(epoch)}-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    _checkpointer().save(work, args=ocp.args.Composite(**items))
    write_manifest(work)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = staging / f"replaced-{int(epoch)}-{os.getpid()}"
        os.rename(final, old)
        os.rename(work, final)
        shutil.rmtree(old)
    else:
        os.rename(work, final)
    with contextlib.suppress(OSError):  # another save may be using it
        staging.rmdir()
    return final


def remove_stale_files(run_dir: str | os.PathLike) -> None:
    """Deletes what interrupted saves left: staging folders, Orbax tmp folders, ``.*.tmp`` files.

    Only call it while holding the run folder's lock (:mod:`ntkd._lock`).
    """
    run_dir = Path(run_dir).expanduser()
    shutil.rmtree(run_dir / _STAGING, ignore_errors=True)
    ckdir = checkpoint_dir(run_dir)
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if ".orbax-checkpoint-tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    remove_stale_tmp(run_dir)


def list_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Epochs with a checkpoint in ``run_dir``, ascending (empty if none)."""
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return []
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit() and p.is_dir())


def _check_epoch(run_dir: Path, epoch: int | None) -> int:
    if not run_dir.exists():
        raise CheckpointError(
            f"run folder {run_dir} does not exist; pass the folder written by "
            "`ntkd train-teacher`/`ntkd distill` (its --out)"
        )
    epochs = list_epochs(run_dir)
    if not epochs:
        raise CheckpointError(
            f"no checkpoints in {checkpoint_dir(run_dir)}; train the run first "
            "(`ntkd train-teacher --out ...`)"
        )
    if epoch is None:
        return epochs[-1]
    if epoch not in epochs:
        raise CheckpointError(
            f"no checkpoint for epoch {epoch} in {run_dir}; saved epochs: {epochs}"
        )
    return int(epoch)


def _restore(path: Path, items: dict) -> dict:
    try:
        return _checkpointer().restore(path, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:300]}) although its files match "
            "its manifest: it was probably written by another version of ntkd/Orbax or for another model "
            "or optimiser."
        ) from e


def read_metadata(run_dir: str | os.PathLike, epoch: int | None = None) -> dict:
    """The JSON metadata of a checkpoint (verified against its manifest), without loading arrays."""
    run_dir = Path(run_dir).expanduser()
    epoch = _check_epoch(run_dir, epoch)
    path = checkpoint_dir(run_dir) / str(epoch)
    verify_checkpoint(path, only="meta")
    return dict(_restore(path, {"meta": ocp.args.JsonRestore()})["meta"])


def load_checkpoint(
    run_dir: str | os.PathLike,
    epoch: int | None = None,
    *,
    opt_state_target: Any = None,
    variables_target: Any = None,
) -> Checkpoint:
    """Restores a checkpoint after checking every file against its manifest.

    Args:
        run_dir: the run folder.
        epoch: which epoch; None means the latest.
        opt_state_target: a template optimiser state (e.g. ``optimizer.init(params)``);
            when given, the optimiser state is restored into its structure.
        variables_target: optional template for the variables' structure and dtypes.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        CheckpointError: no checkpoint, unknown epoch, a file that does not match
            the manifest (named in the message), or unreadable files.
    """
    run_dir = Path(run_dir).expanduser()
    epoch = _check_epoch(run_dir, epoch)
    items = {
        "variables": ocp.args.StandardRestore(variables_target),
        "meta": ocp.args.JsonRestore(),
    }
    if opt_state_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(jax.device_get(opt_state_target))
    path = checkpoint_dir(run_dir) / str(epoch)
    verify_checkpoint(path)
    restored = _restore(path, items)
    variables = restored["variables"]
    if not isinstance(variables, dict) or "params" not in variables:
        raise CheckpointError(f"checkpoint {path} holds no 'params'; it was not written by ntkd")
    return Checkpoint(int(epoch), variables, restored.get("opt_state"), dict(restored["meta"]))


def restore_model(
    run_dir: str | os.PathLike, epoch: int | None = None
) -> tuple[flax.linen.Module, dict, dict]:
    """Rebuilds the model of a run and restores its variables.

    Returns:
        ``(model, variables, metadata)`` where ``model.apply(variables, x)`` gives logits.
    """
    from ntkd.models import get_model

    ckpt = load_checkpoint(run_dir, epoch)
    meta = ckpt.metadata
    try:
        model = get_model(meta["model"], meta["num_classes"], **meta.get("model_options", {}))
    except KeyError as e:
        raise CheckpointError(
            f"checkpoint metadata in {run_dir} lacks {e}; it was not written by ntkd"
        ) from e
    variables = jax.tree_util.tree_map(np.asarray, ckpt.variables)
    return model, variables, meta
