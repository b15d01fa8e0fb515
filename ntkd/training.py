"""Losses, optimisers, and teacher/student training (docs/definitions.md#training-regimes).

Regimes for students (``TrainConfig.regime``):

- ``none``: cross-entropy on labels (no KD).
- ``offline``: τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) against the final teacher.
- ``early_stopped``: the same against the teacher checkpoint ``teacher_epoch``.
- ``online``: at student epoch e (1-based) the target is the teacher checkpoint
  of epoch e, or the latest saved one not after e (:func:`online_teacher_epoch`).

``alpha`` mixes KD with the label loss: ``alpha·KD + (1 − alpha)·CE``.

A run folder (``workdir``) holds ``config.json``, ``history.json`` (one row per
epoch) and ``checkpoints/<epoch>/``. Rerunning the same command on a folder
with an interrupted run resumes from its latest checkpoint; data order and
augmentation depend only on (seed, epoch), so the result equals an
uninterrupted run. Each checkpoint records the configuration that trained it
(and its digest) and the history up to its epoch: a resume under another
configuration is refused even when config.json was deleted, and config.json
and history.json are rebuilt from the latest checkpoint when missing, empty
or behind. A run holds the folder's lock (:mod:`ntkd._lock`) while it writes,
and writes nothing there before all inputs are checked. The optimiser
settings of a run can be changed part-way (e.g. after a divergence) with
``amend_optimizer=True``; ``config_history.json`` records each change.

Training is data-parallel over all local JAX devices: batches are sharded
along a one-axis ``jax.sharding.Mesh`` and parameters replicated; XLA inserts
the gradient all-reduce.

Example:
    >>> cfg = TrainConfig(model="cnn1d", epochs=60)
    >>> teacher = train_teacher(cfg, "runs/teacher")
    >>> scfg = TrainConfig(model="mlp", regime="online", teacher_dir="runs/teacher")
    >>> student = train_student(scfg, "runs/online")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import flax.errors
import flax.linen
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from ntkd import checkpoints as ckpt_lib
from ntkd import metrics
from ntkd._io import read_json, write_json
from ntkd._lock import lock_folder
from ntkd.data import Dataset, iterate_batches, load_dataset
from ntkd.data import augment as augment_batch
from ntkd.models import get_model, init_variables

REGIMES = ("none", "offline", "early_stopped", "online")

# Settings that ``amend_optimizer=True`` may change in a run that has checkpoints.
AMENDABLE = ("optimizer", "learning_rate", "schedule", "momentum", "weight_decay", "warmup_epochs")


class DivergenceError(FloatingPointError):
    """The training loss became NaN or inf; the message says how to continue."""


# ----------------------------------------------------------------------------- losses


def softmax_cross_entropy(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Mean cross-entropy of ``logits`` (n, k) against integer labels (n,) or
    probability targets (n, k)."""
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if targets.ndim == 1:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets {targets.shape} must be labels ({logits.shape[0]},) or "
            f"probabilities {logits.shape}"
        )
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), -1))


def kd_loss(
    student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: float = 1.0
) -> jax.Array:
    """Hinton's distillation loss τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), mean over examples.

    Its gradient w.r.t. the student logits is τ·(softmax(z_S/τ) − softmax(z_T/τ)) / n.
    """
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits)) / temperature
    s = jnp.asarray(student_logits) / temperature
    log_pt = jax.nn.log_softmax(t)
    return temperature**2 * jnp.mean(
        jnp.sum(jnp.exp(log_pt) * (log_pt - jax.nn.log_softmax(s)), -1)
    )


def distillation_loss(
    student_logits, labels, teacher_logits=None, *, temperature: float = 1.0, alpha: float = 1.0
) -> jax.Array:
    """``alpha``·KD + (1 − ``alpha``)·CE; plain CE when ``teacher_logits`` is None."""
    ce = softmax_cross_entropy(student_logits, labels)
    if teacher_logits is None:
        return ce
    return alpha * kd_loss(student_logits, teacher_logits, temperature) + (1.0 - alpha) * ce


# ----------------------------------------------------------------------------- optimisers


