"""Pre-registered findings of a study and their evaluation.

A *criterion* is a plain dict that lives in the study preset (and so in
``study.json``, hashed as ``criteria_sha256`` before any training):

    {"name": "...", "statistic": "temperature", "params": {...},
     "direction": 1, "alpha": 0.05, "kind": "complexity", "criterion": "text"}

``statistic`` names one of the functions of :data:`STATISTICS`; ``params`` are
its arguments; ``direction`` is the sign the paper predicts. Every statistic
is computed *per seed* (paired: the same student initialisation and batch
order in both conditions) or, for statistics of several seeds (a rank
correlation, a regression slope), by a stratified bootstrap over seeds.

Verdicts (:func:`ntkd.stats.verdict`), after a Holm correction across all
findings of the run: **reproduced** (adjusted p < α, effect in the paper's
direction), **not reproduced** (adjusted p < α, the other direction),
**inconclusive** (otherwise).

Complexity findings are decided on the scale-free complexity Â (a property of
the kernel, not of the targets' size) and report the same statistic under
three controls: A itself, the identity kernel (A(Y; I) = RMS row norm of Y:
what target size alone does), and Â with each teacher target replaced by
label smoothing of the same Frobenius norm (what softening alone does). A
finding whose statistic is significant in the paper's direction under A but
not under Â (both at their uncorrected p) is flagged ``size_effect_only``.

On the matrix-free complexity path (``StudyConfig.complexity_path``) every
complexity is a certified interval. The verdict is decided on the midpoint
values, exactly as on the dense path; each complexity finding also records
``bounds``: the statistic's interval per seed and of the effect (interval
arithmetic on the complexities), the seeds whose interval holds 0 (where the
intervals do not give the ordering the criterion predicts), and the verdict
with every seed at the lower and at the upper end of its interval, so that a
verdict the intervals do not decide says so (:func:`evaluate_findings`).

:func:`write_findings` evaluates a study folder's criteria on its
``results/*.json`` and writes ``results/findings.json``: a list of objects
with ``name``, ``verdict``, ``effect``, ``ci`` ([lo, hi]), ``p``,
``p_adjusted``, ``criterion`` and, for complexity findings, ``controls``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from ntkd._io import read_json, write_json
from ntkd.stats import PairedResult, bootstrap_statistic, holm, paired_test, verdict

__all__ = [
    "STATISTICS",
    "NotTestable",
    "Bounds",
    "compare_findings",
    "complexity_kernels",
    "evaluate_findings",
    "paper_criteria",
    "write_findings",
]


class NotTestable(ValueError):
    """The study lacks what a criterion needs (e.g. fewer than 3 students for a slope)."""


# Measures of a complexity statistic: the verdict's (A_hat) and its controls.
MEASURES = {
    "A_hat": "normalised Â",
    "A": "adjusted A",
    "identity": "A under the identity kernel",
    "ls": "Â with teacher targets replaced by equal-norm label smoothing",
}
CONTROL_NAMES = {"A": "A", "identity": "identity_kernel", "ls": "label_smoothing_matched"}


BOUNDS = ":bounds"  # suffix of a measure: its certified interval instead of its value


class Bounds:
    """A certified interval [lo, hi] on a statistic of matrix-free complexities.

    Interval arithmetic for what the statistics do with complexities (``+ − ×
    ÷`` and a number, :func:`_mean`, :func:`_min`); it has no ordering and no
    ``float``, so no statistic can silently take a midpoint of it.
    """

    __slots__ = ("lo", "hi")

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = float(lo), float(hi)

    def __repr__(self) -> str:
        return f"Bounds({self.lo!r}, {self.hi!r})"

    @staticmethod
    def of(v) -> Bounds:
        """``v`` itself if it is an interval, else the point interval [v, v]."""
        return v if isinstance(v, Bounds) else Bounds(v, v)

    def __add__(self, other) -> Bounds:
        o = Bounds.of(other)
        return Bounds(self.lo + o.lo, self.hi + o.hi)

    __radd__ = __add__

    def __neg__(self) -> Bounds:
        return Bounds(-self.hi, -self.lo)

    def __sub__(self, other) -> Bounds:
        return self + -Bounds.of(other)

    def __rsub__(self, other) -> Bounds:
        return Bounds.of(other) - self

    def __mul__(self, other) -> Bounds:
        o = Bounds.of(other)
        ends = [self.lo * o.lo, self.lo * o.hi, self.hi * o.lo, self.hi * o.hi]
        return Bounds(min(ends), max(ends))

    __rmul__ = __mul__

    def __truediv__(self, other) -> Bounds:
        o = Bounds.of(other)
        if o.lo <= 0 <= o.hi:
            return Bounds(-np.inf, np.inf)
        return self * Bounds(1 / o.hi, 1 / o.lo)

    def __rtruediv__(self, other) -> Bounds:
        return Bounds.of(other) / self


def _mean(values) -> float | Bounds:
    values = list(values)
    if any(isinstance(v, Bounds) for v in values):
        return sum(values, Bounds(0, 0)) / len(values)
    return float(np.mean(values))


def _min(values) -> float | Bounds:
    values = list(values)
    if any(isinstance(v, Bounds) for v in values):
        values = [Bounds.of(v) for v in values]
        return Bounds(min(v.lo for v in values), min(v.hi for v in values))
    return min(values)


def _value(entry: dict, measure: str) -> float | Bounds:
    """One complexity of a result entry; ``measure + BOUNDS``: its interval (``*_lower``,
    ``*_upper`` of the matrix-free path; a dense or exact value is its own interval)."""
    measure, bounds = measure.removesuffix(BOUNDS), measure.endswith(BOUNDS)
    if measure == "identity":
        key = "A_identity"
    elif measure == "ls":
        # labels and random labels are their own control
        key = "ls_A_hat" if "ls_A_hat" in entry else "A_hat"
    else:
        key = measure
    if not bounds:
        return entry[key]
    return Bounds(entry.get(f"{key}_lower", entry[key]), entry.get(f"{key}_upper", entry[key]))


# ----------------------------------------------------------------------------- statistics on results


def _teacher_panels(res: dict) -> dict[int, list[dict]]:
    return {p["seed"]: p["rows"] for p in res["teacher_checkpoints"]["panels"]}


def _teacher_value(rows: list[dict], epoch: int, temperature: float, measure: str) -> float:
    row = next(
        r for r in rows if r.get("teacher_epoch") == epoch and r["temperature"] == temperature
    )
    return _value(row, measure)


def _stat_temperature(res, params, measure):
    """Complexity of the final teacher at τ_low minus at τ_high (student NTK at init)."""
    out = {}
    for seed, rows in _teacher_panels(res).items():
        final = max(r["teacher_epoch"] for r in rows if r.get("teacher_epoch") is not None)
        out[seed] = _teacher_value(rows, final, params["t_low"], measure) - _teacher_value(
            rows, final, params["t_high"], measure
        )
    return out


def _stat_checkpoint_growth(res, params, measure):
    """Complexity of the final teacher checkpoint minus the first trained one, at τ."""
    out = {}
    for seed, rows in _teacher_panels(res).items():
        epochs = sorted({r["teacher_epoch"] for r in rows if r.get("teacher_epoch") is not None})
        first = min(e for e in epochs if e > 0)
        out[seed] = _teacher_value(rows, epochs[-1], params["t"], measure) - _teacher_value(
            rows, first, params["t"], measure
        )
    return out


def _student_panels(res: dict) -> dict[int, list[list[dict]]]:
    """seed → the rows of every followed regime's panel."""
    out: dict[int, list[list[dict]]] = {}
    for p in res["student_complexity"]["panels"]:
        out.setdefault(p["seed"], []).append(p["rows"])
    return out


