"""Confidence intervals for the study: Student-t intervals over seeds, paired bootstrap over queries.

- `mean_ci(values)`: the mean of n numbers (one per seed) and the half-width of its 95%
  Student-t interval, t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation.
  The t quantile is computed, not looked up: the t CDF through the regularised incomplete
  beta function (its continued fraction, evaluated with the modified Lentz method, as in
  Numerical Recipes' `betacf`), inverted by bisection to double precision. No SciPy needed.
- `resample_counts` / `resampled_macro` / `paired_differences`: the paired bootstrap over
  queries. One resample draws the parallel question ids with replacement (multinomial
  counts per id) and recomputes a macro-averaged metric: every unit (a language, or a
  language pair) takes the count-weighted mean of its queries' values, and the units are
  averaged. Every condition is evaluated on the same resamples, so a difference between
  two conditions is paired by question; the 95% interval is the percentile interval of the
  resampled differences.
- `clopper_pearson(k, n)` and `chi2_sf(x, df)`: for `python -m minihbt.check batches`, the
  exact binomial interval of a share (Beta quantiles, by bisection on the incomplete beta
  above) and the chi-square upper tail, Q(df/2, x/2), the regularised upper incomplete gamma
  function by its series or its continued fraction (Numerical Recipes' `gser` and `gcf`).
"""
import math

import numpy as np


def _beta_continued_fraction(a, b, x, max_iter=1000, eps=1e-15):
    """The continued fraction of I_x(a, b) (Numerical Recipes `betacf`), by modified Lentz."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a, b, x, y=None):
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1; y = 1 - x may be given
    when the caller knows it more precisely than 1 - x can be computed (x close to 1)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    y = 1.0 - x if y is None else y
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):               # the fraction converges fast here
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def _upper_tail(t, df):
    """P(T > t) for t >= 0: I_x(df/2, 1/2) / 2 with x = df / (df + t^2), 1 - x = t^2 / (df + t^2)
    (both computed directly, so neither small tails nor t near 0 lose precision)."""
    return 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (symmetric about 0)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = _upper_tail(abs(t), df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (0 < p < 1): bisection on the upper tail P(T > t) = 1 - p,
    which decreases in t, down to adjacent doubles."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    target = 1.0 - p
    lo, hi = 0.0, 1.0
    while _upper_tail(hi, df) > target:
        lo, hi = hi, 2.0 * hi
    return _bisect(lambda t: _upper_tail(t, df) > target, lo, hi)


def _bisect(below, lo, hi):
    """The point in [lo, hi] where `below(x)`, true left of it and false right of it, turns
    false, by bisection down to adjacent doubles."""
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):                          # adjacent doubles: as precise as it gets
            return mid
        lo, hi = (mid, hi) if below(mid) else (lo, mid)


def mean_ci(values, level=0.95):
    """(mean, half-width) of the two-sided Student-t interval of the mean of `values`.
    With fewer than two values there is no interval: the half-width is NaN."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of nothing")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    t = t_quantile(1.0 - (1.0 - level) / 2.0, x.size - 1)
    return mean, float(t * x.std(ddof=1) / math.sqrt(x.size))


