"""The LAReQA / HBT evaluation protocol on XQuAD-R and MLQA-R.

Settings (all zero-shot, as the HBT paper and LAReQA define them):
- Mo.  (monolingual):  queries of X against the candidates of X, for every language X;
- Cr.  (cross-lingual): queries of X against the candidates of Y, for every ordered pair
       X != Y; a query counts only where its parallel question exists in Y (MLQA-R);
- Mul. (multilingual): queries of X against the pooled candidates of all languages; the
       relevant candidates are the gold sentences of the query's id in every language.
Per setting: per-language (per-pair) means over queries, then macro means over languages
(pairs), as the paper reports them. Language bias is the mean rank distance (max - min rank
of a query's parallel relevant candidates) in the Mul. ranking, per query language, then
averaged over languages.
`summary_table` is the headline table of the results, as evaluate.py and
`python -m minihbt.check metrics` print it.
"""
import numpy as np

from . import metrics
from .bars import progress_bar
from .retrieval import rank_of_relevant

NOT_APPLICABLE = "n/a"

DEFINITIONS = {
    "map": "full-list average precision (LAReQA; = sklearn average_precision_score without ties), mean over queries",
    "map@20": "XTREME-R mAP@20: precision summed over relevant items in the top 20, divided by min(R, 20)",
    "r@k": "fraction of a query's relevant candidates in the top k (hit rate when R = 1)",
    "mrr": "mean reciprocal rank of the first relevant candidate",
    "ndcg@10": "binary-gain nDCG@10",
    "rank_distance": "language bias: max - min rank of a query's parallel relevant candidates in the Mul. ranking",
    "macro": "per-language (or per-pair) means over queries, then the unweighted mean over languages (pairs)",
    "ties": "equal scores are ordered by lower candidate index (candidates: languages in order, then file order)",
    "center_languages": "optional, training-free: per language and role, the mean embedding of that language's "
                        "queries (candidates) in the evaluation set is subtracted, then rows are re-normalised",
}


def _query_metrics(ranks_list, recall_ks):
    """Per-query metric dicts from the relevant ranks of each query, averaged."""
    out = {"map": metrics.mean(metrics.average_precision(r) for r in ranks_list),
           "map@20": metrics.mean(metrics.map_at_k(r, 20) for r in ranks_list),
           "mrr": metrics.mean(metrics.reciprocal_rank(r) for r in ranks_list),
           "ndcg@10": metrics.mean(metrics.ndcg_at_k(r, 10) for r in ranks_list),
           "n_queries": len(ranks_list)}
    for k in recall_ks:
        out[f"r@{k}"] = metrics.mean(metrics.recall_at_k(r, k) for r in ranks_list)
    return out


def _macro(per, keys):
    """Macro means over languages (pairs); None where nothing was measured (one language: Cr.)."""
    return {k: metrics.mean(v[k] for v in per.values()) if per else None for k in keys}


def _progress_bar(rs):
    langs = rs.languages
    total = sum(len(rs.queries[l]) for l in langs) * (len(langs) + (len(langs) > 1))   # Mo./Cr., then Mul.
    return progress_bar(total=total, desc="rank", unit="query")


def center_languages(query_emb, cand_emb, cand_lang):
    """Subtract each language's mean embedding, per role, then re-normalise (no labels used).

    query_emb: {lang: [n, D]}; cand_emb: [N, D] with cand_lang[i] the language of row i.
    The queries of language X lose the mean of X's queries, the candidates of X the mean
    of X's candidates; a row left at zero (a language with one text) stays zero. This removes
    the language-specific offset that makes same-language texts score higher than their
    translations. Returns (query_emb, cand_emb), new float32 arrays.
    """
    def centred(rows):
        rows = np.asarray(rows, dtype=np.float64)
        rows = rows - rows.mean(axis=0, keepdims=True)                        # [n, D]
        norm = np.linalg.norm(rows, axis=1, keepdims=True)                     # [n, 1]
        return (rows / np.where(norm > 0, norm, 1.0)).astype(np.float32)

    cand_lang = np.asarray(cand_lang)
    cands = np.empty(np.shape(cand_emb), dtype=np.float32)
    for lang in np.unique(cand_lang):
        rows = np.flatnonzero(cand_lang == lang)
        cands[rows] = centred(np.asarray(cand_emb)[rows])
    return {lang: centred(q) for lang, q in query_emb.items()}, cands


def _candidates_by_language(rs, cand_emb):
    """Each language's candidate indices and embeddings (gathered once), and every candidate's
    index within its language."""
    cand_lang = np.array(rs.cand_lang)
    idx_of = {l: np.flatnonzero(cand_lang == l) for l in rs.languages}
    pos_in_lang = {int(g): i for l in rs.languages for i, g in enumerate(idx_of[l])}
    return idx_of, {l: cand_emb[idx_of[l]] for l in rs.languages}, pos_in_lang