def checkpoint_at(rows: list[dict], fraction: float) -> dict:
    """The checkpoint row nearest to a fraction of training (ties: the earlier epoch)."""
    return min(rows, key=lambda r: (abs(r["fraction"] - fraction), r["epoch"]))


def _per_seed_mean(res, fn) -> dict[int, float | Bounds]:
    return {
        seed: _mean(fn(rows) for rows in panels) for seed, panels in _student_panels(res).items()
    }


def _stat_target_gap(res, params, measure):
    """Mean over student checkpoints after init of Q(high) − Q(low), averaged over panels."""

    def fn(rows):
        return _mean(
            _value(r["targets"][params["high"]], measure)
            - _value(r["targets"][params["low"]], measure)
            for r in rows
            if r["epoch"] > 0
        )

    return _per_seed_mean(res, fn)


def _stat_online_early_gap(res, params, measure):
    """Q(offline τ) − Q(online τ) at a fraction of student training."""
    t = params["t"]

    def fn(rows):
        r = checkpoint_at(rows, params["fraction"])["targets"]
        return _value(r[f"offline_teacher_t{t:g}"], measure) - _value(
            r[f"online_teacher_t{t:g}"], measure
        )

    return _per_seed_mean(res, fn)


def _stat_online_rise(res, params, measure):
    """Q(online τ) at fraction ``to`` minus at fraction ``from`` (absolute, not relative to offline)."""
    key = f"online_teacher_t{params['t']:g}"

    def fn(rows):
        return _value(checkpoint_at(rows, params["to"])["targets"][key], measure) - _value(
            checkpoint_at(rows, params["from"])["targets"][key], measure
        )

    return _per_seed_mean(res, fn)


