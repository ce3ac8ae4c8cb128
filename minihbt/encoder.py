"""The encoder as forward/backward pairs over a flat parameter dict (HF tensor names).

    embeddings:  h = dropout(LN(word[ids] + position[pos_ids] + token_type[type_ids]))
    each block:  h1 = LN(h + dropout(Wo attention(Wq h, Wk h, Wv h) + bo))
                 h  = LN(h1 + dropout(W2 gelu(W1 h1 + b1) + b2))            (post-LayerNorm)
    pooling:     mean over the attention mask | first token | tanh(pooler(first token))

Each `*_forward` returns (output, cache) and each `*_backward` takes the output gradient and
that cache and returns the input gradient, adding parameter gradients into `grads`.
"""
import threading
from typing import NamedTuple

import numpy as np

from . import layers
from .dropout import EMBEDDINGS_SITE, layer_site

ATTENTION, ATTENTION_OUTPUT, FFN_OUTPUT = 0, 1, 2       # the dropout sites of a block


class BlockCache(NamedTuple):
    """What block_backward needs from block_forward (each field the cache of one op)."""
    query: tuple
    key: tuple
    value: tuple
    attention: tuple
    attention_output: tuple
    attention_dropout: object
    attention_layernorm: tuple
    ffn_in: tuple
    gelu: tuple
    ffn_out: tuple
    ffn_dropout: object
    ffn_layernorm: tuple


class EmbeddingsCache(NamedTuple):
    input_ids: object
    position_ids: object
    token_type_ids: object
    layernorm: tuple
    dropout: object


WORD_TABLE = "embeddings.word_embeddings.weight"      # the vocabulary table: its gradient is 0 but on the batch's ids


def accumulate(grads, name, g):
    """grads[name] += g, creating the entry on first use."""
    if name in grads:
        grads[name] += g
    else:
        grads[name] = g


def embeddings_forward(be, params, config, input_ids, position_ids, token_type_ids, p_drop, streams):
    """Token, position and type embeddings summed, LayerNorm, dropout -> [B, T, H]."""
    h, _ = layers.embedding_forward(be, params[WORD_TABLE], input_ids)                          # [B, T, H]
    h += params["embeddings.position_embeddings.weight"][position_ids]
    h += params["embeddings.token_type_embeddings.weight"][token_type_ids]
    h, ln = layers.layernorm_forward(be, h, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"],
                                config.layer_norm_eps)
    h, drop = layers.dropout_forward(be, h, p_drop, streams, EMBEDDINGS_SITE)
    return h, EmbeddingsCache(input_ids, position_ids, token_type_ids, ln, drop)


def scatter_rows(be, grads, name, shape, ids, d_rows):
    """grads[name] (a [V, H] table gradient, created on first use) += d_rows scattered to rows `ids`."""
    grads[name] = layers.embedding_backward(be, d_rows, (ids, shape), grads.get(name))


def embeddings_backward(be, params, d_h, cache, grads, tables=None):
    """Back through embeddings_forward: scatter-add into the three tables, LayerNorm grads.
    With `tables` (a list) the scatters are appended there as (name, ids, d_rows) for the
    caller to apply with scatter_rows, in its own order (a [V, H] table per call is avoided)."""
    d_e = layers.dropout_backward(be, d_h, cache.dropout)
    d_e, d_gamma, d_beta = layers.layernorm_backward(be, d_e, cache.layernorm)
    accumulate(grads, "embeddings.LayerNorm.weight", d_gamma)
    accumulate(grads, "embeddings.LayerNorm.bias", d_beta)
    for table, ids in (("word_embeddings", cache.input_ids), ("position_embeddings", cache.position_ids),
                       ("token_type_embeddings", cache.token_type_ids)):
        name = f"embeddings.{table}.weight"
        if tables is not None:
            tables.append((name, ids, d_e))
        else:
            scatter_rows(be, grads, name, params[name].shape, ids, d_e)


class RealTokens(NamedTuple):
    """Where the real tokens of a right-padded [B, T] batch are: flat indices into B * T."""
    index: object
    batch: int
    length: int


PACK_TOKENS, PACK_WIDTH = 128, 256     # real tokens and hidden size from which inference skips the padding


