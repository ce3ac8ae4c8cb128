"""The paper's claims, judged on the study's paired-bootstrap intervals.

One comparison (column A minus column B on a metric, over a subset of languages) is judged
on its 95% interval with both questions and training seeds resampled (DirectionBootstrap's
"seeds" interval; the questions-only interval is quoted beside it), in the metric's better direction (higher mAP and recall, lower bias):
"holds" when the whole interval lies on A's better side of 0, "refuted" when it lies on the
worse side, "not separable" when it covers 0. A claim of several comparisons holds when
all hold, is refuted when any is refuted, and is not separable otherwise. "Best or
tied-best" is judged differently: it holds unless another condition is separably better.
"""
from .perquery import METRICS

HOLDS, REFUTED, NOT_SEPARABLE = "holds", "refuted", "not separable"
SETTINGS = ("mo_map", "cr_map", "mul_map")

# (claim, rule, [(A, B, metric, subset)])
CLAIMS = [
    ("hybrid ≥ X-X on Cr. and Mul.", "all",
     [("hybrid", "xx", "cr_map", "all"), ("hybrid", "xx", "mul_map", "all")]),
    ("hybrid ≥ X-Y on Mo.", "all", [("hybrid", "xy", "mo_map", "all")]),
    ("X-Y and hybrid reduce the language bias vs X-X", "all",
     [("xy", "xx", "bias", "all"), ("hybrid", "xx", "bias", "all")]),
    ("hybrid best or tied-best on Mo., Cr. and Mul. (vs X-X and X-Y)", "best",
     [("hybrid", other, m, "all") for m in SETTINGS for other in ("xx", "xy")]),
    ("hybrid's gains over X-X carry to unseen languages (Cr. and Mul.)", "all",
     [("hybrid", "xx", "cr_map", "unseen"), ("hybrid", "xx", "mul_map", "unseen")]),
    ("(not a paper claim) hybrid beats the training-free fix, base+centered, on Cr., Mul. and bias", "all",
     [("hybrid", "base+centered", m, "all") for m in ("cr_map", "mul_map", "bias")]),
]


def judge(metric, d):
    """The verdict of one difference dict {"difference", "low", "high"} (A - B)."""
    sign = 1 if METRICS[metric][3] else -1                       # higher is better, or lower
    low, high = sorted((sign * d["low"], sign * d["high"]))
    return HOLDS if low > 0 else REFUTED if high < 0 else NOT_SEPARABLE


def fmt_difference(metric, d):
    """'+.031 [+.020, +.043]' (mAP, recall) or '-35.2 [-50.1, -20.3]' (bias); differences too
    small for those decimals in scientific notation ('+2.0e-05 [...]') rather than as zeros."""
    values = (d["difference"], d["low"], d["high"])
    tiny = 0.05 if metric == "bias" else 5e-4
    scientific = any(values) and max(abs(v) for v in values) < tiny
    difference, low, high = (f"{x:+.1e}" if scientific else fmt_value(metric, x, "+") for x in values)
    return f"{difference} [{low}, {high}]"


def fmt_value(metric, x, sign=""):
    """'.031' (mAP, recall) or '35.2' (bias); with sign "+": '+.031', '-35.2'."""
    return f"{x:{sign}.1f}" if metric == "bias" else f"{x:{sign}.3f}".replace("0.", ".", 1)


def _describe(a, b, metric, subset, d, q):
    where = "" if subset == "all" else f", {subset} languages"
    low_high = fmt_difference(metric, q).split(" ", 1)[1]
    return f"{a} − {b} {METRICS[metric][0]}{where}: {fmt_difference(metric, d)} (questions only: {low_high})"


def verdicts(boot, has_unseen):
    """[(claim, verdict, numbers)] for one direction (boot: a DirectionBootstrap)."""
    rows = []
    for claim, rule, comparisons in CLAIMS:
        if any(s == "unseen" for *_, s in comparisons) and not has_unseen:
            rows.append((claim, "not applicable", "every evaluation language was seen in training"))
            continue
        found = [(a, b, m, s, boot.difference(a, b, m, s, interval="seeds")) for a, b, m, s in comparisons]
        absent = sorted({n for a, b, _, _, d in found if d is None for n in (a, b) if n not in boot.columns})
        if absent:
            rows.append((claim, "no data", "missing: " + ", ".join(absent)))
            continue
        judged = [judge(m, d) for _, _, m, _, d in found]
        if rule == "best":
            verdict = REFUTED if REFUTED in judged else HOLDS
        else:
            verdict = HOLDS if all(j == HOLDS for j in judged) else REFUTED if REFUTED in judged else NOT_SEPARABLE
        rows.append((claim, verdict, "; ".join(_describe(a, b, m, s, d, boot.difference(a, b, m, s))
                                               for a, b, m, s, d in found)))
    return rows
