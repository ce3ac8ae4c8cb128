"""The encoder as forward/backward pairs over a flat parameter dict (Hugging Face tensor names).

    embeddings:  h = dropout(LN(word[ids] + position[pos_ids] + token_type[type_ids]))
    each block:  h1 = LN(h + dropout(Wo attention(Wq h, Wk h, Wv h) + bo))
                 h  = LN(h1 + dropout(W2 gelu(W1 h1 + b1) + b2))            (post-LayerNorm)
    pooling:     mean over the attention mask | first token | tanh(pooler(first token))
    embedding:   the pooled vector, L2-normalised

`forward` runs a padded batch [B, T] through all of it and returns the caches; `backward`
takes the embeddings' gradient and those caches and returns every parameter's gradient.
`ops` is the module of operations: layers (the default), or kernels.FUSED on a GPU. `record`,
if given, is called as record(name, array) with the hidden states after the embeddings and
after each block, the pooled and the normalised embeddings, and in `backward` with the
gradients of the same (python -m minihbt.check export builds its bundles from them).
"""
from typing import NamedTuple

import numpy as np

from . import layers
from .dropout import EMBEDDINGS_SITE, layer_site

ATTENTION, ATTENTION_OUTPUT, FFN_OUTPUT = 0, 1, 2       # the dropout sites of a block
WORD_TABLE = "embeddings.word_embeddings.weight"


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


class Cache(NamedTuple):
    """What `backward` needs from `forward`."""
    embeddings: EmbeddingsCache
    blocks: list
    pool: object
    normalize: tuple


def no_record(name, array):
    """The `record` of forward and backward when none is given: keeps nothing."""


def accumulate(grads, name, g):
    """grads[name] += g, creating the entry on first use."""
    if name in grads:
        grads[name] += g
    else:
        grads[name] = g


def position_ids(xp, config, input_ids):
    """RoBERTa: cumsum(ids != pad) * (ids != pad) + pad, so real tokens start at pad + 1
    and padding sits on the pad row; BERT: 0 .. T-1. [B, T] -> [B, T]."""
    B, T = input_ids.shape
    if config.family == "roberta":
        real = (input_ids != config.pad_token_id).astype(np.int64)              # [B, T]
        return xp.cumsum(real, axis=1) * real + config.pad_token_id
    return xp.broadcast_to(xp.arange(T, dtype=np.int64), (B, T))


def embedding_tables(config, cache):
    """(table name, ids [B, T], padding row) of the three tables. As torch's BertEmbeddings and
    RobertaEmbeddings, the word table's pad_token_id row never gets a gradient (for
    multilingual-E5 that is row 0, the <s> that starts every text), nor RoBERTa's position
    table's pad row."""
    pad = config.pad_token_id
    return (("embeddings.word_embeddings.weight", cache.input_ids, pad),
            ("embeddings.position_embeddings.weight", cache.position_ids, pad if config.family == "roberta" else None),
            ("embeddings.token_type_embeddings.weight", cache.token_type_ids, None))


def embeddings_forward(be, params, config, input_ids, token_type_ids, p_drop, streams, ops=layers):
    """Token, position and type embeddings summed, LayerNorm, dropout. ids [B, T] -> [B, T, H]."""
    pos_ids = position_ids(be.xp, config, input_ids)                                   # [B, T]
    h = (params["embeddings.word_embeddings.weight"][input_ids]
         + params["embeddings.position_embeddings.weight"][pos_ids]
         + params["embeddings.token_type_embeddings.weight"][token_type_ids])         # [B, T, H]
    h, ln = ops.layernorm_forward(be, h, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"],
                                  config.layer_norm_eps)
    h, drop = ops.dropout_forward(be, h, p_drop, streams, EMBEDDINGS_SITE)
    return h, EmbeddingsCache(input_ids, pos_ids, token_type_ids, ln, drop)


def embeddings_sum_backward(be, d_h, cache, grads, ops=layers):
    """Back through dropout and LayerNorm: the gradient of the summed embeddings [B, T, H]."""
    d_e = ops.dropout_backward(be, d_h, cache.dropout)
    d_e, d_gamma, d_beta = ops.layernorm_backward(be, d_e, cache.layernorm)
    accumulate(grads, "embeddings.LayerNorm.weight", d_gamma)
    accumulate(grads, "embeddings.LayerNorm.bias", d_beta)
    return d_e


