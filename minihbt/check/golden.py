"""One training step of the plain path with every intermediate tensor kept, by its bundle name.

`record_step` does what step.loss_and_grads, step.clip_grad_norm and step.AdamW do together
(dropout off): it runs encoder.forward, step.contrastive_loss and encoder.backward_to_embeddings,
which hand it their tensors (their `record`), and returns the tensors of a golden bundle by
their names (bundle.py). The word table's gradient and update are computed on the rows the batch
uses only: the table of multilingual-e5-small has 250,037 rows, the batch a few hundred.
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


def side_backward(model, side, d_emb, cache, rows, grads, rec):
    """Back through one side (encoder.backward_to_embeddings, recording); parameter gradients are
    added into `grads`, the word table's as the rows `rows` (sorted ids)."""
    be, params, config = model.backend, model.params, model.config
    d_e = encoder.backward_to_embeddings(be, config, model.pooling, d_emb, cache, grads,
                                         record=keep(rec, f"grad/{side}/"))
    for name, ids, pad in encoder.embedding_tables(config, cache.embeddings):
        if name == WORD:     # the same scatter-add, on the table's used rows renumbered 0 .. R-1
            local = np.searchsorted(rows, ids)
            pad_local = int(np.searchsorted(rows, pad)) if pad is not None and pad in rows else None
            g = layers.embedding_backward(be, d_e, (local, (len(rows), params[name].shape[1])), pad_local)
        else:
            g = layers.embedding_backward(be, d_e, (ids, params[name].shape), pad)
        encoder.accumulate(grads, name, g)


def keep(rec, prefix):
    """A `record` for encoder.forward/backward and step.contrastive_loss: rec[prefix + name] = array."""
    return lambda name, array: rec.__setitem__(prefix + name, array)


def loss_and_gradients(model, triplets, s):
    """Forward and backward of the batch `triplets` ((query, positive, negatives) each), every
    tensor kept: (rec, grads) with grads the trained parameters' (the word table's as rows)."""
    queries, positives, negatives = step.check_batch([t[0] for t in triplets], [t[1] for t in triplets],
                                                     [list(t[2]) for t in triplets])
    query_texts, cand_texts = step.batch_texts(model, queries, positives, negatives)
    be, rec, caches, embs = model.backend, {}, [], []
    for side, texts, max_len in zip(SIDES, (query_texts, cand_texts), (s.max_query_length, s.max_passage_length)):
        ids, mask, types, _ = step.tokenize(model, texts, max_len)
        rec[f"{side}/input_ids"], rec[f"{side}/attention_mask"] = ids, mask
        emb, cache = encoder.forward(be, model.params, model.config, model.pooling, ids, mask, types,
                                     record=keep(rec, f"{side}/"))
        embs.append(emb)
        caches.append(cache)
    rows = np.unique(np.concatenate([rec["query/input_ids"].ravel(), rec["passage/input_ids"].ravel()]))
    rec[WORD_ROWS] = rows
    _, d_q, d_c = step.contrastive_loss(be, embs[0], embs[1], query_texts, cand_texts, s.temperature, s.candidates,
                                        s.symmetric, record=keep(rec, ""))
    rec["mask"] = rec["mask"].astype(np.int64)
    rec["loss"] = np.asarray(rec["loss"], dtype=model.dtype)
    grads = {}
    for side, d_emb, cache in zip(SIDES, (d_q, d_c), caches):
        side_backward(model, side, d_emb, cache, rows, grads, rec)
    return rec, {name: grads[name] for name in model.trainable_names()}


def record_step(model, triplets, s):
    """Every tensor of a golden bundle of one step (names as bundle.py; `s`: StepSettings), as numpy arrays."""
    rec, grads = loss_and_gradients(model, triplets, s)
    rec.update({"grad/" + name: g for name, g in grads.items()})
    clipped = {name: g.copy() for name, g in grads.items()}
    rec["grad_norm"] = np.asarray(step.clip_grad_norm(clipped, s.max_grad_norm or float("inf")), dtype=np.float64)
    rows = rec[WORD_ROWS]
    params = {name: (model.params[name][rows] if name == WORD else model.params[name]).copy() for name in grads}
    optimizer = step.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
                           backend=model.backend)
    optimizer.step(params, clipped)
    rec.update({"updated/" + name: p for name, p in params.items()})
    return {name: np.array(to_numpy(a), order="C") for name, a in rec.items()}     # (0-d stays 0-d)