def real_tokens(be, attention_mask, config, dtype):
    """RealTokens of a [B, T] attention mask (numpy), or None (keep the padding): on CuPy, when
    no position is padding, for fewer than PACK_TOKENS real tokens, a hidden size below
    PACK_WIDTH, or where this process's BLAS gives a row of the block's products other bits
    among other rows (rows_independent). A row of a large product has the same bits whatever
    the number of rows with OpenBLAS's SkylakeX kernels; its small-matrix and vector kernels
    (1-3 rows at width 384, up to ~40 at width 32) and its Haswell kernels (also AMD Zen's) do
    not. Meant for encode, whose products run on one BLAS thread, as the check does."""
    flat = np.asarray(attention_mask).reshape(-1)
    index = np.flatnonzero(flat)
    if be.is_cuda or index.size == flat.size or index.size < PACK_TOKENS or config.hidden_size < PACK_WIDTH:
        return None
    if not rows_independent(be, dtype, config.hidden_size, config.intermediate_size):
        return None
    return RealTokens(be.asarray(index), *np.shape(attention_mask))


_ROWS_CHECKED, _ROWS_LOCK = {}, threading.Lock()


def rows_independent(be, dtype, hidden, ffn):
    """Whether BLAS on one thread computes each row of x @ W.T with the same bits among any
    rows, for the block's three shapes: checked once per (dtype, widths) by rows_agree (once
    although the first length groups ask from several threads at a time)."""
    key = (np.dtype(dtype).str, hidden, ffn)
    with _ROWS_LOCK:
        if key not in _ROWS_CHECKED:
            with be.blas_serial():
                shapes = ((hidden, hidden), (hidden, ffn), (ffn, hidden))
                _ROWS_CHECKED[key] = all(rows_agree(np.matmul, dtype, k, n) for k, n in shapes)
        return _ROWS_CHECKED[key]


def rows_agree(matmul, dtype, k, n, rows=640):
    """Whether matmul(x[idx], W.T) equals matmul(x, W.T)[idx] bit for bit for random x [rows, k],
    W [n, k] and scattered row subsets of several sizes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    full = matmul(x, w.T)
    subsets = (np.sort(rng.choice(rows, size, replace=False)) for size in (PACK_TOKENS, 257, 384))
    return all(np.array_equal(matmul(x[idx], w.T), full[idx]) for idx in subsets)


def pack(x, real):
    """[B, T, H] -> [n, H], the real tokens' rows."""
    return x.reshape(-1, x.shape[-1])[real.index]


def unpack(be, x, real):
    """[n, H] rows of the real tokens -> [B, T, H], zeros at the padding."""
    out = be.xp.zeros((real.batch * real.length, x.shape[-1]), dtype=x.dtype)
    out[real.index] = x
    return out.reshape(real.batch, real.length, x.shape[-1])


def block_forward(be, params, prefix, config, h, mask_bias, layer, p_hidden, p_attn, streams, keep=True, real=None):
    """One post-LN transformer block. h [B, T, H], mask_bias [B, 1, 1, T] -> (h_out [B, T, H], BlockCache).
    keep=False (inference, the cache is discarded): GELU runs in place, keeping nothing for backward.
    real (RealTokens, inference): h and h_out are [n, H], the real tokens only; attention alone
    sees the [B, T] layout, zeros at the padding (masked keys: their probabilities are exactly 0)."""
    eps = config.layer_norm_eps

    def linear(x, name):
        return layers.linear_forward(be, x, params[prefix + name + ".weight"], params[prefix + name + ".bias"])

    q, q_cache = linear(h, "attention.self.query")                                        # [B, T, H]
    k, k_cache = linear(h, "attention.self.key")                                          # [B, T, H]
    v, v_cache = linear(h, "attention.self.value")                                        # [B, T, H]
    if real is not None:
        q, k, v = (unpack(be, x, real) for x in (q, k, v))
    ctx, attn_cache = layers.attention_forward(be, q, k, v, mask_bias, config.num_attention_heads, p_attn, streams,
                                          layer_site(layer, ATTENTION))                   # [B, T, H]
    del q, k, v
    if real is not None:
        ctx = pack(ctx, real)
    a, ao_cache = linear(ctx, "attention.output.dense")                                   # [B, T, H]
    a, ad_cache = layers.dropout_forward(be, a, p_hidden, streams, layer_site(layer, ATTENTION_OUTPUT))
    h1, ln1_cache = layers.add_layernorm_forward(be, a, h, params[prefix + "attention.output.LayerNorm.weight"],
                                            params[prefix + "attention.output.LayerNorm.bias"], eps)   # LN(a + h)
    f, fi_cache = layers.linear_forward(be, h1, params[prefix + "intermediate.dense.weight"], None)  # [B, T, F], bias next
    g, gelu_cache = layers.bias_gelu_forward(be, f, params[prefix + "intermediate.dense.bias"], keep)  # gelu(f + b) [B, T, F]
    o, fo_cache = linear(g, "output.dense")                                               # [B, T, H]
    o, od_cache = layers.dropout_forward(be, o, p_hidden, streams, layer_site(layer, FFN_OUTPUT))
    h_out, ln2_cache = layers.add_layernorm_forward(be, o, h1, params[prefix + "output.LayerNorm.weight"],
                                               params[prefix + "output.LayerNorm.bias"], eps)  # LN(o + h1) [B, T, H]
    return h_out, BlockCache(q_cache, k_cache, v_cache, attn_cache, ao_cache, ad_cache, ln1_cache, fi_cache,
                             gelu_cache, fo_cache, od_cache, ln2_cache)


