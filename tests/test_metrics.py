"""Metrics on hand-made rankings (values worked out by hand, ties included) and against
scikit-learn on random rankings; the exact retriever's ranks and top-k against a sort."""
import numpy as np
import pytest

from minihbt import metrics as M
from minihbt.retrieval import rank_of_relevant, top_k


def test_average_precision_by_hand():
    assert M.average_precision([0]) == 1.0
    assert M.average_precision([1]) == 0.5
    assert M.average_precision([2, 0]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert M.average_precision([1, 3]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert M.average_precision([9]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        M.average_precision([])


def test_map_at_k_is_the_xtreme_r_variant():
    # one relevant item beyond the cut: counted in the denominator min(R, k), not the numerator
    assert M.map_at_k([0, 25], 20) == pytest.approx(1 / 2)
    assert M.average_precision([0, 25]) == pytest.approx((1 + 2 / 26) / 2)
    # more relevant items than k: denominator k
    assert M.map_at_k([0, 1, 2, 3], 2) == pytest.approx((1 + 1) / 2)


def test_recall_mrr_ndcg_bias_by_hand():
    assert M.recall_at_k([0, 15], 10) == 0.5
    assert M.recall_at_k([3], 1) == 0.0 and M.recall_at_k([0], 1) == 1.0
    assert M.reciprocal_rank([4, 2]) == pytest.approx(1 / 3)
    assert M.ndcg_at_k([1], 10) == pytest.approx(1 / np.log2(3))
    assert M.ndcg_at_k([0, 2], 10) == pytest.approx((1 + 1 / 2) / (1 + 1 / np.log2(3)))
    assert M.ndcg_at_k([12], 10) == 0.0
    assert M.rank_distance([3, 10, 7]) == 7
    assert M.rank_distance([5]) == 0


def test_ties_are_broken_by_candidate_index():
    """Scores 0.9, 0.9, 0.1 with candidate 1 relevant: candidate 0 wins the tie, so the
    relevant one is at rank 1 and AP = 1/2. With candidate 0 relevant, AP = 1. (scikit-learn,
    which treats a tie as one threshold, gives 1/2 for both: the definitions differ on ties.)"""
    q = np.array([[1.0, 0.0]], np.float32)
    c = np.array([[0.9, 0.1], [0.9, 0.2], [0.1, 0.9]], np.float32)   # q . c = 0.9, 0.9, 0.1
    assert rank_of_relevant(q, c, [[1]])[0].tolist() == [1]
    assert rank_of_relevant(q, c, [[0]])[0].tolist() == [0]
    assert rank_of_relevant(q, c, [[1, 0]])[0].tolist() == [1, 0]
    idx, scores = top_k(q, c, 2)
    assert idx.tolist() == [[0, 1]] and scores[0, 0] == scores[0, 1]
    # four candidates, two tied pairs: order 1, 3 (0.9) then 0, 2 (0.5)
    c4 = np.array([[0.5, 0], [0.9, 0], [0.5, 0], [0.9, 0]], np.float32)
    ranks = rank_of_relevant(q, c4, [[2, 3]])[0]
    assert ranks.tolist() == [3, 1]
    assert M.average_precision(ranks) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert top_k(q, c4, 3)[0].tolist() == [[1, 3, 0]]


def test_against_scikit_learn_on_random_rankings():
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is a test dependency: pip install -e '.[test]'")
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(5, 60))
        scores = rng.standard_normal(n)                       # continuous: no ties
        y = np.zeros(n, dtype=int)
        y[rng.choice(n, size=int(rng.integers(1, n)), replace=False)] = 1
        order = np.argsort(-scores, kind="stable")
        ranks = np.flatnonzero(y[order])                      # ranks of the relevant items
        assert M.average_precision(ranks) == pytest.approx(sk.average_precision_score(y, scores), abs=1e-12)
        k = int(rng.integers(1, n + 1))
        assert M.ndcg_at_k(ranks, k) == pytest.approx(sk.ndcg_score(y[None], scores[None], k=k), abs=1e-12)
        assert M.recall_at_k(ranks, k) == pytest.approx(y[order[:k]].sum() / y.sum())
        assert M.reciprocal_rank(ranks) == pytest.approx(1 / (np.flatnonzero(y[order])[0] + 1))


def test_retriever_matches_a_full_sort_and_stays_within_memory_blocks():
    rng = np.random.default_rng(1)
    Q = rng.standard_normal((60, 8)).astype(np.float32)
    C = rng.standard_normal((300, 8)).astype(np.float32)
    C[7] = C[3]                                               # exact ties
    C[200] = C[3]
    rel = [rng.choice(300, size=int(rng.integers(1, 5)), replace=False) for _ in range(60)]
    rel[0] = np.array([200, 3, 7])
    S = Q @ C.T                                               # the same single GEMM as one block below
    ranks = rank_of_relevant(Q, C, rel)
    idx, _ = top_k(Q, C, 50)
    for q in range(60):
        order = sorted(range(300), key=lambda j: (-S[q, j], j))
        pos = {j: i for i, j in enumerate(order)}
        assert ranks[q].tolist() == [pos[j] for j in rel[q]]
        assert idx[q].tolist() == order[:50]
    assert ranks[0][1] < ranks[0][2] < ranks[0][0]           # tied: index 3 before 7 before 200
    # small blocks give the same answer for well-separated scores
    small = rank_of_relevant(Q, C, rel, max_bytes=4 * 300 * 7)
    assert all(a.tolist() == b.tolist() for a, b in zip(small[1:], ranks[1:]))


@pytest.mark.parametrize("n", [160, 203, 1000])                  # 203: leftover columns past the last group
def test_top_k_selection_is_exact_with_many_ties(n):
    """The grouped selection of top_k against a full stable sort, on score rows quantised to
    a few levels (so the boundary of the top k is nearly always a tie) and on continuous ones."""
    from minihbt.retrieval import _top_k_rows
    rng = np.random.default_rng(n)
    for levels in (3, 20, None):
        S = rng.standard_normal((40, n)).astype(np.float32)
        if levels:
            S = np.round(S * levels / 4).astype(np.float32)
        for k in (1, 10, 20):
            idx, sc = _top_k_rows(S, k)
            ref = np.argsort(-S, axis=1, kind="stable")[:, :k]
            assert idx.tolist() == ref.tolist()
            assert np.array_equal(sc, np.take_along_axis(S, ref, axis=1))


def test_top_k_threads_and_block_sizes_agree():
    """Several workers and tiny memory blocks give the rows of one big call (integer-valued
    vectors, so every score is exact whatever the GEMM's blocking)."""
    rng = np.random.default_rng(3)
    Q = rng.integers(-3, 4, (70, 16)).astype(np.float32)
    C = rng.integers(-3, 4, (500, 16)).astype(np.float32)
    one = top_k(Q, C, 25, workers=1)
    many = top_k(Q, C, 25, workers=3, max_bytes=4 * 500 * 3 * 4)  # 4 rows a block, 18 blocks
    ref = np.argsort(-(Q.astype(np.float64) @ C.T.astype(np.float64)), axis=1, kind="stable")[:, :25]
    assert one[0].tolist() == ref.tolist() and many[0].tolist() == ref.tolist()
    assert np.array_equal(one[1], many[1])
