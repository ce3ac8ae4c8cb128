"""Exact retrieval by matrix multiplication: scores = Q @ C^T on L2-normalised embeddings.

Scores are computed for a block of queries at a time against the whole pool, the block
sized so that its score matrix stays under a memory budget (`max_bytes`), so memory does
not grow with the number of queries, and for a pool of N candidates is O(N) per query row.

Ties are broken deterministically by candidate index: among candidates with the same score
the one with the lower index ranks higher. The rank of candidate c for query q is thus
    rank(q, c) = #{j : s_qj > s_qc} + #{j < c : s_qj == s_qc}      (0-based),
which is the position c would take in a stable sort by descending score.
"""
import numpy as np

DEFAULT_MAX_BYTES = 256 << 20


def _query_blocks(n_queries, n_candidates, max_bytes):
    """Query-row blocks whose float32 score matrix (rows x n_candidates) fits max_bytes."""
    rows = max(1, int(max_bytes // (4 * max(1, n_candidates))))
    return [(s, min(s + rows, n_queries)) for s in range(0, n_queries, rows)]


def rank_of_relevant(queries, candidates, relevant, max_bytes=DEFAULT_MAX_BYTES, progress=None):
    """0-based rank of each relevant candidate of each query in that query's full ranking.

    queries [Q, D], candidates [N, D] float32 (L2-normalised); relevant: a list of Q integer
    sequences (candidate indices). Returns a list of Q int64 arrays, in the order given.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    if len(relevant) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(relevant)} relevance lists")
    N = candidates.shape[0]
    cand_index = np.arange(N)
    out = [None] * len(queries)
    for s, e in _query_blocks(len(queries), N, max_bytes):
        scores = queries[s:e] @ candidates.T                              # [b, N]
        b = e - s
        width = max(len(r) for r in relevant[s:e])
        rel = np.zeros((b, width), dtype=np.int64)                        # [b, R] padded
        valid = np.zeros((b, width), dtype=bool)
        for i, r in enumerate(relevant[s:e]):
            rel[i, :len(r)] = r
            valid[i, :len(r)] = True
        rel_scores = np.take_along_axis(scores, rel, axis=1)              # [b, R]
        ranks = np.zeros((b, width), dtype=np.int64)
        for k in range(width):                                            # one relevant slot at a time: O(b N) memory
            target = rel_scores[:, k:k + 1]                               # [b, 1]
            ranks[:, k] = (scores > target).sum(axis=1)
            ties = scores == target
            ties &= cand_index[None, :] < rel[:, k:k + 1]
            ranks[:, k] += ties.sum(axis=1)
        for i in range(b):
            out[s + i] = ranks[i, valid[i]]
        if progress is not None:
            progress.update(b)
    return out


def top_k(queries, candidates, k, max_bytes=DEFAULT_MAX_BYTES):
    """The k best candidates of each query, best first: (indices [Q, k], scores [Q, k]),
    ties broken by lower candidate index."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    N = candidates.shape[0]
    k = min(k, N)
    idx_out = np.empty((len(queries), k), dtype=np.int64)
    score_out = np.empty((len(queries), k), dtype=np.float32)
    for s, e in _query_blocks(len(queries), N, max_bytes):
        scores = queries[s:e] @ candidates.T                              # [b, N]
        idx_out[s:e], score_out[s:e] = _top_k_rows(scores, k)
    return idx_out, score_out


def _top_k_rows(scores, k):
    """Exact top-k of each row of `scores` [b, N], best first, ties by lower column index.

    Selection without a full partition of every row: the k-th best score among a strided
    sample of m >= k columns is a lower bound t of the row's true k-th best, so every column
    with score >= t (at least k of them, usually a few times k) is a candidate; the exact
    top k is then chosen among those few.
    """
    b, N = scores.shape
    if k == N:
        part = np.broadcast_to(np.arange(N), scores.shape)
    else:
        stride = max(1, N // max(4 * k, 2048))
        sample = scores[:, ::stride]                                     # [b, m], m >= k
        t = -np.partition(-sample, k - 1, axis=1)[:, k - 1]              # [b] lower bound of the k-th best
        rows, cols = np.nonzero(scores >= t[:, None])                    # survivors, row-major: cols ascending
        counts = np.bincount(rows, minlength=b)
        pos = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]  # place within its row
        width = int(counts.max())
        cand_col = np.zeros((b, width), dtype=np.int64)
        cand_val = np.full((b, width), -np.inf, dtype=np.float32)
        cand_col[rows, pos] = cols
        cand_val[rows, pos] = scores[rows, cols]
        sel = np.argpartition(-cand_val, k - 1, axis=1)[:, :k]           # [b, k] places in cand_*
        kth = np.take_along_axis(cand_val, sel, axis=1).min(axis=1)
        sel.sort(axis=1)                                                 # places ascending = columns ascending
        part = np.take_along_axis(cand_col, sel, axis=1)
        # rows where more than k survivors reach the k-th score: ties at the boundary, which
        # argpartition settled arbitrarily; take the lowest columns instead
        for i in np.flatnonzero((cand_val >= kth[:, None]).sum(axis=1) > k):
            part[i] = _tied_candidates(scores[i], kth[i], k)
    sc = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-sc, axis=1, kind="stable")                      # columns ascending within equal scores
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(sc, order, axis=1)


def _tied_candidates(row, kth, k):
    """Indices of the k best entries of one score row with ties at the k-th score resolved
    by lower index: everything strictly better, then the lowest-indexed ties (ascending)."""
    better = np.flatnonzero(row > kth)
    tied = np.flatnonzero(row == kth)[: k - better.size]
    return np.sort(np.concatenate([better, tied]))
