"""Retrieval metrics, each from the 0-based ranks of a query's relevant candidates in its
full ranked list (rank 0 = the top). Ties in scores are broken before ranks are taken
(see retrieval.py), so every function here sees a strict order.

`ranks` is a 1-D sequence of distinct non-negative ints, one per relevant candidate, in any
order; a query must have at least one relevant candidate.
"""
import numpy as np


def _sorted_ranks(ranks):
    r = np.sort(np.asarray(ranks, dtype=np.int64))
    if r.size == 0:
        raise ValueError("a query needs at least one relevant candidate")
    return r


def average_precision(ranks):
    """AP over the full ranked list (LAReQA's definition):
        AP = (1/R) * sum_k  k / (r_k + 1),   r_1 < ... < r_R the relevant ranks,
    i.e. the mean of precision@(position of each relevant item). Equals scikit-learn's
    average_precision_score(y_true, scores) when the scores have no ties."""
    r = _sorted_ranks(ranks)
    return float(np.mean(np.arange(1, r.size + 1) / (r + 1)))


def map_at_k(ranks, k):
    """mAP@k of XTREME-R (a different number from full-list AP): the sum of precision@(r+1)
    over the relevant items ranked in the top k, divided by min(R, k)."""
    r = _sorted_ranks(ranks)
    hits = np.arange(1, r.size + 1)[r < k] / (r[r < k] + 1)
    return float(hits.sum() / min(r.size, k))


def recall_at_k(ranks, k):
    """R@k: the fraction of the query's relevant candidates that are in the top k,
    |{r < k}| / R (pytrec_eval's recall_k). With one relevant candidate (Mo., Cr.) it is the
    hit rate: 1 if the gold sentence is in the top k, else 0."""
    r = _sorted_ranks(ranks)
    return float((r < k).sum() / r.size)


def reciprocal_rank(ranks):
    """RR = 1 / (rank of the first relevant item + 1); its mean over queries is MRR."""
    return float(1.0 / (_sorted_ranks(ranks)[0] + 1))


def ndcg_at_k(ranks, k):
    """nDCG@k with binary gains: DCG = sum over relevant items in the top k of
    1 / log2(rank + 2), divided by the ideal DCG = sum_{i < min(R, k)} 1 / log2(i + 2)."""
    r = _sorted_ranks(ranks)
    dcg = (1.0 / np.log2(r[r < k] + 2)).sum()
    ideal = (1.0 / np.log2(np.arange(min(r.size, k)) + 2)).sum()
    return float(dcg / ideal)


def rank_distance(ranks):
    """Language bias of one query (KD-SPD, Huang et al. 2023): in the multilingual ranking,
    the lowest-placed minus the highest-placed of its parallel relevant candidates,
    max(rank) - min(rank). 0 when all translations sit together; lower is better."""
    r = _sorted_ranks(ranks)
    return int(r[-1] - r[0])


def mean(values):
    """Arithmetic mean (the macro average over queries, languages or pairs)."""
    values = list(values)
    if not values:
        raise ValueError("mean of nothing")
    return float(np.mean(values))
