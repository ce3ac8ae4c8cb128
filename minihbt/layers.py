"""The encoder's operations as pairs of free functions, in plain array code.

    x_forward(be, ...)            -> (out, cache)     cache: exactly what the backward needs
    x_backward(be, d_out, cache)  -> d_in (, parameter gradients)

`be` is the Backend: `be.xp` is numpy or cupy, so the same code runs on CPU and GPU, in
float32 or float64. Every operation takes it, also those that do not use it, so the encoder calls
each alike whether `ops` is this module or kernels.FUSED. Inference simply drops the caches.
Above every backward, its derivation.
Shapes: B texts, T tokens, H hidden, F FFN width, N heads, D = H / N, V vocabulary rows.
"""
import math

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def embedding_backward(be, d_out, cache, padding_idx=None):
    """Back through the row gather out = table[ids] (cache: ids [B, T], the table's shape [V, H]):
    out[b, t] = table[ids[b, t]], so d_table[v] = the sum of d_out[b, t] over the (b, t)
    with ids[b, t] == v: a scatter-add into the rows that were used, 0 elsewhere. The row
    `padding_idx` gets no gradient, as in torch.nn.Embedding(padding_idx=...)."""
    ids, shape = cache
    d_table = be.xp.zeros(shape, dtype=d_out.dtype)                           # [V, H]
    # add.at adds in the order of (b, t) on the CPU; on a GPU its adds are atomic, in no fixed order
    # (the fast path sums them in order: rowgrad.sum_rows_in_order)
    be.xp.add.at(d_table, ids.reshape(-1), d_out.reshape(-1, shape[1]))       # [B*T] rows of [B*T, H]
    if padding_idx is not None:
        d_table[padding_idx] = 0
    return d_table


def linear_forward(be, x, weight, bias):
    """y = x W^T + b. x [..., I], weight [O, I] (Hugging Face's layout), bias [O] -> [..., O]."""
    x2 = x.reshape(-1, x.shape[-1])                                   # [M, I]
    y = x2 @ weight.T + bias                                          # [M, O]
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x2, weight, x.shape)


def linear_backward(be, d_y, cache):
    """y = x W^T + b  =>  dx = dy W,  dW = dy^T x,  db = the sum of dy over rows.
    d_y [..., O] -> (d_x [..., I], d_weight [O, I], d_bias [O])."""
    x2, weight, x_shape = cache
    d_y2 = d_y.reshape(-1, weight.shape[0])                           # [M, O]
    d_weight = d_y2.T @ x2                                            # [O, I]
    d_bias = d_y2.sum(axis=0)                                         # [O]
    d_x = (d_y2 @ weight).reshape(x_shape)                            # [..., I]
    return d_x, d_weight, d_bias


def layernorm_forward(be, x, gamma, beta, eps):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance, as torch)."""
    centred = x - x.mean(axis=-1, keepdims=True)                      # [..., H]
    var = (centred * centred).mean(axis=-1, keepdims=True)            # [..., 1]
    rstd = 1.0 / be.xp.sqrt(var + eps)                                # [..., 1]
    xhat = centred * rstd                                             # [..., H]
    return xhat * gamma + beta, (xhat, rstd, gamma)


def add_layernorm_forward(be, x, residual, gamma, beta, eps):
    """LayerNorm(x + residual): the post-LN block's residual join. [..., H] -> [..., H]."""
    return layernorm_forward(be, x + residual, gamma, beta, eps)


def layernorm_backward(be, d_y, cache):
    """y = xhat * g + b, xhat = (x - mu) * rstd.
    dg = sum(dy * xhat), db = sum(dy) (over all but the last axis). With dxhat = dy * g and
    H features, differentiating mu and rstd through xhat gives
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    """
    xhat, rstd, gamma = cache
    H = xhat.shape[-1]
    d_gamma = (d_y * xhat).reshape(-1, H).sum(axis=0)                 # [H]
    d_beta = d_y.reshape(-1, H).sum(axis=0)                           # [H]
    d_xhat = d_y * gamma                                              # [..., H]
    d_x = d_xhat - d_xhat.mean(axis=-1, keepdims=True) - xhat * (d_xhat * xhat).mean(axis=-1, keepdims=True)
    return d_x * rstd, d_gamma, d_beta


def gelu_forward(be, x):
    """Exact GELU: x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 the normal CDF. x [...]."""
    cdf = 0.5 * (1.0 + be.erf(x * x.dtype.type(INV_SQRT2)))          # [...]
    return x * cdf, (x, cdf)


def gelu_backward(be, d_y, cache):
    """y = x Phi(x)  =>  dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    x, cdf = cache
    pdf = be.xp.exp(-0.5 * x * x) * x.dtype.type(INV_SQRT2PI)        # [...]
    return d_y * (cdf + x * pdf)


def dropout_forward(be, x, p, streams, site):
    """Inverted dropout: zero with probability p, scale the rest by 1 / (1 - p).
    `streams` (dropout.DropoutStreams) gives each text its own mask at each `site`; with p == 0
    or streams None it is the identity. The cache: the boolean keep-mask and the scale."""
    if not p or streams is None:
        return x, None
    keep = streams.keep_mask(be, site, x.shape, p)                    # bool, x's shape
    scale = x.dtype.type(1.0 / (1.0 - p))
    return x * keep * scale, (keep, scale)


def dropout_backward(be, d_y, cache):
    """y = x * keep / (1 - p)  =>  dx = dy * keep / (1 - p)."""
    if cache is None:
        return d_y
    keep, scale = cache
    return d_y * keep * scale


def softmax_forward(be, scores, mask_bias):
    """softmax(scores + mask_bias) over the last axis. scores [B, N, T, T], mask_bias [B, 1, 1, T].
    The sum is a new array; the steps after it work in place on it (the largest tensor of a block)."""
    p = scores + mask_bias                                            # [B, N, T, T]
    p -= p.max(axis=-1, keepdims=True)                                # exp never overflows
    be.xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def softmax_backward(be, d_probs, probs):
    """p = softmax(s) row-wise  =>  ds = p * (dp - sum_j(dp_j p_j)).
    Masked entries have p = 0 and so get no gradient."""
    return probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))


def split_heads(x, num_heads):
    """[B, T, H] -> [B, N, T, D]."""
    B, T, H = x.shape
    return x.reshape(B, T, num_heads, H // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, N, T, D] -> [B, T, N * D]."""
    B, N, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, N * D)