def block_backward(be, prefix, d_out, cache, grads):
    """Back through block_forward: d_out [B, T, H] -> d_h [B, T, H]; parameter gradients into `grads`."""
    def add(name, g):
        accumulate(grads, prefix + name, g)

    # h_out = LN2(o + h1), o = dropout(W2 gelu(W1 h1 + b1) + b2)
    d_o, d_gamma, d_beta = layers.layernorm_backward(be, d_out, cache.ffn_layernorm)
    add("output.LayerNorm.weight", d_gamma)
    add("output.LayerNorm.bias", d_beta)
    d_h1 = d_o                                                                     # residual path
    d_o = layers.dropout_backward(be, d_o, cache.ffn_dropout)
    d_gelu, d_w, d_b = layers.linear_backward(be, d_o, cache.ffn_out)                   # [B, T, F]
    add("output.dense.weight", d_w)
    add("output.dense.bias", d_b)
    d_f = layers.gelu_backward(be, d_gelu, cache.gelu)
    del d_gelu
    d_x, d_w, d_b = layers.linear_backward(be, d_f, cache.ffn_in)
    add("intermediate.dense.weight", d_w)
    add("intermediate.dense.bias", d_b)
    d_h1 = d_h1 + d_x
    # h1 = LN1(a + h), a = dropout(Wo attention(q, k, v) + bo)
    d_a, d_gamma, d_beta = layers.layernorm_backward(be, d_h1, cache.attention_layernorm)
    add("attention.output.LayerNorm.weight", d_gamma)
    add("attention.output.LayerNorm.bias", d_beta)
    d_h = d_a                                                                      # residual path
    d_a = layers.dropout_backward(be, d_a, cache.attention_dropout)
    d_ctx, d_w, d_b = layers.linear_backward(be, d_a, cache.attention_output)
    add("attention.output.dense.weight", d_w)
    add("attention.output.dense.bias", d_b)
    d_q, d_k, d_v = layers.attention_backward(be, d_ctx, cache.attention)
    for name, d, lin_cache in (("query", d_q, cache.query), ("key", d_k, cache.key), ("value", d_v, cache.value)):
        d_x, d_w, d_b = layers.linear_backward(be, d, lin_cache)
        if name == "key":
            # The key bias adds q_i . b_k to every score of row i: a constant per row, which
            # softmax ignores. Its gradient is exactly 0; computed, it is float noise (~1e-9)
            # that AdamW's normalisation would blow up to lr-sized steps.
            d_b = be.xp.zeros_like(d_b)
        add(f"attention.self.{name}.weight", d_w)
        add(f"attention.self.{name}.bias", d_b)
        d_h = d_h + d_x
    return d_h


def pool_forward(be, params, mode, hidden, attention_mask):
    """[B, T, H] -> [B, H] (not yet normalised), by `mode`: mean, cls or pooler."""
    if mode == "mean":
        return layers.mean_pool_forward(be, hidden, attention_mask)
    first, shape = layers.cls_pool_forward(be, hidden)
    if mode == "cls":
        return first, shape
    z, lin_cache = layers.linear_forward(be, first, params["pooler.dense.weight"], params["pooler.dense.bias"])
    out = be.xp.tanh(z)                                                              # pooler: tanh(W h0 + b)
    return out, (shape, lin_cache, out)


def pool_backward(be, mode, d_pooled, cache, grads):
    """Back through pool_forward: d_pooled [B, H] -> d_hidden [B, T, H]."""
    if mode == "mean":
        return layers.mean_pool_backward(be, d_pooled, cache)
    if mode == "cls":
        return layers.cls_pool_backward(be, d_pooled, cache)
    shape, lin_cache, out = cache
    d_z = d_pooled * (1.0 - out * out)                                               # tanh' = 1 - tanh^2
    d_first, d_w, d_b = layers.linear_backward(be, d_z, lin_cache)
    accumulate(grads, "pooler.dense.weight", d_w)
    accumulate(grads, "pooler.dense.bias", d_b)
    return layers.cls_pool_backward(be, d_first, shape)
