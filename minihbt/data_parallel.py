"""Data parallelism: a batch's triplets split over the ranks of a communicator (comm.py, the
transport; `Shard`, `balanced`, `triplet_tokens`), the embeddings gathered back in the one-process
order and the gradients summed over the ranks (`reduce_grads`; `Timer` counts the collectives'
seconds and bytes). fast_step.py uses it; tests/test_data_parallel.py checks N ranks = one process.
"""
import time

import numpy as np

from . import encoder
from . import rowgrad
from .backend import to_numpy


class Shard:
    """Rank r's part of a global batch of B triplets (B divisible by the number of ranks N): B / N
    triplets, chosen so that the ranks' token counts are about equal (`balanced`; the same on
    every rank). Its queries are its triplets' rows of the queries; its candidates their positives,
    then their negatives (in the candidates, every positive comes first, then the negatives in
    triplet order). Indices are global, so dropout seeds and gradient rows are the one-process
    ones. Every rank holds the same global batch; the embeddings are all-gathered and put back in
    the one-process order, and the parameter gradients summed over the ranks.

    Why nothing is scaled by 1/N or N: with E the global embeddings (queries, positives,
    negatives) and L(E) the batch's loss, the mean over its B queries, every rank gathers the
    same E, so computes the same L and the same dL/dE. Rank r's embeddings E_r are rows of E:
    the gather's backward is a slice, dL/dE_r = those rows of dL/dE, summed over nothing. The
    parameters' gradient is the sum over texts t of (dE_t/dtheta)^T dL/dE_t, split by the rank
    that embedded t: the sum over ranks of each rank's encoder backward of its own rows, an
    all-reduce SUM, no average. (Trainers whose ranks each compute a loss over their own B/N
    queries against the gathered candidates, averaged over B/N, must instead sum the gather's
    gradient over the ranks, since a rank's loss reaches every rank's candidates, and divide
    the summed parameter gradients by N: DDP's average.) tests/test_data_parallel.py checks it."""

    def __init__(self, costs, negatives_per_triplet, comm):
        B = len(costs)
        if B % comm.size:
            raise ValueError(f"a batch of {B} triplets does not split evenly over {comm.size} ranks")
        self.comm, self.B = comm, B
        first = B + np.cumsum([0] + list(negatives_per_triplet or [0] * B))
        owned = balanced(costs, comm.size)                       # each rank's triplets, sorted

        def negatives(triplets):                                 # their negatives' candidate rows
            return np.concatenate([np.arange(first[t], first[t + 1]) for t in triplets] + [np.zeros(0, np.int64)])
        mine = owned[comm.rank]
        self.queries, self.positives = mine, len(mine)
        self.candidates = np.concatenate([mine, negatives(mine)])
        self.order = (np.concatenate(owned), np.concatenate([negatives(t) for t in owned]))  # rank order -> global

    def gather(self, xp, local, timer):
        """(this rank's query rows, its candidate rows) -> every rank's, in the global order."""
        q, c = local
        if self.comm.size == 1:
            return q, c
        with timer:
            q_ranks = self.comm.allgather(q)
            p_ranks, n_ranks = self.comm.allgather(c[:self.positives]), self.comm.allgather(c[self.positives:])
        q_all = xp.empty_like(q_ranks)
        q_all[self.order[0]] = q_ranks
        c_all = xp.empty((self.B + len(n_ranks), c.shape[1]), dtype=c.dtype)
        c_all[self.order[0]], c_all[self.order[1]] = p_ranks, n_ranks
        return q_all, c_all


def balanced(costs, ranks):
    """The triplets of each rank, len(costs) / ranks each: the costliest first, each to the rank
    with the least cost so far that has room (ties: the lower rank); sorted. One rank: all, in order."""
    per, load, owned = len(costs) // ranks, [0] * ranks, [[] for _ in range(ranks)]
    for t in sorted(range(len(costs)), key=lambda t: -costs[t]):
        r = min((r for r in range(ranks) if len(owned[r]) < per), key=lambda r: load[r])
        owned[r].append(t)
        load[r] += costs[t]
    return [np.array(sorted(o), dtype=np.int64) for o in owned]


def triplet_tokens(model, query_texts, cand_texts, max_query_length, max_passage_length, negatives):
    """Each triplet's tokens after truncation (its query, positive and negatives): its cost."""
    tokens = [[len(ids) for ids in model.tokenizer.encode(texts, max_length=min(n, model.max_length))[0]]
              for texts, n in ((query_texts, max_query_length), (cand_texts, max_passage_length))]
    first = len(query_texts) + np.cumsum([0] + [len(n) for n in negatives or [[]] * len(query_texts)])
    return [tokens[0][t] + tokens[1][t] + sum(tokens[1][first[t]:first[t + 1]]) for t in range(len(query_texts))]


def reduce_grads(model, grads, table, comm, timer):
    """Every parameter's gradient of the global batch: the word table's as a RowGrad from this
    rank's token rows and, over N ranks, every rank's rows (gathered, summed in rank order); the
    others summed over the ranks in one flat all-reduce (zeros where the loss does not reach)."""
    be, word = model.backend, model.params[encoder.WORD_TABLE]
    ids = np.concatenate([to_numpy(i) for i, _ in table])
    rows = rowgrad.embedding_backward(be, ids, be.xp.concatenate([d for _, d in table]), word.shape,
                                      model.config.pad_token_id)
    names = [name for name in model.params if name != encoder.WORD_TABLE]
    dense = {name: grads[name] if name in grads else be.xp.zeros_like(model.params[name]) for name in names}
    if comm.size > 1:
        with timer:
            gathered = comm.allgather_rows(rows.ids, rows.values)
            flat = comm.allreduce_sum(be.xp.concatenate([dense[name].reshape(-1) for name in names]))
        timer.sent(table=gathered.bytes_sent, dense=flat.nbytes)
        rows = rowgrad.embedding_backward(be, gathered.ids, gathered.values, word.shape, model.config.pad_token_id)
        sizes = np.cumsum([0] + [dense[name].size for name in names])
        dense = {name: flat[sizes[k]:sizes[k + 1]].reshape(dense[name].shape) for k, name in enumerate(names)}
    dense[encoder.WORD_TABLE] = rows
    return {name: dense[name] for name in model.params}


class Timer:
    """Seconds spent in collectives, added into stats["comm_seconds"], and what this rank put on
    the wire: the word table's rows ("table_bytes") and the other gradients ("dense_bytes", the
    flat array this rank contributes to the all-reduce)."""

    def __init__(self, stats):
        self.stats = stats if stats is not None else {}
        for key in ("comm_seconds", "table_bytes", "dense_bytes"):
            self.stats.setdefault(key, 0)

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.stats["comm_seconds"] += time.perf_counter() - self.start

    def sent(self, table, dense):
        self.stats["table_bytes"] += int(table)
        self.stats["dense_bytes"] += int(dense)
