"""One training step of the plain path, written out so that every intermediate tensor is kept.

`record_step` does what step.loss_and_grads, step.clip_grad_norm and step.AdamW do together
(dropout off), with the plain path's own public functions (encoder.embeddings_forward,
block_forward, pool_forward, layers.l2_normalize_forward, step.contrastive_loss, and their
backwards), and returns the tensors of a golden bundle by their names (bundle.py). The word
table's gradient and update are computed on the rows the batch uses only: the table of
multilingual-e5-small has 250,037 rows, the batch a few hundred.
tests/test_check_step.py checks the result against step.loss_and_grads and step.train_step.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .. import encoder, layers, step
from ..backend import to_numpy
from .bundle import SIDES, WORD_ROWS

WORD = encoder.WORD_TABLE


@dataclass(frozen=True)
class StepSettings:
    """Everything the step depends on besides the model and the batch."""
    max_query_length: int = 64
    max_passage_length: int = 256
    temperature: float = 0.05
    candidates: str = "inbatch"
    symmetric: bool = False
    lr: float = 3e-5
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


def side_forward(model, side, texts, max_length, rec):
    """Tokens, embeddings, each block, pooling and normalisation of one side, kept in `rec`."""
    be, params, config = model.backend, model.params, model.config
    ids, mask, types, _ = step.tokenize(model, texts, max_length)
    rec[f"{side}/input_ids"], rec[f"{side}/attention_mask"] = ids, mask
    h, emb_cache = encoder.embeddings_forward(be, params, config, ids, types, 0.0, None)
    rec[f"{side}/embeddings"] = h
    mask_bias = layers.mask_bias_from(be, mask, h.dtype)
    blocks = []
    for i in range(config.num_hidden_layers):
        h, cache = encoder.block_forward(be, params, f"encoder.layer.{i}.", config, h, mask_bias, i, 0.0, 0.0, None)
        rec[f"{side}/encoder.layer.{i}.output"] = h
        blocks.append(cache)
    pooled, pool_cache = encoder.pool_forward(be, params, model.pooling, h, mask)
    emb, norm_cache = layers.l2_normalize_forward(be, pooled)
    rec[f"{side}/pooled"], rec[f"{side}/normalized"] = pooled, emb
    return emb, encoder.Cache(emb_cache, blocks, pool_cache, norm_cache)


def side_backward(model, side, d_emb, cache, rows, grads, rec):
    """Back through one side, keeping the gradient at each block's output; parameter gradients
    are added into `grads`, the word table's as the rows `rows` (sorted ids)."""
    be, params, config = model.backend, model.params, model.config
    d_pooled = layers.l2_normalize_backward(be, d_emb, cache.normalize)
    rec[f"grad/{side}/normalized"], rec[f"grad/{side}/pooled"] = d_emb, d_pooled
    d_h = encoder.pool_backward(be, model.pooling, d_pooled, cache.pool, grads)
    for i in reversed(range(config.num_hidden_layers)):
        rec[f"grad/{side}/encoder.layer.{i}.output"] = d_h
        d_h = encoder.block_backward(be, f"encoder.layer.{i}.", d_h, cache.blocks[i], grads)
    rec[f"grad/{side}/embeddings"] = d_h
    d_e = encoder.embeddings_sum_backward(be, d_h, cache.embeddings, grads)
    for name, ids, pad in encoder.embedding_tables(config, cache.embeddings):
        if name == WORD:     # the same scatter-add, on the table's used rows renumbered 0 .. R-1
            local = np.searchsorted(rows, ids)
            pad_local = int(np.searchsorted(rows, pad)) if pad is not None and pad in rows else None
            g = layers.embedding_backward(be, d_e, (local, (len(rows), params[name].shape[1])), pad_local)
        else:
            g = layers.embedding_backward(be, d_e, (ids, params[name].shape), pad)
        encoder.accumulate(grads, name, g)


def score_gradient(be, q, c, query_texts, cand_texts, s):
    """The score matrix q c^T / temperature [B, M], the mask of the candidates that count, and
    the loss's gradient with respect to the scores: (softmax - onehot) / B over the masked row
    (0 where masked); with `symmetric`, half of it plus half of the passage -> query term's,
    which scores positive i against query j with scores[j, i]."""
    B = q.shape[0]
    mask = step.candidate_mask(cand_texts[:B], cand_texts, own_only=B if s.candidates == "paper" else None)
    _, (_, _, probs, _) = step.info_nce_forward(be, q, c, mask, s.temperature)
    d_scores = probs.copy()
    d_scores[np.arange(B), np.arange(B)] -= 1.0
    d_scores /= B
    if s.symmetric:
        mask_pq = step.candidate_mask(query_texts, query_texts)
        _, (_, _, probs_pq, _) = step.info_nce_forward(be, c[:B], q, mask_pq, s.temperature)
        d_pq = probs_pq.copy()
        d_pq[np.arange(B), np.arange(B)] -= 1.0
        d_scores *= 0.5
        d_scores[:, :B] += 0.5 * d_pq.T / B
    return (q @ c.T) * (1.0 / s.temperature), mask, d_scores


def loss_and_gradients(model, triplets, s):
    """Forward and backward of the batch `triplets` ((query, positive, negatives) each), every
    tensor kept: (rec, grads) with grads the trained parameters' (the word table's as rows)."""
    queries, positives, negatives = step.check_batch([t[0] for t in triplets], [t[1] for t in triplets],
                                                     [list(t[2]) for t in triplets])
    query_texts, cand_texts = step.batch_texts(model, queries, positives, negatives)
    rec, caches, embs = {}, [], []
    for side, texts, max_len in zip(SIDES, (query_texts, cand_texts), (s.max_query_length, s.max_passage_length)):
        emb, cache = side_forward(model, side, texts, max_len, rec)
        embs.append(emb)
        caches.append(cache)
    rows = np.unique(np.concatenate([rec["query/input_ids"].ravel(), rec["passage/input_ids"].ravel()]))
    rec[WORD_ROWS] = rows
    be = model.backend
    loss, d_q, d_c = step.contrastive_loss(be, embs[0], embs[1], query_texts, cand_texts, s.temperature,
                                           s.candidates, s.symmetric)
    rec["scores"], mask, rec["grad/scores"] = score_gradient(be, embs[0], embs[1], query_texts, cand_texts, s)
    rec["mask"] = mask.astype(np.int64)
    rec["loss"] = np.asarray(loss, dtype=model.dtype)
    grads = {}
    for side, d_emb, cache in zip(SIDES, (d_q, d_c), caches):
        side_backward(model, side, d_emb, cache, rows, grads, rec)
    trainable = model.trainable_names()
    return rec, {name: grads[name] for name in trainable}


def record_step(model, triplets, settings):
    """Every tensor of a golden bundle of one step (names as bundle.py), as numpy arrays."""
    s = settings
    rec, grads = loss_and_gradients(model, triplets, s)
    for name, g in grads.items():
        rec["grad/" + name] = g
    clipped = {name: g.copy() for name, g in grads.items()}
    rec["grad_norm"] = np.asarray(step.clip_grad_norm(clipped, s.max_grad_norm if s.max_grad_norm else float("inf")),
                                  dtype=np.float64)
    rows = rec[WORD_ROWS]
    params = {name: (model.params[name][rows] if name == WORD else model.params[name]).copy() for name in grads}
    optimizer = step.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
                           backend=model.backend)
    optimizer.step(params, clipped)
    for name, p in params.items():
        rec["updated/" + name] = p
    return {name: np.array(to_numpy(a), order="C") for name, a in rec.items()}     # (0-d stays 0-d)
