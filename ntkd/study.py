"""The study of Harutyunyan et al. (ICLR 2023) as five resumable steps.

``run_study(config, out)`` trains a teacher and the students of every KD
regime, then runs the five analyses of the issue tracker's study:

1. ``teacher_checkpoints``: adjusted supervision complexity of each teacher
   checkpoint's predictions at several temperatures, in the student's NTK at
   initialisation, with the teacher's accuracy.
2. ``student_complexity``: complexity of true labels, random labels, the
   offline (final) teacher and the online teacher (checkpoint of the same
   epoch) in the student's NTK at checkpoints along its training.
3. ``distillation``: test accuracy, train/test fidelity and KL per regime,
   mean ± std over seeds.
4. ``ntk_similarity``: each trained student's NTK against its NTK at init and
   against the teacher's NTK on the same inputs (alignment and CKA), and the
   trained students' NTKs against each other.
5. ``margins``: student margins w.r.t. the teacher and the terms of the
   margin bound, per regime.

Layout of ``out``::

    study.json               the configuration
    runs/teacher/            teacher run (checkpoints every epoch)
    runs/<regime>_s<seed>/   student runs
    results/<step>.json      one file per analysis (CSV/Markdown for tables)
    timings/<step>.json      wall-clock seconds (kept out of results/, which is deterministic);
                             training.json sums every invocation, a resumed run included
    figures/<step>.png       made from results/ by :func:`ntkd.plotting.plot_study`
    report.md                the findings of SPEC §5, reproduced or not

Every step writes its result atomically and is skipped when its result
exists for the same configuration, so an interrupted study resumes where it
stopped; training runs resume from their latest checkpoint.

Example:
    >>> from ntkd.configs import get_config
    >>> run_study(get_config("mnist1d", quick=True), "results/quick")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from ntkd import checkpoints as ckpt_lib
from ntkd import metrics
from ntkd._io import read_json, write_csv, write_json, write_text
from ntkd.complexity import compare_teachers, factor_kernel, margin_bound
from ntkd.data import Dataset, load_dataset
from ntkd.kernels import kernel_alignment
from ntkd.ntk import empirical_ntk, flax_apply_fn
from ntkd.targets import one_hot, random_labels, softmax_targets
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
            comparison, while the NTK analyses use the main student's regimes.
        seeds: student seeds (the table reports mean ± std over them).
        temperatures: τ of the teacher-checkpoint analysis.
        teacher_epochs: teacher checkpoints analysed (None: every saved one).
        n_kernel: training examples used by the NTK analyses.
        complexity_regimes: regimes whose training is followed in step 2 (one panel each).
        complexity_temperatures: τ of the offline/online teacher targets in step 2; the
            report's checks use the first.
        ntk_mode: scalar eNTK mode of the analyses (``trace``, ``sum`` or ``logit``).
        ridge: relative ridge of the complexity solves.
        gammas: margin thresholds γ of the bound.
        delta: failure probability δ of the bound.
    """

    name: str = "mnist1d"
    dataset: str = "mnist1d"
    dataset_options: dict = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    teacher: dict = dataclasses.field(default_factory=dict)
    student: dict = dataclasses.field(default_factory=dict)
    regimes: list = dataclasses.field(default_factory=list)
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    temperatures: list = dataclasses.field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    teacher_epochs: list | None = None
    n_kernel: int = 1000
    complexity_regimes: list = dataclasses.field(default_factory=list)
    complexity_temperatures: list = dataclasses.field(default_factory=lambda: [1.0, 4.0])
    ntk_mode: str = "trace"
    ridge: float = 0.0
    gammas: list = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    delta: float = 0.05

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def teacher_config(self) -> TrainConfig:
        return TrainConfig(dataset=self.dataset, dataset_options=self.dataset_options, data_dir=self.data_dir,
                           **self.teacher)

    def student_config(self, regime: dict, seed: int, teacher_dir: Path) -> TrainConfig:
        fields = {k: v for k, v in regime.items() if k not in ("name", "student")}
        if fields.get("regime", "none") != "none":
            fields["teacher_dir"] = str(teacher_dir)  # relative to the student's run folder
        return TrainConfig(dataset=self.dataset, dataset_options=self.dataset_options, data_dir=self.data_dir,
                           **{**self.student, **fields, "seed": seed})

    @property
    def main_regimes(self) -> list[dict]:
        """Regimes of the main student (those without a ``student`` label)."""
        return [r for r in self.regimes if "student" not in r]

    def regime(self, name: str) -> dict:
        for r in self.regimes:
            if r["name"] == name:
                return r
        raise ValueError(f"no regime named {name!r}; regimes: {[r['name'] for r in self.regimes]}")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("τ", "t")).strip("_")