def block_forward(be, params, prefix, config, h, mask_bias, layer, p_hidden, p_attn, streams, ops=layers):
    """One post-LN transformer block. h [B, T, H], mask_bias [B, 1, 1, T] -> (h_out [B, T, H], BlockCache)."""
    eps = config.layer_norm_eps

    def linear(x, name):
        return ops.linear_forward(be, x, params[prefix + name + ".weight"], params[prefix + name + ".bias"])

    def norm(name):
        return params[prefix + name + ".LayerNorm.weight"], params[prefix + name + ".LayerNorm.bias"], eps

    q, q_cache = linear(h, "attention.self.query")                                     # [B, T, H]
    k, k_cache = linear(h, "attention.self.key")                                       # [B, T, H]
    v, v_cache = linear(h, "attention.self.value")                                     # [B, T, H]
    ctx, attn_cache = ops.attention_forward(be, q, k, v, mask_bias, config.num_attention_heads, p_attn, streams,
                                            layer_site(layer, ATTENTION))               # [B, T, H]
    a, ao_cache = linear(ctx, "attention.output.dense")                                # [B, T, H]
    a, ad_cache = ops.dropout_forward(be, a, p_hidden, streams, layer_site(layer, ATTENTION_OUTPUT))
    h1, ln1_cache = ops.add_layernorm_forward(be, a, h, *norm("attention.output"))    # LN(a + h) [B, T, H]
    f, fi_cache = linear(h1, "intermediate.dense")                                     # [B, T, F]
    g, gelu_cache = ops.gelu_forward(be, f)                                            # [B, T, F]
    o, fo_cache = linear(g, "output.dense")                                            # [B, T, H]
    o, od_cache = ops.dropout_forward(be, o, p_hidden, streams, layer_site(layer, FFN_OUTPUT))
    h_out, ln2_cache = ops.add_layernorm_forward(be, o, h1, *norm("output"))          # LN(o + h1) [B, T, H]
    return h_out, BlockCache(q_cache, k_cache, v_cache, attn_cache, ao_cache, ad_cache, ln1_cache, fi_cache,
                             gelu_cache, fo_cache, od_cache, ln2_cache)


def block_backward(be, prefix, d_out, cache, grads, ops=layers):
    """Back through block_forward: d_out [B, T, H] -> d_h [B, T, H]; parameter gradients into `grads`."""
    def add(name, g):
        accumulate(grads, prefix + name, g)

    def linear(d_y, name, lin_cache):                      # y = x W^T + b: dW and db into grads, dx out
        d_x, d_w, d_b = ops.linear_backward(be, d_y, lin_cache)
        add(name + ".weight", d_w)
        # The key bias adds q_i . b_k to every score of row i: a constant per row, which softmax
        # ignores. Its gradient is exactly 0; computed, it is float noise (~1e-9) that AdamW's
        # normalisation would blow up to lr-sized steps.
        add(name + ".bias", be.xp.zeros_like(d_b) if name == "attention.self.key" else d_b)
        return d_x

    def norm(d_y, name, ln_cache):
        d_x, d_gamma, d_beta = ops.layernorm_backward(be, d_y, ln_cache)
        add(name + ".LayerNorm.weight", d_gamma)
        add(name + ".LayerNorm.bias", d_beta)
        return d_x

    # h_out = LN2(o + h1), o = dropout(W2 gelu(W1 h1 + b1) + b2): the residual h1 gets d_o as is
    d_o = norm(d_out, "output", cache.ffn_layernorm)                                   # [B, T, H]
    d_gelu = linear(ops.dropout_backward(be, d_o, cache.ffn_dropout), "output.dense", cache.ffn_out)   # [B, T, F]
    d_f = ops.gelu_backward(be, d_gelu, cache.gelu)                                    # [B, T, F]
    d_h1 = d_o + linear(d_f, "intermediate.dense", cache.ffn_in)                       # [B, T, H]
    # h1 = LN1(a + h), a = dropout(Wo attention(q, k, v) + bo): the residual h gets d_a as is
    d_a = norm(d_h1, "attention.output", cache.attention_layernorm)                    # [B, T, H]
    d_ctx = linear(ops.dropout_backward(be, d_a, cache.attention_dropout), "attention.output.dense",
                   cache.attention_output)                                             # [B, T, H]
    d_q, d_k, d_v = ops.attention_backward(be, d_ctx, cache.attention)                 # [B, T, H] each
    d_h = d_a + linear(d_q, "attention.self.query", cache.query)                       # [B, T, H]
    d_h = d_h + linear(d_k, "attention.self.key", cache.key)
    return d_h + linear(d_v, "attention.self.value", cache.value)


