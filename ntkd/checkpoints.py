"""Orbax-backed checkpoints with metadata, written atomically.

A run folder holds ``checkpoints/<epoch>/`` (one Orbax checkpoint per saved
epoch, epoch 0 = initialisation). Each checkpoint has three items:

- ``variables``: the model variables (``params`` and, for BatchNorm models,
  ``batch_stats``);
- ``opt_state``: the optimiser state, so a run can resume exactly;
- ``meta``: JSON metadata — epoch, model name and options, dataset, metrics.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so an interrupted save never leaves a half-written checkpoint that
looks finished.

Example:
    >>> save_checkpoint("runs/t", 3, variables, metadata={"model": "mlp", ...})
    >>> list_epochs("runs/t")
    [3]
    >>> model, variables, meta = restore_model("runs/t", epoch=3)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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


def _manager(run_dir, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options,
                                 item_names=("variables", "opt_state", "meta"))


def save_checkpoint(run_dir: str | os.PathLike, epoch: int, variables: dict, *,
                    opt_state: Any = None, metadata: dict | None = None) -> Path:
    """Saves one checkpoint atomically; overwrites an existing one of the same epoch.

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
    items = {"variables": ocp.args.StandardSave(variables),
             "meta": ocp.args.JsonSave(dict(metadata or {}, epoch=int(epoch)))}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(jax.device_get(opt_state))
    with _manager(run_dir, create=True) as mngr:
        if epoch in mngr.all_steps():
            mngr.delete(epoch)
        mngr.save(int(epoch), args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
    return checkpoint_dir(run_dir) / str(epoch)


def list_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Epochs with a complete checkpoint in ``run_dir``, ascending (empty if none)."""
    if not checkpoint_dir(run_dir).is_dir():
        return []
    with _manager(run_dir, create=False) as mngr:
        return sorted(int(s) for s in mngr.all_steps())


def load_checkpoint(run_dir: str | os.PathLike, epoch: int | None = None, *,
                    opt_state_target: Any = None, variables_target: Any = None) -> Checkpoint:
    """Restores a checkpoint.

    Args:
        run_dir: the run folder.
        epoch: which epoch; None means the latest.
        opt_state_target: a template optimiser state (e.g. ``optimizer.init(params)``);
            when given, the optimiser state is restored into its structure.
        variables_target: optional template for the variables' structure and dtypes.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        CheckpointError: no checkpoint, unknown epoch, or unreadable files.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the folder written by "
                              "`ntkd train-teacher`/`ntkd distill` (its --out)")
    epochs = list_epochs(run_dir)
    if not epochs:
        raise CheckpointError(f"no checkpoints in {checkpoint_dir(run_dir)}; train the run first "
                              "(`ntkd train-teacher --out ...`)")
    if epoch is None:
        epoch = epochs[-1]
    if epoch not in epochs:
        raise CheckpointError(f"no checkpoint for epoch {epoch} in {run_dir}; saved epochs: {epochs}")
    items = {"variables": ocp.args.StandardRestore(variables_target), "meta": ocp.args.JsonRestore()}
    if opt_state_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(jax.device_get(opt_state_target))
    path = checkpoint_dir(run_dir) / str(epoch)
    try:
        with _manager(run_dir, create=False) as mngr:
            restored = mngr.restore(int(epoch), args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for damaged files
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:300]}). It is probably "
            f"corrupt: delete that folder and rerun; training resumes from the previous checkpoint.") from e
    variables = restored["variables"]
    if not isinstance(variables, dict) or "params" not in variables:
        raise CheckpointError(f"checkpoint {path} holds no 'params'; it was not written by ntkd")
    return Checkpoint(int(epoch), variables, restored.get("opt_state"), dict(restored["meta"]))


def restore_model(run_dir: str | os.PathLike, epoch: int | None = None):
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
        raise CheckpointError(f"checkpoint metadata in {run_dir} lacks {e}; it was not written by ntkd") from e
    variables = jax.tree_util.tree_map(np.asarray, ckpt.variables)
    return model, variables, meta