class Study:
    """Paths, data and trained runs of one study folder."""

    def __init__(self, config: StudyConfig, out: str | os.PathLike, *, progress: bool = True):
        self.config, self.out, self.progress = config, Path(out).expanduser(), progress
        self.results = self.out / "results"
        self.teacher_dir = self.out / "runs" / "teacher"
        # The data are loaded (and so checked) before anything is written to the study folder.
        self.ds: Dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=0, **config.dataset_options)
        n = min(config.n_kernel, len(self.ds.x_train))
        self.x_sub, self.y_sub = self.ds.x_train[:n], self.ds.y_train[:n]
        from ntkd.models import get_model

        for run in [config.teacher_config()] + [config.student_config(r, s, self.teacher_dir)
                                                 for r in config.regimes for s in config.seeds]:
            run.validate()
            get_model(run.model, self.ds.num_classes, **run.model_options)
        self._claim()

    def _claim(self) -> None:
        """Takes the study folder's lock for this object's life, then checks or writes study.json."""
        from ntkd._lock import lock_folder

        path = self.out / "study.json"
        cfg = self.config.to_dict()

        def refuse_another_config():
            if path.exists() and read_json(path) != cfg:
                raise ValueError(f"{self.out} holds a study with another configuration; use a new --out or delete it")

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
        jobs = [(r, s) for s in cfg.seeds for r in cfg.regimes]
        for regime, seed in tqdm(jobs, desc="students", disable=not self.progress):
            run = self.student_dir(regime["name"], seed)
            train(cfg.student_config(regime, seed, Path(os.path.relpath(self.teacher_dir, run))), run,
                  dataset=self.ds, progress=False)

    # ------------------------------------------------------------------ helpers
    def model_at(self, run_dir: Path, epoch: int | None = None):
        model, variables, _ = ckpt_lib.restore_model(run_dir, epoch)
        return model, variables

    def ntk(self, run_dir: Path, epoch: int | None = None, x: np.ndarray | None = None) -> np.ndarray:
        """The scalar eNTK (n, n) of a run's checkpoint on the analysis subset (float64 on host)."""
        model, variables = self.model_at(run_dir, epoch)
        apply_fn, params = flax_apply_fn(model, variables)
        K = empirical_ntk(apply_fn, params, self.x_sub if x is None else x, mode=self.config.ntk_mode)
        return np.asarray(K, np.float64)

    def logits(self, run_dir: Path, epoch: int | None = None, x: np.ndarray | None = None) -> np.ndarray:
        model, variables = self.model_at(run_dir, epoch)
        return predict(model, variables, self.x_sub if x is None else x)

    def history(self, run_dir: Path) -> list[dict]:
        return read_json(run_dir / "history.json")

    # ------------------------------------------------------------------ steps
    def teacher_checkpoints(self) -> dict:
        cfg = self.config
        saved = ckpt_lib.list_epochs(self.teacher_dir)
        epochs = [e for e in (cfg.teacher_epochs or saved) if e in saved]
        student0 = self.student_dir(cfg.main_regimes[0]["name"], cfg.seeds[0])
        K = self.ntk(student0, 0)
        s_logits = self.logits(student0, 0)
        teachers = {str(e): self.logits(self.teacher_dir, e) for e in epochs}
        rows = compare_teachers(None, None, self.x_sub, self.y_sub, teachers, temperatures=cfg.temperatures,
                                kernel=K, student_logits=s_logits, ridge=cfg.ridge, seed=0)
        hist = {r["epoch"]: r for r in self.history(self.teacher_dir)}
        for row in rows:
            if row["target"] not in ("labels", "random"):
                e = int(row["target"])
                row.update(teacher_epoch=e, teacher_test_acc=hist[e]["test_acc"], teacher_train_acc=hist[e]["train_acc"])
        return {"n": len(self.y_sub), "mode": cfg.ntk_mode, "kernel": "student NTK at initialisation", "rows": rows}

    def student_complexity(self) -> dict:
        cfg = self.config
        k = self.ds.num_classes
        teacher_saved = ckpt_lib.list_epochs(self.teacher_dir)
        z_final = self.logits(self.teacher_dir)
        fixed = {"labels": np.asarray(one_hot(self.y_sub, k)),
                 "random": np.asarray(random_labels(jax.random.key(0), len(self.y_sub), k))}
        for t in cfg.complexity_temperatures:
            fixed[f"offline_teacher_t{t:g}"] = np.asarray(softmax_targets(z_final, t))
        online_logits: dict[int, np.ndarray] = {}
        panels = []
        for name in cfg.complexity_regimes:
            run = self.student_dir(name, cfg.seeds[0])
            rows = []
            for e in tqdm(ckpt_lib.list_epochs(run), desc=f"complexity {name}", disable=not self.progress, leave=False):
                te = online_teacher_epoch(max(e, teacher_saved[0]), teacher_saved)
                if te not in online_logits:
                    online_logits[te] = self.logits(self.teacher_dir, te)
                factor = factor_kernel(self.ntk(run, e), ridge=cfg.ridge)
                row = {"epoch": e, "online_teacher_epoch": te,
                       **{key: factor.adjusted_complexity(Y) for key, Y in fixed.items()}}
                for t in cfg.complexity_temperatures:
                    row[f"online_teacher_t{t:g}"] = factor.adjusted_complexity(softmax_targets(online_logits[te], t))
                # LAPACK's condition *estimate* varies in its last bits between runs (threaded BLAS);
                # rounded so that identical runs give identical results files.
                rows.append({**row, "condition_number": float(f"{factor.info.condition_number:.4g}")})
            panels.append({"regime": name, "rows": rows})
        return {"n": len(self.y_sub), "mode": cfg.ntk_mode, "temperatures": cfg.complexity_temperatures,
                "panels": panels}

    def distillation(self) -> dict:
        cfg = self.config
        per_run, rows = [], []
        keys = ("test_acc", "train_acc", "train_fidelity", "test_fidelity", "test_kl")
        for regime in cfg.regimes:
            finals = []
            for seed in cfg.seeds:
                last = self.history(self.student_dir(regime["name"], seed))[-1]
                finals.append(last)
                per_run.append({"regime": regime["name"], "seed": seed, **{k: last.get(k) for k in keys}})
            row = {"regime": regime["name"], "student": regime.get("student", "main"),
                   "kind": regime.get("regime", "none"), "temperature": regime.get("temperature"),
                   "seeds": len(finals)}
            for key in keys:
                vals = [f[key] for f in finals if f.get(key) is not None]
                if vals:
                    row[f"{key}_mean"], row[f"{key}_std"] = float(np.mean(vals)), float(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            rows.append(row)
        teacher_last = self.history(self.teacher_dir)[-1]
        return {"rows": rows, "runs": per_run, "teacher_test_acc": teacher_last["test_acc"],
                "teacher_train_acc": teacher_last["train_acc"]}

    def ntk_similarity(self) -> dict:
        cfg = self.config
        seed = cfg.seeds[0]
        K_teacher = self.ntk(self.teacher_dir)
        finals, rows = {}, []
        for regime in tqdm(cfg.main_regimes, desc="NTK similarity", disable=not self.progress, leave=False):
            run = self.student_dir(regime["name"], seed)
            K0, K1 = self.ntk(run, 0), self.ntk(run)
            finals[regime["name"]] = K1
            rows.append({"regime": regime["name"],
                         "alignment_vs_init": kernel_alignment(K1, K0),
                         "cka_vs_init": kernel_alignment(K1, K0, centered=True),
                         "alignment_vs_teacher": kernel_alignment(K1, K_teacher),
                         "cka_vs_teacher": kernel_alignment(K1, K_teacher, centered=True),
                         "init_alignment_vs_teacher": kernel_alignment(K0, K_teacher),
                         "init_cka_vs_teacher": kernel_alignment(K0, K_teacher, centered=True)})
        names = list(finals)
        pairwise = [[kernel_alignment(finals[a], finals[b], centered=True) for b in names] for a in names]
        return {"n": len(self.y_sub), "mode": cfg.ntk_mode, "seed": seed, "rows": rows,
                "pairwise_cka": {"regimes": names, "matrix": pairwise}}

    def margins(self) -> dict:
        cfg = self.config
        seed = cfg.seeds[0]
        z_teacher = self.logits(self.teacher_dir)
        ref = z_teacher.argmax(1)
        out = []
        for regime in tqdm(cfg.main_regimes, desc="margins", disable=not self.progress, leave=False):
            run = self.student_dir(regime["name"], seed)
            z = self.logits(run)
            m = np.asarray(metrics.margins(z, ref))
            targets = self._regime_targets(regime)
            factor = factor_kernel(self.ntk(run), ridge=cfg.ridge)
            C = factor.complexity(targets)
            bounds = [margin_bound(z, z_teacher, self.y_sub, complexity=C, kernel_trace=factor.trace,
                                   gamma=g, delta=cfg.delta).as_dict() for g in cfg.gammas]
            out.append({"regime": regime["name"], "margins": m.tolist(),
                        "summary": metrics.margin_summary(m, gammas=(0.0, 1.0)),
                        "complexity": C, "adjusted_complexity": factor.adjusted_complexity(targets),
                        "bound": bounds, "best_bound": min(bounds, key=lambda b: b["total"])})
        return {"n": len(self.y_sub), "mode": cfg.ntk_mode, "seed": seed,
                "kernel": "trained student's NTK; targets = the regime's final supervision", "rows": out}

    def _regime_targets(self, regime: dict) -> np.ndarray:
        """The supervision a regime ends with: labels, or the (last) teacher's softened predictions."""
        kind = regime.get("regime", "none")
        if kind == "none":
            return np.asarray(one_hot(self.y_sub, self.ds.num_classes))
        epoch = regime.get("teacher_epoch") if kind == "early_stopped" else None
        return np.asarray(softmax_targets(self.logits(self.teacher_dir, epoch), float(regime.get("temperature", 1.0))))

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


def teacher_complexity_table(student_dir: str | os.PathLike, teacher_dirs, *, student_epoch: int = 0,
                             teacher_epochs: list[int] | None = None, temperatures=(1.0, 2.0, 4.0, 8.0),
                             n: int = 1000, mode: str = "trace", ridge: float = 0.0,
                             data_dir: str | None = None) -> list[dict]:
    """Complexity of teacher checkpoints' targets in a student's NTK, from run folders.

    The student's checkpoint fixes the dataset (from its metadata); the kernel
    is its eNTK on the first ``n`` training examples. See
    :func:`ntkd.complexity.compare_teachers` for the columns; rows of teacher
    checkpoints also carry ``teacher_run``, ``teacher_epoch`` and
    ``teacher_test_acc`` (from the teacher's history).

    Args:
        student_dir: student (or any) run folder whose NTK measures complexity.
        teacher_dirs: one or more teacher run folders.
        student_epoch: the student checkpoint (0 = initialisation).
        teacher_epochs: teacher checkpoints to use (None: every saved one).
        temperatures, mode, ridge: see :func:`ntkd.complexity.compare_teachers`.
        n: number of training examples.
        data_dir: folder with local archives, when the dataset needs one.
    """
    model, variables, meta = ckpt_lib.restore_model(student_dir, student_epoch)
    ds = load_dataset(meta["dataset"], data_dir=data_dir, seed=meta.get("data_seed", 0), **meta["dataset_options"])
    x, y = ds.x_train[:n], ds.y_train[:n]
    apply_fn, params = flax_apply_fn(model, variables)
    K = np.asarray(empirical_ntk(apply_fn, params, x, mode=mode), np.float64)
    teachers, info = {}, {}
    for tdir in [teacher_dirs] if isinstance(teacher_dirs, (str, os.PathLike)) else teacher_dirs:
        tdir = Path(tdir)
        saved = ckpt_lib.list_epochs(tdir)
        if not saved:
            raise ckpt_lib.CheckpointError(f"teacher folder {tdir} has no checkpoints")
        hist = {r["epoch"]: r for r in read_json(tdir / "history.json")} if (tdir / "history.json").exists() else {}
        for e in teacher_epochs if teacher_epochs else saved:
            tmodel, tvars, _ = ckpt_lib.restore_model(tdir, e)
            name = f"{tdir.name}@{e}"
            teachers[name] = predict(tmodel, tvars, x)
            info[name] = {"teacher_run": str(tdir), "teacher_epoch": e,
                          "teacher_test_acc": hist.get(e, {}).get("test_acc")}
    rows = compare_teachers(None, None, x, y, teachers, temperatures=temperatures, kernel=K,
                            student_logits=predict(model, variables, x), ridge=ridge, mode=mode)
    return [{**r, **info.get(r["target"], {})} for r in rows]


def _config_digest(config: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def step_main(step: str, doc: str, argv: list[str] | None = None) -> Path:
    """Command-line entry of one experiment script in ``experiments/``: trains
    what the step needs (resuming), runs the step, redraws its figure.

    Args:
        step: one of :data:`STEPS`.
        doc: the script's docstring (shown by ``--help``).
        argv: arguments (default: ``sys.argv[1:]``).
    """
    import argparse

    from ntkd.configs import get_config
    from ntkd.plotting import plot_study

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist1d", help="study preset (ntkd.configs)")
    parser.add_argument("--quick", action="store_true", help="the small smoke-test version")
    parser.add_argument("--out", default=None, help="study folder (default results/<dataset>[_quick])")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    cfg = get_config(args.dataset, quick=args.quick)
    if args.data_dir:
        cfg.data_dir = args.data_dir
    study = Study(cfg, args.out or f"results/{args.dataset}{'_quick' if args.quick else ''}")
    study.train_all()
    study.run_step(step)
    for path in plot_study(study.out):
        if path.stem == step:
            print(path)
    return study.out


def _record_training_time(path: Path, seconds: float) -> None:
    """Appends this invocation's training wall time; a resumed run keeps the earlier ones.

    No result depends on it, so an unreadable file is replaced (with a warning) rather than fatal.
    """
    try:
        history = read_json(path).get("history", []) if path.exists() else []
        history = [float(s) for s in history]
    except (ValueError, AttributeError, TypeError) as e:
        import warnings

        warnings.warn(f"{path} is unreadable ({e}); starting its record of training times afresh")
        history = []
    history.append(seconds)
    write_json(path, {"seconds": sum(history), "history": history})


def run_study(config: StudyConfig, out: str | os.PathLike, *, steps: tuple[str, ...] = STEPS,
              progress: bool = True, figures: bool = True) -> Path:
    """Trains every run, runs the analysis steps, draws the figures and writes report.md.

    Returns:
        The study folder.
    """
    from ntkd.plotting import plot_study
    from ntkd.report import write_report

    study = Study(config, out, progress=progress)
    t0 = time.perf_counter()
    study.train_all()
    _record_training_time(study.out / "timings" / "training.json", time.perf_counter() - t0)
    for step in tqdm(steps, desc="analyses", disable=not progress):
        study.run_step(step)
    if figures:
        plot_study(study.out)
    write_report(study.out)
    return study.out
