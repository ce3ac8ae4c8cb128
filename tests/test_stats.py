"""minihbt.stats against values worked out by hand: the Student-t quantile (closed forms for
1 and 2 degrees of freedom, the printed table for more), the t-interval of three numbers,
and the paired bootstrap on cases whose answer is known exactly."""
import math

import numpy as np
import pytest

from minihbt import stats

# two-sided 95% critical values t_{0.975, df} as printed in statistics tables (3 decimals)
T_TABLE = {3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131,
           20: 2.086, 25: 2.060, 30: 2.042}


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9999])
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution: F^-1(p) = tan(pi (p - 1/2));
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))  =>  t = (2p - 1) / sqrt(2 p (1 - p))
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    assert stats.t_quantile(1 - p, 2) == -stats.t_quantile(p, 2)


def test_t_quantile_matches_the_printed_table():
    for df, t in T_TABLE.items():
        assert round(stats.t_quantile(0.975, df), 3) == t
    assert stats.t_quantile(0.975, 10 ** 6) == pytest.approx(1.959964, abs=1e-5)     # -> the normal's 1.96


def test_t_cdf_inverts_the_quantile_and_matches_scipy():
    for df in (1, 2, 3, 7.5, 30, 200):
        for p in (0.51, 0.8, 0.975, 0.999):
            assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-13)
    scipy_stats = pytest.importorskip("scipy.stats", reason="SciPy is not installed: no independent cross-check")
    for df in (1, 2, 4, 9, 29, 100):
        assert stats.t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-11)


def test_mean_ci_of_three_numbers_by_hand():
    # 1, 2, 3: mean 2, s = 1, s / sqrt(3) = 0.57735, t_{0.975, 2} = 0.95 / sqrt(2 * 0.975 * 0.025) = 4.302653
    mean, half = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
    assert half == pytest.approx(2.484138, abs=1e-6)
    # 0.70, 0.72, 0.77: mean 0.73, s = sqrt((0.03^2 + 0.01^2 + 0.04^2) / 2) = sqrt(0.0013)
    mean, half = stats.mean_ci([0.70, 0.72, 0.77])
    assert mean == pytest.approx(0.73) and half == pytest.approx(4.302653 * math.sqrt(0.0013 / 3), rel=1e-6)
    mean, half = stats.mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)                       # one seed: no interval
    assert stats.mean_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.0), abs=1e-12)   # no spread: zero width


def test_resampled_macro_by_hand():
    unit_a = (np.array([0, 1, 2]), np.array([1.0, 4.0, 10.0]))
    unit_b = (np.array([2]), np.array([3.0]))
    counts = np.array([[1, 1, 1], [2, 1, 0], [0, 3, 0]], dtype=float)
    got = stats.resampled_macro(counts, [unit_a, unit_b])[:, 0]
    # row 0: (5 + 3) / 2; row 1: a = (2*1 + 4) / 3 = 2, b not drawn -> left out; row 2: a = 4, b left out
    np.testing.assert_allclose(got, [4.0, 2.0, 4.0])


def test_resample_counts_are_multinomial_draws():
    c = stats.resample_counts(7, 500, seed=3)
    assert c.shape == (500, 7) and (c.sum(axis=1) == 7).all() and (c >= 0).all()
    np.testing.assert_array_equal(c, stats.resample_counts(7, 500, seed=3))      # fixed seed: same resamples
    assert abs(c.mean() - 1.0) < 1e-12 and abs(c.var() - 6 / 7) < 0.05         # Binomial(7, 1/7) per cell


def test_constant_difference_gives_a_zero_width_interval():
    rng = np.random.default_rng(0)
    units = []
    for size in (5, 9, 3):                                         # three languages of different sizes
        base = rng.random(size)
        units.append((rng.choice(12, size, replace=False), np.stack([base + 0.25, base], axis=1)))
    (res,) = stats.paired_differences(units, 12, [(0, 1)], resamples=1000, seed=1)
    assert res["difference"] == pytest.approx(0.25, abs=1e-12)
    assert res["low"] == pytest.approx(0.25, abs=1e-12) and res["high"] == pytest.approx(0.25, abs=1e-12)


