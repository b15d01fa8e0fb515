"""The ``ntkd`` command line: a thin layer over the library, and the only one.

Each subcommand is one ``_cmd_*`` function that parses nothing itself and
calls library functions; ``_COMMANDS`` registers them. The training flags of
``train-teacher`` and ``distill`` are generated from the fields of
:class:`ntkd.training.TrainConfig` (type, default, help and flag name in each
field's metadata), so a new training option is one new field. ``reproduce``
and ``step`` take ``--set KEY=VALUE`` overrides of the study preset
(:meth:`ntkd.study.StudyConfig.with_overrides`). The scripts in
``experiments/`` call :func:`main`.

    ntkd train-teacher --out runs/teacher
    ntkd distill --teacher runs/teacher --regime online --out runs/online
    ntkd reproduce --quick --set seeds=[0,1] --set analysis_seeds=[0,1]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not valid JSON: {text!r} ({e}); e.g. '{{\"widths\": [256, 256]}}'"
        ) from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is JSON but not an object of option names and values; "
            "e.g. '{\"widths\": [256, 256]}'"
        )
    return value


def _override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: VALUE as JSON, else a Python literal, else a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE; e.g. --set seeds=[0,1] or --set teacher.epochs=30"
        )
    for parse in (json.loads, ast.literal_eval):
        try:
            return key.strip(), parse(raw)
        except (ValueError, SyntaxError):
            pass
    return key.strip(), raw


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_GROUP_TITLES = {
    "data": "data",
    "training": "model and optimisation",
    "distillation": "distillation",
}


def _flag_type(annotation, *, positive: bool):
    """The argparse ``type`` of a TrainConfig field from its annotation."""
    kind = next(t for t in typing.get_args(annotation) or (annotation,) if t is not type(None))
    if kind is dict:
        return _json_object
    if kind is int:
        return _positive_int if positive else int
    if kind is float:
        return _positive_float if positive else float
    if kind is list:
        return int  # with nargs="+": checkpoint_epochs
    return str


def _train_fields(*, distill: bool) -> list[dataclasses.Field]:
    from ntkd.training import TrainConfig

    return [
        f
        for f in dataclasses.fields(TrainConfig)
        if distill or f.metadata["group"] != "distillation"
    ]


def _add_train_args(p: argparse.ArgumentParser, *, distill: bool, **defaults) -> None:
    """One flag per TrainConfig field (type, default and help from the field), ``defaults``
    replacing the dataclass's for this command."""
    from ntkd.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in _train_fields(distill=distill):
        m = f.metadata
        if m["group"] not in groups:
            groups[m["group"]] = p.add_argument_group(_GROUP_TITLES[m["group"]])
        group = groups[m["group"]]
        flags = m["flags"] or ("--" + f.name.replace("_", "-"),)
        default = defaults.get(
            f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default
        )
        if hints[f.name] is bool:
            group.add_argument(
                *flags,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=m["help"],
            )
            continue
        kwargs = {"nargs": "+"} if list in (typing.get_args(hints[f.name]) or ()) else {}
        if m["choices"]:
            kwargs["choices"] = m["choices"]
        else:
            kwargs["metavar"] = (
                "JSON" if hints[f.name] is dict else flags[0].lstrip("-").upper().replace("-", "_")
            )
        group.add_argument(
            *flags,
            dest=f.name,
            type=_flag_type(hints[f.name], positive=m["positive"]),
            default=default,
            help=f"{m['help']} (default: {default})" if default not in (None, {}) else m["help"],
            **kwargs,
        )
    p.add_argument(
        "--out", required=True, help="run folder; rerunning on it resumes an interrupted run"
    )
    p.add_argument(
        "--amend-optimizer",
        action="store_true",
        help="continue the run in --out from its latest checkpoint with changed optimiser settings "
        "(--optimizer, --lr, --schedule, --momentum, --weight-decay, --warmup-epochs), e.g. "
        "after a divergence; recorded in OUT/config_history.json",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _config_from_args(args, *, distill: bool):
    from ntkd.training import TrainConfig

    fields = {f.name: getattr(args, f.name) for f in _train_fields(distill=distill)}
    if fields.get("teacher_dir"):
        fields["teacher_dir"] = str(Path(fields["teacher_dir"]).resolve())
    return TrainConfig(**fields)


def _print_summary(result: dict) -> None:
    last = result["history"][-1]
    keys = [
        k
        for k in (
            "epoch",
            "train_acc",
            "test_acc",
            "train_fidelity",
            "test_fidelity",
            "test_kl",
            "margin_median",
        )
        if k in last
    ]
    print(
        "  ".join(
            f"{k}={last[k]:.4g}" if isinstance(last[k], float) else f"{k}={last[k]}" for k in keys
        )
    )
    print(f"results in {result['workdir']} (config.json, history.json, checkpoints/)")


def _cmd_train_teacher(args) -> int:
    from ntkd.training import train_teacher

    _print_summary(
        train_teacher(
            _config_from_args(args, distill=False),
            args.out,
            progress=not args.no_progress,
            amend_optimizer=args.amend_optimizer,
        )
    )
    return 0


def _parser_train_teacher(sub) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train a teacher with cross-entropy, checkpointing along training",
        description="Train a teacher with cross-entropy on labels; saves a checkpoint every "
        "--checkpoint-every epochs (epoch 0 = init) for later KD and analysis.",
    )
    _add_train_args(p, distill=False)
    p.set_defaults(func=_cmd_train_teacher)