def attention_forward(be, q, k, v, mask_bias, num_heads, dropout_p=0.0, streams=None, site=0,
                      softmax=softmax_forward):
    """Masked multi-head scaled dot-product attention:
        ctx = dropout(softmax(q k^T / sqrt(D) + mask_bias)) v, per head.
    q, k, v [B, T, H]; mask_bias [B, 1, 1, T] (0 for real tokens, a huge negative number for
    padding) -> ctx [B, T, H]. `softmax` may be a fused kernel of the same signature."""
    q_heads, k_heads, v_heads = (split_heads(x, num_heads) for x in (q, k, v))   # [B, N, T, D] each
    scale = q.dtype.type(1.0 / math.sqrt(q_heads.shape[-1]))
    scores = (q_heads * scale) @ k_heads.transpose(0, 1, 3, 2)          # [B, N, T, T]
    probs = softmax(be, scores, mask_bias)                              # [B, N, T, T]
    dropped, drop = dropout_forward(be, probs, dropout_p, streams, site)
    ctx = merge_heads(dropped @ v_heads)                                # [B, T, H]
    return ctx, (q_heads, k_heads, v_heads, probs, drop, scale)


def attention_backward(be, d_ctx, cache, softmax_grad=softmax_backward):
    """Back through attention_forward, with P = softmax(S), S = q k^T * scale, A = dropout(P):
        ctx = A v  =>  dA = d_ctx v^T,  dv = A^T d_ctx
        dP = dropout_backward(dA);  dS = softmax_backward(dP);  dq = dS k * scale,  dk = dS^T q * scale.
    d_ctx [B, T, H] -> (d_q, d_k, d_v) each [B, T, H]."""
    q_heads, k_heads, v_heads, probs, drop, scale = cache
    d_ctx = split_heads(d_ctx, q_heads.shape[1])                        # [B, N, T, D]
    dropped = dropout_backward(be, probs, drop)                         # A (dropout is linear)
    d_v = dropped.transpose(0, 1, 3, 2) @ d_ctx                         # [B, N, T, D]
    d_probs = dropout_backward(be, d_ctx @ v_heads.transpose(0, 1, 3, 2), drop)   # [B, N, T, T]
    d_scores = softmax_grad(be, d_probs, probs) * scale                 # [B, N, T, T]
    d_q = d_scores @ k_heads                                            # [B, N, T, D]
    d_k = d_scores.transpose(0, 1, 3, 2) @ q_heads                      # [B, N, T, D]
    return merge_heads(d_q), merge_heads(d_k), merge_heads(d_v)


def mask_bias_from(be, attention_mask, dtype):
    """[B, T] 0/1 mask -> additive bias [B, 1, 1, T]: 0 where attended, dtype-min where padded.
    This is what `transformers` adds before the softmax; exp() of it is exactly 0."""
    m = be.xp.asarray(attention_mask)
    return ((1 - m.astype(dtype)) * be.xp.finfo(dtype).min)[:, None, None, :]


def mean_pool_forward(be, hidden, attention_mask):
    """Mean over real tokens (special tokens included, as sentence-transformers does).
    hidden [B, T, H], attention_mask [B, T] -> [B, H]."""
    m = attention_mask.astype(hidden.dtype)[:, :, None]              # [B, T, 1]
    count = be.xp.maximum(m.sum(axis=1), 1e-9)                        # [B, 1]
    return (hidden * m).sum(axis=1) / count, (m, count)


def mean_pool_backward(be, d_out, cache):
    """out = sum_t(h_t m_t) / count  =>  d_h[b, t] = d_out[b] * m[b, t] / count[b]."""
    m, count = cache
    return (d_out / count)[:, None, :] * m                            # [B, T, H]


def cls_pool_forward(be, hidden):
    """The first token's state. hidden [B, T, H] -> [B, H]."""
    return hidden[:, 0], hidden.shape


def cls_pool_backward(be, d_out, shape):
    """out = h[:, 0]  =>  d_h is d_out at position 0 and zero elsewhere."""
    d_h = be.xp.zeros(shape, dtype=d_out.dtype)                       # [B, T, H]
    d_h[:, 0] = d_out
    return d_h


def l2_normalize_forward(be, x, eps=1e-12):
    """x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize. [B, H] -> [B, H]."""
    norm = be.xp.maximum(be.xp.sqrt((x * x).sum(axis=-1, keepdims=True)), eps)   # [B, 1]
    return x / norm, (x, norm)


def l2_normalize_backward(be, d_y, cache):
    """y = x / n, n = max(||x||, eps). Where n = ||x||: dx = (dy - y (dy . y)) / n."""
    x, norm = cache
    y = x / norm
    return (d_y - y * (d_y * y).sum(axis=-1, keepdims=True)) / norm
