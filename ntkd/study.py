"""The study of Harutyunyan et al. (ICLR 2023) as five resumable steps.

``run_study(config, out)`` trains a teacher and the students of every KD
regime, then runs five analyses, evaluates the pre-registered findings
(:mod:`ntkd.findings`) and writes the report. The NTK analyses run on every
seed of ``config.analysis_seeds`` (each seed: its own student initialisation,
hence its own kernel); every complexity is recorded as A, the scale-free Â,
the identity-kernel A and, for teacher targets, Â of equal-norm label
smoothing (docs/study.md).

1. ``teacher_checkpoints``: complexity of each teacher checkpoint's
   predictions at several temperatures in the student's NTK at
   initialisation, with the teacher's accuracy.
2. ``student_complexity``: complexity of true labels, random labels, the
   offline (final) teacher and the online teacher (checkpoint of the same
   epoch) in the student's NTK at checkpoints along its training.
3. ``distillation``: test accuracy, train/test fidelity and KL per regime and
   seed, with mean, std and standard error.
4. ``ntk_similarity``: each trained student's NTK against its NTK at init and
   against the teacher's NTK on the same inputs (alignment and CKA), and the
   trained students' NTKs against each other.
5. ``margins``: the kernel-student margin bound of each regime's final
   supervision (:func:`ntkd.complexity.kernel_margin_bound`), and the trained
   network's logit margins as a description.

Layout of ``out``::

    study.json               the configuration
    runs/teacher/            teacher run (checkpoints every epoch)
    runs/<regime>_s<seed>/   student runs
    results/<step>.json      one file per analysis (CSV/Markdown for tables)
    timings/<step>.json      wall-clock seconds (kept out of results/, which is deterministic);
                             training.json sums every invocation, a resumed run included
    figures/<step>.png       made from results/ by :func:`ntkd.plotting.plot_study`
    results/findings.json    the pre-registered findings, evaluated (ntkd.findings)
    report.md                the findings, against the paper first, and the tables behind them

Every step writes its result atomically and is skipped when its result
exists for the same configuration, so an interrupted study resumes where it
stopped; training runs resume from their latest checkpoint.

Example:
    >>> from ntkd.configs import get_config
    >>> run_study(get_config("mnist1d", quick=True), "results/quick")
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ntkd import checkpoints as ckpt_lib
from ntkd import metrics
from ntkd._io import read_json, write_csv, write_json, write_text
from ntkd.complexity import KernelFactor, compare_teachers, factor_kernel, kernel_margin_bound
from ntkd.data import Dataset, load_dataset
from ntkd.kernels import kernel_alignment
from ntkd.matfree.measure import matfree_complexity
from ntkd.ntk import empirical_ntk, empirical_ntk_fn, flax_apply_fn
from ntkd.targets import matched_label_smoothing, one_hot, random_labels, softmax_targets
from ntkd.training import TrainConfig, online_teacher_epoch, predict, train

STEPS = ("teacher_checkpoints", "student_complexity", "distillation", "ntk_similarity", "margins")


@dataclasses.dataclass
class StudyConfig:
    """A whole study: data, teacher, students, regimes and analysis sizes.

    Attributes:
        name: label used in titles.
        dataset, dataset_options, data_dir: the data (see :func:`ntkd.data.load_dataset`).
        teacher: :class:`ntkd.training.TrainConfig` fields of the teacher.
        student: TrainConfig fields shared by all students (regime fields are set per regime).
        regimes: one dict per student regime: ``name`` plus TrainConfig fields
            (``regime``, ``temperature``, ``teacher_epoch``, ``alpha``, and ``model`` /
            ``model_options`` to override the student). Regimes of another student carry
            ``student`` (a label); they enter the distillation table and the capacity-gap
            regression, while the NTK analyses use the main student's regimes. A regime may
            carry ``seeds`` (its own seed list; default ``seeds``).
        seeds: student seeds of the distillation comparisons (paired by seed).
        analysis_seeds: seeds whose runs the NTK analyses use (complexity, margins and
            bound, NTK similarity); None: the first three of ``seeds``.
        temperatures: τ of the teacher-checkpoint analysis.
        teacher_epochs: teacher checkpoints analysed (None: every saved one).
        n_kernel: training examples used by the NTK analyses.
        complexity_regimes: regimes whose training is followed in step 2 (one panel each).
        complexity_temperatures: τ of the offline/online teacher targets in step 2; the
            report's checks use the first.
        ntk_mode: scalar eNTK mode of the analyses (``trace``, ``sum`` or ``logit``).
        ridge: relative ridge of the complexity solves.
        complexity_path: how steps 1 and 2 compute the complexity: ``"dense"`` (form the
            n_kernel × n_kernel eNTK, Cholesky), ``"matfree"`` (certified intervals from
            streaming eNTK products, ``ntkd.matfree``; needs ``ridge > 0``) or ``"auto"``
            (dense when the dense kernel fits ``memory_budget``). The margins and NTK
            similarity steps always use the dense kernel (docs/matfree.md).
        memory_budget: bytes (or a size such as ``"8GiB"``) of ``"auto"``; None: half the
            available host memory.
        complexity_rtol: relative gap at which the matrix-free intervals stop.
        gammas: margins γ of the kernel-student bound, in target units (probabilities).
        delta: failure probability δ of the bound.
        criteria: the pre-registered findings (see :mod:`ntkd.findings`): fixed before any
            training, hashed into ``study.json`` as ``criteria_sha256`` and printed in the
            report. Changing one is a changed configuration.
        overrides: the changes :meth:`with_overrides` made to the preset (``ntkd reproduce
            --set``), recorded in ``study.json`` and the report; omitted from
            :meth:`to_dict` when empty.
    """

    name: str = "mnist1d"
    dataset: str = "mnist1d"
    dataset_options: dict = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    teacher: dict = dataclasses.field(default_factory=dict)
    student: dict = dataclasses.field(default_factory=dict)
    regimes: list = dataclasses.field(default_factory=list)
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    analysis_seeds: list | None = None
    temperatures: list = dataclasses.field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    teacher_epochs: list | None = None
    n_kernel: int = 1000
    complexity_regimes: list = dataclasses.field(default_factory=list)
    complexity_temperatures: list = dataclasses.field(default_factory=lambda: [1.0, 4.0])
    ntk_mode: str = "trace"
    ridge: float = 0.0
    gammas: list = dataclasses.field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4, 0.8])
    delta: float = 0.05
    criteria: list = dataclasses.field(default_factory=list)
    overrides: dict = dataclasses.field(default_factory=dict)
    complexity_path: str = "auto"
    memory_budget: int | str | None = None
    complexity_rtol: float = 1e-2

    def __post_init__(self):
        from ntkd.matfree.measure import PATHS, parse_bytes

        if self.complexity_path not in PATHS:
            raise ValueError(
                f"complexity_path must be one of {PATHS}, got {self.complexity_path!r}."
            )
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        if not self.complexity_rtol > 0:
            raise ValueError(f"complexity_rtol must be > 0, got {self.complexity_rtol}.")
        if self.analysis_seeds is None:
            self.analysis_seeds = list(self.seeds[:3])
        missing = [s for s in self.analysis_seeds if s not in self.seeds]
        if missing:
            raise ValueError(
                f"analysis_seeds {missing} are not among seeds {self.seeds}; the NTK analyses use "
                "trained runs, so pick analysis seeds from seeds"
            )
        epochs = self.teacher.get("epochs", TrainConfig.epochs)
        late = sorted(
            {e for e in self.teacher_epochs or [] if e > epochs}
            | {r["teacher_epoch"] for r in self.regimes if (r.get("teacher_epoch") or 0) > epochs}
        )
        if late:
            raise ValueError(
                f"teacher epochs {late} (teacher_epochs, or a regime's teacher_epoch) are after the "
                f"teacher's last epoch {epochs}; shorten them with the teacher (e.g. --set "
                "teacher_epochs=[0,1,2,4,8])"
            )

    def to_dict(self) -> dict:
        """The configuration as JSON data (``study.json``, hashed into every result).

        ``overrides`` only when there are any, and fields added after the first studies
        (``_LATER_FIELDS``) only when not at their defaults, so that a folder written
        before either existed still matches its preset and keeps its finished steps.
        """
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        if not d["overrides"]:
            del d["overrides"]
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    def with_overrides(self, overrides: Mapping[str, Any]) -> StudyConfig:
        """A copy with fields replaced, e.g. ``{"seeds": [0, 1], "teacher.epochs": 30}``.

        A key names a field; dots walk into it: ``teacher.epochs`` and ``student.model_options``
        are TrainConfig fields of the teacher and student (type-checked like the top-level
        fields); a bare TrainConfig field (``epochs``) sets it for the teacher and the students
        alike (a regime's own fields still win); ``dataset_options.num_samples`` a loader option, ``regimes.0.temperature`` an
        entry of a list. Below the typed levels the value is not checked here; the study
        checks every run's configuration before it writes anything. The overrides are
        recorded in :attr:`overrides`; the result is a new configuration, so a study folder
        holding the preset (or other overrides) refuses it, and a changed ``criteria`` changes
        ``criteria_sha256`` like any other change of the pre-registered criteria.

        Raises:
            ValueError: an unknown key (naming the valid ones) or a value of the wrong type.
        """
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            name, *path = key.split(".")
            if name not in _STUDY_FIELDS and name in _TRAIN_FIELDS:
                for run in ("teacher", "student"):
                    changes[run] = self._override_path(changes, key, run, [name, *path], value)
                continue
            if name not in _STUDY_FIELDS:
                raise ValueError(_unknown_key(key, name, _STUDY_FIELDS, "StudyConfig"))
            if not path:
                _check_type(key, value, _STUDY_FIELDS[name])
                changes[name] = copy.deepcopy(value)
                continue
            changes[name] = self._override_path(changes, key, name, path, value)
        recorded = {**self.overrides, **json.loads(json.dumps(dict(overrides)))}
        return dataclasses.replace(self, **changes, overrides=recorded)

    def shifted_seeds(self, offset: int) -> StudyConfig:
        """The same study on disjoint seeds (every seed + ``offset``): the stability check."""
        regimes = [
            {**r, "seeds": [s + offset for s in r["seeds"]]} if "seeds" in r else dict(r)
            for r in self.regimes
        ]
        return dataclasses.replace(
            self,
            regimes=regimes,
            seeds=[s + offset for s in self.seeds],
            analysis_seeds=[s + offset for s in self.analysis_seeds],
            name=f"{self.name}, seeds +{offset}",
        )

    def _override_path(self, changes: dict, key: str, name: str, path: list[str], value: Any):
        root = copy.deepcopy(changes.get(name, getattr(self, name)))
        if name in ("teacher", "student"):
            if path[0] not in _TRAIN_FIELDS:
                raise ValueError(_unknown_key(key, path[0], _TRAIN_FIELDS, "TrainConfig"))
            if len(path) == 1:
                _check_type(key, value, _TRAIN_FIELDS[path[0]])
        return _set_path(root, key, path, copy.deepcopy(value))

    def regime_seeds(self, regime: dict) -> list[int]:
        """The seeds of one regime: its own ``seeds`` or the study's."""
        return list(regime.get("seeds", self.seeds))

    @property
    def criteria_sha256(self) -> str:
        """SHA-256 of the pre-registered criteria (canonical JSON)."""
        return hashlib.sha256(
            json.dumps(self.criteria, sort_keys=True, ensure_ascii=False).encode()
        ).hexdigest()

    def teacher_config(self) -> TrainConfig:
        return TrainConfig(
            dataset=self.dataset,
            dataset_options=self.dataset_options,
            data_dir=self.data_dir,
            **self.teacher,
        )

    def student_config(self, regime: dict, seed: int, teacher_dir: Path) -> TrainConfig:
        fields = {k: v for k, v in regime.items() if k not in ("name", "student", "seeds")}
        if fields.get("regime", "none") != "none":
            fields["teacher_dir"] = str(teacher_dir)  # relative to the student's run folder
        return TrainConfig(
            dataset=self.dataset,
            dataset_options=self.dataset_options,
            data_dir=self.data_dir,
            **{**self.student, **fields, "seed": seed},
        )

    @property
    def main_regimes(self) -> list[dict]:
        """Regimes of the main student (those without a ``student`` label)."""
        return [r for r in self.regimes if "student" not in r]

    def regime(self, name: str) -> dict:
        for r in self.regimes:
            if r["name"] == name:
                return r
        raise ValueError(f"no regime named {name!r}; regimes: {[r['name'] for r in self.regimes]}")


_LATER_FIELDS = {"complexity_path": "auto", "memory_budget": None, "complexity_rtol": 1e-2}

_STUDY_FIELDS = {
    name: t for name, t in typing.get_type_hints(StudyConfig).items() if name != "overrides"
}
_TRAIN_FIELDS = typing.get_type_hints(TrainConfig)


def _unknown_key(key: str, name: str, valid: Mapping, where: str) -> str:
    also = "; or a TrainConfig field for teacher and students" if where == "StudyConfig" else ""
    return f"unknown key {name!r} in override {key!r}; valid {where} keys: {', '.join(valid)}{also}"


def _check_type(key: str, value: Any, annotation: Any) -> None:
    """Refuses a value whose type does not fit the field's annotation (int passes for float)."""
    allowed = typing.get_args(annotation) or (annotation,)
    if float in allowed:
        allowed += (int,)
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = any(value is None if t is type(None) else isinstance(value, t) for t in allowed)
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"override {key}={value!r}: expected {names}, got {type(value).__name__}")