def make_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    *,
    total_steps: int,
    schedule: str = "cosine",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> optax.GradientTransformation:
    """An Optax optimiser with a learning-rate schedule.

    Args:
        name: ``"sgd"`` (with Nesterov-free momentum) or ``"adam"`` (AdamW when
            ``weight_decay`` > 0).
        learning_rate: peak learning rate.
        total_steps: number of optimisation steps (sets the decay horizon).
        schedule: ``"constant"``, ``"cosine"`` or ``"step"`` (×0.1 at 50% and 75%).
        momentum: SGD momentum.
        weight_decay: decoupled weight decay.
        warmup_steps: linear warm-up steps.
    """
    if schedule == "constant":
        lr = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    elif schedule == "step":
        lr = optax.piecewise_constant_schedule(
            learning_rate, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1}
        )
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose constant, cosine or step")
    if warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), lr], [warmup_steps]
        )
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum or None)
        )
    if name == "adam":
        return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adam")


# ----------------------------------------------------------------------------- config and state


def _field(default, help: str, *, flags=(), choices=None, positive=False, group="training"):
    """A TrainConfig field whose metadata the command line turns into a flag (``ntkd.cli``).

    ``flags`` replaces the default ``--field-name``; ``positive`` makes the flag refuse
    values below 1 (ints) or not > 0 (floats); ``group`` is the flag's section in ``--help``
    (``distillation`` fields are flags of ``ntkd distill`` only).
    """
    metadata = {"help": help, "flags": tuple(flags), "choices": choices, "positive": positive}
    metadata["group"] = group
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    Attributes:
        dataset, dataset_options, data_dir, data_seed: passed to :func:`ntkd.data.load_dataset`
            (``data_seed`` fixes generated data and splits; it is separate from ``seed`` so
            students of several seeds see the teacher's data).
        model, model_options: passed to :func:`ntkd.models.get_model`.
        epochs, batch_size: training length and global batch size (divisible by
            the number of devices).
        optimizer, learning_rate, schedule, momentum, weight_decay, warmup_epochs:
            see :func:`make_optimizer`.
        augment: random crop + flip for images, random shift + noise for 1-D signals
            (:func:`ntkd.data.augment`).
        seed: initialisation, batch order and augmentation.
        checkpoint_every: save every N epochs (epoch 0 and the last are always saved).
        checkpoint_epochs: further epochs to save (e.g. a log grid 1, 2, 4, 8, … that
            catches the early transient); None: only ``checkpoint_every``'s.
        regime: ``none``, ``offline``, ``early_stopped`` or ``online`` (students).
        teacher_dir: the teacher's run folder (KD regimes); a relative path is taken
            relative to the student's ``workdir``, so a study folder can be moved.
        teacher_epoch: checkpoint for ``early_stopped``.
        temperature, alpha: KD temperature τ and weight of the KD term.
        eval_batch_size: batch size for evaluation passes.
    """

    dataset: str = _field(
        "mnist1d", "mnist1d, digits, cifar10, cifar100, tinyimagenet, gaussian", group="data"
    )
    dataset_options: dict = _field(
        dict, "loader options, e.g. '{\"num_samples\": 2000}'", group="data"
    )
    data_dir: str | None = _field(
        None, "folder with local archives (CIFAR, Tiny-ImageNet)", group="data"
    )
    data_seed: int = _field(0, "seed of generated data and splits", group="data")
    model: str = _field("cnn1d", "mlp, cnn1d, lenet5, resnet20, resnet56, resnet110")
    model_options: dict = _field(
        dict, "model options, e.g. '{\"widths\": [512, 512]}' or '{\"width\": 8}'"
    )
    epochs: int = _field(60, "training epochs", positive=True)
    batch_size: int = _field(128, "global batch size", positive=True)
    optimizer: str = _field("adam", "optimiser", choices=("adam", "sgd"))
    learning_rate: float = _field(1e-2, "peak learning rate (> 0)", flags=("--lr",), positive=True)
    schedule: str = _field(
        "cosine", "learning-rate schedule", choices=("constant", "cosine", "step")
    )
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(0.0, "decoupled weight decay")
    warmup_epochs: int = _field(0, "linear warm-up epochs")
    augment: bool = _field(
        False, "random crop + flip (images) or random shift + noise (1-D signals)"
    )
    seed: int = _field(0, "initialisation, batch order and augmentation")
    checkpoint_every: int = _field(1, "save every N epochs (0 and last always)", positive=True)
    checkpoint_epochs: list | None = _field(None, "further epochs to save, e.g. 1 2 4 8")
    regime: str = _field("none", "student regime", choices=REGIMES, group="distillation")
    teacher_dir: str | None = _field(
        None, "the teacher's run folder (its --out)", flags=("--teacher",), group="distillation"
    )
    teacher_epoch: int | None = _field(
        None, "checkpoint for --regime early_stopped", group="distillation"
    )
    temperature: float = _field(
        1.0, "KD temperature tau", flags=("--temperature", "-T"), group="distillation"
    )
    alpha: float = _field(1.0, "weight of the KD term (1 - alpha on labels)", group="distillation")
    eval_batch_size: int = _field(1000, "batch size of evaluation passes", positive=True)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def digest(self) -> str:
        """A short SHA-256 of the configuration (recorded in every checkpoint)."""
        return config_digest(self.to_dict())

    def validate(self) -> None:
        for name in ("dataset_options", "model_options"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(
                    f"{name} must be a JSON object (a dict) of option names and values, got "
                    f"{value!r}; e.g. '{{\"widths\": [64, 64]}}' rather than '[64, 64]'"
                )
        if not (
            isinstance(self.learning_rate, (int, float))
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise ValueError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate!r} (--lr)"
            )
        if not (self.momentum >= 0 and self.weight_decay >= 0 and self.warmup_epochs >= 0):
            raise ValueError(
                f"momentum, weight_decay and warmup_epochs must be >= 0, got {self.momentum}, "
                f"{self.weight_decay}, {self.warmup_epochs}"
            )
        if self.optimizer not in ("sgd", "adam") or self.schedule not in (
            "constant",
            "cosine",
            "step",
        ):
            raise ValueError(
                f"unknown optimizer {self.optimizer!r} or schedule {self.schedule!r}; optimizers: sgd, "
                "adam; schedules: constant, cosine, step"
            )
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose one of {', '.join(REGIMES)}")
        if self.regime != "none" and not self.teacher_dir:
            raise ValueError(f"regime {self.regime!r} needs teacher_dir (--teacher RUN_DIR)")
        if self.regime == "early_stopped" and self.teacher_epoch is None:
            raise ValueError("regime 'early_stopped' needs teacher_epoch (--teacher-epoch N)")
        if (
            self.epochs < 1
            or self.batch_size < 1
            or self.checkpoint_every < 1
            or self.eval_batch_size < 1
        ):
            raise ValueError(
                f"epochs, batch_size, checkpoint_every, eval_batch_size must be >= 1, got "
                f"{self.epochs}, {self.batch_size}, {self.checkpoint_every}, {self.eval_batch_size}"
            )
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"need temperature > 0 and 0 <= alpha <= 1, got {self.temperature}, {self.alpha}"
            )


def config_digest(config: dict) -> str:
    """A short SHA-256 of a configuration dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@flax.struct.dataclass
class TrainState:
    """Model variables and optimiser state; a pytree."""

    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        v = {"params": self.params}
        if self.batch_stats is not None:
            v["batch_stats"] = self.batch_stats
        return v


# ----------------------------------------------------------------------------- evaluation


def predict(model, variables: dict, x: ArrayLike, *, batch_size: int = 1000) -> np.ndarray:
    """Logits (n, k) of ``model`` on ``x`` in eval mode, computed in fixed-size
    batches (the last one padded) so only one shape is ever compiled."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have a batch axis, got shape {x.shape}")
    fn = _predict_fn(model)
    n = len(x)
    b = min(batch_size, n)
    out = []
    for i in range(0, n, b):
        chunk = x[i : i + b]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        try:
            out.append(np.asarray(fn(variables, chunk))[: b - pad])
        except flax.errors.ScopeParamShapeError as e:
            raise ValueError(
                f"inputs of example shape {tuple(x.shape[1:])} do not fit the model's parameters "
                f"({str(e).splitlines()[0][:200]}); pass inputs shaped like its training data (the "
                "checkpoint metadata's 'input_shape')"
            ) from None
    return np.concatenate(out)


@functools.lru_cache(maxsize=64)
def _predict_fn(model):
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


# ----------------------------------------------------------------------------- steps


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _make_train_step(
    model, tx, *, temperature: float, alpha: float, augment: bool, teacher_model=None
):
    """One optimisation step: (state, x, y, teacher_vars, key) -> (state, loss).

    ``y`` holds integer labels, or (n, k) probabilities for fixed soft targets
    (see :func:`fit`).
    """

    def step(state: TrainState, x, y, teacher_variables, key):
        if augment:
            x = augment_batch(key, x)
        teacher_logits = None
        if teacher_model is not None:
            teacher_logits = teacher_model.apply(teacher_variables, x, train=False)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats is not None:
                variables["batch_stats"] = state.batch_stats
                logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
                new_bs = updates["batch_stats"]
            else:
                logits, new_bs = model.apply(variables, x, train=True), None
            if y.ndim == 2:
                loss = softmax_cross_entropy(logits, y)
            else:
                loss = distillation_loss(
                    logits, y, teacher_logits, temperature=temperature, alpha=alpha
                )
            return loss, new_bs

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, new_bs, opt_state), loss

    return step


def _make_epoch_fn(step, batch_sharding: NamedSharding):
    """A jitted epoch: scans ``step`` over the batches' index rows, with the
    whole (replicated) training set on device, so an epoch is one dispatch.

    Returns:
        ``epoch_fn(state, x_all, y_all, batches (steps, bs), teacher_vars, key) -> (state, losses)``.
    """

    def epoch_fn(state, x_all, y_all, batches, teacher_variables, key):
        def body(state, inputs):
            i, idx = inputs
            x = jax.lax.with_sharding_constraint(x_all[idx], batch_sharding)
            y = jax.lax.with_sharding_constraint(y_all[idx], batch_sharding)
            return step(state, x, y, teacher_variables, jax.random.fold_in(key, i))

        return jax.lax.scan(body, state, (jnp.arange(batches.shape[0]), batches))

    return jax.jit(epoch_fn, donate_argnums=(0,))


def _epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """Index rows (steps, bs) of one epoch; bs is rounded down to a multiple of the device count."""
    n_dev = len(jax.devices())
    bs = min(batch_size, n)
    bs -= bs % n_dev
    if bs == 0:
        raise ValueError(
            f"batch size {batch_size} is smaller than the {n_dev} devices; use a batch size "
            f"that is a multiple of {n_dev}"
        )
    return np.stack(list(iterate_batches(n, bs, seed=seed, epoch=epoch)))


def _check_inputs(x: np.ndarray, input_shape: Sequence[int], what: str) -> None:
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"{what} has example shape {tuple(x.shape[1:])} but the model was built for "
            f"{tuple(input_shape)}; check --dataset / the teacher's dataset"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or inf values; clean the data before training")


def _init_state(model, tx, key, input_shape) -> TrainState:
    variables = init_variables(model, key, input_shape)
    return TrainState(
        variables["params"], variables.get("batch_stats"), tx.init(variables["params"])
    )


# ----------------------------------------------------------------------------- teacher schedule


def online_teacher_epoch(student_epoch: int, saved_epochs: Iterable[int]) -> int:
    """Teacher checkpoint used at (1-based) student epoch e in online KD:
    the latest saved teacher epoch not after e (docs/definitions.md#training-regimes).

    Raises:
        ValueError: when no saved epoch is ≤ e.
    """
    saved = sorted(saved_epochs)
    eligible = [s for s in saved if s <= student_epoch]
    if not eligible:
        raise ValueError(
            f"no teacher checkpoint at or before epoch {student_epoch} (saved: {saved}); "
            "save teacher checkpoints from epoch 0 or 1 (checkpoint_every)"
        )
    return eligible[-1]


# ----------------------------------------------------------------------------- training


def _epoch_row(model, state, ds, cfg, ref_train, ref_test) -> dict:
    variables = state.variables
    z_train = predict(model, variables, ds.x_train, batch_size=cfg.eval_batch_size)
    z_test = predict(model, variables, ds.x_test, batch_size=cfg.eval_batch_size)
    row = {
        "train_acc": float(metrics.accuracy(z_train, ds.y_train)),
        "test_acc": float(metrics.accuracy(z_test, ds.y_test)),
    }
    if ref_train is not None:
        row["train_fidelity"] = float(metrics.fidelity(z_train, ref_train))
        row["test_fidelity"] = float(metrics.fidelity(z_test, ref_test))
        row["test_kl"] = float(metrics.mean_kl(ref_test, z_test))
        ref_labels = np.argmax(ref_train, -1)
    else:
        ref_labels = ds.y_train
    m = metrics.margin_summary(metrics.margins(z_train, ref_labels))
    row.update({f"margin_{k}": v for k, v in m.items()})
    return row


def _optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    return make_optimizer(
        cfg.optimizer,
        cfg.learning_rate,
        total_steps=cfg.epochs * steps_per_epoch,
        schedule=cfg.schedule,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
    )


def train(
    cfg: TrainConfig,
    workdir: str | os.PathLike,
    *,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    amend_optimizer: bool = False,
) -> dict:
    """Trains a teacher (``regime="none"``) or a student, resuming if possible.

    Args:
        cfg: the run's configuration.
        workdir: run folder; created if missing. If it holds an interrupted run with
            the same configuration, training resumes from its latest checkpoint.
        dataset: an already loaded dataset (else loaded from ``cfg``).
        progress: show a progress bar.
        on_epoch_end: called as ``on_epoch_end(epoch, history_row)`` after each epoch
            (and after its checkpoint, on checkpoint epochs); raising stops training,
            e.g. for early stopping, and a rerun resumes from the latest checkpoint.
        amend_optimizer: continue a run whose checkpoints were trained with other
            optimiser settings (only the :data:`AMENDABLE` fields may differ) from its
            latest checkpoint under ``cfg``; the change is appended to
            ``workdir/config_history.json``. When the optimiser state no longer fits
            (e.g. another ``optimizer``) it starts afresh, and that is recorded too.

    Returns:
        ``{"variables", "history", "model", "workdir"}``.

    Raises:
        FolderInUseError: another process is writing ``workdir``.
        DivergenceError: the loss became NaN or inf (checkpoints before it are kept).
        ValueError: a bad configuration or input, or ``workdir`` holds a run of
            another configuration.
    """
    cfg.validate()
    workdir = Path(workdir).expanduser()
    ds = (
        dataset
        if dataset is not None
        else load_dataset(
            cfg.dataset, data_dir=cfg.data_dir, seed=cfg.data_seed, **cfg.dataset_options
        )
    )
    model = get_model(cfg.model, ds.num_classes, **cfg.model_options)
    _check_inputs(ds.x_train, ds.input_shape, "training inputs")
    _check_inputs(ds.x_test, ds.input_shape, "test inputs")
    if cfg.augment and ds.x_train.ndim not in (3, 4):
        raise ValueError(
            f"augment=True needs images (n, H, W, C) or signals (n, length, C); {ds.name} inputs "
            f"have shape {ds.x_train.shape}"
        )

    steps_per_epoch = max(len(ds.x_train) // min(cfg.batch_size, len(ds.x_train)), 1)
    tx = _optimizer(cfg, steps_per_epoch)

    teacher = _Teacher(cfg, ds, workdir) if cfg.regime != "none" else None
    ref_train, ref_test = teacher.reference_logits if teacher else (None, None)
    step = _make_train_step(
        model,
        tx,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        augment=cfg.augment,
        teacher_model=teacher.model if teacher else None,
    )
    state = _init_state(model, tx, jax.random.key(cfg.seed), ds.input_shape)

    # Every input is checked by now: only from here on is anything written to workdir.
    with lock_folder(workdir):
        ckpt_lib.remove_stale_files(workdir)
        saved = ckpt_lib.list_epochs(workdir)
        trained = ckpt_lib.read_metadata(workdir, saved[-1]).get("config") if saved else None
        keep_opt_state = trained is None or _same_optimizer_state(
            TrainConfig.from_dict(trained), tx, state, steps_per_epoch
        )
        _claim_workdir(
            workdir,
            cfg,
            trained,
            saved[-1] if saved else None,
            amend=amend_optimizer,
            keep_opt_state=keep_opt_state,
        )
        meta = {
            "model": cfg.model,
            "model_options": cfg.model_options,
            "num_classes": ds.num_classes,
            "input_shape": list(ds.input_shape),
            "dataset": cfg.dataset,
            "dataset_options": cfg.dataset_options,
            "data_seed": cfg.data_seed,
            "regime": cfg.regime,
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "config_digest": cfg.digest(),
        }

        def save(epoch: int, state: TrainState, history: list[dict]) -> None:
            # The checkpoint carries the history up to its epoch, so history.json can always be rebuilt.
            ckpt_lib.save_checkpoint(
                workdir,
                epoch,
                state.variables,
                opt_state=state.opt_state,
                metadata=dict(meta, metrics=history[-1], history=history),
            )
            write_json(workdir / "history.json", history)

        if saved:
            start = saved[-1]
            restored = ckpt_lib.load_checkpoint(
                workdir,
                start,
                variables_target=state.variables,
                opt_state_target=state.opt_state if keep_opt_state else None,
            )
            v = restored.variables
            state = TrainState(
                v["params"],
                v.get("batch_stats"),
                restored.opt_state if keep_opt_state else state.opt_state,
            )
            history = _history_at(workdir, restored.metadata, start)
            write_json(workdir / "history.json", history)
        else:
            start = 0
            history = [
                dict(epoch=0, loss=None, **_epoch_row(model, state, ds, cfg, ref_train, ref_test))
            ]
            save(0, state, history)
        last_saved = start

        mesh = _mesh()
        data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        state = jax.device_put(state, replicated)
        epoch_fn = _make_epoch_fn(step, data_sharding)
        x_all, y_all = jax.device_put((ds.x_train, ds.y_train), replicated)
        bar = tqdm(
            range(start + 1, cfg.epochs + 1),
            desc=f"{cfg.regime if teacher else 'train'} {cfg.model}",
            disable=not progress,
            initial=start,
            total=cfg.epochs,
            leave=False,
        )
        for epoch in bar:
            t0 = time.perf_counter()
            t_vars, t_epoch = teacher.variables_for(epoch) if teacher else (None, None)
            t_vars = jax.device_put(t_vars, replicated) if t_vars is not None else None
            batches = _epoch_batches(len(ds.x_train), cfg.batch_size, seed=cfg.seed, epoch=epoch)
            state, losses = epoch_fn(
                state,
                x_all,
                y_all,
                batches,
                t_vars,
                jax.random.fold_in(jax.random.key(cfg.seed), epoch),
            )
            loss = float(np.mean(jax.device_get(losses)))
            if not np.isfinite(loss):
                raise DivergenceError(_divergence_message(cfg, workdir, loss, epoch, last_saved))
            row = {
                "epoch": epoch,
                "loss": loss,
                **_epoch_row(model, state, ds, cfg, ref_train, ref_test),
                "seconds": time.perf_counter() - t0,
            }
            if t_epoch is not None:
                row["teacher_epoch"] = t_epoch
            history.append(row)
            if (
                epoch % cfg.checkpoint_every == 0
                or epoch == cfg.epochs
                or epoch in (cfg.checkpoint_epochs or ())
            ):
                save(epoch, state, history)
                last_saved = epoch
            bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{row['test_acc']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        write_json(workdir / "history.json", history)
    return {
        "variables": jax.device_get(state.variables),
        "history": history,
        "model": model,
        "workdir": workdir,
    }


def _divergence_message(
    cfg: TrainConfig, workdir: Path, loss: float, epoch: int, last_saved: int
) -> str:
    return (
        f"training diverged: the loss became {loss} at epoch {epoch} (optimizer {cfg.optimizer}, learning "
        f"rate {cfg.learning_rate:g}); nothing after the checkpoint of epoch {last_saved} was saved. To continue "
        f"from that checkpoint with a smaller learning rate, rerun the same command on the same --out with "
        f"e.g. --lr {cfg.learning_rate / 10:g} --amend-optimizer (in Python: train(dataclasses.replace(cfg, "
        f"learning_rate=...), workdir, amend_optimizer=True)); the change is recorded in "
        f"{workdir / 'config_history.json'}. Or start afresh with another --out."
    )


def _same_optimizer_state(
    trained: TrainConfig, tx, state: TrainState, steps_per_epoch: int
) -> bool:
    """Whether the optimiser of ``trained`` has a state of the same structure and shapes as ``tx``'s."""
    old = jax.eval_shape(_optimizer(trained, steps_per_epoch).init, state.params)
    new = jax.eval_shape(tx.init, state.params)
    if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new):
        return False
    return all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new))
    )


