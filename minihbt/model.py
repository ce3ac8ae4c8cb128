"""A loaded encoder (config, parameters, tokenizer, backend) and the one way texts become embeddings.

`embed_sides` (and `embed_texts`, its one-side form) is the only embedding path: `encode`
(inference), `loss_and_grads` (training, GradCache), evaluation and the demo all go through
it. It tokenizes, sorts the texts by length and runs them in groups padded only to their own
longest text, so no compute goes to padding beyond a group's; with `keep=True` it returns a
backward closure that runs each group's backward from its own cache. On a multi-threaded CPU
the groups (of a step's queries and passages together) run side by side, each on one thread
(`Backend.map_ordered`), with the same bits as one thread. Padding never reaches a real token
(attention masks it, pooling skips it, dropout keeps it), so the result is that of one padded batch.
"""
import json
import os

import numpy as np
from tqdm.auto import tqdm

from . import encoder
from . import layers
from .backend import Backend, to_numpy
from .config import ConfigError, ModelConfig
from .dropout import DropoutStreams
from .tokenizer import Tokenizer
from .weights import default_pooling, load_weights, save_model

POOLINGS = ("mean", "cls", "pooler")
DEFAULT_PREFIXES = {"query": "query: ", "passage": "passage: "}
GROUP_TOKENS = 512        # padded tokens per length group in training (benchmarks/train_step.py measured 256-4096)


class Model:
    """A loaded encoder. `params` maps HF tensor names to arrays of the backend's module."""

    def __init__(self, config, params, tokenizer, backend, pooling="mean", raw_config=None, path=None):
        self.config, self.params, self.tokenizer, self.backend = config, params, tokenizer, backend
        self.pooling = pooling
        self.prefixes = dict(DEFAULT_PREFIXES)
        self.raw_config = raw_config or config.to_dict()
        self.path = path

    xp = property(lambda self: self.backend.xp)
    dtype = property(lambda self: self.backend.dtype)
    device = property(lambda self: self.backend.device)

    def __repr__(self):
        c = self.config
        n = sum(int(np.prod(p.shape)) for p in self.params.values())
        return (f"Model({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, params={n:,}, pooling={self.pooling!r}, {self.backend})")

    @property
    def max_length(self):
        """Longest sequence the position table allows (RoBERTa positions start at pad_id + 1)."""
        c = self.config
        offset = c.pad_token_id + 1 if c.family == "roberta" else 0
        return c.max_position_embeddings - offset

    def trainable_names(self):
        """Parameters a training step updates: all but the pooler, unless pooling uses it
        (an unused pooler gets no gradient, and PyTorch's optimisers skip such tensors)."""
        return [k for k in self.params if self.pooling == "pooler" or not k.startswith("pooler.")]

    def position_ids(self, input_ids):
        """RoBERTa: cumsum(ids != pad) * (ids != pad) + pad, so real tokens start at pad + 1
        and padding sits on the pad row; BERT: 0 .. T-1."""
        xp = self.xp
        B, T = input_ids.shape
        if self.config.family == "roberta":
            pad = self.config.pad_token_id
            real = (input_ids != pad).astype(np.int64)              # [B, T]
            return xp.cumsum(real, axis=1) * real + pad            # [B, T]
        return xp.broadcast_to(xp.arange(T, dtype=np.int64), (B, T))

    def forward(self, input_ids, attention_mask, token_type_ids=None, caches=None, streams=None, skip_padding=False):
        """Last hidden states [B, T, H] for padded token ids [B, T]. With `caches` (a list) each
        layer appends what its backward needs; with `streams` (DropoutStreams) dropout is on.
        skip_padding (inference on the CPU: no caches, no dropout): the per-token work runs on the
        real tokens only, with the same bits for them (see encoder.real_tokens for when); padded
        positions' states are then 0."""
        be, c = self.backend, self.config
        input_ids = be.asarray(input_ids)
        token_type_ids = be.xp.zeros_like(input_ids) if token_type_ids is None else be.asarray(token_type_ids)
        p_hidden = c.hidden_dropout_prob if streams is not None else 0.0
        p_attn = c.attention_probs_dropout_prob if streams is not None else 0.0
        h, cache = encoder.embeddings_forward(be, self.params, c, input_ids, self.position_ids(input_ids), token_type_ids,
                                        p_hidden, streams)                                      # [B, T, H]
        if caches is not None:
            caches.append(cache)
        mask_bias = layers.mask_bias_from(be, attention_mask, self.dtype)                           # [B, 1, 1, T]
        skip = skip_padding and caches is None and streams is None
        real = encoder.real_tokens(be, attention_mask, c, self.dtype) if skip else None
        h = h if real is None else encoder.pack(h, real)                                           # [n, H]
        for i in range(c.num_hidden_layers):
            h, cache = encoder.block_forward(be, self.params, f"encoder.layer.{i}.", c, h, mask_bias, i, p_hidden, p_attn,
                                       streams, keep=caches is not None, real=real)
            if caches is not None:
                caches.append(cache)
        return h if real is None else encoder.unpack(be, h, real)

    def backward(self, d_hidden, caches, grads, tables=None):
        """Back through forward(): pops its caches newest first (each activation is freed once
        used) and adds parameter gradients into `grads` (name -> array). `tables`, a list:
        the embedding tables' scatter-adds are appended there instead (see embeddings_backward)."""
        d_h = d_hidden
        for i in reversed(range(self.config.num_hidden_layers)):
            d_h = encoder.block_backward(self.backend, f"encoder.layer.{i}.", d_h, caches.pop(), grads)
        encoder.embeddings_backward(self.backend, self.params, d_h, caches.pop(), grads, tables)
        return grads

    def pool(self, hidden, attention_mask):
        """[B, T, H] -> [B, H] by the model's pooling (not yet normalised)."""
        return encoder.pool_forward(self.backend, self.params, self.pooling, hidden, self.backend.asarray(attention_mask))[0]

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        """Token ids -> L2-normalised embeddings [B, H] (backend array). No caches, no dropout."""
        hidden = self.forward(input_ids, attention_mask, token_type_ids)
        return layers.l2_normalize_forward(self.backend, self.pool(hidden, attention_mask))[0]

    def save(self, out_dir):
        """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files and
        sentence-transformers modules) that opens in `transformers`; files written atomically."""
        save_model(self, out_dir)