def _set_path(container: Any, key: str, path: list[str], value: Any) -> Any:
    """``container`` with the entry at ``path`` (dict keys, list indices) set to ``value``."""
    node = container
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        elif isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ValueError(
                    f"override {key!r}: {part!r} is not an index of a list of {len(node)} entries"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            done = ".".join(path[:i])
            raise ValueError(
                f"override {key!r}: {done or 'the field'} is {node!r}, not a dict or list to index"
            )
    return container


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("τ", "t")).strip("_")


class Study:
    """Paths, data and trained runs of one study folder."""

    def __init__(self, config: StudyConfig, out: str | os.PathLike, *, progress: bool = True):
        self.config, self.out, self.progress = config, Path(out).expanduser(), progress
        self.results = self.out / "results"
        self._ntk_fns: dict = {}
        self.teacher_dir = self.out / "runs" / "teacher"
        # The data are loaded (and so checked) before anything is written to the study folder.
        self.ds: Dataset = load_dataset(
            config.dataset, data_dir=config.data_dir, seed=0, **config.dataset_options
        )
        n = min(config.n_kernel, len(self.ds.x_train))
        self.x_sub, self.y_sub = self.ds.x_train[:n], self.ds.y_train[:n]
        from ntkd.matfree.measure import require_ridge, resolve_path

        # Decided (and a matrix-free study without a ridge refused) before any training.
        self.complexity_path = resolve_path(
            config.complexity_path, n, mode=config.ntk_mode, memory_budget=config.memory_budget
        )
        if self.complexity_path == "matfree":
            require_ridge(config.ridge, n, mode=config.ntk_mode)
        from ntkd.models import get_model

        for run in [config.teacher_config()] + [
            config.student_config(r, s, self.teacher_dir)
            for r in config.regimes
            for s in config.regime_seeds(r)
        ]:
            run.validate()
            get_model(run.model, self.ds.num_classes, **run.model_options)
        self._claim()

    def _claim(self) -> None:
        """Takes the study folder's lock for this object's life, then checks or writes study.json."""
        from ntkd._lock import lock_folder

        path = self.out / "study.json"
        cfg = {**self.config.to_dict(), "criteria_sha256": self.config.criteria_sha256}

        def refuse_another_config():
            if path.exists() and read_json(path) != cfg:
                raise ValueError(
                    f"{self.out} holds a study with another configuration; use a new --out or delete it"
                )

        refuse_another_config()  # before touching the folder at all
        self._lock = lock_folder(self.out, what="study folder")
        try:
            refuse_another_config()  # again, now that no other process can write study.json
        except ValueError:
            self._lock.release()
            raise
        from ntkd._io import remove_stale_tmp

        for folder in (self.out, self.results, self.out / "timings", self.out / "figures"):
            remove_stale_tmp(folder)  # left by interrupted writes; safe now that we hold the lock
        if not path.exists():
            write_json(path, cfg)

    def student_dir(self, regime: str, seed: int) -> Path:
        return self.out / "runs" / f"{_slug(regime)}_s{seed}"

    # ------------------------------------------------------------------ training
    def train_all(self) -> None:
        """Trains (or resumes) the teacher and every regime × seed student."""
        cfg = self.config
        train(cfg.teacher_config(), self.teacher_dir, dataset=self.ds, progress=self.progress)
        jobs = [(r, s) for s in cfg.seeds for r in cfg.regimes if s in cfg.regime_seeds(r)]
        jobs += [(r, s) for r in cfg.regimes for s in cfg.regime_seeds(r) if s not in cfg.seeds]
        for regime, seed in tqdm(jobs, desc="students", disable=not self.progress):
            run = self.student_dir(regime["name"], seed)
            train(
                cfg.student_config(regime, seed, Path(os.path.relpath(self.teacher_dir, run))),
                run,
                dataset=self.ds,
                progress=False,
            )

    # ------------------------------------------------------------------ helpers
    def model_at(self, run_dir: Path, epoch: int | None = None):
        model, variables, _ = ckpt_lib.restore_model(run_dir, epoch)
        return model, variables

    def ntk(
        self, run_dir: Path, epoch: int | None = None, x: np.ndarray | None = None
    ) -> np.ndarray:
        """The scalar eNTK (n, n) of a run's checkpoint on the analysis subset (float64 on host)."""
        model, variables = self.model_at(run_dir, epoch)
        apply_fn, params = flax_apply_fn(model, variables)
        x = self.x_sub if x is None else x
        if set(variables) != {
            "params"
        }:  # frozen state (BatchNorm statistics) differs per checkpoint
            return np.asarray(
                empirical_ntk(apply_fn, params, x, mode=self.config.ntk_mode), np.float64
            )
        # One compiled kernel function per architecture, reused for every checkpoint of it.
        if model not in self._ntk_fns:
            self._ntk_fns[model] = empirical_ntk_fn(apply_fn, mode=self.config.ntk_mode)
        return np.asarray(self._ntk_fns[model](x, None, params), np.float64)

    def logits(
        self, run_dir: Path, epoch: int | None = None, x: np.ndarray | None = None
    ) -> np.ndarray:
        model, variables = self.model_at(run_dir, epoch)
        return predict(model, variables, self.x_sub if x is None else x)

    def history(self, run_dir: Path) -> list[dict]:
        return read_json(run_dir / "history.json")

    # ------------------------------------------------------------------ steps
    def _measure(self, factor: KernelFactor, Y: np.ndarray, *, teacher: bool) -> dict:
        """A, Â and the identity-kernel A of targets Y; for teacher targets also A and Â
        of label smoothing with the same Frobenius norm (the shape-vs-size control)."""
        Y = np.asarray(Y, np.float64)
        out = {
            "A": factor.adjusted_complexity(Y),
            "A_hat": factor.normalized_complexity(Y),
            "A_identity": float(np.sqrt(np.sum(Y * Y) / len(Y))),
        }
        if teacher:
            Y_ls, eps = matched_label_smoothing(
                self.y_sub, self.ds.num_classes, float(np.linalg.norm(Y))
            )
            out.update(
                ls_A=factor.adjusted_complexity(Y_ls),
                ls_A_hat=factor.normalized_complexity(Y_ls),
                ls_epsilon=eps,
            )
        return out

    def _complexities(
        self, run_dir: Path, epoch: int | None, targets: dict
    ) -> tuple[dict[Any, dict], dict]:
        """:meth:`_measure` of every ``key -> (Y, teacher)`` in the eNTK of a run's checkpoint,
        on the study's complexity path, and what the path records about the kernel."""
        cfg = self.config
        if self.complexity_path == "dense":
            factor = factor_kernel(self.ntk(run_dir, epoch), ridge=cfg.ridge)
            measures = {
                key: self._measure(factor, Y, teacher=teacher)
                for key, (Y, teacher) in targets.items()
            }
            # LAPACK's condition *estimate* varies in its last bits between runs (threaded
            # BLAS); rounded so that identical runs give identical results files.
            return measures, {"condition_number": float(f"{factor.info.condition_number:.4g}")}
        model, variables = self.model_at(run_dir, epoch)
        apply_fn, params = flax_apply_fn(model, variables)
        ys, eps = {}, {}
        for key, (Y, teacher) in targets.items():
            ys[key] = np.asarray(Y, np.float64)
            if teacher:
                ys[(key, "ls")], eps[key] = matched_label_smoothing(
                    self.y_sub, self.ds.num_classes, float(np.linalg.norm(ys[key]))
                )
        res = matfree_complexity(
            apply_fn,
            params,
            self.x_sub,
            ys,
            mode=cfg.ntk_mode,
            ridge=cfg.ridge,
            rtol=cfg.complexity_rtol,
            memory_budget=cfg.memory_budget,
        )

        def forms(name, prefix=""):
            c = res.columns(name)
            return {
                f"{prefix}A": c["adjusted_complexity"],
                f"{prefix}A_lower": c["adjusted_lower"],
                f"{prefix}A_upper": c["adjusted_upper"],
                f"{prefix}A_hat": c["normalized_complexity"],
                f"{prefix}A_hat_lower": c["normalized_lower"],
                f"{prefix}A_hat_upper": c["normalized_upper"],
            }

        measures = {}
        for key, (_, teacher) in targets.items():
            Y = ys[key]
            out = {**forms(key), "A_identity": float(np.sqrt(np.sum(Y * Y) / len(Y)))}
            if teacher:
                out.update(forms((key, "ls"), "ls_"), ls_epsilon=eps[key])
            measures[key] = out
        gaps = [b.relative_gap for b in res.bounds.values()]
        return measures, {
            "trace": res.trace,
            "trace_source": res.trace_source,
            "shift": res.shift,
            "matvecs": res.matvecs,
            "matvec_cache": res.matvec_cache,
            "max_relative_gap": max(gaps),
            "certified": all(b.upper_certified for b in res.bounds.values()),
        }

    def _fixed_targets(self) -> dict[str, np.ndarray]:
        k = self.ds.num_classes
        return {
            "labels": np.asarray(one_hot(self.y_sub, k), np.float64),
            "random": np.asarray(random_labels(jax.random.key(0), len(self.y_sub), k), np.float64),
        }

    def teacher_checkpoints(self) -> dict:
        cfg = self.config
        saved = ckpt_lib.list_epochs(self.teacher_dir)
        epochs = [e for e in (cfg.teacher_epochs or saved) if e in saved]
        teachers = {e: self.logits(self.teacher_dir, e) for e in epochs}
        hist = {r["epoch"]: r for r in self.history(self.teacher_dir)}
        fixed = self._fixed_targets()
        panels = []
        for seed in tqdm(
            cfg.analysis_seeds, desc="teacher checkpoints", disable=not self.progress, leave=False
        ):
            targets = {key: (Y, False) for key, Y in fixed.items()}
            for e, z in teachers.items():
                for t in cfg.temperatures:
                    targets[e, float(t)] = (softmax_targets(z, t), True)
            measures, kernel_info = self._complexities(
                self.student_dir(cfg.main_regimes[0]["name"], seed), 0, targets
            )
            rows = [{"target": key, "temperature": None, **measures[key]} for key in fixed]
            for e in teachers:
                for t in cfg.temperatures:
                    rows.append(
                        {
                            "target": f"epoch {e}",
                            "teacher_epoch": e,
                            "temperature": float(t),
                            "teacher_test_acc": hist[e]["test_acc"],
                            "teacher_train_acc": hist[e]["train_acc"],
                            **measures[e, float(t)],
                        }
                    )
            panels.append({"seed": seed, **kernel_info, "rows": rows})
        return {
            "n": len(self.y_sub),
            "mode": cfg.ntk_mode,
            "complexity_path": self.complexity_path,
            "kernel": "student NTK at initialisation",
            "seeds": list(cfg.analysis_seeds),
            "temperatures": list(cfg.temperatures),
            "panels": panels,
        }

    def student_complexity(self) -> dict:
        cfg = self.config
        teacher_saved = ckpt_lib.list_epochs(self.teacher_dir)
        z_final = self.logits(self.teacher_dir)
        fixed = self._fixed_targets()
        offline = {
            t: np.asarray(softmax_targets(z_final, t), np.float64)
            for t in cfg.complexity_temperatures
        }
        online_logits: dict[int, np.ndarray] = {}
        epochs_total = int(cfg.student.get("epochs", 1))
        panels = []
        jobs = [(name, seed) for name in cfg.complexity_regimes for seed in cfg.analysis_seeds]
        for name, seed in tqdm(
            jobs, desc="student complexity", disable=not self.progress, leave=False
        ):
            run = self.student_dir(name, seed)
            rows = []
            for e in ckpt_lib.list_epochs(run):
                te = online_teacher_epoch(max(e, teacher_saved[0]), teacher_saved)
                if te not in online_logits:
                    online_logits[te] = self.logits(self.teacher_dir, te)
                targets = {key: (Y, False) for key, Y in fixed.items()}
                for t in cfg.complexity_temperatures:
                    targets[f"offline_teacher_t{t:g}"] = (offline[t], True)
                    targets[f"online_teacher_t{t:g}"] = (
                        softmax_targets(online_logits[te], t),
                        True,
                    )
                measures, kernel_info = self._complexities(run, e, targets)
                rows.append(
                    {
                        "epoch": e,
                        "fraction": e / epochs_total,
                        "online_teacher_epoch": te,
                        **kernel_info,
                        "targets": measures,
                    }
                )
            panels.append({"regime": name, "seed": seed, "rows": rows})
        return {
            "n": len(self.y_sub),
            "mode": cfg.ntk_mode,
            "complexity_path": self.complexity_path,
            "temperatures": list(cfg.complexity_temperatures),
            "regimes": list(cfg.complexity_regimes),
            "seeds": list(cfg.analysis_seeds),
            "epochs": epochs_total,
            "panels": panels,
        }

    def distillation(self) -> dict:
        cfg = self.config
        per_run, rows = [], []
        keys = ("test_acc", "train_acc", "train_fidelity", "test_fidelity", "test_kl")
        for regime in cfg.regimes:
            finals = []
            for seed in cfg.regime_seeds(regime):
                last = self.history(self.student_dir(regime["name"], seed))[-1]
                finals.append(last)
                per_run.append(
                    {
                        "regime": regime["name"],
                        "student": regime.get("student", "main"),
                        "seed": seed,
                        **{k: last.get(k) for k in keys},
                    }
                )
            row = {
                "regime": regime["name"],
                "student": regime.get("student", "main"),
                "kind": regime.get("regime", "none"),
                "temperature": regime.get("temperature"),
                "seeds": len(finals),
            }
            for key in keys:
                vals = [f[key] for f in finals if f.get(key) is not None]
                if vals:
                    row[f"{key}_mean"] = float(np.mean(vals))
                    row[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                    row[f"{key}_se"] = row[f"{key}_std"] / float(np.sqrt(len(vals)))
            rows.append(row)
        teacher_last = self.history(self.teacher_dir)[-1]
        return {
            "rows": rows,
            "runs": per_run,
            "teacher_test_acc": teacher_last["test_acc"],
            "teacher_train_acc": teacher_last["train_acc"],
        }

    def ntk_similarity(self) -> dict:
        cfg = self.config
        K_teacher = self.ntk(self.teacher_dir)
        rows, pairwise = [], []
        names = [r["name"] for r in cfg.main_regimes]
        jobs = [(r, s) for s in cfg.analysis_seeds for r in cfg.main_regimes]
        finals: dict[int, dict[str, np.ndarray]] = {}
        for regime, seed in tqdm(
            jobs, desc="NTK similarity", disable=not self.progress, leave=False
        ):
            run = self.student_dir(regime["name"], seed)
            K0, K1 = self.ntk(run, 0), self.ntk(run)
            finals.setdefault(seed, {})[regime["name"]] = K1
            rows.append(
                {
                    "regime": regime["name"],
                    "seed": seed,
                    "alignment_vs_init": kernel_alignment(K1, K0),
                    "cka_vs_init": kernel_alignment(K1, K0, centered=True),
                    "alignment_vs_teacher": kernel_alignment(K1, K_teacher),
                    "cka_vs_teacher": kernel_alignment(K1, K_teacher, centered=True),
                    "init_alignment_vs_teacher": kernel_alignment(K0, K_teacher),
                    "init_cka_vs_teacher": kernel_alignment(K0, K_teacher, centered=True),
                }
            )
        for ks in finals.values():
            pairwise.append(
                [[kernel_alignment(ks[a], ks[b], centered=True) for b in names] for a in names]
            )
        keys = [k for k in rows[0] if k not in ("regime", "seed")] if rows else []
        summary = []
        for name in names:
            mine = [r for r in rows if r["regime"] == name]
            entry = {"regime": name, "seeds": len(mine)}
            for key in keys:
                vals = np.array([r[key] for r in mine])
                entry[f"{key}_mean"] = float(vals.mean())
                entry[f"{key}_se"] = (
                    float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
                )
            summary.append(entry)
        return {
            "n": len(self.y_sub),
            "mode": cfg.ntk_mode,
            "seeds": list(cfg.analysis_seeds),
            "rows": rows,
            "summary": summary,
            "pairwise_cka": {
                "regimes": names,
                "matrix": np.mean(pairwise, axis=0).tolist() if pairwise else [],
            },
        }

    def margins(self) -> dict:
        cfg = self.config
        z_teacher = self.logits(self.teacher_dir)
        ref = z_teacher.argmax(1)
        out = []
        jobs = [(r, s) for s in cfg.analysis_seeds for r in cfg.main_regimes]
        for regime, seed in tqdm(
            jobs, desc="margins and bound", disable=not self.progress, leave=False
        ):
            run = self.student_dir(regime["name"], seed)
            m = np.asarray(metrics.margins(self.logits(run), ref))
            targets = self._regime_targets(regime)
            K = self.ntk(run)
            factor = factor_kernel(K, ridge=cfg.ridge)
            bound = kernel_margin_bound(
                K, targets, self.y_sub, gammas=cfg.gammas, delta=cfg.delta, ridge=cfg.ridge
            )
            row = {
                "regime": regime["name"],
                "seed": seed,
                "network_margins": metrics.margin_summary(m, gammas=(0.0, 1.0)),
                "A": factor.adjusted_complexity(targets),
                "A_hat": factor.normalized_complexity(targets),
                "bound": bound.as_dict(),
            }
            if seed == cfg.analysis_seeds[0]:
                row["network_margin_values"] = m.tolist()
            out.append(row)
        return {
            "n": len(self.y_sub),
            "mode": cfg.ntk_mode,
            "seeds": list(cfg.analysis_seeds),
            "gammas": list(cfg.gammas),
            "delta": cfg.delta,
            "kernel": "trained student's NTK; f = K (K + λI)⁻¹ Y with Y the regime's final supervision "
            "(labels, or its teacher's softmax at the regime's τ)",
            "network_margins": "trained network's logit margins w.r.t. the final teacher's argmax (descriptive; "
            "not part of the bound)",
            "rows": out,
        }

    def _regime_targets(self, regime: dict) -> np.ndarray:
        """The supervision a regime ends with: labels, or its (last) teacher's softened predictions."""
        kind = regime.get("regime", "none")
        if kind == "none":
            return np.asarray(one_hot(self.y_sub, self.ds.num_classes), np.float64)
        epoch = regime.get("teacher_epoch") if kind == "early_stopped" else None
        return np.asarray(
            softmax_targets(
                self.logits(self.teacher_dir, epoch), float(regime.get("temperature", 1.0))
            ),
            np.float64,
        )

    # ------------------------------------------------------------------ driver
    def run_step(self, step: str) -> dict:
        """Runs one analysis unless its result already exists for this configuration."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        path = self.results / f"{step}.json"
        digest = _config_digest(self.config)
        if path.exists():
            cached = read_json(path)
            if cached.get("config_digest") == digest:
                return cached
        t0 = time.perf_counter()
        result = {"step": step, "config_digest": digest, **getattr(self, step)()}
        write_json(path, result)
        write_json(self.out / "timings" / f"{step}.json", {"seconds": time.perf_counter() - t0})
        if step == "distillation":
            from ntkd.report import distillation_markdown

            write_csv(self.results / "distillation.csv", result["rows"])
            write_text(self.results / "distillation.md", distillation_markdown(result))
        return result


def teacher_complexity_table(
    student_dir: str | os.PathLike,
    teacher_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    student_epoch: int = 0,
    teacher_epochs: list[int] | None = None,
    temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    n: int | str = 1000,
    mode: str = "trace",
    ridge: float = 0.0,
    data_dir: str | None = None,
    path: str = "auto",
    memory_budget: int | str | None = None,
    rtol: float = 1e-2,
) -> list[dict]:
    """Complexity of teacher checkpoints' targets in a student's NTK, from run folders.

    The student's checkpoint fixes the dataset (from its metadata); the kernel
    is its eNTK on the first ``n`` training examples (``n="all"``: the whole
    training set). The dense path forms the kernel and factorises it; the
    matrix-free path (``path="matfree"``, or ``"auto"`` when the dense kernel
    would not fit ``memory_budget``) gives every row a certified interval
    from one streaming eNTK operator (needs ``ridge > 0``). See
    :func:`ntkd.complexity.compare_teachers` for the columns (``path`` says
    which); rows of teacher checkpoints also carry ``teacher_run``,
    ``teacher_epoch`` and ``teacher_test_acc`` (from the teacher's history).

    Args:
        student_dir: student (or any) run folder whose NTK measures complexity.
        teacher_dirs: one or more teacher run folders.
        student_epoch: the student checkpoint (0 = initialisation).
        teacher_epochs: teacher checkpoints to use (None: every saved one).
        temperatures: softmax temperatures of the teacher targets.
        mode: scalar eNTK mode (see :func:`ntkd.complexity.compare_teachers`).
        ridge: relative ridge of the complexity solves.
        n: number of training examples (an int >= 1, at most the training
            set's size) or ``"all"``.
        data_dir: folder with local archives, when the dataset needs one.
        path: ``"auto"``, ``"dense"`` or ``"matfree"``.
        memory_budget: bytes, or a size such as ``"8GiB"``, for ``path="auto"``
            (default: half the available host memory, see :func:`ntkd.matfree.choose_path`).
        rtol: relative gap at which the matrix-free intervals stop.

    Raises:
        ValueError: a bad ``n`` or ``path``, or ridge = 0 on the matrix-free
            path (raised before any kernel work).
    """
    from ntkd.matfree.measure import PATHS, require_ridge, resolve_path

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    if not (
        n == "all" or (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1)
    ):
        raise ValueError(f"n must be an int >= 1 or 'all', got {n!r}.")
    model, variables, meta = ckpt_lib.restore_model(student_dir, student_epoch)
    ds = load_dataset(
        meta["dataset"], data_dir=data_dir, seed=meta.get("data_seed", 0), **meta["dataset_options"]
    )
    if n != "all" and n > len(ds.x_train):
        raise ValueError(
            f"n={n} exceeds the {len(ds.x_train)} training examples of {meta['dataset']}; "
            "pass n='all' (--n all) for the whole training set."
        )
    n = len(ds.x_train) if n == "all" else int(n)
    x, y = ds.x_train[:n], ds.y_train[:n]
    student_logits = predict(model, variables, x)
    k = student_logits.shape[1]
    chosen = resolve_path(path, n, k=k, mode=mode, memory_budget=memory_budget)
    if chosen == "matfree":
        require_ridge(ridge, n, k=k, mode=mode)
    apply_fn, params = flax_apply_fn(model, variables)
    K = None
    if chosen == "dense":
        K = np.asarray(empirical_ntk(apply_fn, params, x, mode=mode), np.float64)
    teachers, info = {}, {}
    for tdir in [teacher_dirs] if isinstance(teacher_dirs, (str, os.PathLike)) else teacher_dirs:
        tdir = Path(tdir)
        saved = ckpt_lib.list_epochs(tdir)
        if not saved:
            raise ckpt_lib.CheckpointError(f"teacher folder {tdir} has no checkpoints")
        hist = (
            {r["epoch"]: r for r in read_json(tdir / "history.json")}
            if (tdir / "history.json").exists()
            else {}
        )
        for e in teacher_epochs if teacher_epochs else saved:
            tmodel, tvars, _ = ckpt_lib.restore_model(tdir, e)
            name = f"{tdir.name}@{e}"
            teachers[name] = predict(tmodel, tvars, x)
            info[name] = {
                "teacher_run": str(tdir),
                "teacher_epoch": e,
                "teacher_test_acc": hist.get(e, {}).get("test_acc"),
            }
    rows = compare_teachers(
        apply_fn,
        params,
        x,
        y,
        teachers,
        temperatures=temperatures,
        kernel=K,
        student_logits=student_logits,
        ridge=ridge,
        mode=mode,
        path=chosen,
        rtol=rtol,
    )
    return [{**r, "n": n, **info.get(r["target"], {})} for r in rows]


def _config_digest(config: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _record_training_time(path: Path, seconds: float) -> None:
    """Appends this invocation's training wall time; a resumed run keeps the earlier ones.

    No result depends on it, so an unreadable file is replaced (with a warning) rather than fatal.
    """
    try:
        history = read_json(path).get("history", []) if path.exists() else []
        history = [float(s) for s in history]
    except (ValueError, AttributeError, TypeError) as e:
        import warnings

        warnings.warn(
            f"{path} is unreadable ({e}); starting its record of training times afresh",
            stacklevel=2,
        )
        history = []
    history.append(seconds)
    write_json(path, {"seconds": sum(history), "history": history})


def run_study_step(
    config: StudyConfig, out: str | os.PathLike, step: str, *, progress: bool = True
) -> Path | None:
    """Trains (or resumes) what the study needs, runs one analysis step and draws the
    figures of the steps whose results exist (``ntkd step``, ``experiments/*.py``).

    Returns:
        The figure of ``step`` (None if it has none).
    """
    from ntkd.plotting import plot_study

    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    study = Study(config, out, progress=progress)
    study.train_all()
    study.run_step(step)
    return {p.stem: p for p in plot_study(study.out)}.get(step)


def run_study(
    config: StudyConfig,
    out: str | os.PathLike,
    *,
    steps: tuple[str, ...] = STEPS,
    progress: bool = True,
    figures: bool = True,
) -> Path:
    """Trains every run, runs the analysis steps, evaluates the pre-registered
    findings (``results/findings.json``), draws the figures and writes report.md.

    Returns:
        The study folder.
    """
    from ntkd.findings import write_findings
    from ntkd.plotting import plot_study
    from ntkd.report import write_report

    study = Study(config, out, progress=progress)
    t0 = time.perf_counter()
    study.train_all()
    _record_training_time(study.out / "timings" / "training.json", time.perf_counter() - t0)
    for step in tqdm(steps, desc="analyses", disable=not progress):
        study.run_step(step)
    write_findings(study.out)
    if figures:
        plot_study(study.out)
    write_report(study.out)
    return study.out
