"""InfoNCE over a batch of (query, positive, negatives...) triplets, and `loss_and_grads`.

Scores are cosine similarities (the embeddings are L2-normalised) divided by a temperature
tau (default 0.05, as sentence-transformers). Candidate columns are the batch's positives
(column i is query i's positive) followed by all its negatives. Which columns count for
query i is a boolean mask:

- `inbatch` (default): every positive and every negative of the batch; the target is the
  query's own positive (sentence-transformers MultipleNegativesRankingLoss, Tevatron).
- `paper`: exactly the denominator of the HBT paper's Eq. 1: the query's own positive plus
  all negatives of the batch, not the other queries' positives.
- in both, a candidate whose text duplicates the target's text is masked (a copy of the
  positive is no negative), and repeated texts count once.
- `symmetric=True` adds the passage -> query term (each positive scored against the batch's
  queries) and averages the two directions, as MultipleNegativesSymmetricRankingLoss.

The loss is the mean over queries of -log softmax(scores)[target]. This module sees only
embeddings and texts; step.py runs the encoder around it.
"""
import numpy as np

CANDIDATES = ("inbatch", "paper")


def candidate_mask(target_texts, candidate_texts, own_only=None):
    """Boolean [B, M] mask of the candidates that count for each row; row i's target is column i.

    Column j is masked for row i when its text equals row i's target text (j != i), or when
    it repeats the text of an earlier column. `own_only`, if given (an int n), keeps of the
    first n columns only the row's own column (the `paper` denominator).
    """
    B, M = len(target_texts), len(candidate_texts)
    first = {}
    dup_of_earlier = np.zeros(M, dtype=bool)
    for j, t in enumerate(candidate_texts):
        if t in first:
            dup_of_earlier[j] = True
        else:
            first[t] = j
    mask = np.tile(~dup_of_earlier, (B, 1))                      # [B, M]
    for i, t in enumerate(target_texts):
        same = [j for j in range(M) if candidate_texts[j] == t] if t in first else []
        mask[i, same] = False
        mask[i, i] = True                                        # the target always counts
    if own_only is not None:
        mask[:, :own_only] &= np.eye(B, own_only, dtype=bool)
    return mask


def info_nce_forward(be, q, c, mask, temperature):
    """q [B, H], c [M, H] (L2-normalised), mask [B, M]; row i's target is column i.
    Returns (mean loss as a 0-d array, cache)."""
    xp = be.xp
    B = q.shape[0]
    scores = (q @ c.T) * (1.0 / temperature)                     # [B, M]
    scores = xp.where(xp.asarray(mask), scores, -xp.inf)
    row_max = scores.max(axis=1, keepdims=True)                  # [B, 1]
    shifted = scores - row_max
    lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))     # [B, 1]
    log_probs = shifted - lse                                    # [B, M], -inf where masked
    rows = xp.arange(B)
    loss = -log_probs[rows, rows].mean()
    return loss, (q, c, xp.exp(log_probs), temperature)


def info_nce_backward(be, d_loss, cache):
    """loss = mean_i(lse_i - s_ii), s = q c^T / tau
    => ds = (softmax(s) - onehot) / B;  dq = ds c / tau;  dc = ds^T q / tau."""
    q, c, probs, temperature = cache
    B = q.shape[0]
    d_s = probs.copy()                                           # [B, M]
    rows = be.xp.arange(B)
    d_s[rows, rows] -= 1.0
    d_s *= d_loss / (B * temperature)
    return d_s @ c, d_s.T @ q


def contrastive_loss(be, q, c, query_texts, candidate_texts, temperature=0.05, candidates="inbatch",
                     symmetric=False):
    """The loss and its gradients with respect to q [B, H] and c [M, H] (see module doc)."""
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B = q.shape[0]
    mask = candidate_mask(candidate_texts[:B], candidate_texts, own_only=B if candidates == "paper" else None)
    loss, cache = info_nce_forward(be, q, c, mask, temperature)
    if not symmetric:
        d_q, d_c = info_nce_backward(be, 1.0, cache)
        return float(loss), d_q, d_c
    # passage -> query: positive i against all queries, target query i
    mask_pq = candidate_mask(query_texts, query_texts)
    loss_pq, cache_pq = info_nce_forward(be, c[:B], q, mask_pq, temperature)
    d_q, d_c = info_nce_backward(be, 0.5, cache)
    d_p, d_q2 = info_nce_backward(be, 0.5, cache_pq)
    d_q += d_q2
    d_c[:B] += d_p
    return 0.5 * (float(loss) + float(loss_pq)), d_q, d_c