def evaluate(rs, query_emb, cand_emb, progress=False, return_ranks=False):
    """Run Mo., Cr. and Mul. on a RetrievalSet given embeddings.

    query_emb: {lang: [len(rs.queries[lang]), D]}; cand_emb: [len(rs.cand_text), D].
    Returns the results dict (see evaluate.py for its JSON shape; with one language, Cr.,
    Mul. and bias are None); with return_ranks,
    (results, ranks), the per-query ranks every figure derives from: ranks["mono"][x],
    ranks["cross"]["x-y"] (for the queries of x at ranks["cross_queries"]["x-y"]) and
    ranks["multi"][x], as rank_of_relevant returns them.
    """
    langs = rs.languages
    idx_of, cands_of, pos_in_lang = _candidates_by_language(rs, cand_emb)
    bar = _progress_bar(rs) if progress else None

    mono, cross, multi, bias = {}, {}, {}, {}
    kept = {"mono": {}, "cross": {}, "multi": {}, "cross_queries": {}}
    for x in langs:
        qids = [qid for qid, _ in rs.queries[x]]
        Qx = query_emb[x]
        # Mo. and Cr.: against the candidates of each language y
        for y in langs:
            keep = [i for i, qid in enumerate(qids) if (qid, y) in rs.gold]
            if not keep:
                continue
            rel = [[pos_in_lang[rs.gold[(qids[i], y)]]] for i in keep]
            ranks = rank_of_relevant(Qx[keep], cands_of[y], rel, progress=bar)
            res = _query_metrics(ranks, recall_ks=(1, 10))
            if x == y:
                mono[x], kept["mono"][x] = res, ranks
            else:
                cross[f"{x}-{y}"], kept["cross"][f"{x}-{y}"], kept["cross_queries"][f"{x}-{y}"] = res, ranks, keep
        if len(langs) == 1:                             # Mul. and bias compare languages: not applicable
            continue
        # Mul.: against the pooled candidates; relevant = gold in every language
        rel = [[rs.gold[(qid, l)] for l in langs if (qid, l) in rs.gold] for qid in qids]
        ranks = rank_of_relevant(Qx, cand_emb, rel, progress=bar)
        multi[x], kept["multi"][x] = _query_metrics(ranks, recall_ks=(1, 10)), ranks
        distances = [metrics.rank_distance(r) for r in ranks if len(r) > 1]
        bias[x] = metrics.mean(distances) if distances else None   # None: no query of x has a parallel
    if bar is not None:
        bar.close()
    keys = ("map", "map@20", "r@1", "r@10", "mrr", "ndcg@10")
    measured = [b for b in bias.values() if b is not None]
    results = {
        "dataset": rs.name,
        "languages": list(langs),
        "mono": {**_macro(mono, keys), "per_language": mono},
        "cross": {**_macro(cross, keys), "per_pair": cross},
        "multi": {**_macro(multi, keys), "per_language": multi},
        "bias": {"rank_distance": metrics.mean(measured) if measured else None, "per_language": bias},
        "counts": {"queries": {l: len(rs.queries[l]) for l in langs},
                   "candidates": {l: int(len(idx_of[l])) for l in langs},
                   "pooled_candidates": len(rs.cand_text),
                   "dropped_no_sentence": dict(rs.dropped)},
        "definitions": DEFINITIONS,
    }
    return (results, kept) if return_ranks else results


def number(value, spec):
    """A figure for the tables, or n/a where the setting does not apply (one language)."""
    return NOT_APPLICABLE if value is None else format(value, spec)


def not_applicable(res):
    """The settings that do not apply to this evaluation, with the reason (for the JSON)."""
    if len(res["languages"]) > 1:
        return {}
    reason = "one language: this setting compares languages"
    return {"cross": reason, "multi": reason, "bias": reason}


def summary_table(res):
    """The headline figures of `evaluate`'s results, as evaluate.py prints them."""
    rows = [("Mo.", "map", res["mono"]["map"]), ("Mo.", "r@1", res["mono"]["r@1"]),
            ("Cr.", "map", res["cross"]["map"]), ("Cr.", "r@1", res["cross"]["r@1"]),
            ("Mul.", "map", res["multi"]["map"]), ("Mul.", "r@10", res["multi"]["r@10"])]
    lines = [f"{res['dataset']}: {len(res['languages'])} languages, "
             f"{sum(res['counts']['queries'].values())} queries, {res['counts']['pooled_candidates']} candidates",
             f"{'setting':8s}{'metric':8s}{'value':>8s}"]
    lines += [f"{s:8s}{m:8s}{number(v, '8.3f'):>8s}" for s, m, v in rows]
    lines.append(f"{'Mul.':8s}{'bias':8s}{number(res['bias']['rank_distance'], '8.1f'):>8s}   "
                 "(mean rank distance, lower is better)")
    if not_applicable(res):
        lines.append("Cr., Mul. and bias: n/a (one language; they compare languages)")
    return "\n".join(lines)