def _stat_relative_change(res, params, measure):
    """min over curves of sign·(Q(to) − Q(from)) / Q(from): every curve moves the predicted way."""
    sign = params.get("sign", 1)

    def rel(a, b):
        if isinstance(a, Bounds):  # each interval once: the exact range of the ratio
            return sign * (b / a - 1)
        return sign * (b - a) / a

    def fn(rows):
        a, b = (
            checkpoint_at(rows, params["from"])["targets"],
            checkpoint_at(rows, params["to"])["targets"],
        )
        return _min(rel(_value(a[k], measure), _value(b[k], measure)) for k in params["keys"])

    return _per_seed_mean(res, fn)


def _runs(res: dict) -> dict[tuple[str, int], dict]:
    return {(r["regime"], r["seed"]): r for r in res["distillation"]["runs"]}


def _stat_paired_metric(res, params, measure):
    """metric(regime a) − metric(regime b), per seed both share."""
    del measure
    runs = _runs(res)
    seeds = sorted(
        {s for (name, s) in runs if name == params["a"]}
        & {s for (name, s) in runs if name == params["b"]}
    )
    if not seeds:
        raise NotTestable(f"no seed has runs of both '{params['a']}' and '{params['b']}'")
    return {
        s: runs[params["a"], s][params["metric"]] - runs[params["b"], s][params["metric"]]
        for s in seeds
    }


def capacity_points(
    dist: Mapping[str, Any], temperature: float, metric: str = "test_acc"
) -> dict[str, dict[int, tuple[float, float]]]:
    """student → seed → (capacity gap, online − offline) at τ, from distillation results.

    The capacity gap of a seed is the teacher's test accuracy minus that
    seed's no-KD student; only seeds with a no-KD, an offline and an online
    run at τ count. The capacity-gap criterion, the report's table and the
    figure all read these same numbers.
    """
    runs = {(r["regime"], r["seed"]): r for r in dist["runs"]}
    by_student: dict[str, dict[str, str]] = {}
    for r in dist["rows"]:
        if r["kind"] == "none" or r.get("temperature") == temperature:
            by_student.setdefault(r.get("student", "main"), {})[r["kind"]] = r["regime"]
    table = {}
    for student, names in by_student.items():
        if not {"none", "offline", "online"} <= set(names):
            continue
        seeds = sorted(
            {s for (n, s) in runs if n == names["online"]}
            & {s for (n, s) in runs if n == names["offline"]}
            & {s for (n, s) in runs if n == names["none"]}
        )
        table[student] = {
            s: (
                dist["teacher_test_acc"] - runs[names["none"], s][metric],
                runs[names["online"], s][metric] - runs[names["offline"], s][metric],
            )
            for s in seeds
        }
    return table