def _cmd_distill(args) -> int:
    from ntkd.training import train_student

    cfg = _config_from_args(args, distill=True)
    _print_summary(
        train_student(
            cfg, args.out, progress=not args.no_progress, amend_optimizer=args.amend_optimizer
        )
    )
    return 0


def _parser_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student: no KD, offline, early-stopped or online KD",
        description="Train a student. Regimes: none (labels only), offline (final teacher), "
        "early_stopped (teacher checkpoint --teacher-epoch), online (at student "
        "epoch e the teacher checkpoint of epoch e, or the latest saved before).",
    )
    _add_train_args(p, distill=True, model="mlp", regime="offline")
    p.set_defaults(func=_cmd_distill)


def _cmd_theory(args) -> int:
    from ntkd.theory import run_experiment

    run_experiment(args.experiment, args.out, quick=args.quick, seed=args.seed)
    print(f"wrote {args.out}/theory_{args.experiment}.json and .png")
    return 0


def _parser_theory(sub) -> None:
    p = sub.add_parser(
        "theory",
        help="KD-theory mechanisms: linear (Phuong & Lampert), variance (Safaryan et "
        "al.), knowledge (Tang et al.)",
        description="Run one KD-theory experiment; writes OUT/theory_<name>.json and .png.",
    )
    p.add_argument("experiment", choices=("linear", "variance", "knowledge"))
    p.add_argument("--out", default="figures", help="folder for the JSON results and the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes that run in seconds (tests, CI)"
    )
    p.set_defaults(func=_cmd_theory)


def _cmd_complexity(args) -> int:
    from ntkd.complexity import format_table, write_table
    from ntkd.study import teacher_complexity_table

    rows = teacher_complexity_table(
        args.student,
        args.teacher,
        student_epoch=args.student_epoch,
        teacher_epochs=args.teacher_epochs,
        temperatures=args.temperatures,
        n=args.n,
        mode=args.mode,
        ridge=args.ridge,
        data_dir=args.data_dir,
        path=args.path,
        memory_budget=args.memory_budget,
        rtol=args.rtol,
    )
    # The printed table shows each certified interval in one cell; the files keep every column.
    cells = {"complexity": "C interval", "adjusted_complexity": "A interval"}
    cells["normalized_complexity"] = "Â interval"
    shown = []
    for r in rows:
        row = {}
        for c, v in r.items():
            if c.endswith(("_lower", "_upper")):
                continue
            row[c] = v
            if c in cells and r["path"] == "matfree":
                stem = c.split("_")[0]
                row[cells[c]] = f"[{r[stem + '_lower']:.5g}, {r[stem + '_upper']:.5g}]"
        shown.append(row)
    print(format_table(shown))
    paths = write_table(rows, str(Path(args.out) / "complexity"))
    print(f"path: {rows[0]['path']} (n={rows[0]['n']}); wrote " + ", ".join(map(str, paths)))
    return 0


