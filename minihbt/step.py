"""One training step's loss and gradients: encoder forward, InfoNCE, encoder backward.

Plain: both sides (queries; positives then negatives) are embedded in one pass keeping their
activations (model.embed_sides: the two sides' length groups share the thread pool), the loss
gives the gradient of every embedding, and every group's backward runs from its cache.
GradCache (`chunk_size`): embed the texts `chunk_size` at a time without keeping activations,
compute the loss and the embedding gradients, then re-run each chunk (same dropout masks) and
backpropagate its slice: the same gradients, memory bounded by the chunk, for one extra
forward pass. Either way the texts run in length-sorted groups padded only to their own
longest text.

Dropout: text i of role r (0 queries, 1 passages) gets the streams of seed [seed, r, i], so
its masks do not depend on chunking or grouping (dropout.py).
"""
import numpy as np

from .backend import to_numpy
from .loss import contrastive_loss
from .model import GROUP_TOKENS, Side, check_texts, embed_sides, embed_texts, resolve_prefix

QUERY, PASSAGE = 0, 1


def _check_batch(queries, positives, negatives, chunk_size):
    queries, positives = check_texts(queries, "queries"), check_texts(positives, "positives")
    B = len(queries)
    if B == 0 or len(positives) != B:
        raise ValueError(f"need as many positives as queries (got {B} queries, {len(positives)} positives)")
    if negatives is not None:
        if len(negatives) != B:
            raise ValueError(f"negatives must be a list of {B} lists (one per query), got {len(negatives)}")
        negatives = [check_texts(n, f"negatives[{i}]") for i, n in enumerate(negatives)]
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return queries, positives, negatives


def _seeds(seed, role, start, n, dropout):
    """Dropout seeds of texts start .. start + n - 1 of a side (None: dropout off)."""
    return [[seed, role, start + i] for i in range(n)] if dropout else None


def loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False, symmetric=False, seed=None, max_query_length=512, max_passage_length=512,
                   chunk_size=None, return_numpy=True, stats=None, group_tokens=GROUP_TOKENS):
    """InfoNCE loss of a batch and its gradient for every parameter of `model`.

    queries, positives: lists of B texts; negatives: a list of B lists of texts (any length,
    possibly empty) or None. Texts get the model's `query: ` / `passage: ` prefixes as
    `encode` does. dropout: apply the model's dropout; its masks are a function of `seed`
    (an int; None draws one) and of each text's place in the batch, so a step can be replayed.
    chunk_size: GradCache (see the module docstring). group_tokens: padded tokens per
    length-sorted group (None: each side, or chunk, as one padded batch).
    Returns (loss: float, grads: dict name -> array with the names and shapes of
    `model.params`; numpy arrays unless return_numpy=False). `stats`, if a dict, receives
    the number of real tokens processed ("tokens") and {word table name: the rows of its
    gradient that may be nonzero} ("table_rows", every other row is exactly 0: pass it as
    `rows` to clip_grad_norm and AdamW.step, which then skip the rest of the table).
    """
    queries, positives, negatives = _check_batch(queries, positives, negatives, chunk_size)
    if dropout and seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    q_pre, p_pre = resolve_prefix(model, "query", True), resolve_prefix(model, "passage", True)
    query_texts = [q_pre + t for t in queries]
    cand_texts = [p_pre + t for t in positives] + [p_pre + t for negs in (negatives or []) for t in negs]
    sides = [(query_texts, max_query_length, QUERY), (cand_texts, max_passage_length, PASSAGE)]

    def run(texts, max_len, role, start, keep):
        seeds = _seeds(seed, role, start, len(texts), dropout)
        return embed_texts(model, texts, max_len, seeds=seeds, keep=keep, max_tokens=group_tokens)

    grads, tokens, rows = {}, 0, {}
    if chunk_size is None:                                    # both sides' length groups in one pass
        both = [Side(texts, max_len, seeds=_seeds(seed, role, 0, len(texts), dropout)) for texts, max_len, role in sides]
        emb, backward, tokens = embed_sides(model, both, keep=True, max_tokens=group_tokens)
        n_q = len(query_texts)
        with model.backend.blas_serial():                     # the same bits on any number of threads
            loss, d_q, d_c = contrastive_loss(model.backend, emb[:n_q], emb[n_q:], query_texts, cand_texts,
                                              temperature, candidates, symmetric)
        backward(model.xp.concatenate([d_q, d_c]), grads, rows)
    else:
        embs = [model.xp.concatenate([run(texts[s:s + chunk_size], max_len, role, s, False)[0]
                                      for s in range(0, len(texts), chunk_size)]) for texts, max_len, role in sides]
        with model.backend.blas_serial():
            loss, d_q, d_c = contrastive_loss(model.backend, embs[0], embs[1], query_texts, cand_texts,
                                              temperature, candidates, symmetric)
        for (texts, max_len, role), d_emb in zip(sides, (d_q, d_c)):
            for s in range(0, len(texts), chunk_size):
                _, backward, n = run(texts[s:s + chunk_size], max_len, role, s, True)
                backward(d_emb[s:s + chunk_size], grads, rows)
                tokens += n
    for name, p in model.params.items():          # parameters the loss does not reach (e.g. an unused pooler)
        if name not in grads:
            grads[name] = model.xp.zeros_like(p)
    grads = {name: (to_numpy(grads[name]) if return_numpy else grads[name]) for name in model.params}
    if stats is not None:
        stats["tokens"], stats["table_rows"] = tokens, rows
    return loss, grads
