"""HBT's rules over many batches, each against what minihbt's sampler draws for the same data
and settings (`HBTSampler.distributions`), not against a uniform guess:

- xx-share: the share of xx batches; its exact two-sided 99.9% binomial interval
  (Clopper-Pearson) must contain the declared probability (alpha for hybrid, 1 for xx, 0 for xy);
- xx-languages: the languages of the xx batches, per source; chi-square goodness of fit
  to the sampler's language weights (uniform or proportional), p > 0.001;
- xy-pairs: the ordered (query, passage) language pairs of the xy triplets, per source;
  chi-square goodness of fit to the pairs the data's parallel groups give, p > 0.001.

The chi-square statistic adds the sources' statistics (and degrees of freedom): given how many
batches (triplets) each source has, they are independent. Within a source, cells expected
fewer than 5 times are pooled, smallest first, so the chi-square approximation holds; a draw
in a cell the sampler never draws breaks the rule outright. Batches (triplets) that break a
language rule are left out of the counts: they are reported under that rule.
"""
from collections import Counter
from typing import NamedTuple

import numpy as np

from ..stats import chi2_sf, clopper_pearson

LEVEL = 0.999                  # the xx share's interval
P_MIN = 0.001                  # a chi-square p-value at or below this breaks the rule
MIN_EXPECTED = 5.0             # cells expected fewer times are pooled


class Finding(NamedTuple):
    rule: str
    status: str                # "ok", "FAIL" or "skip" (not testable on this log)
    detail: str


def share_finding(batches, p_xx, declared):
    """xx-share: is the share of xx batches consistent with probability `p_xx`?"""
    n, k = len(batches), sum(b.kind == "xx" for b in batches)
    low, high = clopper_pearson(k, n, LEVEL)
    detail = (f"{k} of {n} batches are xx ({k / n:.3f}; {LEVEL:.1%} interval [{low:.3f}, {high:.3f}]); "
              f"{declared} expects {p_xx:g}")
    return Finding("xx-share", "ok" if low <= p_xx <= high else "FAIL", detail)


def xx_language_counts(batches):
    """{source: Counter(language)} of the xx batches that have one language."""
    out = {}
    for b in batches:
        langs = {t.query_lang for t in b.triplets} | {t.passage_lang for t in b.triplets}
        if b.kind == "xx" and len(langs) == 1:
            out.setdefault(b.source, Counter())[langs.pop()] += 1
    return out


def xy_pair_counts(batches):
    """{source: Counter((query language, passage language))} of the xy triplets in two languages."""
    out = {}
    for b in batches:
        if b.kind == "xy":
            counts = out.setdefault(b.source, Counter())
            counts.update((t.query_lang, t.passage_lang) for t in b.triplets if t.query_lang != t.passage_lang)
    return {source: counts for source, counts in out.items() if counts}


def pool_cells(observed, expected, min_expected=MIN_EXPECTED):
    """(observed, expected) with the cells expected fewer than `min_expected` times merged:
    cells are taken smallest expectation first and gathered until a gathering reaches it; a
    last gathering short of it joins the one before."""
    order = np.argsort(expected, kind="stable")
    obs, exp, o, e = [], [], 0.0, 0.0
    for i in order:
        o, e = o + observed[i], e + expected[i]
        if e >= min_expected:
            obs.append(o)
            exp.append(e)
            o, e = 0.0, 0.0
    if e > 0 and exp:
        obs[-1], exp[-1] = obs[-1] + o, exp[-1] + e
    elif e > 0:
        obs.append(o)
        exp.append(e)
    return np.array(obs), np.array(exp)


def cell_name(cell):
    return cell if isinstance(cell, str) else "-".join(cell)


def goodness_of_fit(rule, observed, expected, what):
    """Finding of a chi-square test of `observed` {source: Counter(cell)} against `expected`
    {source: {cell: probability}}; `what` names the counted things ("xx batches")."""
    if not observed:
        return Finding(rule, "skip", f"no {what} in the log")
    stat, df, total, worst = 0.0, 0, 0, (0.0, "")
    for source, counts in sorted(observed.items()):
        probs = expected.get(source, {})
        never = sorted((c for c in counts if probs.get(c, 0.0) <= 0.0), key=cell_name)
        if never:
            return Finding(rule, "FAIL", f"{counts[never[0]]} {what} of {source} in {cell_name(never[0])}, which "
                                         f"the sampler never draws from this data")
        cells = sorted(probs, key=cell_name)
        n = sum(counts.values())
        obs = np.array([counts.get(c, 0) for c in cells], dtype=np.float64)
        exp = n * np.array([probs[c] for c in cells])
        o, e = pool_cells(obs, exp)
        stat, df, total = stat + float(((o - e) ** 2 / e).sum()), df + len(o) - 1, total + n
        z = np.abs(obs - exp) / np.sqrt(exp)
        if z.max() > worst[0]:
            i = int(z.argmax())
            worst = (z[i], f"{source} {cell_name(cells[i])}: {int(obs[i])} observed, {exp[i]:.1f} expected")
    if df == 0:
        return Finding(rule, "skip", f"{total} {what}: too few, or one possible value, to test")
    p = chi2_sf(stat, df)
    detail = f"chi-square {stat:.1f} on {df} df over {total} {what}, p = {p:.3g}"
    if p <= P_MIN:
        return Finding(rule, "FAIL", f"{detail} (<= {P_MIN}); furthest from expected: {worst[1]}")
    return Finding(rule, "ok", detail)
