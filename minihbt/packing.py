"""Inference on the real tokens only: a speed mechanism, apart from the mathematics.

encoder.forward runs every per-token operation (the projections, the FFN, the LayerNorms) on
the padded [B, T] layout. Here, as MosaicBERT's "unpadding", they run on the [n, H] matrix of
the n real tokens, and only attention sees the [B, T] layout, with zeros at the padding (padded
keys are masked: their probabilities are exactly 0; padded queries are dropped). The same
function as encoder.forward without dropout, up to rounding: a row of a product may get other
bits among other rows. tests/test_fast_path.py checks the two against each other.
"""
from . import encoder
from . import layers


def pack(x, real):
    """[B, T, H] -> [n, H], the rows of the real tokens (flat indices `real` into B * T)."""
    return x.reshape(-1, x.shape[-1])[real]


def unpack(be, x, real, B, T):
    """[n, H] rows of the real tokens -> [B, T, H], zeros at the padding."""
    out = be.xp.zeros((B * T, x.shape[-1]), dtype=x.dtype)
    out[real] = x
    return out.reshape(B, T, x.shape[-1])


def block_forward(be, params, prefix, config, h, real, B, T, mask_bias, ops=layers):
    """encoder.block_forward without dropout or caches, h [n, H] the real tokens -> [n, H]."""
    eps = config.layer_norm_eps

    def linear(x, name):                                                       # [n, I] -> [n, O]
        return ops.linear_forward(be, x, params[prefix + name + ".weight"], params[prefix + name + ".bias"])[0]

    def norm(name):
        return params[prefix + name + ".LayerNorm.weight"], params[prefix + name + ".LayerNorm.bias"], eps

    q, k, v = (unpack(be, linear(h, "attention.self." + n), real, B, T) for n in ("query", "key", "value"))
    ctx, _ = ops.attention_forward(be, q, k, v, mask_bias, config.num_attention_heads)   # [B, T, H]
    a = linear(pack(ctx, real), "attention.output.dense")                                # [n, H]
    h1, _ = ops.add_layernorm_forward(be, a, h, *norm("attention.output"))              # [n, H]
    g, _ = ops.gelu_forward(be, linear(h1, "intermediate.dense"))                        # [n, F]
    h_out, _ = ops.add_layernorm_forward(be, linear(g, "output.dense"), h1, *norm("output"))
    return h_out                                                                         # [n, H]


def embed(be, params, config, pooling, input_ids, attention_mask, token_type_ids, ops=layers):
    """Padded token ids [B, T] (numpy) -> L2-normalised embeddings [B, H], as encoder.forward
    without dropout, the per-token work on the real tokens only."""
    xp = be.xp
    ids, mask, types = xp.asarray(input_ids), xp.asarray(attention_mask), xp.asarray(token_type_ids)
    B, T = ids.shape
    real = xp.flatnonzero(mask.reshape(-1))                                               # [n]
    h, _ = encoder.embeddings_forward(be, params, config, ids, types, 0.0, None, ops)     # [B, T, H]
    h = pack(h, real)                                                                     # [n, H]
    mask_bias = layers.mask_bias_from(be, mask, h.dtype)                                  # [B, 1, 1, T]
    for i in range(config.num_hidden_layers):
        h = block_forward(be, params, f"encoder.layer.{i}.", config, h, real, B, T, mask_bias, ops)
    pooled, _ = encoder.pool_forward(be, params, pooling, unpack(be, h, real, B, T), mask, ops)   # [B, H]
    return ops.l2_normalize_forward(be, pooled)[0]