def load_model(path, device="cpu", dtype="float32", pooling=None, tf32=False, fused_kernels=False):
    """Load a Hugging Face encoder directory (config.json, safetensors weights, tokenizer.json).

    device: "cpu" (NumPy) or "cuda" (CuPy; an error if no GPU is usable).
    dtype: compute dtype, "float32" (default) or "float64".
    pooling: "mean", "cls" or "pooler"; None reads the checkpoint's sentence-transformers
        pooling config and otherwise uses "mean" (right for multilingual-E5 and XLM-R).
    tf32, fused_kernels: GPU switches (see backend.Backend); ignored on the CPU.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")
    backend = Backend(device, dtype, tf32=tf32, fused=fused_kernels)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory not found")
    cfg_path = os.path.join(path, "config.json")
    config = ModelConfig.from_file(cfg_path)
    with open(cfg_path, encoding="utf-8") as f:
        raw_config = json.load(f)
    params = load_weights(path, config, dtype=backend.dtype)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer.json"), fallback_pad_id=config.pad_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
                          f"vocab_size is {config.vocab_size}: ids would index past the embedding table")
    pooling = pooling or default_pooling(path, params)
    if pooling == "pooler" and "pooler.dense.weight" not in params:
        raise ValueError(f"{path}: pooling='pooler' needs pooler.dense.* weights, which this checkpoint lacks")
    params = {k: backend.asarray(v) for k, v in params.items()}
    return Model(config, params, tokenizer, backend, pooling=pooling, raw_config=raw_config, path=path)


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


def embed_texts(model, texts, max_length, pairs=None, seeds=None, keep=False, max_tokens=None, max_texts=None,
                progress=None):
    """The embedding path: texts (prefixes already added) -> (embeddings [N, H] backend array in input
    order, backward or None, number of real tokens).

    seeds: per-text dropout seeds (dropout on) or None (off). keep: keep activations and return
    `backward(d_emb, grads)`, which adds every parameter gradient into `grads`. Groups: see
    length_groups. progress: a description for a progress bar counting real tokens (its ETA
    holds although groups shrink), or None.
    """
    return embed_sides(model, [Side(texts, max_length, pairs, seeds)], keep, max_tokens, max_texts, progress)


class Side:
    """One list of texts for embed_sides, with its own truncation, second segments and dropout seeds."""

    def __init__(self, texts, max_length, pairs=None, seeds=None):
        self.texts, self.max_length, self.pairs, self.seeds = texts, max_length, pairs, seeds


def embed_sides(model, sides, keep=False, max_tokens=None, max_texts=None, progress=None):
    """embed_texts for several lists of texts at once (a step's queries and its passages).

    Each side is tokenized and cut into length groups of its own; all the groups then run in one
    pass over the thread pool, the costliest first, so that one side's small groups fill the time
    the other's large ones leave a thread idle. Rows of the embeddings (and of backward's d_emb)
    are the sides' texts, one side after another. A group's result does not depend on what runs
    beside it, and backward adds the groups' gradients in the order of embedding the sides one at
    a time and backpropagating the last side first: the same bits as separate embed_texts calls.
    """
    be = model.backend
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
        input_ids, mask, token_types = model.tokenizer.pad([ids[i] for i in rows], [type_ids[i] for i in rows])
        dropout = seeds[rows[0]] is not None                       # a group is of one side: all or none
        streams = DropoutStreams([seeds[i] for i in rows], [lengths[i] for i in rows]) if dropout else None
        layer_caches = [] if keep else None
        hidden = model.forward(input_ids, mask, token_types, caches=layer_caches, streams=streams,
                               skip_padding=True)                                              # [g, T, H]
        pooled, pool_cache = encoder.pool_forward(be, model.params, model.pooling, hidden, be.asarray(mask))
        e, norm_cache = layers.l2_normalize_forward(be, pooled)                                     # [g, H]
        cache = (rows, layer_caches, pool_cache, norm_cache) if keep else None
        return rows, e, cache, int(mask.sum())

    def store(result):
        rows, e, cache, n = result
        emb[rows] = e
        if keep:
            caches.append(cache)
        if bar is not None:
            bar.update(n)
    costs = [len(rows) * lengths[rows[0]] for rows in groups]
    be.map_ordered(forward, groups, store, order=_costliest_first(costs))
    if bar is not None:
        bar.close()

    def backward(d_emb, grads, rows=None):
        """Add every parameter's gradient into `grads` (once: it consumes the activations); with
        a dict `rows`, also add to rows[WORD_TABLE] the rows of the word table that these texts
        can have made nonzero (their token ids and the padding id): the rest of it is exactly 0."""
        if not caches and groups:
            raise RuntimeError("backward was already called: it runs once, on the activations it frees")
        backward_groups(model, caches, d_emb, grads, costs)
        if rows is not None:
            used = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids] + [[model.tokenizer.pad_token_id]])
            rows[encoder.WORD_TABLE] = np.union1d(rows.get(encoder.WORD_TABLE, np.empty(0, np.int64)), used)
    return emb, (backward if keep else None), sum(lengths)


def _costliest_first(padded_tokens):
    """Indices of length groups by padded tokens (a group's cost), largest first (stable)."""
    return sorted(range(len(padded_tokens)), key=lambda k: -padded_tokens[k])


def _costliest_last_window(costs, window):
    """Item order, but the last `window` items costliest first (stable): map_ordered's order
    for items that must be handed over in item order with at most `window` in flight."""
    tail = max(0, len(costs) - window)
    return list(range(tail)) + sorted(range(tail, len(costs)), key=lambda k: -costs[k])


def backward_groups(model, caches, d_emb, grads, costs=None):
    """Each group's backward from its own cache (side by side on the CPU's threads; `caches` is
    emptied); their gradients are added into `grads` newest group first, as a one-thread loop
    would add them. The groups start in that order too, at most threads + 1 of them ahead of
    the sums, except that the last threads + 1 start costliest first (`costs`, one per cache:
    its padded tokens), so that the step does not end on one thread finishing a large group.
    (Started costliest first throughout, the small newest groups would finish last and every
    other group's gradients would wait in memory for them.)"""
    be = model.backend
    side_by_side = be.parallel(len(caches))
    window = be.threads + 1
    order = _costliest_last_window(list(costs if costs is not None else [0] * len(caches))[::-1], window)

    def group_backward(cache):
        rows, layer_caches, pool_cache, norm_cache = cache
        # side by side: this group's own gradients, and its embedding-table scatters deferred;
        # one after another: straight into `grads` (the same sums in the same order)
        own, tables = ({}, []) if side_by_side else (grads, None)
        d_pooled = layers.l2_normalize_backward(be, d_emb[rows], norm_cache)
        model.backward(encoder.pool_backward(be, model.pooling, d_pooled, pool_cache, own), layer_caches, own, tables)
        return own, tables

    def add(result):
        own, tables = result
        if own is grads:
            return
        for name, g in own.items():
            encoder.accumulate(grads, name, g)
        for name, table_ids, d_rows in tables:
            encoder.scatter_rows(be, grads, name, model.params[name].shape, table_ids, d_rows)
    be.map_ordered(group_backward, caches[::-1], add, order=order, window=window)
    caches.clear()


def resolve_prefix(model, kind, prefix):
    """prefix True -> the model's default for `kind` ('query: ' / 'passage: '); a string ->
    itself; False/None -> no prefix."""
    if kind not in DEFAULT_PREFIXES:
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    if prefix is True:
        return model.prefixes[kind]
    if not prefix:
        return ""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be True, False/None or a string, got {type(prefix).__name__}")
    return prefix


def check_texts(texts, what="texts"):
    """A list of str, or a ValueError naming the first bad item."""
    if isinstance(texts, str):
        raise TypeError(f"{what}: expected a list of texts, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str")
    return texts


def encode(model, texts, kind="query", batch_size=64, max_length=None, prefix=True, progress=False, pairs=None):
    """Embed `texts` -> numpy float32 array [len(texts), H], L2-normalised, in input order.

    kind: "query" or "passage" chooses the E5/HBT prefix ("query: " / "passage: ").
    prefix: True (the default prefix of `kind`), a string to use instead, or False/None.
    max_length: truncation in tokens, special tokens included; None (default) or at most what
        the model's position table allows (512 for XLM-R and BERT checkpoints).
    pairs: optional second segments (e.g. the paragraph of each sentence, as LAReQA).
    Texts are sorted by token length and run `batch_size` at a time, padded per batch.
    progress: a bar counting tokens (so its ETA holds although batches shrink).
    """
    texts = check_texts(texts)
    if pairs is not None:
        pairs = check_texts(pairs, "pairs")
        if len(pairs) != len(texts):
            raise ValueError(f"pairs has {len(pairs)} items for {len(texts)} texts")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    max_length = model.max_length if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= model.max_length:
        raise ValueError(f"max_length must be an integer in [2, {model.max_length}] for this model, got {max_length!r}")
    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    pre = resolve_prefix(model, kind, prefix)
    texts = [pre + t for t in texts]
    emb, _, _ = embed_texts(model, texts, max_length, pairs=pairs, max_texts=batch_size,
                            progress=f"encode {kind}" if progress else None)
    return to_numpy(emb).astype(np.float32, copy=False)
