"""Statistics of the findings: paired t-tests, bootstrap, Holm, verdicts (oracles: SciPy, hand computation)."""

import numpy as np
import pytest
import scipy.stats

from ntkd.stats import bootstrap_statistic, holm, paired_test, verdict


def test_paired_test_matches_scipy_one_sample_t():
    rng = np.random.default_rng(0)
    for n in (3, 5, 8, 16):
        d = rng.normal(0.3, 1.0, size=n)
        r = paired_test(d)
        ref = scipy.stats.ttest_1samp(d, 0.0)
        assert r.p == pytest.approx(ref.pvalue, rel=1e-12)
        ci = ref.confidence_interval(0.95)
        assert r.ci == pytest.approx((ci.low, ci.high), rel=1e-12)
        assert r.effect == pytest.approx(d.mean()) and r.n == n


def test_three_seeds_at_2_4_standard_errors_is_inconclusive():
    base = np.array([-1.0, 0.0, 1.0])
    se = base.std(ddof=1) / np.sqrt(3)
    d = base + 2.4 * se  # mean / se = 2.4, as the old z > 2 rule called "reproduced"
    r = paired_test(d)
    assert r.effect / r.se == pytest.approx(2.4)
    assert r.p == pytest.approx(2 * scipy.stats.t.sf(2.4, 2))  # 0.138
    assert r.p > 0.13
    assert verdict(r.effect, holm([r.p])[0]) == "inconclusive"
    assert verdict(r.effect, r.p) == "inconclusive"  # even before any correction


def test_degenerate_inputs():
    assert paired_test([0.5]).p == 1.0
    assert paired_test([0.2, 0.2, 0.2]).p == 1.0
    with pytest.raises(ValueError, match="finite"):
        paired_test([])
    with pytest.raises(ValueError, match="finite"):
        paired_test([1.0, np.nan])


def test_holm_on_hand_made_p_values():
    # sorted: 0.001·5, 0.01·4, 0.02·3 = 0.06, 0.03·2 = 0.06, 0.2·1 → monotone running maximum
    p = [0.03, 0.2, 0.001, 0.02, 0.01]
    assert holm(p) == pytest.approx([0.06, 0.2, 0.005, 0.06, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.04]) == [0.04]
    assert holm([]) == []
    # ties keep their order and equal adjusted values
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])
    with pytest.raises(ValueError, match="p-values"):
        holm([1.5])


def test_holm_controls_family_wise_error_under_the_null():
    rng = np.random.default_rng(1)
    rejections = 0
    for _ in range(2000):
        p = rng.uniform(size=10)
        rejections += any(q < 0.05 for q in holm(p))
    assert rejections / 2000 < 0.065  # ≤ α up to Monte-Carlo error


def test_verdict_directions():
    assert verdict(0.3, 0.01) == "reproduced"
    assert verdict(-0.3, 0.01) == "not reproduced"
    assert verdict(-0.3, 0.01, direction=-1) == "reproduced"
    assert verdict(0.3, 0.2) == "inconclusive"
    with pytest.raises(ValueError):
        verdict(0.3, 0.01, direction=0)


def test_bootstrap_slope_covers_the_truth_and_detects_it():
    rng = np.random.default_rng(2)
    gaps = {f"s{i}": g for i, g in enumerate([5.0, 10.0, 15.0, 20.0, 25.0])}
    data = {s: 0.2 * g + rng.normal(0, 0.5, size=6) for s, g in gaps.items()}

    def slope(ids):
        return np.polyfit([gaps[s] for s in ids], [data[s][ids[s]].mean() for s in ids], 1)[0]

    r = bootstrap_statistic({s: np.arange(6) for s in gaps}, slope, resamples=500)
    assert r.ci[0] < 0.2 < r.ci[1] and r.ci[0] > 0 and r.p < 0.01
    flat = {s: rng.normal(0, 0.5, size=6) for s in gaps}

    def flat_slope(ids):
        return np.polyfit([gaps[s] for s in ids], [flat[s][ids[s]].mean() for s in ids], 1)[0]

    assert bootstrap_statistic({s: np.arange(6) for s in gaps}, flat_slope, resamples=500).p > 0.05
