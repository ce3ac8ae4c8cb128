"""Hand-made metric cases: small rankings with every metric worked out by hand.

Each ranking case gives one query's candidate scores and which candidates are relevant;
`ranks` are the relevant candidates' 0-based places in the ranking (descending score, ties
to the lower candidate index, as minihbt.retrieval ranks), and each metric's value comes
with its working, written from the definitions in minihbt/metrics.py. The macro case shows
how per-query values become a setting's figure: the mean over queries of each language
(pair), then the unweighted mean over languages (pairs).

`python -m minihbt.check metrics --cases OUT.json` writes them; tests/test_check_metrics.py
shows that minihbt's own ranking and metric functions reproduce every value, and
`mismatches` names what another implementation gets wrong.
"""
import math

import numpy as np

from .. import metrics
from ..retrieval import rank_of_relevant

L2, L3 = math.log2, math.log2(3)

# (name, scores, relevant, ranks, {metric: (value, working)})
RANKING_CASES = [
    ("top", [0.9, 0.5, 0.1], [0], [0],
     {"ap": (1.0, "1/1"), "map@20": (1.0, "1/1 / min(1, 20)"), "r@1": (1.0, "1 of 1 in the top 1"),
      "r@10": (1.0, "1 of 1"), "rr": (1.0, "1/(0+1)"), "ndcg@10": (1.0, "(1/log2(2)) / (1/log2(2))"),
      "rank_distance": (0, "0 - 0")}),
    ("second", [0.2, 0.8, 0.5], [2], [1],
     {"ap": (1 / 2, "1/2"), "map@20": (1 / 2, "(1/2) / 1"), "r@1": (0.0, "0 of 1"), "r@10": (1.0, "1 of 1"),
      "rr": (1 / 2, "1/(1+1)"), "ndcg@10": (1 / L3, "(1/log2(3)) / (1/log2(2))"), "rank_distance": (0, "1 - 1")}),
    ("two relevant, ranks 0 and 2", [0.1, 0.9, 0.3, 0.5], [1, 2], [0, 2],
     {"ap": (5 / 6, "(1/1 + 2/3) / 2"), "map@20": (5 / 6, "(1/1 + 2/3) / min(2, 20)"),
      "r@1": (1 / 2, "1 of 2"), "r@10": (1.0, "2 of 2"), "rr": (1.0, "1/(0+1)"),
      "ndcg@10": ((1 + 1 / 2) / (1 + 1 / L3), "(1/log2(2) + 1/log2(4)) / (1/log2(2) + 1/log2(3))"),
      "rank_distance": (2, "2 - 0")}),
    ("a tie, broken by the lower index", [0.9, 0.9, 0.1], [1], [1],
     {"ap": (1 / 2, "1/2: candidate 0 (same score) ranks first"), "map@20": (1 / 2, "(1/2) / 1"),
      "r@1": (0.0, "0 of 1"), "r@10": (1.0, "1 of 1"), "rr": (1 / 2, "1/(1+1)"),
      "ndcg@10": (1 / L3, "(1/log2(3)) / 1"), "rank_distance": (0, "1 - 1")}),
    ("two tied pairs", [0.5, 0.9, 0.5, 0.9], [2, 3], [3, 1],
     {"ap": (1 / 2, "ranking 1, 3, 0, 2: (1/2 + 2/4) / 2"), "map@20": (1 / 2, "(1/2 + 2/4) / 2"),
      "r@1": (0.0, "0 of 2"), "r@10": (1.0, "2 of 2"), "rr": (1 / 2, "1/(1+1)"),
      "ndcg@10": ((1 / L3 + 1 / L2(5)) / (1 + 1 / L3), "(1/log2(3) + 1/log2(5)) / (1/log2(2) + 1/log2(3))"),
      "rank_distance": (2, "3 - 1")}),
    ("a relevant candidate beyond the top 20", [1 - i / 100 for i in range(30)], [0, 25], [0, 25],
     {"ap": (7 / 13, "(1/1 + 2/26) / 2"), "map@20": (1 / 2, "(1/1) / min(2, 20): rank 25 is past the cut"),
      "r@1": (1 / 2, "1 of 2"), "r@10": (1 / 2, "1 of 2"), "rr": (1.0, "1/(0+1)"),
      "ndcg@10": (1 / (1 + 1 / L3), "(1/log2(2)) / (1/log2(2) + 1/log2(3))"), "rank_distance": (25, "25 - 0")}),
    ("Mul.: three parallel relevant candidates", [1 - i / 100 for i in range(12)], [3, 10, 7], [3, 10, 7],
     {"ap": ((1 / 4 + 2 / 8 + 3 / 11) / 3, "(1/4 + 2/8 + 3/11) / 3"),
      "map@20": ((1 / 4 + 2 / 8 + 3 / 11) / 3, "(1/4 + 2/8 + 3/11) / min(3, 20)"),
      "r@1": (0.0, "0 of 3"), "r@10": (2 / 3, "ranks 3 and 7 of 3, 7, 10"), "rr": (1 / 4, "1/(3+1)"),
      "ndcg@10": ((1 / L2(5) + 1 / L2(9)) / (1 + 1 / L3 + 1 / 2),
                  "(1/log2(5) + 1/log2(9)) / (1/log2(2) + 1/log2(3) + 1/log2(4))"),
      "rank_distance": (7, "language bias: 10 - 3")}),
]

