"""Statistics of a study's findings: paired tests, bootstrap intervals, Holm.

A finding compares two conditions measured on the same seeds (the same
student initialisation and batch order), so every test here is *paired by
seed*: the unit of replication is the per-seed difference ``d_s``.

* :func:`paired_test` — mean of ``d_s`` with a t-based 95% CI and the
  two-sided one-sample t-test p-value (``n − 1`` degrees of freedom).
* :func:`bootstrap_statistic` — percentile CI and two-sided bootstrap p-value
  of any statistic of resampled seeds (stratified: each group of seeds is
  resampled within itself), for statistics without a t distribution
  (Spearman correlations, regression slopes).
* :func:`holm` — Holm–Bonferroni adjusted p-values across the findings of a run.
* :func:`verdict` — "reproduced" (adjusted p < α in the paper's direction),
  "not reproduced" (adjusted p < α against it) or "inconclusive".

Example:
    >>> r = paired_test([0.021, 0.018, 0.025, 0.019])
    >>> r.effect > 0 and r.ci[0] > 0
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.stats

__all__ = ["PairedResult", "bootstrap_statistic", "holm", "paired_test", "verdict"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclasses.dataclass(frozen=True)
class PairedResult:
    """Mean per-seed difference with its uncertainty.

    Attributes:
        effect: mean of the differences.
        ci: (lo, hi) 95% (or ``1 − alpha``) interval of the mean.
        p: two-sided p-value of "mean = 0".
        n: number of seeds.
        se: standard error of the mean.
        method: how ``ci`` and ``p`` were computed.
    """

    effect: float
    ci: tuple[float, float]
    p: float
    n: int
    se: float
    method: str

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ci": list(self.ci)}


def paired_test(differences: Sequence[float], *, alpha: float = 0.05) -> PairedResult:
    """One-sample t-test of per-seed paired differences.

    Args:
        differences: ``d_s`` = (condition A − condition B) on seed s, one per seed.
        alpha: 1 − confidence level of the interval.

    Returns:
        A :class:`PairedResult`. With one seed, or when all differences are
        equal, the test is undefined: ``p`` is 1 (never significant) and the CI
        is the point (one seed) or ``(d, d)``; the method says so.

    Raises:
        ValueError: when ``differences`` is empty or not finite.
    """
    d = np.asarray(differences, dtype=np.float64).reshape(-1)
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"paired_test needs one finite difference per seed, got {d.tolist()}")
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return PairedResult(mean, (mean, mean), 1.0, n, math.inf, "one seed: no test (p = 1)")
    se = float(d.std(ddof=1) / math.sqrt(n))
    # Differences equal up to round-off (e.g. a control that no seed changes): no variance to test against.
    if se <= 1e-12 * max(float(np.max(np.abs(d))), np.finfo(np.float64).tiny):
        return PairedResult(
            mean, (mean, mean), 1.0, n, 0.0, "all differences equal: no test (p = 1)"
        )
    t = mean / se
    half = float(scipy.stats.t.ppf(1 - alpha / 2, n - 1)) * se
    p = float(2 * scipy.stats.t.sf(abs(t), n - 1))
    return PairedResult(mean, (mean - half, mean + half), p, n, se, f"paired t-test, {n - 1} df")


def bootstrap_statistic(
    groups: Mapping[str, Sequence[int]],
    statistic: Callable[[Mapping[str, np.ndarray]], float],
    *,
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedResult:
    """Percentile bootstrap of a statistic of seeds, resampled within groups.

    Args:
        groups: group name → the seeds (or any ids) of that group; each
            bootstrap draw resamples every group's ids with replacement, so
            paired quantities (e.g. a regime's seeds) stay together.
        statistic: maps {group: array of drawn ids} to a float; called once on
            the original ids for the point estimate.
        resamples: number of bootstrap draws.
        seed: seed of the resampling.
        alpha: 1 − confidence level.

    Returns:
        :class:`PairedResult` with the point estimate, the percentile CI, the
        bootstrap standard error, and the two-sided p-value
        ``2 · min(P*(stat ≤ 0), P*(stat ≥ 0))`` (at least ``1 / resamples``).
        Draws where the statistic is undefined (NaN) are dropped and counted in
        ``method``.
    """
    ids = {g: np.asarray(v) for g, v in groups.items()}
    if not ids or any(v.size == 0 for v in ids.values()):
        raise ValueError(f"bootstrap_statistic needs at least one id per group, got {groups}")
    rng = np.random.default_rng(seed)
    point = float(statistic(ids))
    draws = []
    for _ in range(resamples):
        value = statistic({g: rng.choice(v, size=v.size, replace=True) for g, v in ids.items()})
        if np.isfinite(value):
            draws.append(value)
    dropped = resamples - len(draws)
    if not draws:
        return PairedResult(
            point, (math.nan, math.nan), 1.0, resamples, math.nan, "bootstrap: every draw undefined"
        )
    draws = np.asarray(draws)
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    p = max(2 * min(np.mean(draws <= 0), np.mean(draws >= 0)), 1.0 / len(draws))
    n = int(sum(v.size for v in ids.values()))
    return PairedResult(
        point,
        (float(lo), float(hi)),
        float(min(p, 1.0)),
        n,
        float(draws.std(ddof=1)),
        f"percentile bootstrap, {len(draws)} stratified resamples"
        + (f" ({dropped} undefined dropped)" if dropped else ""),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    The i-th smallest of m p-values is multiplied by (m − i + 1), a running
    maximum keeps the adjusted values monotone, and they are capped at 1.

    >>> holm([0.01, 0.04, 0.03, 0.005])
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return []
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adjusted[i] = min(running, 1.0)
    return [round(float(a), 15) for a in adjusted]


def verdict(effect: float, p_adjusted: float, *, direction: int = 1, alpha: float = 0.05) -> str:
    """The verdict of one finding.

    Args:
        effect: the estimated effect (its sign is compared with ``direction``).
        p_adjusted: the Holm-adjusted p-value.
        direction: +1 if the paper predicts a positive effect, −1 a negative one.
        alpha: significance level (after correction).
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if not p_adjusted < alpha or effect == 0 or not np.isfinite(effect):
        return "inconclusive"
    return "reproduced" if np.sign(effect) == direction else "not reproduced"
