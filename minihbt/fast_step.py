"""The fast training step: step.loss_and_grads's loss and gradients from length groups on the
CPU's threads (length_groups.py), the word table's gradient as rows (rowgrad.py), GradCache
(`chunk_size`) and a shard of the batch per rank (data_parallel.py). tests/test_fast_path.py
checks it against step.py, tests/test_data_parallel.py N ranks against one process."""
import numpy as np

from . import encoder
from . import rowgrad
from .backend import to_numpy
from .comm import SingleProcess
from .data_parallel import Shard, Timer, reduce_grads, triplet_tokens
from .length_groups import GROUP_TOKENS, Side, embed_sides
from .parallel import pool_for
from .step import PASSAGE, QUERY, batch_texts, check_batch, contrastive_loss


def loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False, symmetric=False, seed=None, max_query_length=512, max_passage_length=512,
                   chunk_size=None, group_tokens=GROUP_TOKENS, return_numpy=True, stats=None, table_rows=False,
                   comm=None):
    """step.loss_and_grads, fast: the texts in length groups of at most `group_tokens` padded
    tokens (None: each side, or chunk, as one padded batch) run side by side on the backend's thread pool.

    chunk_size: GradCache. Embed the texts `chunk_size` at a time without keeping activations,
    compute the loss and the embeddings' gradients, then re-run each chunk (same dropout masks)
    and backpropagate its slice: the same gradients, memory bounded by the chunk, for one
    extra forward pass. table_rows: the word table's gradient as a rowgrad.RowGrad (for
    rowgrad.clip_grad_norm and rowgrad.AdamW) instead of a [V, H] array. return_numpy: numpy
    arrays (else the backend's). stats, a dict: receives the real tokens this process embedded
    ("tokens"), and with a communicator the seconds and bytes of its collectives (Timer).
    comm (comm.py; None: one process): data-parallel over its ranks, see Shard; every rank
    returns the loss and gradients of the whole batch."""
    queries, positives, negatives = check_batch(queries, positives, negatives)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    comm = comm or SingleProcess()
    if dropout and seed is None:
        seed = comm.bcast_object(int(np.random.SeedSequence().entropy % (2 ** 63)))
    be = model.backend
    query_texts, cand_texts = batch_texts(model, queries, positives, negatives)
    costs = (triplet_tokens(model, query_texts, cand_texts, max_query_length, max_passage_length, negatives)
             if comm.size > 1 else [1] * len(queries))
    shard = Shard(costs, [len(n) for n in negatives] if negatives else None, comm)
    seed = seed if dropout else None
    mine = (Texts(query_texts, max_query_length, QUERY, shard.queries, seed),
            Texts(cand_texts, max_passage_length, PASSAGE, shard.candidates, seed))
    grads, table = {}, []
    if chunk_size is None:                                    # both sides' length groups in one pass
        emb, backward, tokens = embed_sides(model, [t.side() for t in mine], keep_activations=True,
                                            max_tokens=group_tokens)
        local = (emb[:len(shard.queries)], emb[len(shard.queries):])
    else:
        local = [be.xp.concatenate([embed_sides(model, [t.side(s, s + chunk_size)], max_tokens=group_tokens)[0]
                                    for s in range(0, len(t.indices), chunk_size)]) for t in mine]
    timer = Timer(stats)
    q_all, c_all = shard.gather(be.xp, local, timer)          # [B, H], [M, H] in the one-process order
    with pool_for(be).blas_serial():                          # the same bits on any number of threads
        loss, d_q, d_c = contrastive_loss(be, q_all, c_all, query_texts, cand_texts, temperature, candidates,
                                          symmetric)
    d_mine = (d_q[shard.queries], d_c[shard.candidates])      # the gather's backward: this rank's rows
    if chunk_size is None:
        backward(be.xp.concatenate(d_mine), grads, table)
    else:
        tokens = sum(t.chunks_backward(model, d_emb, chunk_size, group_tokens, grads, table)
                     for t, d_emb in zip(mine, d_mine))
    grads = reduce_grads(model, grads, table, comm, timer)
    if not table_rows:
        grads[encoder.WORD_TABLE] = rowgrad.dense(be, grads[encoder.WORD_TABLE])
    if return_numpy:
        grads = {name: to_numpy(g) if not isinstance(g, rowgrad.RowGrad) else g for name, g in grads.items()}
    if stats is not None:
        stats["tokens"] = tokens
    return loss, grads


class Texts:
    """This process's texts of one side: `texts[i]` for i in `indices` (global), each with the
    dropout seed [seed, role, its global index] (none where seed is None)."""

    def __init__(self, texts, max_length, role, indices, seed):
        self.texts, self.max_length, self.role, self.indices, self.seed = texts, max_length, role, indices, seed

    def side(self, start=0, stop=None):
        indices = self.indices[start:stop]
        seeds = [[self.seed, self.role, int(i)] for i in indices] if self.seed is not None else None
        return Side([self.texts[i] for i in indices], self.max_length, seeds=seeds)

    def chunks_backward(self, model, d_emb, chunk_size, group_tokens, grads, table):
        """GradCache's second pass: each chunk re-embedded with its activations and backpropagated
        from its rows of d_emb; returns the real tokens embedded."""
        tokens = 0
        for s in range(0, len(self.indices), chunk_size):
            _, backward, n = embed_sides(model, [self.side(s, s + chunk_size)], keep_activations=True,
                                         max_tokens=group_tokens)
            backward(d_emb[s:s + chunk_size], grads, table)
            tokens += n
        return tokens