def _parser_complexity(sub) -> None:
    def examples(text: str):
        if text == "all":
            return text
        try:
            return _positive_int(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or 'all' for the whole training set)") from None

    def memory_size(text: str) -> int:
        from ntkd.matfree import parse_bytes

        try:
            return parse_bytes(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = sub.add_parser(
        "complexity",
        help="supervision complexity of teacher checkpoints in a student's NTK",
        description="For every checkpoint of each --teacher run and every temperature, the "
        "(adjusted) supervision complexity of the teacher's softened predictions in the "
        "student's eNTK on the first --n training examples, with teacher accuracy and "
        "student margin statistics; true and random labels as references. When the dense "
        "kernel does not fit --memory-budget (or with --path matfree) every row gets a "
        "certified interval from matrix-free kernel products instead (needs --ridge > 0); "
        "the column 'path' says which (docs/matfree.md).",
    )
    p.add_argument("--student", required=True, help="student run folder")
    p.add_argument(
        "--student-epoch",
        type=int,
        default=0,
        help="student checkpoint whose NTK is used (0 = init)",
    )
    p.add_argument("--teacher", required=True, nargs="+", help="teacher run folder(s)")
    p.add_argument(
        "--teacher-epochs",
        type=int,
        nargs="*",
        default=None,
        help="checkpoints (default: all saved)",
    )
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument(
        "--n",
        type=examples,
        default=1000,
        help="training examples in the kernel (>= 1), or 'all' for the whole training set",
    )
    p.add_argument(
        "--mode", choices=("trace", "sum", "logit", "full"), default="trace", help="eNTK mode"
    )
    p.add_argument("--ridge", type=float, default=0.0, help="relative ridge (times tr K / n)")
    p.add_argument(
        "--path",
        choices=("auto", "dense", "matfree"),
        default="auto",
        help="dense Cholesky, matrix-free certified bounds, or auto: dense when the kernel "
        "and its factor (20 bytes per entry) fit --memory-budget",
    )
    p.add_argument(
        "--memory-budget",
        type=memory_size,
        default=None,
        metavar="SIZE",
        help="memory for the dense path, e.g. 8GiB, 512MiB or bytes "
        "(default: half the available memory)",
    )
    p.add_argument(
        "--rtol",
        type=_positive_float,
        default=1e-2,
        help="matrix-free path: stop when (upper - lower) / lower <= RTOL",
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="folder for complexity.csv / complexity.json")
    p.set_defaults(func=_cmd_complexity)


def _add_preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="mnist1d", help="preset: mnist1d (default), digits, cifar10, cifar100"
    )
    p.add_argument(
        "--quick", action="store_true", help="a small smoke-test version (about 2 minutes)"
    )
    p.add_argument("--out", default=None, help="study folder (default results/<dataset>[_quick])")
    p.add_argument("--data-dir", default=None, help="folder with local archives (CIFAR)")
    p.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the preset (repeatable): VALUE is JSON or a Python literal "
        "(a bare word is a string); dotted keys reach into nested fields, e.g. --set seeds=[0,1] "
        "--set analysis_seeds=[0] --set teacher.epochs=30; a bare training field (epochs) sets "
        "the teacher's and the students'. Recorded in study.json; a folder holding another "
        "configuration (or other pre-registered criteria) refuses it",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _preset(args, suffix: str = ""):
    """The study configuration of the preset flags, and its default folder."""
    from ntkd.configs import get_config

    cfg = get_config(args.dataset, quick=args.quick)
    if args.overrides:
        cfg = cfg.with_overrides(dict(args.overrides))
    if args.data_dir:
        cfg.data_dir = args.data_dir
    return cfg, args.out or f"results/{args.dataset}{'_quick' if args.quick else ''}{suffix}"


def _cmd_reproduce(args) -> int:
    from ntkd.study import run_study

    if args.seed_offset < 0:
        print(f"error: --seed-offset must be >= 0, got {args.seed_offset}", file=sys.stderr)
        return 2
    if args.compare_with and not (Path(args.compare_with) / "results" / "findings.json").is_file():
        print(
            f"error: --compare-with {args.compare_with} holds no results/findings.json; run that study first",
            file=sys.stderr,
        )
        return 2
    cfg, out = _preset(args, f"_seeds+{args.seed_offset}" if args.seed_offset else "")
    if args.seed_offset:
        cfg = cfg.shifted_seeds(args.seed_offset)
    path = run_study(cfg, out, progress=not args.no_progress)
    if args.compare_with:
        from ntkd.findings import compare_findings
        from ntkd.report import write_report

        compare_findings(args.compare_with, path)
        write_report(args.compare_with)
        print(f"stability: {Path(args.compare_with) / 'results' / 'stability.json'}")
    print(
        f"report: {path / 'report.md'}\nfindings: {path / 'results' / 'findings.json'}\n"
        f"figures: {path / 'figures'}\nresults: {path / 'results'}"
    )
    return 0


