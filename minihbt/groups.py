"""Length groups and their schedule: the fast embedding path of training and inference.

A batch's texts are sorted by length and cut into groups padded only to their own longest
text, so little compute goes to padding. On a multi-threaded CPU the groups (of a step's
queries and passages together) run side by side on a parallel.Pool, each group one call of
the plain encoder.forward / encoder.backward on one thread, the costliest first. Gradients
are added in a fixed order (the groups' item order), so the result has the same bits on any
number of threads. The word table's gradient is kept as rows (rowgrad.py); inference skips
the padding altogether (packing.py). `loss_and_grads` here is step.loss_and_grads made fast,
with GradCache; tests/test_fast_path.py checks it against step.py.
"""
import time

import numpy as np
from .bars import progress_bar

from . import encoder
from . import kernels
from . import packing
from . import rowgrad
from .backend import to_numpy
from .comm import SingleProcess
from .dropout import DropoutStreams
from .step import PASSAGE, QUERY, batch_texts, check_batch, contrastive_loss

GROUP_TOKENS = 512        # padded tokens per length group in training (benchmarks/train_step.py measured 256-4096)


class Side:
    """One list of texts for embed_sides, with its own truncation, second segments and dropout seeds."""

    def __init__(self, texts, max_length, pairs=None, seeds=None):
        self.texts, self.max_length, self.pairs, self.seeds = texts, max_length, pairs, seeds