def train_teacher(cfg: TrainConfig, workdir: str | os.PathLike, **kwargs) -> dict:
    """Trains a teacher with cross-entropy, saving checkpoints along training.
    See :func:`train` for arguments and return value."""
    if cfg.regime != "none":
        raise ValueError(f"a teacher is trained with regime 'none', got {cfg.regime!r}")
    return train(cfg, workdir, **kwargs)


def train_student(cfg: TrainConfig, workdir: str | os.PathLike, **kwargs) -> dict:
    """Trains a student under ``cfg.regime`` (none/offline/early_stopped/online).
    See :func:`train` for arguments and return value."""
    return train(cfg, workdir, **kwargs)


class _Teacher:
    """Teacher checkpoints of a KD run: which variables to distil from at each epoch."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, workdir: Path):
        # Lexically normalised: the student's workdir need not exist yet (nothing is written before
        # the inputs are checked), and "workdir/../teacher" cannot be resolved through a missing folder.
        self.dir = Path(os.path.normpath(workdir / Path(cfg.teacher_dir).expanduser()))
        self.epochs = ckpt_lib.list_epochs(self.dir)
        if not self.epochs:
            raise ckpt_lib.CheckpointError(
                f"teacher folder {self.dir} has no checkpoints; train it with "
                f"`ntkd train-teacher --out {self.dir}` first"
            )
        self.model, final_vars, meta = ckpt_lib.restore_model(self.dir)
        planned = (meta.get("config") or {}).get("epochs")
        if planned is None and (self.dir / "config.json").is_file():  # checkpoints of an older ntkd
            planned = read_json(self.dir / "config.json").get("epochs")
        if planned is not None and self.epochs[-1] < planned:
            raise ckpt_lib.CheckpointError(
                f"teacher run {self.dir} is unfinished: it was configured for {planned} epochs but its latest "
                f"checkpoint is epoch {self.epochs[-1]}, so its final teacher does not exist. Finish it first by "
                f"rerunning its `ntkd train-teacher ... --out {self.dir}` command (it resumes)."
            )
        if tuple(meta["input_shape"]) != ds.input_shape or meta["num_classes"] != ds.num_classes:
            raise ValueError(
                f"teacher in {self.dir} was trained on inputs {tuple(meta['input_shape'])} with "
                f"{meta['num_classes']} classes (dataset {meta['dataset']!r}) but the student data "
                f"has {ds.input_shape} and {ds.num_classes} classes"
            )
        mine = {
            "dataset": cfg.dataset,
            "dataset_options": cfg.dataset_options,
            "data_seed": cfg.data_seed,
        }
        diff = {k: (meta[k], v) for k, v in mine.items() if k in meta and meta[k] != v}
        if diff:
            warnings.warn(
                f"the student's data differ from those of teacher {self.dir}: {diff} (teacher, "
                "student); the teacher is distilled on other examples than it was trained on. Pass "
                "the teacher's --dataset/--dataset-options unless that is what you want.",
                stacklevel=4,
            )
        self.regime, self.cfg = cfg.regime, cfg
        self._cache = {self.epochs[-1]: final_vars}
        if cfg.regime == "early_stopped" and cfg.teacher_epoch not in self.epochs:
            raise ValueError(
                f"teacher_epoch {cfg.teacher_epoch} not saved in {self.dir}; saved: {self.epochs}"
            )
        self.reference_logits = (
            predict(self.model, final_vars, ds.x_train, batch_size=cfg.eval_batch_size),
            predict(self.model, final_vars, ds.x_test, batch_size=cfg.eval_batch_size),
        )

    def _load(self, epoch: int):
        if epoch not in self._cache:
            self._cache = {self.epochs[-1]: self._cache[self.epochs[-1]]}
            self._cache[epoch] = ckpt_lib.restore_model(self.dir, epoch)[1]
        return self._cache[epoch]

    def variables_for(self, student_epoch: int):
        if self.regime == "offline":
            e = self.epochs[-1]
        elif self.regime == "early_stopped":
            e = self.cfg.teacher_epoch
        else:
            e = online_teacher_epoch(student_epoch, self.epochs)
        return self._load(e), e


def _claim_workdir(
    workdir: Path,
    cfg: TrainConfig,
    trained: dict | None,
    latest: int | None,
    *,
    amend: bool,
    keep_opt_state: bool,
) -> None:
    """Checks that ``cfg`` may continue the run in ``workdir`` and (re)writes its config.json.

    ``trained`` is the configuration recorded in the latest checkpoint (epoch
    ``latest``); it, not config.json, decides, so a deleted or edited config.json
    cannot make a resume mix configurations. Call it holding the folder's lock.
    """
    requested = cfg.to_dict()
    path = workdir / "config.json"
    history_path = workdir / "config_history.json"
    if latest is None:  # nothing trained yet: the folder takes this configuration
        history_path.unlink(missing_ok=True)
        write_json(path, requested)
        return
    if trained is None:
        if not path.exists():
            raise ValueError(
                f"{workdir} has checkpoints of an older ntkd, which do not record their "
                "configuration, and no config.json; resuming could mix configurations, so use "
                "another output folder"
            )
        trained = read_json(path)
    if trained != requested:
        diff = {k: (trained.get(k), v) for k, v in requested.items() if trained.get(k) != v}
        changes = read_json(history_path) if history_path.exists() else []
        if not (
            changes and changes[-1]["from_epoch"] == latest and changes[-1]["config"] == requested
        ):
            fixed = sorted(set(diff) - set(AMENDABLE))
            if not amend or fixed:
                how = (
                    f"only {', '.join(AMENDABLE)} can change part-way, not {fixed}"
                    if fixed
                    else f"to continue from epoch {latest} with these optimiser settings, pass --amend-optimizer "
                    "(amend_optimizer=True)"
                )
                raise ValueError(
                    f"{workdir} holds a run with a different configuration {diff} (trained, "
                    f"requested; recorded in checkpoints/{latest}): use another output folder or "
                    f"delete it; {how}"
                )
            if not changes:
                changes = [{"from_epoch": 0, "config": trained, "changes": {}}]
            elif (
                changes[-1]["from_epoch"] == latest
            ):  # an amendment from this epoch that never trained
                changes.pop()
            changes.append(
                {
                    "from_epoch": latest,
                    "config": requested,
                    "changes": {k: list(v) for k, v in diff.items()},
                    "optimizer_state": "kept" if keep_opt_state else "reinitialised",
                }
            )
            write_json(history_path, changes)
    write_json(path, requested)


def _history_at(workdir: Path, meta: dict, epoch: int) -> list[dict]:
    """The history up to ``epoch``, from its checkpoint's metadata (or, for an older ntkd's, history.json)."""
    if "history" in meta:
        return list(meta["history"])
    path = workdir / "history.json"
    try:
        rows = read_json(path) if path.exists() else []
    except ValueError:
        rows = []
    return [r for r in rows if isinstance(r, dict) and r.get("epoch", epoch + 1) <= epoch]


@functools.lru_cache(maxsize=32)
def _fit_epoch_fn(model, optimizer: str, learning_rate: float, total_steps: int, schedule, mesh):
    """(optimizer, jitted epoch function) of :func:`fit`, built once per model and settings.

    Repeated ``fit`` calls with the same model and hyperparameters (an
    ablation ladder, a notebook cell run again) reuse the compiled epoch
    instead of tracing and compiling a new one each call.
    """
    tx = make_optimizer(optimizer, learning_rate, total_steps=total_steps, schedule=schedule)
    step = _make_train_step(model, tx, temperature=1.0, alpha=1.0, augment=False)
    return tx, _make_epoch_fn(step, NamedSharding(mesh, P("data")))


def fit(
    model: flax.linen.Module,
    x: ArrayLike,
    targets: ArrayLike,
    *,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "constant",
    seed: int = 0,
    x_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """Trains ``model`` in memory on fixed targets with cross-entropy (no checkpoints).

    For experiments that compare target distributions (label smoothing,
    partial-teacher KD, ...) on small models.

    Args:
        model: a Linen model.
        x: (n, *input_shape) inputs.
        targets: (n,) integer labels or (n, k) probabilities.
        epochs: training epochs.
        batch_size: examples per batch.
        learning_rate: peak learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (see :func:`make_optimizer`).
        schedule: learning-rate schedule (see :func:`make_optimizer`).
        seed: initialisation and data order.
        x_test: optional test inputs; their accuracy is logged per epoch.
        y_test: labels of ``x_test``.

    Returns:
        ``(variables, history)`` with one history row per epoch.
    """
    x, targets = np.asarray(x, np.float32), np.asarray(targets)
    if len(targets) != len(x):
        raise ValueError(f"x has {len(x)} examples but targets has {len(targets)}")
    if targets.ndim == 2:
        targets = targets.astype(np.float32)
    bs = min(batch_size, len(x))
    mesh = _mesh()
    tx, epoch_fn = _fit_epoch_fn(
        model, optimizer, float(learning_rate), epochs * (len(x) // bs), schedule, mesh
    )
    state = _init_state(model, tx, jax.random.key(seed), x.shape[1:])
    x_all, y_all = jax.device_put((x, targets), NamedSharding(mesh, P()))
    history = []
    for epoch in tqdm(range(1, epochs + 1), disable=not progress, leave=False):
        batches = _epoch_batches(len(x), bs, seed=seed, epoch=epoch)
        state, losses = epoch_fn(state, x_all, y_all, batches, None, jax.random.key(seed))
        row = {"epoch": epoch, "loss": float(np.mean(jax.device_get(losses)))}
        if x_test is not None:
            row["test_acc"] = float(
                metrics.accuracy(predict(model, state.variables, x_test), y_test)
            )
        history.append(row)
    return jax.device_get(state.variables), history