def capacity_temperature(findings: Sequence[Mapping[str, Any]], dist: Mapping[str, Any]):
    """τ of the capacity-gap criterion in ``findings`` (older results: the largest KD τ)."""
    for f in findings:
        if f.get("statistic") == "capacity_slope" and "params" in f:
            return f["params"]["temperature"]
    temps = {r["temperature"] for r in dist["rows"] if r["kind"] == "offline"} & {
        r["temperature"] for r in dist["rows"] if r["kind"] == "online"
    }
    return max(temps) if temps else None


def _capacity_table(res, params):
    return capacity_points(
        res["distillation"], params["temperature"], params.get("metric", "test_acc")
    )


def _stat_capacity_slope(res, params, measure) -> PairedResult:
    """OLS slope of (online − offline) on the capacity gap across students; bootstrap over seeds."""
    del measure
    table = _capacity_table(res, params)
    if len(table) < 3:
        raise NotTestable(
            f"the capacity-gap regression needs at least 3 students with no-KD, offline and online "
            f"runs at τ={params['temperature']:g}; this study has {sorted(table)}"
        )

    def slope(ids: Mapping[str, np.ndarray]) -> float:
        gaps = [np.mean([table[s][i][0] for i in ids[s]]) for s in table]
        gains = [np.mean([table[s][i][1] for i in ids[s]]) for s in table]
        if np.ptp(gaps) == 0:
            return float("nan")
        return float(np.polyfit(gaps, gains, 1)[0])

    return bootstrap_statistic(
        {s: sorted(v) for s, v in table.items()},
        slope,
        resamples=params.get("resamples", 2000),
        seed=params.get("seed", 0),
    )


def _stat_bound_spearman(res, params, measure) -> PairedResult:
    """Spearman ρ across regimes between the mean bound and the mean test error; bootstrap over seeds."""
    del measure
    bound = {}
    for r in res["margins"]["rows"]:
        bound.setdefault(r["regime"], {})[r["seed"]] = r["bound"]["total"]
    runs = _runs(res)
    groups = {name: sorted(s for s in seeds if (name, s) in runs) for name, seeds in bound.items()}

    def rho(ids: Mapping[str, np.ndarray]) -> float:
        names = list(ids)
        b = [np.mean([bound[n][i] for i in ids[n]]) for n in names]
        e = [np.mean([1.0 - runs[n, i]["test_acc"] for i in ids[n]]) for n in names]
        if np.ptp(b) == 0 or np.ptp(e) == 0:
            return float("nan")
        return float(spearmanr(b, e).statistic)

    return bootstrap_statistic(
        groups, rho, resamples=params.get("resamples", 2000), seed=params.get("seed", 0)
    )


STATISTICS: dict[str, tuple[str, Callable]] = {
    "temperature": ("teacher_checkpoints", _stat_temperature),
    "checkpoint_growth": ("teacher_checkpoints", _stat_checkpoint_growth),
    "target_gap": ("student_complexity", _stat_target_gap),
    "online_early_gap": ("student_complexity", _stat_online_early_gap),
    "online_rise": ("student_complexity", _stat_online_rise),
    "relative_change": ("student_complexity", _stat_relative_change),
    "paired_metric": ("distillation", _stat_paired_metric),
    "capacity_slope": ("distillation", _stat_capacity_slope),
    "bound_spearman": ("margins", _stat_bound_spearman),
}


# ----------------------------------------------------------------------------- the paper's criteria


def _c(name, statistic, criterion, *, kind, direction=1, alpha=0.05, **params) -> dict:
    return {
        "name": name,
        "statistic": statistic,
        "params": params,
        "direction": direction,
        "alpha": alpha,
        "kind": kind,
        "criterion": criterion,
    }