def test_resampling_is_paired_by_question_id_across_languages():
    # question q0 helps A in language a and hurts it as much in language b: with the same
    # ids drawn for both languages the macro difference is exactly 0 in every resample;
    # resampling the languages independently would spread it.
    diff_a, diff_b = np.array([1.0, 0.0]), np.array([-1.0, 0.0])
    units = [(np.array([0, 1]), np.stack([diff_a, np.zeros(2)], axis=1)),
             (np.array([0, 1]), np.stack([diff_b, np.zeros(2)], axis=1))]
    (res,) = stats.paired_differences(units, 2, [(0, 1)], resamples=2000, seed=0)
    assert res == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_distribution_of_a_known_small_case():
    # one language, 3 questions, differences (0, 0, 1): a resample's mean is k/3 with
    # k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27 for k = 0..3; the 2.5% percentile is
    # 0 and, since P(k = 3) = 3.7% > 2.5%, the 97.5% percentile is 1.
    units = [(np.array([0, 1, 2]), np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))]
    samples = stats.resampled_macro(stats.resample_counts(3, 4000, seed=0), units)[:, 0]
    freq = np.array([np.mean(np.isclose(samples, k / 3)) for k in range(4)])
    expected = np.array([8, 12, 6, 1]) / 27
    assert freq.sum() == pytest.approx(1.0)                         # every resample is one of the four
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000))
    (res,) = stats.paired_differences(units, 3, [(0, 1)], resamples=4000, seed=0)
    assert res["difference"] == pytest.approx(1 / 3) and (res["low"], res["high"]) == (0.0, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must lie"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="nothing"):
        stats.mean_ci([])


def test_seed_weights_draw_each_columns_runs_with_replacement():
    w = stats.seed_weights([2, 1, 3], 4000, seed=0)
    assert w.shape == (4000, 6)
    np.testing.assert_allclose(w[:, :2].sum(axis=1), 1.0)
    np.testing.assert_allclose(w[:, 3:].sum(axis=1), 1.0)
    assert (w[:, 2] == 1.0).all()                                   # a column of one run always weighs 1
    assert set(np.round(w[:, 3:] * 3).ravel()) <= {0, 1, 2, 3}       # k of 3 draws
    # two runs: weights (1, 0), (1/2, 1/2), (0, 1) with probabilities 1/4, 1/2, 1/4
    freq = [np.mean(np.isclose(w[:, 0], x)) for x in (1.0, 0.5, 0.0)]
    np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.03)


def test_resampling_seeds_widens_the_interval_by_the_seed_spread():
    # condition A: two runs whose per-query values are 0.2 and 0.6 on every question;
    # condition B: one run at 0. Questions alone: the difference is 0.4 in every resample.
    # With the runs drawn too: 0.2, 0.4 or 0.6 with probabilities 1/4, 1/2, 1/4, so the 95%
    # interval is [0.2, 0.6].
    units = [(np.arange(4), np.array([[0.2, 0.6, 0.0]] * 4))]
    per_run = stats.resampled_macro(stats.resample_counts(4, 2000, seed=0), units)      # [B, 3]
    uniform = np.array([[0.5, 0.5, 1.0]])
    questions = stats.combine_seeds(per_run, uniform, [2, 1])
    np.testing.assert_allclose(questions[:, 0] - questions[:, 1], 0.4)
    seeds = stats.combine_seeds(per_run, stats.seed_weights([2, 1], 2000, seed=5), [2, 1])
    low, high = stats.percentile_interval(seeds[:, 0] - seeds[:, 1])
    assert low == pytest.approx(0.2) and high == pytest.approx(0.6)
    assert np.mean(np.isclose(seeds[:, 0], 0.4)) == pytest.approx(0.5, abs=0.04)
