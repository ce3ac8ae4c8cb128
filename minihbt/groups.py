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
import numpy as np
from tqdm.auto import tqdm

from . import encoder
from . import kernels
from . import layers
from . import packing
from . import rowgrad
from .backend import to_numpy
from .dropout import DropoutStreams
from .step import (PASSAGE, QUERY, batch_texts, check_batch, contrastive_loss, dropout_seeds)

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


def embed_sides(model, sides, keep=False, max_tokens=None, max_texts=None, progress=None):
    """Texts (prefixes already added) of one or more sides -> (embeddings [N, H] in input
    order, one side after another; backward or None; real tokens).

    keep: keep the activations and return `backward(d_emb, grads, table)`, which adds every
    parameter gradient but the word table's into `grads` and appends the word table's
    (token ids, gradient rows) to the list `table`. Without keep (inference, no dropout) the
    groups skip their padding (packing.py). progress: a description for a bar counting real
    tokens (its ETA holds although the groups shrink), or None."""
    be, ops = model.backend, kernels.ops_for(model.backend)
    ids, type_ids, seeds, groups = [], [], [], []
    for side in sides:
        side_ids, side_types = model.tokenizer.encode(side.texts, max_length=min(side.max_length, model.max_length),
                                                      pairs=side.pairs)
        groups += [len(ids) + rows for rows in length_groups([len(x) for x in side_ids], max_tokens, max_texts)]
        ids, type_ids = ids + side_ids, type_ids + side_types
        seeds += side.seeds if side.seeds is not None else [None] * len(side_ids)
    lengths = [len(x) for x in ids]
    bar = tqdm(total=sum(lengths), desc=progress, unit="tok", unit_scale=True) if progress else None
    emb = be.xp.empty((len(ids), model.config.hidden_size), dtype=model.dtype)
    caches = []

    def forward(rows):
        batch = model.tokenizer.pad([ids[i] for i in rows], [type_ids[i] for i in rows])      # [g, T] each
        dropout = seeds[rows[0]] is not None                       # a group is of one side: all or none
        streams = DropoutStreams([seeds[i] for i in rows], [lengths[i] for i in rows]) if dropout else None
        if keep or dropout:
            e, cache = encoder.forward(be, model.params, model.config, model.pooling, *batch, streams=streams, ops=ops)
        else:
            e, cache = packing.embed(be, model.params, model.config, model.pooling, *batch, ops=ops), None
        return rows, e, (rows, batch[0], cache) if keep else None, int(batch[1].sum())

    def store(result):
        rows, e, cache, n = result
        emb[rows] = e                                                               # [g, H]
        if keep:
            caches.append(cache)
        if bar is not None:
            bar.update(n)
    costs = [len(rows) * lengths[rows[0]] for rows in groups]
    model.pool.map_ordered(forward, groups, store, order=_costliest_first(costs))
    if bar is not None:
        bar.close()

    def backward(d_emb, grads, table):
        if not caches and groups:
            raise RuntimeError("backward was already called: it runs once, on the activations it frees")
        backward_groups(model, caches, d_emb, grads, table, costs)
    return emb, (backward if keep else None), sum(lengths)


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
        rows, input_ids, enc_cache = cache
        own = {}
        d_e = encoder.backward_to_embeddings(be, config, model.pooling, d_emb[rows], enc_cache, own, ops)   # [g, T, H]
        for name, ids, pad in encoder.embedding_tables(config, enc_cache.embeddings)[1:]:   # position, token type
            encoder.accumulate(own, name, layers.embedding_backward(be, d_e, (ids, model.params[name].shape), pad))
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
                   chunk_size=None, group_tokens=GROUP_TOKENS, return_numpy=True, stats=None, table_rows=False):
    """step.loss_and_grads, fast: the texts in length groups of at most `group_tokens` padded
    tokens (None: each side, or chunk, as one padded batch) run side by side on model.pool.

    chunk_size: GradCache. Embed the texts `chunk_size` at a time without keeping activations,
    compute the loss and the embeddings' gradients, then re-run each chunk (same dropout masks)
    and backpropagate its slice: the same gradients, memory bounded by the chunk, for one
    extra forward pass. table_rows: the word table's gradient as a rowgrad.RowGrad (for
    rowgrad.clip_grad_norm and rowgrad.AdamW) instead of a [V, H] array. return_numpy: numpy
    arrays (else the backend's). stats, a dict: receives the real tokens processed ("tokens")."""
    queries, positives, negatives = check_batch(queries, positives, negatives)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if dropout and seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    be = model.backend
    query_texts, cand_texts = batch_texts(model, queries, positives, negatives)
    sides = [(query_texts, max_query_length, QUERY), (cand_texts, max_passage_length, PASSAGE)]

    def run(texts, max_len, role, start, keep):
        side = Side(texts, max_len, seeds=dropout_seeds(seed, role, start, len(texts), dropout))
        return embed_sides(model, [side], keep=keep, max_tokens=group_tokens)

    grads, table, tokens = {}, [], 0
    if chunk_size is None:                                    # both sides' length groups in one pass
        both = [Side(texts, max_len, seeds=dropout_seeds(seed, role, 0, len(texts), dropout))
                for texts, max_len, role in sides]
        emb, backward, tokens = embed_sides(model, both, keep=True, max_tokens=group_tokens)
        with model.pool.blas_serial():                        # the same bits on any number of threads
            loss, d_q, d_c = contrastive_loss(be, emb[:len(query_texts)], emb[len(query_texts):], query_texts,
                                              cand_texts, temperature, candidates, symmetric)
        backward(be.xp.concatenate([d_q, d_c]), grads, table)
    else:
        embs = [be.xp.concatenate([run(texts[s:s + chunk_size], max_len, role, s, False)[0]
                                   for s in range(0, len(texts), chunk_size)]) for texts, max_len, role in sides]
        with model.pool.blas_serial():
            loss, d_q, d_c = contrastive_loss(be, embs[0], embs[1], query_texts, cand_texts, temperature,
                                              candidates, symmetric)
        for (texts, max_len, role), d_emb in zip(sides, (d_q, d_c)):
            for s in range(0, len(texts), chunk_size):
                _, backward, n = run(texts[s:s + chunk_size], max_len, role, s, True)
                backward(d_emb[s:s + chunk_size], grads, table)
                tokens += n
    word = model.params[encoder.WORD_TABLE]
    ids, d_rows = (np.concatenate([to_numpy(i) for i, _ in table]), be.xp.concatenate([d for _, d in table]))
    grads[encoder.WORD_TABLE] = rowgrad.embedding_backward(be, ids, d_rows, word.shape, model.config.pad_token_id)
    if not table_rows:
        grads[encoder.WORD_TABLE] = rowgrad.dense(be, grads[encoder.WORD_TABLE])
    grads = {name: grads[name] if name in grads else be.xp.zeros_like(p) for name, p in model.params.items()}
    if return_numpy:
        grads = {name: to_numpy(g) if not isinstance(g, rowgrad.RowGrad) else g for name, g in grads.items()}
    if stats is not None:
        stats["tokens"] = tokens
    return loss, grads
