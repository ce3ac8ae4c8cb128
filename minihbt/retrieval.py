"""Exact retrieval by matrix multiplication: scores = Q @ C^T on L2-normalised embeddings.

Scores are computed for a block of queries at a time against the whole pool, the block
sized so that its score matrix stays under a memory budget (`max_bytes`), so memory does
not grow with the number of queries, and for a pool of N candidates is O(N) per query row.

Ties are broken deterministically by candidate index: among candidates with the same score
the one with the lower index ranks higher. The rank of candidate c for query q is thus
    rank(q, c) = #{j : s_qj > s_qc} + #{j < c : s_qj == s_qc}      (0-based),
which is the position c would take in a stable sort by descending score.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

DEFAULT_MAX_BYTES = 256 << 20


def _query_blocks(n_queries, n_candidates, max_bytes, max_rows=None):
    """Query-row blocks whose float32 score matrix (rows x n_candidates) fits max_bytes,
    of at most max_rows rows when given."""
    rows = max(1, min(max_rows or n_queries, int(max_bytes // (4 * max(1, n_candidates)))))
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
        with threadpool_limits(limits=1, user_api="blas"):               # the same bits on any thread count
            scores = queries[s:e] @ candidates.T                          # [b, N]
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


def top_k(queries, candidates, k, max_bytes=DEFAULT_MAX_BYTES, workers=None):
    """The k best candidates of each query, best first: (indices [Q, k], scores [Q, k]),
    ties broken by lower candidate index.

    Query blocks of at most 256 rows are shared among `workers` threads (default: one per
    core), each doing its block's GEMM and selection, with BLAS held to one thread meanwhile
    (threadpoolctl) so the cores are not oversubscribed; all blocks in flight together stay
    under `max_bytes`. Scores are float32 GEMM results, so a different block shape or thread
    count may round a score differently in the last bit, which can swap two near-tied
    candidates (faiss has the same property); the selection itself is exact.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    N = candidates.shape[0]
    k = min(k, N)
    idx_out = np.empty((len(queries), k), dtype=np.int64)
    score_out = np.empty((len(queries), k), dtype=np.float32)
    workers = max(1, workers or os.cpu_count() or 1)
    blocks = _query_blocks(len(queries), N * workers, max_bytes, max_rows=256)   # `workers` blocks at once

    # BLAS runs ~5% faster on a row-major [D, N] operand than on the transposed view; the
    # copy is made only when it fits the memory budget, so memory stays bounded
    cand_t = np.ascontiguousarray(candidates.T) if candidates.nbytes <= max_bytes else candidates.T

    def work(block):
        s, e = block
        scores = queries[s:e] @ cand_t                                    # [b, N]
        idx_out[s:e], score_out[s:e] = _top_k_rows(scores, k)

    if workers == 1 or len(blocks) == 1:
        for block in blocks:
            work(block)
    else:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, blocks))    # waits for every block; a worker's error raises here
    return idx_out, score_out


def _top_k_rows(scores, k, group=8):
    """Exact top-k of each row of `scores` [b, N], best first, ties by lower column index.

    Selection without sorting or partitioning whole rows. Columns are dealt into G = N // group
    groups (column j*G + i belongs to group i); the group maxima are one element-wise pass.
    The k-th best group maximum t is a lower bound of the row's k-th best score (k different
    groups each hold a score >= t), so every column of the top k lies in a group whose
    maximum is >= t. Those k groups (k * group columns, plus the N % group columns left over)
    are the only candidates; the exact top k is chosen among them. Rows where more than k
    groups or candidates tie at the boundary are redone exactly, one row at a time.
    """
    b, N = scores.shape
    G = N // group
    if G < 2 * k:                                                        # small pools: plain sort
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(scores, order, axis=1)
    gmax = scores[:, :G].copy()                                         # [b, G]
    for j in range(1, group):
        np.maximum(gmax, scores[:, j * G:(j + 1) * G], out=gmax)
    gsel = np.argpartition(gmax, G - k, axis=1)[:, G - k:]              # [b, k] the k best groups
    gsel.sort(axis=1)
    t = np.take_along_axis(gmax, gsel, axis=1).min(axis=1)              # [b]
    base = (np.arange(b) * N)[:, None]                                  # flat offset of each row
    cols = ((G * np.arange(group))[None, :, None] + gsel[:, None, :]).reshape(b, group * k)
    if group * G < N:                                                   # leftover columns: always candidates
        cols = np.concatenate([cols, np.broadcast_to(np.arange(group * G, N), (b, N - group * G))], axis=1)
    # cols is ascending within each row, so ascending places below are ascending columns
    vals = np.take(scores.reshape(-1), base + cols)                     # [b, m]
    sel = np.argpartition(vals, vals.shape[1] - k, axis=1)[:, -k:]
    sel.sort(axis=1)
    part = np.take_along_axis(cols, sel, axis=1)                        # [b, k] columns ascending
    sc = np.take_along_axis(vals, sel, axis=1)
    kth = sc.min(axis=1)
    tied = ((gmax >= t[:, None]).sum(axis=1) > k) | ((vals >= kth[:, None]).sum(axis=1) > k)
    for i in np.flatnonzero(tied):
        part[i] = _tied_candidates(scores[i], kth[i], k)
        sc[i] = scores[i, part[i]]
    order = np.argsort(-sc, axis=1, kind="stable")                      # columns ascending within equal scores
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(sc, order, axis=1)


def _tied_candidates(row, kth, k):
    """Indices of the k best entries of one score row with ties at the k-th score resolved
    by lower index: everything strictly better, then the lowest-indexed ties (ascending)."""
    better = np.flatnonzero(row > kth)
    tied = np.flatnonzero(row == kth)[: k - better.size]
    return np.sort(np.concatenate([better, tied]))