def length_groups(lengths, max_tokens=None, max_texts=None):
    """Indices of texts sorted longest first (stable), cut into groups of at most `max_texts`
    texts and at most `max_tokens` padded tokens (a group is padded to its first, longest text)."""
    order = np.argsort([-n for n in lengths], kind="stable")
    groups, start = [], 0
    while start < len(order):
        longest = lengths[order[start]]
        size = len(order) - start
        if max_texts:
            size = min(size, max_texts)
        if max_tokens:
            size = max(1, min(size, max_tokens // max(1, longest)))
        groups.append(order[start:start + size])
        start += size
    return groups


def embed_sides(model, sides, keep_activations=False, max_tokens=None, max_texts=None, progress=None):
    """Texts (prefixes already added) of one or more sides -> (embeddings [N, H] in input
    order, one side after another; backward or None; real tokens).

    keep_activations: return `backward(d_emb, grads, table)` too, which adds every parameter
    gradient but the word table's into `grads` and appends the word table's (token ids,
    gradient rows) to the list `table`. Without it (inference, no dropout) the
    groups skip their padding (packing.py). progress: a description for a bar counting real
    tokens (its ETA holds although the groups shrink), or None."""
    be, ops = model.backend, kernels.ops_for(model.backend)
    ids, type_ids, seeds, groups = [], [], [], []
    for side in sides:
        side_ids, side_types = model.tokenizer.encode(side.texts, max_length=min(side.max_length, model.max_length),
                                                      pairs=side.pairs)
        groups += [len(ids) + group for group in length_groups([len(x) for x in side_ids], max_tokens, max_texts)]
        ids, type_ids = ids + side_ids, type_ids + side_types
        seeds += side.seeds if side.seeds is not None else [None] * len(side_ids)
    lengths = [len(x) for x in ids]
    bar = progress_bar(total=sum(lengths), desc=progress, unit="tok", unit_scale=True) if progress else None
    emb = be.xp.empty((len(ids), model.config.hidden_size), dtype=model.dtype)
    caches = []

    def forward(group):                                            # the group's text indices
        batch = model.tokenizer.pad([ids[i] for i in group], [type_ids[i] for i in group])    # [g, T] each
        dropout = seeds[group[0]] is not None                      # a group is of one side: all or none
        streams = DropoutStreams([seeds[i] for i in group], [lengths[i] for i in group]) if dropout else None
        if keep_activations or dropout:
            e, cache = encoder.forward(be, model.params, model.config, model.pooling, *batch, streams=streams, ops=ops)
        else:
            e, cache = packing.embed(be, model.params, model.config, model.pooling, *batch, ops=ops), None
        return group, e, (group, batch[0], cache) if keep_activations else None, int(batch[1].sum())

    def store(result):
        group, e, cache, n = result
        emb[group] = e                                                              # [g, H]
        if keep_activations:
            caches.append(cache)
        if bar is not None:
            bar.update(n)
    costs = [len(group) * lengths[group[0]] for group in groups]
    model.pool.map_ordered(forward, groups, store, order=_costliest_first(costs))
    if bar is not None:
        bar.close()

    def backward(d_emb, grads, table):
        if not caches and groups:
            raise RuntimeError("backward was already called: it runs once, on the activations it frees")
        backward_groups(model, caches, d_emb, grads, table, costs)
    return emb, (backward if keep_activations else None), sum(lengths)


def _costliest_first(padded_tokens):
    """Indices of length groups by padded tokens (a group's cost), largest first (stable)."""
    return sorted(range(len(padded_tokens)), key=lambda k: -padded_tokens[k])


def costliest_last_window(costs, window):
    """Item order, but the last `window` items costliest first (stable): map_ordered's order
    for items that must be handed over in item order with at most `window` in flight."""
    tail = max(0, len(costs) - window)
    return list(range(tail)) + sorted(range(tail, len(costs)), key=lambda k: -costs[k])


def backward_groups(model, caches, d_emb, grads, table, costs):
    """Each group's backward from its own cache, side by side on the CPU's threads (`caches` is
    emptied), newest group first; their gradients are added into `grads` in that order, and
    their word-table rows appended to `table`. At most threads + 1 groups are started and not
    yet added, and the last threads + 1 start costliest first, so that the step does not end
    on one thread finishing a large group."""
    be, config, ops = model.backend, model.config, kernels.ops_for(model.backend)
    window = model.pool.threads + 1
    order = costliest_last_window(list(costs)[::-1], window)

    def group_backward(cache):
        group, input_ids, enc_cache = cache
        own = {}
        d_e = encoder.backward_to_embeddings(be, config, model.pooling, d_emb[group], enc_cache, own, ops)  # [g, T, H]
        for name, ids, pad in encoder.embedding_tables(config, enc_cache.embeddings)[1:]:   # position, token type
            rows = rowgrad.embedding_backward(be, to_numpy(ids), d_e, model.params[name].shape, pad)
            encoder.accumulate(own, name, rowgrad.dense(be, rows))                 # layers' sums, in a fixed order
        return own, input_ids, d_e

    def add(result):
        own, input_ids, d_e = result
        for name, g in own.items():
            encoder.accumulate(grads, name, g)
        table.append((input_ids.reshape(-1), d_e.reshape(-1, d_e.shape[-1])))
    model.pool.map_ordered(group_backward, caches[::-1], add, order=order, window=window)
    caches.clear()


def loss_and_grads(model, queries, positives, negatives=None, temperature=0.05, candidates="inbatch",
                   dropout=False, symmetric=False, seed=None, max_query_length=512, max_passage_length=512,
                   chunk_size=None, group_tokens=GROUP_TOKENS, return_numpy=True, stats=None, table_rows=False,
                   comm=None):
    """step.loss_and_grads, fast: the texts in length groups of at most `group_tokens` padded
    tokens (None: each side, or chunk, as one padded batch) run side by side on model.pool.

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
        emb, backward, tokens = embed_sides(model, [t.side() for t in mine], keep_activations=True, max_tokens=group_tokens)
        local = (emb[:len(shard.queries)], emb[len(shard.queries):])
    else:
        local = [be.xp.concatenate([embed_sides(model, [t.side(s, s + chunk_size)], max_tokens=group_tokens)[0]
                                    for s in range(0, len(t.indices), chunk_size)]) for t in mine]
    timer = Timer(stats)
    q_all, c_all = shard.gather(be.xp, local, timer)          # [B, H], [M, H] in the one-process order
    with model.pool.blas_serial():                            # the same bits on any number of threads
        loss, d_q, d_c = contrastive_loss(be, q_all, c_all, query_texts, cand_texts, temperature, candidates,
                                          symmetric)
    d_mine = (d_q[shard.queries], d_c[shard.candidates])      # the gather's backward: this rank's rows
    if chunk_size is None:
        backward(be.xp.concatenate(d_mine), grads, table)
    else:
        tokens = sum(t.chunks_backward(model, d_emb, chunk_size, group_tokens, grads, table)
                     for t, d_emb in zip(mine, d_mine))
    grads = _reduce(model, grads, table, comm, timer)
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
            _, backward, n = embed_sides(model, [self.side(s, s + chunk_size)], keep_activations=True, max_tokens=group_tokens)
            backward(d_emb[s:s + chunk_size], grads, table)
            tokens += n
        return tokens


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


def _reduce(model, grads, table, comm, timer):
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
