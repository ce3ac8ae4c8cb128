"""The tests behind `python -m minihbt.check batches`: the chi-square upper tail against its
closed forms, and the Clopper-Pearson interval against its definition and its closed forms."""
import math

import pytest

from minihbt.stats import beta_quantile, chi2_sf, clopper_pearson, regularized_gamma_q


def chi2_sf_closed_form(x, df):
    """Even df: e^(-x/2) sum_{i < df/2} (x/2)^i / i!; odd df: erfc(sqrt(x/2)) plus
    e^(-x/2) sum_{i < (df-1)/2} (x/2)^(i+1/2) / Gamma(i + 3/2)."""
    h = x / 2
    if df % 2 == 0:
        return math.exp(-h) * sum(h ** i / math.factorial(i) for i in range(df // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * sum(h ** (i + 0.5) / math.gamma(i + 1.5) for i in range(df // 2))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 7, 10, 11, 41, 42, 100])
def test_chi2_sf_matches_the_closed_forms(df):
    for x in (0.01, 0.5, 1.0, 3.0, df - 0.5, df + 0.5, 10.0, 30.0, 80.0, 150.0):   # both sides of x = df/2 + 1
        assert chi2_sf(x, df) == pytest.approx(chi2_sf_closed_form(x, df), rel=1e-11, abs=1e-300)


def test_chi2_sf_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-12)          # the 95% critical values
    assert chi2_sf(5.991464547107979, 2) == pytest.approx(0.05, rel=1e-12)
    assert chi2_sf(10.827566170662733, 1) == pytest.approx(0.001, rel=1e-10)
    assert chi2_sf(0.0, 3) == 1.0 and chi2_sf(-1.0, 3) == 1.0
    assert chi2_sf(10.0, 1) != pytest.approx(chi2_sf(10.0, 2))                      # df matters
    assert regularized_gamma_q(1.0, 2.0) == pytest.approx(math.exp(-2.0), rel=1e-14)   # Q(1, x) = e^-x
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)
    with pytest.raises(ValueError):
        regularized_gamma_q(0.0, 1.0)


def binomial_tail(n, p, ks):
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in ks)


@pytest.mark.parametrize("k,n", [(1, 10), (5, 10), (37, 100), (499, 1000), (3, 1000)])
def test_clopper_pearson_is_where_each_tail_is_half_the_rest(k, n):
    """The lower end L has P(X >= k | L) = 0.0005, the upper U has P(X <= k | U) = 0.0005."""
    low, high = clopper_pearson(k, n, level=0.999)
    assert 0 < low < k / n < high < 1
    assert binomial_tail(n, low, range(k, n + 1)) == pytest.approx(0.0005, rel=1e-6)
    assert binomial_tail(n, high, range(0, k + 1)) == pytest.approx(0.0005, rel=1e-6)
    assert clopper_pearson(n - k, n, level=0.999) == pytest.approx((1 - high, 1 - low), abs=1e-12)


def test_clopper_pearson_closed_forms_at_the_ends():
    """k = 0: [0, 1 - 0.0005^(1/n)]; k = n: [0.0005^(1/n), 1]."""
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.0005 ** 0.1), abs=1e-14)
    assert clopper_pearson(10, 10) == pytest.approx((0.0005 ** 0.1, 1.0), abs=1e-14)
    assert clopper_pearson(10, 10)[1] == 1.0
    assert clopper_pearson(50, 100, level=0.95)[0] == pytest.approx(0.3983, abs=1e-4)       # tables: 0.3983, 0.6017
    assert beta_quantile(0.5, 1.0, 1.0) == pytest.approx(0.5)                         # Beta(1, 1) is uniform
    for k, n in ((-1, 10), (11, 10), (0, 0), (1.5, 10)):
        with pytest.raises(ValueError):
            clopper_pearson(k, n)
