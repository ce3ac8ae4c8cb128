"""Per-query ranks of a run (the .npz beside its JSON) and the per-query metric values they give.

Every figure of a run derives from the ranks of its queries' gold sentences, so those are
what is kept (exact, and smaller than the metric values). The file (np.savez_compressed,
no pickled objects):

    qids                     [n_ids] str   the question ids; parallel questions share one
    languages                [L] str
    query_ids/<x>            [n_x]         index into qids of each query of language x
    has_gold/<x>             [n_x, L] bool whether each query of x has a gold sentence in each language
    <variant>/mono/<x>       [n_x]         rank of the gold sentence among x's candidates (0 = top)
    <variant>/cross/<x>-<y>  [m]           rank of the gold sentence among y's candidates, for the m
                                           queries of x with one there (has_gold/<x>[:, y]), in order
    <variant>/multi/<x>      [n_x, L]      ranks of the gold sentences in the pool, ascending, padded

with variant "plain" or "centered". Ranks are uint16 (padding 65535) when the pool has
fewer than 65535 candidates, else uint32 (padding 2**32 - 1).

The metric values (same definitions as minihbt/metrics.py, vectorised): AP = mean over the
relevant ranks r_1 < ... < r_R of k / (r_k + 1); R@k = |{r < k}| / R; bias = r_R - r_1,
for the queries with R > 1.
"""
import numpy as np

from ..files import atomic_path

# metric: (label, section of the results JSON, key in it, higher is better)
METRICS = {
    "mo_map": ("Mo. mAP", "mono", "map", True),
    "mo_r1": ("Mo. R@1", "mono", "r@1", True),
    "cr_map": ("Cr. mAP", "cross", "map", True),
    "cr_r1": ("Cr. R@1", "cross", "r@1", True),
    "mul_map": ("Mul. mAP", "multi", "map", True),
    "mul_r10": ("Mul. R@10", "multi", "r@10", True),
    "bias": ("bias", "bias", "rank_distance", False),
}
VARIANTS = ("plain", "centered")


def macro_value(results, metric):
    """The macro-averaged figure of `metric` in one evaluation's results dict."""
    _, section, key, _ = METRICS[metric]
    return results[section][key]


def unit_values(results, metric):
    """{unit: figure}: per language (Mo., Mul., bias) or per pair (Cr.) of one evaluation."""
    _, section, key, _ = METRICS[metric]
    if section == "bias":
        return dict(results["bias"]["per_language"])
    per = results[section]["per_pair" if section == "cross" else "per_language"]
    return {unit: v[key] for unit, v in per.items()}


def save_ranks(path, rs, ranks_by_variant):
    """Write the ranks of evaluate(..., return_ranks=True) for each variant, atomically."""
    qid_index = {}
    for x in rs.languages:
        for qid, _ in rs.queries[x]:
            qid_index.setdefault(qid, len(qid_index))
    dtype = np.uint16 if len(rs.cand_text) < np.iinfo(np.uint16).max else np.uint32
    pad = np.iinfo(dtype).max
    arrays = {"qids": np.array(list(qid_index), dtype=str), "languages": np.array(rs.languages, dtype=str)}
    for x in rs.languages:
        arrays[f"query_ids/{x}"] = np.array([qid_index[q] for q, _ in rs.queries[x]], dtype=np.int32)
        arrays[f"has_gold/{x}"] = np.array([[(q, y) in rs.gold for y in rs.languages] for q, _ in rs.queries[x]],
                                           dtype=bool).reshape(-1, len(rs.languages))
    for variant, ranks in ranks_by_variant.items():
        for pair, positions in ranks["cross_queries"].items():            # the same queries as has_gold says
            x, y = pair.split("-")
            if list(positions) != list(np.flatnonzero(arrays[f"has_gold/{x}"][:, rs.languages.index(y)])):
                raise ValueError(f"{pair}: the ranked queries are not those with a gold sentence")
        for setting in ("mono", "cross"):
            for unit, rows in ranks[setting].items():
                arrays[f"{variant}/{setting}/{unit}"] = np.array([int(r[0]) for r in rows], dtype=dtype)
        for x, rows in ranks["multi"].items():
            block = np.full((len(rows), len(rs.languages)), pad, dtype=dtype)
            for i, r in enumerate(rows):
                block[i, :len(r)] = np.sort(r)
            arrays[f"{variant}/multi/{x}"] = block
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


class RankFile:
    """The ranks of one run, read back: per-query values of every metric, per unit."""

    def __init__(self, path):
        with np.load(path) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.qids = [str(q) for q in self.arrays["qids"]]
        self.languages = [str(x) for x in self.arrays["languages"]]

    def units(self, variant, metric):
        """{unit: (question indices into self.qids, per-query values)} of `metric`."""
        _, section, _, _ = METRICS[metric]
        a, out = self.arrays, {}
        if section in ("mono", "cross"):
            prefix = f"{variant}/{section}/"
            for key in (k for k in a if k.startswith(prefix)):
                unit = key[len(prefix):]
                x = unit.split("-")[0]
                ids = a[f"query_ids/{x}"]
                if section == "cross":
                    ids = ids[a[f"has_gold/{x}"][:, self.languages.index(unit.split("-")[1])]]
                ranks = a[key].astype(np.float64)
                out[unit] = (ids, 1.0 / (ranks + 1.0) if metric.endswith("map") else (ranks < 1).astype(np.float64))
            return out
        for x in self.languages:
            block = a[f"{variant}/multi/{x}"]
            valid = block != np.iinfo(block.dtype).max                           # [n, L]
            n_rel = valid.sum(axis=1)
            ranks = np.where(valid, block, 0).astype(np.float64)
            ids = a[f"query_ids/{x}"]
            if metric == "mul_map":
                k = np.cumsum(valid, axis=1)                                      # position among the relevant
                values = np.where(valid, k / (ranks + 1.0), 0.0).sum(axis=1) / n_rel
            elif metric == "mul_r10":
                values = (valid & (ranks < 10)).sum(axis=1) / n_rel
            else:                                                                 # bias: last - first relevant
                keep = n_rel > 1
                last = ranks[np.arange(len(ranks)), n_rel - 1]
                ids, values = ids[keep], (last - ranks[:, 0])[keep]
            out[x] = (ids, values)
        return out
