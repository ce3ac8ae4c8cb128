"""Length groups: the texts of a batch, sorted by length and cut into groups padded only to
their own longest text, so little compute goes to padding; the embedding of training and
inference (`embed_sides`) and its backward (`backward_groups`).

On a multi-threaded CPU the groups (of a step's queries and passages together) run side by
side on the backend's parallel.Pool, each group one call of the plain encoder.forward /
encoder.backward on one thread, the costliest first. Gradients are added in a fixed order (the
groups' item order), so the result has the same bits on any number of threads. The word
table's gradient is kept as rows (rowgrad.py); inference skips the padding altogether
(packing.py).
"""
import numpy as np

from . import encoder
from . import kernels
from . import packing
from . import rowgrad
from .backend import to_numpy
from .bars import progress_bar
from .dropout import DropoutStreams
from .parallel import pool_for

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
    be, ops, pool = model.backend, kernels.ops_for(model.backend), pool_for(model.backend)
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
    costs = [len(group) * lengths[group[0]] for group in groups]                 # padded tokens
    pool.map_ordered(forward, groups, store, order=costliest_last_window(costs, len(costs)))   # all costliest first
    if bar is not None:
        bar.close()

    def backward(d_emb, grads, table):
        if not caches and groups:
            raise RuntimeError("backward was already called: it runs once, on the activations it frees")
        backward_groups(model, caches, d_emb, grads, table, costs)
    return emb, (backward if keep_activations else None), sum(lengths)


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
    be, config, ops, pool = model.backend, model.config, kernels.ops_for(model.backend), pool_for(model.backend)
    window = pool.threads + 1
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
    pool.map_ordered(group_backward, caches[::-1], add, order=order, window=window)
    caches.clear()
