"""The ``ntkd`` command line: a thin layer over the library.

Each subcommand is one ``_cmd_*`` function that parses nothing itself and
calls library functions; ``_COMMANDS`` registers them.

    ntkd train-teacher --out runs/teacher
    ntkd distill --teacher runs/teacher --regime online --out runs/online
"""

from __future__ import annotations

import argparse
import json
import sys
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


def _add_train_args(p: argparse.ArgumentParser, *, model: str, epochs: int, lr: float) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="mnist1d",
        help="mnist1d, digits, cifar10, cifar100, tinyimagenet, gaussian",
    )
    g.add_argument(
        "--dataset-options",
        type=_json_object,
        default={},
        metavar="JSON",
        help="loader options, e.g. '{\"num_samples\": 2000}'",
    )
    g.add_argument(
        "--data-dir", default=None, help="folder with local archives (CIFAR, Tiny-ImageNet)"
    )
    g = p.add_argument_group("model and optimisation")
    g.add_argument(
        "--model", default=model, help="mlp, cnn1d, lenet5, resnet20, resnet56, resnet110"
    )
    g.add_argument(
        "--model-options",
        type=_json_object,
        default={},
        metavar="JSON",
        help="model options, e.g. '{\"widths\": [512, 512]}' or '{\"width\": 8}'",
    )
    g.add_argument("--epochs", type=_positive_int, default=epochs)
    g.add_argument("--batch-size", type=_positive_int, default=128)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=_positive_float, default=lr, help="peak learning rate (> 0)")
    g.add_argument("--schedule", choices=("constant", "cosine", "step"), default="cosine")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument(
        "--augment",
        action="store_true",
        help="random crop + flip (images) or random shift + noise (1-D signals)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=1,
        help="save every N epochs (0 and last always)",
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


def _config_from_args(args, **extra):
    from ntkd.training import TrainConfig

    return TrainConfig(
        dataset=args.dataset,
        dataset_options=args.dataset_options,
        data_dir=args.data_dir,
        model=args.model,
        model_options=args.model_options,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        schedule=args.schedule,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        augment=args.augment,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        **extra,
    )


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
            _config_from_args(args),
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
    _add_train_args(p, model="cnn1d", epochs=60, lr=1e-2)
    p.set_defaults(func=_cmd_train_teacher)


def _cmd_distill(args) -> int:
    from ntkd.training import train_student

    teacher = str(Path(args.teacher).resolve()) if args.teacher else None
    cfg = _config_from_args(
        args,
        regime=args.regime,
        teacher_dir=teacher,
        teacher_epoch=args.teacher_epoch,
        temperature=args.temperature,
        alpha=args.alpha,
    )
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
    _add_train_args(p, model="mlp", epochs=60, lr=1e-2)
    p.add_argument(
        "--regime", choices=("none", "offline", "early_stopped", "online"), default="offline"
    )
    p.add_argument("--teacher", default=None, help="the teacher's run folder (its --out)")
    p.add_argument(
        "--teacher-epoch", type=int, default=None, help="checkpoint for --regime early_stopped"
    )
    p.add_argument("--temperature", "-T", type=float, default=1.0, help="KD temperature tau")
    p.add_argument(
        "--alpha", type=float, default=1.0, help="weight of the KD term (1 - alpha on labels)"
    )
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


def _cmd_reproduce(args) -> int:
    from ntkd.configs import get_config
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
    cfg = get_config(args.dataset, quick=args.quick)
    if args.seed_offset:
        cfg = cfg.shifted_seeds(args.seed_offset)
    if args.data_dir:
        cfg.data_dir = args.data_dir
    suffix = ("_quick" if args.quick else "") + (
        f"_seeds+{args.seed_offset}" if args.seed_offset else ""
    )
    out = args.out or f"results/{args.dataset}{suffix}"
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
    p.add_argument(
        "--dataset", default="mnist1d", help="preset: mnist1d (default), digits, cifar10, cifar100"
    )
    p.add_argument(
        "--quick", action="store_true", help="a small smoke-test version (about 2 minutes)"
    )
    p.add_argument("--out", default=None, help="study folder (default results/<dataset>[_quick])")
    p.add_argument("--data-dir", default=None, help="folder with local archives (CIFAR)")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)


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
    """Entry point of the ``ntkd`` console script."""
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