MACRO_CASE = {
    "name": "macro mean over languages",
    "per_query_ap": {"de": [1.0, 0.5], "en": [1 / 3]},
    "per_language_map": {"de": 0.75, "en": 1 / 3},
    "map": (0.75 + 1 / 3) / 2,
    "working": "de: (1 + 1/2) / 2 = 3/4; en: 1/3; mAP = (3/4 + 1/3) / 2 = 13/24 (the mean over the three "
               "queries, 11/18, is not the figure)",
}

FUNCTIONS = {"ap": metrics.average_precision, "map@20": lambda r: metrics.map_at_k(r, 20),
             "r@1": lambda r: metrics.recall_at_k(r, 1), "r@10": lambda r: metrics.recall_at_k(r, 10),
             "rr": metrics.reciprocal_rank, "ndcg@10": lambda r: metrics.ndcg_at_k(r, 10),
             "rank_distance": metrics.rank_distance}


def cases():
    """The cases as one JSON-ready document."""
    ranking = [{"name": name, "scores": scores, "relevant": relevant, "ranks": ranks,
                "metrics": {k: v for k, (v, _) in values.items()},
                "working": {k: w for k, (_, w) in values.items()}}
               for name, scores, relevant, ranks, values in RANKING_CASES]
    return {"about": "hand-made metric cases of minihbt (python -m minihbt.check metrics --cases); definitions "
                     "in minihbt/metrics.py and docs/check-your-implementation.md",
            "ranking": "candidates by descending score; equal scores: the lower candidate index first; ranks are "
                       "0-based places of the relevant candidates, in the order `relevant` lists them",
            "metrics": {"ap": "full-list average precision", "map@20": "XTREME-R mAP@20",
                        "r@k": "fraction of the relevant candidates in the top k", "rr": "reciprocal rank "
                        "(its mean is MRR)", "ndcg@10": "binary-gain nDCG@10",
                        "rank_distance": "language bias: max - min rank of the relevant candidates"},
            "cases": ranking, "macro": MACRO_CASE}


def ranks_of(case):
    """minihbt's exact retriever on a case: the scores as one-dimensional embeddings (q = [1])."""
    scores = np.asarray(case["scores"], dtype=np.float32)[:, None]
    return rank_of_relevant(np.ones((1, 1), np.float32), scores, [case["relevant"]])[0].tolist()


def mismatches(case, tolerance=1e-12):
    """What minihbt's ranking and metric functions get differently from the case (empty: none)."""
    out = []
    if ranks_of(case) != case["ranks"]:
        out.append(f"{case['name']}: ranks {ranks_of(case)}, the case says {case['ranks']}")
    for metric, value in case["metrics"].items():
        got = FUNCTIONS[metric](case["ranks"])
        if abs(got - value) > tolerance:
            out.append(f"{case['name']}: {metric} {got!r}, the case says {value!r}")
    return out


def macro_mismatches(case, tolerance=1e-12):
    """The macro case through metrics.mean, as evaluation.py averages (empty: it agrees)."""
    per_language = {lang: metrics.mean(aps) for lang, aps in case["per_query_ap"].items()}
    out = [f"{case['name']}: {lang} {value!r}, the case says {case['per_language_map'][lang]!r}"
           for lang, value in per_language.items() if abs(value - case["per_language_map"][lang]) > tolerance]
    got = metrics.mean(per_language.values())
    if abs(got - case["map"]) > tolerance:
        out.append(f"{case['name']}: mAP {got!r}, the case says {case['map']!r}")
    return out