def pool_forward(be, params, mode, hidden, attention_mask, ops=layers):
    """[B, T, H] -> [B, H] (not yet normalised), by `mode`: mean, cls or pooler."""
    if mode == "mean":
        return ops.mean_pool_forward(be, hidden, attention_mask)
    first, shape = ops.cls_pool_forward(be, hidden)                                     # [B, H]
    if mode == "cls":
        return first, shape
    z, lin_cache = ops.linear_forward(be, first, params["pooler.dense.weight"], params["pooler.dense.bias"])
    out = be.xp.tanh(z)                                                                # pooler: tanh(W h0 + b)
    return out, (shape, lin_cache, out)


def pool_backward(be, mode, d_pooled, cache, grads, ops=layers):
    """Back through pool_forward: d_pooled [B, H] -> d_hidden [B, T, H]."""
    if mode == "mean":
        return ops.mean_pool_backward(be, d_pooled, cache)
    if mode == "cls":
        return ops.cls_pool_backward(be, d_pooled, cache)
    shape, lin_cache, out = cache
    d_z = d_pooled * (1.0 - out * out)                                                 # tanh' = 1 - tanh^2
    d_first, d_w, d_b = ops.linear_backward(be, d_z, lin_cache)
    accumulate(grads, "pooler.dense.weight", d_w)
    accumulate(grads, "pooler.dense.bias", d_b)
    return ops.cls_pool_backward(be, d_first, shape)


def hidden_forward(be, params, config, input_ids, attention_mask, token_type_ids, streams=None, ops=layers,
                   record=no_record):
    """Last hidden states [B, T, H] of a padded batch, and the embeddings' and blocks' caches.
    With `streams` (dropout.DropoutStreams) dropout is on."""
    p_hidden = config.hidden_dropout_prob if streams is not None else 0.0
    p_attn = config.attention_probs_dropout_prob if streams is not None else 0.0
    h, emb_cache = embeddings_forward(be, params, config, input_ids, token_type_ids, p_hidden, streams, ops)
    record("embeddings", h)
    mask_bias = layers.mask_bias_from(be, attention_mask, h.dtype)                     # [B, 1, 1, T]
    blocks = []
    for i in range(config.num_hidden_layers):
        h, cache = block_forward(be, params, f"encoder.layer.{i}.", config, h, mask_bias, i, p_hidden, p_attn,
                                 streams, ops)
        blocks.append(cache)
        record(f"encoder.layer.{i}.output", h)
    return h, emb_cache, blocks


def forward(be, params, config, pooling, input_ids, attention_mask, token_type_ids, streams=None, ops=layers,
            record=no_record):
    """Padded token ids [B, T] (numpy) -> (L2-normalised embeddings [B, H], Cache)."""
    xp = be.xp
    ids, mask, types = xp.asarray(input_ids), xp.asarray(attention_mask), xp.asarray(token_type_ids)
    hidden, emb_cache, blocks = hidden_forward(be, params, config, ids, mask, types, streams, ops,
                                               record)                                             # [B, T, H]
    pooled, pool_cache = pool_forward(be, params, pooling, hidden, mask, ops)                      # [B, H]
    emb, norm_cache = ops.l2_normalize_forward(be, pooled)                                         # [B, H]
    record("pooled", pooled)
    record("normalized", emb)
    return emb, Cache(emb_cache, blocks, pool_cache, norm_cache)


def backward_to_embeddings(be, config, pooling, d_emb, cache, grads, ops=layers, record=no_record):
    """Back through forward down to the summed embeddings: d_emb [B, H] -> d_e [B, T, H];
    every parameter gradient but the three tables' into `grads`."""
    record("normalized", d_emb)
    d_pooled = ops.l2_normalize_backward(be, d_emb, cache.normalize)                  # [B, H]
    record("pooled", d_pooled)
    d_h = pool_backward(be, pooling, d_pooled, cache.pool, grads, ops)                 # [B, T, H]
    for i in reversed(range(config.num_hidden_layers)):
        record(f"encoder.layer.{i}.output", d_h)
        d_h = block_backward(be, f"encoder.layer.{i}.", d_h, cache.blocks[i], grads, ops)
    record("embeddings", d_h)
    return embeddings_sum_backward(be, d_h, cache.embeddings, grads, ops)


def backward(be, params, config, pooling, d_emb, cache, grads, ops=layers, record=no_record):
    """Back through forward: every parameter's gradient added into `grads` (name -> array)."""
    d_e = backward_to_embeddings(be, config, pooling, d_emb, cache, grads, ops, record)   # [B, T, H]
    for name, ids, pad in embedding_tables(config, cache.embeddings):
        accumulate(grads, name, layers.embedding_backward(be, d_e, (ids, params[name].shape), pad))
    return grads
