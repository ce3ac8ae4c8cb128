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

The loss is the mean over queries of -log softmax(scores)[target].
"""
import numpy as np

from . import layers as L
from .backend import to_numpy
from .model import resolve_prefix

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


def info_nce_forward(xp, q, c, mask, temperature):
    """q [B, H], c [M, H] (L2-normalised), mask [B, M]; row i's target is column i.
    Returns (mean loss as a 0-d array, cache)."""
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


def info_nce_backward(xp, d_loss, cache):
    """loss = mean_i(lse_i - s_ii), s = q c^T / tau
    => ds = (softmax(s) - onehot) / B;  dq = ds c / tau;  dc = ds^T q / tau."""
    q, c, probs, temperature = cache
    B = q.shape[0]
    d_s = probs.copy()                                           # [B, M]
    rows = xp.arange(B)
    d_s[rows, rows] -= 1.0
    d_s *= d_loss / (B * temperature)
    return d_s @ c, d_s.T @ q


def contrastive_loss(xp, q, c, query_texts, candidate_texts, temperature=0.05, candidates="inbatch",
                     symmetric=False):
    """The loss and its gradients with respect to q [B, H] and c [M, H] (see module doc)."""
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B = q.shape[0]
    mask = candidate_mask(candidate_texts[:B], candidate_texts, own_only=B if candidates == "paper" else None)
    loss, cache = info_nce_forward(xp, q, c, mask, temperature)
    if not symmetric:
        d_q, d_c = info_nce_backward(xp, 1.0, cache)
        return float(loss), d_q, d_c
    # passage -> query: positive i against all queries, target query i
    mask_pq = candidate_mask(query_texts, query_texts)
    loss_pq, cache_pq = info_nce_forward(xp, c[:B], q, mask_pq, temperature)
    d_q, d_c = info_nce_backward(xp, 0.5, cache)
    d_p, d_q2 = info_nce_backward(xp, 0.5, cache_pq)
    d_q += d_q2
    d_c[:B] += d_p
    return 0.5 * (float(loss) + float(loss_pq)), d_q, d_c


def _dropout_streams(texts_ids, mask, dropout, seed, kind, offset):
    """Per-text dropout streams seeded by (seed, kind, index in the batch), or None."""
    if not dropout:
        return None
    seeds = [[seed, kind, offset + i] for i in range(len(texts_ids))]
    return L.RowDropout(seeds, to_numpy(mask).sum(axis=1))


def embed_with_cache(model, texts, max_length, dropout, seed=0, kind=0, offset=0, keep=True):
    """Forward `texts` through the encoder: (embeddings [N, H], backward closure or None, tokens).

    Dropout streams are per text, seeded by (seed, kind, offset + i), so that the same text
    at the same place of the batch gets the same masks however the batch is chunked.
    With keep=False no activations are kept (GradCache's first pass).
    """
    xp = model.xp
    ids, mask, tt = model.tokenizer(texts, max_length=min(max_length, model.max_length))
    rng = _dropout_streams(ids, mask, dropout, seed, kind, offset)
    caches = [] if keep else None
    hidden = model.forward(ids, mask, tt, caches=caches, rng=rng, dropout=dropout)      # [N, T, H]
    pooled = model.pool(hidden, mask, caches=caches)                                    # [N, H]
    emb, norm_cache = L.l2_normalize_forward(xp, pooled)
    shape = hidden.shape
    del hidden
    n_tokens = int(mask.sum())
    if not keep:
        return emb, None, n_tokens

    def backward(d_emb, grads):
        d_pooled = L.l2_normalize_backward(xp, d_emb, norm_cache)
        d_hidden = model.pool_backward(d_pooled, shape, caches, grads)
        model.backward(d_hidden, caches, grads)
    return emb, backward, n_tokens


QUERY, PASSAGE = 0, 1


def loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False, symmetric=False, seed=None, max_query_length=512, max_passage_length=512,
                   chunk_size=None, return_numpy=True, stats=None):
    """InfoNCE loss of a batch and its gradient for every parameter of `model`.

    queries, positives: lists of B texts; negatives: a list of B lists of texts (any length,
    possibly empty) or None. Texts get the model's `query: ` / `passage: ` prefixes as
    `encode` does. dropout: apply the model's dropout; its randomness is a function of `seed`
    (an int; None draws one) and of each text's place in the batch, so a step can be replayed.
    chunk_size: GradCache. Embed the texts `chunk_size` at a time without keeping
    activations, compute the loss and its gradient with respect to the embeddings, then
    re-run each chunk (same dropout) and backpropagate that gradient: the same gradients in
    memory bounded by the chunk, for one extra forward pass.
    Returns (loss: float, grads: dict name -> numpy array with the names and shapes of
    `model.params`). `stats`, if a dict, receives the number of tokens processed.
    """
    xp = model.xp
    B = len(queries)
    if B == 0 or len(positives) != B:
        raise ValueError(f"need as many positives as queries (got {B} queries, {len(positives)} positives)")
    if negatives is not None and len(negatives) != B:
        raise ValueError(f"negatives must be a list of {B} lists (one per query), got {len(negatives)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if dropout and seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    q_pre, p_pre = resolve_prefix(model, "query", True), resolve_prefix(model, "passage", True)
    query_texts = [q_pre + t for t in queries]
    cand_texts = [p_pre + t for t in positives] + [p_pre + t for negs in (negatives or []) for t in negs]
    parts = [(query_texts, max_query_length, QUERY), (cand_texts, max_passage_length, PASSAGE)]
    step = chunk_size or max(len(query_texts), len(cand_texts))
    grads, tokens = {}, 0
    if chunk_size is None:                 # plain: both batches keep their activations
        embs, backwards = [], []
        for texts, max_len, kind in parts:
            e, bw, n = embed_with_cache(model, texts, max_len, dropout, seed, kind, 0)
            embs.append(e)
            backwards.append(bw)
            tokens += n
        loss, d_q, d_c = contrastive_loss(xp, embs[0], embs[1], query_texts, cand_texts, temperature, candidates,
                                          symmetric)
        backwards[1](d_c, grads)
        backwards[0](d_q, grads)
    else:                                  # GradCache
        embs = []
        for texts, max_len, kind in parts:
            chunks = [embed_with_cache(model, texts[s:s + step], max_len, dropout, seed, kind, s, keep=False)[0]
                      for s in range(0, len(texts), step)]
            embs.append(xp.concatenate(chunks))
        loss, d_q, d_c = contrastive_loss(xp, embs[0], embs[1], query_texts, cand_texts, temperature, candidates,
                                          symmetric)
        for (texts, max_len, kind), d_emb in zip(parts, (d_q, d_c)):
            for s in range(0, len(texts), step):
                _, bw, n = embed_with_cache(model, texts[s:s + step], max_len, dropout, seed, kind, s)
                bw(d_emb[s:s + step], grads)
                tokens += n
    for name, p in model.params.items():          # parameters the loss does not reach (e.g. an unused pooler)
        if name not in grads:
            grads[name] = xp.zeros_like(p)
    grads = {name: grads[name] for name in model.params}
    if return_numpy:
        grads = {k: to_numpy(v) for k, v in grads.items()}
    if stats is not None:
        stats["tokens"] = tokens
    return loss, grads