def _parser_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the whole study: train, analyse, plot, write report.md",
        description="Train the teacher and the students of every KD regime, run the five analyses "
        "(teacher checkpoints, complexity along training, distillation table, NTK "
        "similarity, margins and bound), draw the figures and write report.md. "
        "Interrupted runs resume; finished steps are not recomputed.",
    )
    _add_preset_args(p)
    p.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="shift every seed by N: the same study on a disjoint seed set (stability check)",
    )
    p.add_argument(
        "--compare-with",
        default=None,
        metavar="STUDY_DIR",
        help="after the run, compare its verdicts with STUDY_DIR's (run on other seeds) and add the "
        "comparison to STUDY_DIR's report",
    )
    p.set_defaults(func=_cmd_reproduce)


def _cmd_step(args) -> int:
    from ntkd.study import run_study_step

    cfg, out = _preset(args)
    figure = run_study_step(cfg, out, args.step, progress=not args.no_progress)
    print(f"results: {Path(out) / 'results' / (args.step + '.json')}")
    if figure:
        print(f"figure: {figure}")
    return 0


def _parser_step(sub) -> None:
    from ntkd.study import STEPS

    p = sub.add_parser(
        "step",
        help="one analysis of the study (training what it needs first)",
        description="Train (or resume) the study's runs, then run one of its analyses and draw "
        "its figure; the experiments/*.py scripts call this. `ntkd reproduce` runs them all "
        "and adds the findings and the report.",
    )
    p.add_argument("step", choices=STEPS)
    _add_preset_args(p)
    p.set_defaults(func=_cmd_step)


def _cmd_figures(args) -> int:
    from ntkd.plotting import plot_study
    from ntkd.theory import plot_all

    folder = Path(args.results_dir)
    if not folder.is_dir():
        print(
            f"error: {folder} is not a folder; pass a study folder (the --out of `ntkd reproduce`) or a "
            "figures folder holding study/ and theory_*.json",
            file=sys.stderr,
        )
        return 2
    written = []
    if (folder / "results").is_dir():  # a study folder written by `ntkd reproduce`
        written += plot_study(folder, args.to or folder / "figures")
    elif (
        folder / "study" / "results"
    ).is_dir():  # a figures folder with the study's results beside it
        written += plot_study(folder / "study", args.to or folder)
    written += plot_all(folder, args.to or folder)
    if not written:
        print(
            f"error: nothing to plot in {folder}: expected results/*.json (a study folder), "
            "study/results/*.json or theory_*.json",
            file=sys.stderr,
        )
        return 2
    for path in written:
        print(path)
    return 0


def _parser_figures(sub) -> None:
    p = sub.add_parser(
        "figures",
        help="redraw every figure from saved results",
        description="Redraw figures from saved results alone. RESULTS_DIR is either a study "
        "folder (the --out of `ntkd reproduce`; figures go to RESULTS_DIR/figures) or "
        "a figures folder like the repository's figures/ (study results under "
        "study/results, theory results as theory_*.json; figures are drawn beside "
        "them).",
    )
    p.add_argument(
        "results_dir",
        nargs="?",
        default="figures",
        help="study or figures folder (default: figures)",
    )
    p.add_argument("--to", default=None, help="write the PNGs here instead")
    p.set_defaults(func=_cmd_figures)


_COMMANDS: list[Callable] = [
    _parser_train_teacher,
    _parser_distill,
    _parser_complexity,
    _parser_reproduce,
    _parser_step,
    _parser_figures,
    _parser_theory,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntkd", description="Knowledge distillation through the student's empirical NTK."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _enable_compilation_cache() -> None:
    """Reuses XLA compilations across runs (``$NTKD_JAX_CACHE``, default ~/.cache/ntkd/jax)."""
    import os

    import jax

    path = os.environ.get("NTKD_JAX_CACHE", str(Path.home() / ".cache" / "ntkd" / "jax"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ntkd`` console script (and of ``experiments/*.py``).

    Before any JAX work it applies the process-wide settings a library import leaves alone:
    glibc's allocator keeps freed host memory (:func:`ntkd.tune_host_memory`; ``NTKD_TUNE_MALLOC=0``
    opts out), figures render with matplotlib's file-only Agg backend, and XLA compilations are
    cached on disk.
    """
    from ntkd import _hostmem

    _hostmem.tune()
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished checkpoints and results are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        print(f"ntkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