def paper_criteria(
    *,
    regimes: Mapping[str, str],
    temperatures: Sequence[float] = (1.0, 4.0),
    capacity_temperature: float = 4.0,
    alpha: float = 0.05,
) -> list[dict]:
    """The findings of Harutyunyan et al. (ICLR 2023) as pre-registered criteria.

    Args:
        regimes: names of the main student's regimes: keys ``none``, ``offline_t1``,
            ``offline_t4``, ``early_stopped_t1``, ``online_t1``, ``online_t4``.
        temperatures: (τ_low, τ_high) of the KD comparisons and complexity curves.
        capacity_temperature: τ of the capacity-gap regression.
        alpha: significance level after the Holm correction.

    Returns:
        A list of criterion dicts (see the module docstring), one per finding.
    """
    lo, hi = (float(t) for t in temperatures)
    r = regimes
    off = f"offline_teacher_t{lo:g}"
    common = {"alpha": alpha}
    cx = dict(kind="complexity", **common)
    out = [
        _c(
            "higher temperature lowers the complexity of teacher targets",
            "temperature",
            f"Â(final teacher, τ={lo:g}) − Â(final teacher, τ={hi:g}) in the student's NTK at init, per analysis "
            "seed; paired t-test; > 0 predicted.",
            t_low=lo,
            t_high=hi,
            **cx,
        ),
        _c(
            "later teacher checkpoints have higher complexity",
            "checkpoint_growth",
            f"Â(final teacher, τ={lo:g}) − Â(first trained teacher checkpoint, τ={lo:g}) in the student's NTK at "
            "init, per analysis seed; paired t-test; > 0 predicted.",
            t=lo,
            **cx,
        ),
        _c(
            "random labels are more complex than true labels",
            "target_gap",
            "Â(random labels) − Â(true labels), mean over student checkpoints after init and over the followed "
            "regimes, per analysis seed; paired t-test; > 0 predicted.",
            high="random",
            low="labels",
            **cx,
        ),
        _c(
            "true labels are more complex than the offline teacher's targets",
            "target_gap",
            f"Â(true labels) − Â(offline teacher, τ={lo:g}), mean over student checkpoints after init and over the "
            "followed regimes, per analysis seed; paired t-test; > 0 predicted.",
            high="labels",
            low=off,
            **cx,
        ),
    ]
    for t in (lo, hi):
        out.append(
            _c(
                f"the online teacher's targets start below the offline teacher's (τ={t:g})",
                "online_early_gap",
                f"Â(offline teacher, τ={t:g}) − Â(online teacher, τ={t:g}) at 10% of student training, per "
                "analysis seed; paired t-test; > 0 predicted.",
                t=t,
                fraction=0.1,
                **cx,
            )
        )
    for t in (lo, hi):
        out.append(
            _c(
                f"the online teacher's targets rise during training (τ={t:g})",
                "online_rise",
                f"Â(online teacher, τ={t:g}) at 90% minus at 10% of student training (absolute, in the "
                "student's changing NTK), per analysis seed; paired t-test; > 0 predicted.",
                t=t,
                **{"from": 0.1, "to": 0.9},
                **cx,
            )
        )
    keys = ["labels", "random", off]
    out += [
        _c(
            "all complexity curves drop in the first epochs",
            "relative_change",
            f"min over curves {keys} of the relative drop (Q(0) − Q(10%)) / Q(0) of Â, per analysis seed; paired "
            "t-test; > 0 predicted.",
            keys=keys,
            sign=-1,
            **{"from": 0.0, "to": 0.1},
            **cx,
        ),
        _c(
            "all complexity curves rise again after the early dip",
            "relative_change",
            f"min over curves {keys} of the relative rise (Q(100%) − Q(20%)) / Q(20%) of Â, per analysis seed; "
            "paired t-test; > 0 predicted.",
            keys=keys,
            sign=1,
            **{"from": 0.2, "to": 1.0},
            **cx,
        ),
    ]
    acc = dict(kind="distillation", **common)
    for t, on, offl in (
        (lo, r["online_t1"], r["offline_t1"]),
        (hi, r["online_t4"], r["offline_t4"]),
    ):
        out.append(
            _c(
                f"online KD beats offline KD in test accuracy (τ={t:g})",
                "paired_metric",
                f"test accuracy of '{on}' − '{offl}', paired by seed; paired t-test; > 0 predicted.",
                metric="test_acc",
                a=on,
                b=offl,
                **acc,
            )
        )
        out.append(
            _c(
                f"online KD has higher test fidelity than offline KD (τ={t:g})",
                "paired_metric",
                f"test fidelity (top-1 agreement with the teacher) of '{on}' − '{offl}', paired by seed; "
                "paired t-test; > 0 predicted.",
                metric="test_fidelity",
                a=on,
                b=offl,
                **acc,
            )
        )
    out += [
        _c(
            f"offline KD (τ={hi:g}) beats training on labels",
            "paired_metric",
            f"test accuracy of '{r['offline_t4']}' − '{r['none']}', paired by seed; paired t-test; > 0 predicted.",
            metric="test_acc",
            a=r["offline_t4"],
            b=r["none"],
            **acc,
        ),
        _c(
            f"offline KD (τ={lo:g}) beats training on labels",
            "paired_metric",
            f"test accuracy of '{r['offline_t1']}' − '{r['none']}', paired by seed; paired t-test; > 0 predicted.",
            metric="test_acc",
            a=r["offline_t1"],
            b=r["none"],
            **acc,
        ),
        _c(
            f"an early-stopped teacher beats the final teacher (τ={lo:g})",
            "paired_metric",
            f"test accuracy of '{r['early_stopped_t1']}' − '{r['offline_t1']}', paired by seed; paired t-test; > 0 "
            "predicted.",
            metric="test_acc",
            a=r["early_stopped_t1"],
            b=r["offline_t1"],
            **acc,
        ),
        _c(
            "online KD helps most when the capacity gap is large",
            "capacity_slope",
            f"OLS slope, across students, of the mean (online − offline) test accuracy at τ={capacity_temperature:g} "
            "on the capacity gap (teacher test accuracy − the student's mean no-KD accuracy); 95% percentile CI and "
            "p from 2000 bootstrap resamples of seeds within each student; > 0 predicted.",
            temperature=capacity_temperature,
            metric="test_acc",
            **acc,
        ),
        _c(
            "the kernel-student bound ranks the regimes by test error",
            "bound_spearman",
            "Spearman ρ across the main student's regimes between the mean kernel-student bound and the mean test "
            "error; 95% percentile CI and p from 2000 bootstrap resamples of the analysis seeds within each regime; "
            "> 0 predicted.",
            kind="bound",
            alpha=alpha,
        ),
    ]
    return out