def resample_counts(n_items, resamples, seed):
    """[resamples, n_items] float64 counts: how often each item (a question id) is drawn in
    each resample of n_items draws with replacement (multinomial, uniform)."""
    if n_items < 1 or resamples < 1:
        raise ValueError(f"need n_items >= 1 and resamples >= 1, got {n_items}, {resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=resamples).astype(np.float64)


def seed_weights(seeds_per_column, resamples, seed):
    """[resamples, sum(seeds_per_column)] float64: for each column (a condition with n runs,
    one per training seed), its runs drawn n times with replacement, as fractions of n (each
    column's weights sum to 1). Weighting a column's per-run figures by them resamples the
    seeds; a column of one run always weighs 1."""
    rng = np.random.default_rng(seed)
    parts = [rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n for n in seeds_per_column]
    return np.hstack(parts).astype(np.float64)


def combine_seeds(per_run, weights, seeds_per_column):
    """[B, K] column figures from [B, sum(n)] per-run figures and weights of the same shape
    (weights [1, sum(n)] or [B, sum(n)]; uniform weights give the mean over seeds)."""
    weighted, ends = per_run * weights, np.cumsum(seeds_per_column)
    columns = [weighted[:, end - n:end].sum(axis=1) for n, end in zip(seeds_per_column, ends)]
    return np.stack(columns, axis=1)


def resampled_macro(counts, units):
    """Macro mean of a metric under each row of `counts` ([B, n_items], e.g. all ones for
    the observed value): for each unit (item_index [n_u], values [n_u, K]) the count-weighted
    mean of its values, then the mean over units. Returns [B, K]. A unit none of whose items
    was drawn in a resample is left out of that resample's mean.

    Each unit is one matrix product: its values scattered into an [n_items, K + 1] table
    (last column: how many of the unit's queries each item has), so counts @ table gives
    the weighted sums and the weights together."""
    counts = np.asarray(counts, dtype=np.float64)
    total, n_units = None, np.zeros((counts.shape[0], 1))
    for item_index, values in units:
        values = np.asarray(values, dtype=np.float64).reshape(len(item_index), -1)    # [n_u, K]
        table = np.zeros((counts.shape[1], values.shape[1] + 1))                     # [n_items, K + 1]
        np.add.at(table, np.asarray(item_index), np.hstack([values, np.ones((len(values), 1))]))
        sums = counts @ table                                                         # [B, K + 1]
        weight_sum = sums[:, -1:]                                                     # [B, 1]
        drawn = weight_sum > 0
        unit_mean = np.where(drawn, sums[:, :-1] / np.where(drawn, weight_sum, 1.0), 0.0)   # [B, K]
        total = unit_mean if total is None else total + unit_mean
        n_units += drawn
    if total is None:
        raise ValueError("resampled_macro needs at least one unit")
    return total / n_units


def percentile_interval(samples, level=0.95):
    """(low, high): the (1-level)/2 and (1+level)/2 percentiles of `samples` (linear interpolation)."""
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_differences(units, n_items, comparisons, resamples=2000, seed=0, level=0.95, counts=None):
    """Paired bootstrap of differences of a macro-averaged metric between conditions.

    units: list of (item_index [n_u], values [n_u, K]), column k holding condition k's
    per-query values; comparisons: list of (a, b) column pairs; counts: resample counts to
    reuse (default: resample_counts(n_items, resamples, seed)). Returns, per comparison,
    {"difference": observed macro(a) - macro(b), "low": ..., "high": ...}.
    """
    counts = resample_counts(n_items, resamples, seed) if counts is None else counts
    observed = resampled_macro(np.ones((1, n_items)), units)[0]                     # [K]
    samples = resampled_macro(counts, units)                                         # [B, K]
    out = []
    for a, b in comparisons:
        lo, hi = percentile_interval(samples[:, a] - samples[:, b], level)
        out.append({"difference": float(observed[a] - observed[b]), "low": lo, "high": hi})
    return out


# ----------------------------------------------------------------------------- tests of a sampler's draws
# Used by `python -m minihbt.check batches`: is a share of batches consistent with a declared
# probability (Clopper-Pearson interval), are counts consistent with expected probabilities
# (chi-square goodness of fit)?

def _gamma_series(a, x, max_iter=10000, eps=1e-16):
    """P(a, x) by its series e^-x x^a / Gamma(a) * sum_n x^n / (a (a+1) ... (a+n)); for x < a + 1."""
    term = total = 1.0 / a
    for n in range(1, max_iter):
        term *= x / (a + n)
        total += term
        if abs(term) < abs(total) * eps:
            return total * math.exp(-x + a * math.log(x) - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma series did not converge (a={a}, x={x})")


def _gamma_continued_fraction(a, x, max_iter=10000, eps=1e-16):
    """Q(a, x) by its continued fraction (Numerical Recipes `gcf`, modified Lentz); for x >= a + 1."""
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, max_iter):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1.0) < eps:
            return h * math.exp(-x + a * math.log(x) - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma continued fraction did not converge (a={a}, x={x})")


def regularized_gamma_q(a, x):
    """Q(a, x) = Gamma(a, x) / Gamma(a), the upper regularized incomplete gamma function (a > 0, x >= 0)."""
    if a <= 0 or x < 0:
        raise ValueError(f"need a > 0 and x >= 0, got a={a}, x={x}")
    if x == 0:
        return 1.0
    if x < a + 1.0:
        return 1.0 - _gamma_series(a, x)
    return _gamma_continued_fraction(a, x)


def chi2_sf(x, df):
    """P(X > x) for X chi-square with df degrees of freedom: Q(df / 2, x / 2)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return 1.0 if x <= 0 else regularized_gamma_q(df / 2.0, x / 2.0)


def beta_quantile(p, a, b):
    """The x in [0, 1] with I_x(a, b) = p, by bisection (I_x increases in x) down to adjacent doubles."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return _bisect(lambda x: regularized_incomplete_beta(a, b, x) < p, 0.0, 1.0)


def clopper_pearson(k, n, level=0.999):
    """(low, high): the exact two-sided binomial interval of a probability after k successes
    in n trials: low = Beta quantile (1 - level) / 2 of (k, n - k + 1), high = quantile
    (1 + level) / 2 of (k + 1, n - k); low = 0 when k = 0, high = 1 when k = n."""
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k <= n and n >= 1):
        raise ValueError(f"need integers 0 <= k <= n, n >= 1; got k={k}, n={n}")
    tail = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else beta_quantile(tail, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1.0 - tail, k + 1, n - k)
    return low, high