# ----------------------------------------------------------------------------- evaluation


def _result(values: dict | PairedResult) -> PairedResult:
    if isinstance(values, PairedResult):
        return values
    return paired_test([values[s] for s in sorted(values)])


def _is_matfree(step_result: Mapping[str, Any]) -> bool:
    return step_result.get("complexity_path") == "matfree"


def complexity_kernels(step_result: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(where, record) of every kernel a matrix-free complexity step bounded in: its record
    holds ``max_relative_gap``, ``certified``, ``matvecs``, ... (a panel of
    ``teacher_checkpoints``, a checkpoint row of ``student_complexity``); [] for dense results."""
    out = []
    for p in step_result.get("panels", []):
        where = f"{p['regime']}, seed {p['seed']}" if "regime" in p else f"seed {p['seed']}"
        if "certified" in p:
            out.append((where, p))
        out += [(f"{where}, epoch {r['epoch']}", r) for r in p["rows"] if "certified" in r]
    return out


def _bounds_entry(values: Mapping[int, Bounds]) -> dict:
    """Per-seed intervals of a paired statistic and the interval of their mean."""
    per_seed = {s: Bounds.of(values[s]) for s in sorted(values)}
    effect = _mean(per_seed.values())
    return {
        "inputs": "certified intervals (matrix-free complexity path)",
        "effect": [effect.lo, effect.hi],
        "per_seed": {str(s): [b.lo, b.hi] for s, b in per_seed.items()},
        # seeds whose interval holds 0: the intervals do not order the two sides there
        "undecided_seeds": [str(s) for s, b in per_seed.items() if b.lo <= 0 <= b.hi],
    }


def _verdicts_at_ends(row: dict, p_values: list[float], j: int) -> None:
    """The verdict with every seed's statistic at the lower (upper) end of its interval, the
    other findings' p-values as they are (Holm), and whether both ends agree with the verdict."""
    b = row["bounds"]
    for end, k in (("lower", 0), ("upper", 1)):
        ends = [v[k] for v in b["per_seed"].values()]
        if not np.all(np.isfinite(ends)):
            b[f"verdict_at_{end}"] = None
            continue
        r = paired_test(ends)
        p_adj = holm([*p_values[:j], r.p, *p_values[j + 1 :]])[j]
        b[f"p_at_{end}"] = r.p
        b[f"verdict_at_{end}"] = verdict(
            r.effect, p_adj, direction=row["direction"], alpha=row["alpha"]
        )
    b["verdict_holds"] = b["verdict_at_lower"] == b["verdict_at_upper"] == row["verdict"]


def evaluate_findings(criteria: list[dict], results: Mapping[str, dict]) -> list[dict]:
    """Evaluates pre-registered criteria on a study's results.

    Args:
        criteria: criterion dicts (see the module docstring).
        results: step name → that step's ``results/<step>.json`` content.

    Returns:
        One dict per criterion, in order: ``name``, ``kind``, ``statistic``,
        ``params`` (the criterion's), ``criterion``, ``direction``, ``verdict``, ``effect``, ``ci``, ``p``, ``p_adjusted``,
        ``n``, ``method``, ``per_seed`` (paired statistics) and, for complexity
        findings, ``controls`` and ``size_effect_only``. Criteria whose step has
        not run get verdict ``not tested`` and take no part in the correction.
        A complexity finding whose step ran on the matrix-free path (its
        complexities are certified intervals) also has ``bounds``: the interval
        of the effect (``effect``) and of every seed's statistic (``per_seed``),
        by interval arithmetic on the complexities; ``undecided_seeds`` (seeds
        whose interval holds 0, so the intervals do not give the predicted
        ordering); the verdict with every seed at the lower and at the upper
        end of its interval (``verdict_at_lower``, ``verdict_at_upper``, with
        the other findings' p-values in the Holm correction), and
        ``verdict_holds`` (both equal the verdict). The verdict itself is
        computed from the midpoint values, as on the dense path; its controls
        under A and label smoothing carry ``effect_bounds``.
    """
    rows, tested = [], []
    for c in criteria:
        if c["statistic"] not in STATISTICS:
            raise ValueError(
                f"criterion {c['name']!r} names an unknown statistic {c['statistic']!r}; known: "
                f"{', '.join(STATISTICS)}"
            )
        step, fn = STATISTICS[c["statistic"]]
        row: dict[str, Any] = {
            "name": c["name"],
            "kind": c["kind"],
            "statistic": c["statistic"],
            "params": c["params"],
            "criterion": c["criterion"],
            "direction": c["direction"],
            "alpha": c["alpha"],
        }
        if step not in results:
            rows.append(
                {
                    **row,
                    "verdict": "not tested",
                    "effect": None,
                    "ci": None,
                    "p": None,
                    "p_adjusted": None,
                }
            )
            continue
        try:
            values = fn(results, c["params"], "A_hat")
        except NotTestable as e:
            rows.append(
                {
                    **row,
                    "verdict": "not tested",
                    "reason": str(e),
                    "effect": None,
                    "ci": None,
                    "p": None,
                    "p_adjusted": None,
                }
            )
            continue
        main = _result(values)
        row.update(effect=main.effect, ci=list(main.ci), p=main.p, n=main.n, method=main.method)
        if not isinstance(values, PairedResult):
            row["per_seed"] = {str(s): v for s, v in sorted(values.items())}
        intervals = (
            c["kind"] == "complexity"
            and _is_matfree(results[step])
            and not isinstance(values, PairedResult)
        )
        if intervals:
            row["bounds"] = _bounds_entry(fn(results, c["params"], "A_hat" + BOUNDS))
            # an uncertified upper bound does not guarantee the upper ends
            row["bounds"]["certified"] = all(
                k["certified"] for _, k in complexity_kernels(results[step])
            )
        if c["kind"] == "complexity":
            row["measure"] = MEASURES["A_hat"]
            row["controls"] = {}
            for m in ("A", "identity", "ls"):
                r = _result(fn(results, c["params"], m))
                row["controls"][CONTROL_NAMES[m]] = {
                    "measure": MEASURES[m],
                    "effect": r.effect,
                    "ci": list(r.ci),
                    "p": r.p,
                    "method": r.method,
                }
                if intervals and m != "identity":  # A(Y; I) is exact on either path
                    b = _bounds_entry(fn(results, c["params"], m + BOUNDS))
                    row["controls"][CONTROL_NAMES[m]]["effect_bounds"] = b["effect"]
        rows.append(row)
        tested.append(len(rows) - 1)
    p_values = [rows[i]["p"] for i in tested]
    adjusted = holm(p_values)
    for j, (i, p_adj) in enumerate(zip(tested, adjusted)):
        row = rows[i]
        row["p_adjusted"] = p_adj
        row["verdict"] = verdict(
            row["effect"], p_adj, direction=row["direction"], alpha=row["alpha"]
        )
        if "bounds" in row:
            _verdicts_at_ends(row, p_values, j)
        if row["kind"] == "complexity":
            # Like with like: both at their uncorrected p (the controls take no part in the correction).
            def holds(effect, p):
                return p < row["alpha"] and np.sign(effect) == row["direction"]

            a = row["controls"]["A"]
            row["size_effect_only"] = bool(
                holds(a["effect"], a["p"]) and not holds(row["effect"], row["p"])
            )
    return rows


def write_findings(study_dir: str | os.PathLike) -> Path:
    """Evaluates the study's pre-registered criteria and writes ``results/findings.json``."""
    study_dir = Path(study_dir)
    cfg = read_json(study_dir / "study.json")
    results = {
        p.stem: read_json(p)
        for p in (study_dir / "results").glob("*.json")
        if p.stem in {step for step, _ in STATISTICS.values()}
    }
    findings = evaluate_findings(cfg.get("criteria", []), results)
    return write_json(study_dir / "results" / "findings.json", findings)


def compare_findings(study_dir: str | os.PathLike, other_dir: str | os.PathLike) -> Path:
    """Verdicts of the same criteria on two seed sets: writes ``results/stability.json`` of ``study_dir``.

    Both folders must hold studies with the same criteria (``criteria_sha256``)
    and evaluated findings; the report of ``study_dir`` then shows the
    comparison ("Stability across seed sets").
    """
    study_dir, other_dir = Path(study_dir), Path(other_dir)
    a, b = read_json(study_dir / "study.json"), read_json(other_dir / "study.json")
    if a.get("criteria_sha256") != b.get("criteria_sha256"):
        raise ValueError(
            f"{study_dir} and {other_dir} were run with different criteria (criteria_sha256 "
            f"{a.get('criteria_sha256')} vs {b.get('criteria_sha256')}); compare studies of one preset"
        )
    overlap = set(a["seeds"]) & set(b["seeds"])
    if overlap:
        raise ValueError(
            f"the two studies share seeds {sorted(overlap)}; a stability check needs disjoint seed sets "
            "(e.g. `ntkd reproduce --seed-offset 8`)"
        )
    fa = read_json(study_dir / "results" / "findings.json")
    fb = {f["name"]: f for f in read_json(other_dir / "results" / "findings.json")}
    rows = [
        {
            "name": f["name"],
            "verdict": f["verdict"],
            "other_verdict": fb[f["name"]]["verdict"],
            "effect": f["effect"],
            "other_effect": fb[f["name"]]["effect"],
            "same": f["verdict"] == fb[f["name"]]["verdict"],
        }
        for f in fa
        if f["name"] in fb
    ]
    return write_json(
        study_dir / "results" / "stability.json",
        {
            "other": os.path.relpath(other_dir, study_dir),
            "seeds": a["seeds"],
            "other_seeds": b["seeds"],
            "unchanged": sum(r["same"] for r in rows),
            "total": len(rows),
            "rows": rows,
        },
    )
