"""The encoder's operations as free functions: `x_forward(be, ...) -> (out, cache)` and
`x_backward(be, d_out, cache) -> d_in (, parameter gradients)`.

`cache` holds exactly what the matching backward needs; inference simply drops it.
Every function takes the Backend `be` (its array module `be.xp` is numpy or cupy) so the
same code runs on CPU and GPU. Where a fused CuPy kernel can serve an op, one line says so
(`if be.fused:`); the array expression below it is the reference the kernel reproduces.
Shapes: B batch, T tokens, H hidden, F FFN width, N heads, D = H / N.
"""
import math

from . import kernels
from .backend import TABLE_ROWS, lazy_zeros

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def embedding_forward(be, table, ids):
    """Row gather. table [V, H], ids [B, T] -> [B, T, H]."""
    return table[ids], (ids, table.shape)


def embedding_backward(be, d_out, cache, d_table=None):
    """out[b, t] = table[ids[b, t]], so d_table[v] = sum of d_out[b, t] over the (b, t) with
    ids[b, t] == v: a scatter-add into the rows that were used (the rest stay 0).
    Pass `d_table` to add into an existing gradient instead of allocating [V, H] zeros."""
    ids, shape = cache
    if d_table is None and not be.is_cuda and shape[0] >= TABLE_ROWS:
        d_table = lazy_zeros(shape, d_out.dtype)                          # [V, H]: memory only where written
    elif d_table is None:
        d_table = be.xp.zeros(shape, dtype=d_out.dtype)                    # [V, H]
    be.xp.add.at(d_table, ids.reshape(-1), d_out.reshape(-1, shape[1]))
    return d_table


def linear_forward(be, x, weight, bias):
    """y = x W^T + b as one 2-D GEMM. x [..., I], weight [O, I] (HF layout), bias [O] -> [..., O].
    With bias None the caller adds it (fused into the next operation, see bias_gelu_forward)."""
    x2 = x.reshape(-1, x.shape[-1])                      # [M, I]
    y = x2 @ weight.T                                    # [M, O]
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x2, weight, x.shape)


def linear_backward(be, d_y, cache):
    """y = x W^T + b  =>  dx = dy W,  dW = dy^T x,  db = sum over rows of dy.
    d_y [..., O] -> (d_x [..., I], d_weight [O, I], d_bias [O])."""
    x2, weight, x_shape = cache
    d_y2 = d_y.reshape(-1, weight.shape[0])                        # [M, O]
    d_weight = d_y2.T @ x2                                         # [O, I]
    d_bias = d_y2.sum(axis=0)                                      # [O]
    d_x = (d_y2 @ weight).reshape(x_shape)                         # [..., I]
    return d_x, d_weight, d_bias


def layernorm_forward(be, x, gamma, beta, eps):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis. x [..., H].
    Rows are independent: on the CPU, blocks of rows run on all cores."""
    xp, H = be.xp, x.shape[-1]
    x2 = x.reshape(-1, H)                                                # [R, H]
    xhat, y = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)                     # [R, 1]

    def rows(s, e):
        xp.subtract(x2[s:e], x2[s:e].mean(axis=-1, keepdims=True), out=xhat[s:e])   # x - mean
        var = (xhat[s:e] * xhat[s:e]).mean(axis=-1, keepdims=True)       # biased variance, as torch
        rstd[s:e] = 1.0 / xp.sqrt(var + eps)
        xhat[s:e] *= rstd[s:e]                                           # normalised
        xp.multiply(xhat[s:e], gamma, out=y[s:e])
        y[s:e] += beta
    be.map_rows(rows, x2.shape[0], H)
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)), gamma)


def add_layernorm_forward(be, x, residual, gamma, beta, eps):
    """LayerNorm(x + residual), the post-LN block's residual join; x [..., H] is owned (overwritten)."""
    if be.fused:
        y, xhat, rstd = kernels.add_layernorm(x, residual, gamma, beta, eps)
        return y, (xhat, rstd, gamma)
    x += residual
    return layernorm_forward(be, x, gamma, beta, eps)


def layernorm_backward(be, d_y, cache):
    """y = xhat * g + b, xhat = (x - mu) * rstd.
    dg = sum(dy * xhat), db = sum(dy) (over all but the last axis). With dxhat = dy * g and
    H features, differentiating mu and rstd through xhat gives
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    """
    xhat, rstd, gamma = cache
    H = xhat.shape[-1]
    d_gamma = (d_y * xhat).reshape(-1, H).sum(axis=0)              # [H]
    d_beta = d_y.reshape(-1, H).sum(axis=0)                        # [H]
    if be.fused:
        return kernels.layernorm_grad(d_y, xhat, rstd, gamma), d_gamma, d_beta
    d_y2, xhat2, rstd2 = d_y.reshape(-1, H), xhat.reshape(-1, H), rstd.reshape(-1, 1)
    d_x = be.xp.empty_like(d_y2)                                   # [R, H]

    def rows(s, e):
        d_xhat = d_y2[s:e] * gamma
        be.xp.subtract(d_xhat, d_xhat.mean(axis=-1, keepdims=True), out=d_x[s:e])
        d_x[s:e] -= xhat2[s:e] * (d_xhat * xhat2[s:e]).mean(axis=-1, keepdims=True)
        d_x[s:e] *= rstd2[s:e]
    be.map_rows(rows, d_y2.shape[0], H)
    return d_x.reshape(d_y.shape), d_gamma, d_beta


def _phi(be, x):
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)) of a (flat) slice, a new array."""
    cdf = be.erf(x * x.dtype.type(INV_SQRT2), threaded=False)
    cdf += 1.0
    cdf *= 0.5
    return cdf


def _gelu_into(be, x, cdf, out):
    """cdf = Phi(x), out = x * cdf, on same-shaped (flat) slices."""
    cdf[...] = _phi(be, x)
    be.xp.multiply(x, cdf, out=out)


def gelu_forward(be, x):
    """Exact GELU: x * Phi(x). x [...]. On the CPU in cache-sized chunks over all cores."""
    x = be.xp.ascontiguousarray(x)                                 # the flat views below must be views
    cdf, out = be.xp.empty(x.shape, x.dtype), be.xp.empty(x.shape, x.dtype)
    xf, cf, of = x.reshape(-1), cdf.reshape(-1), out.reshape(-1)
    be.map_chunks(lambda s, e: _gelu_into(be, xf[s:e], cf[s:e], of[s:e]), x.size)
    return out, (x, cdf)


def bias_gelu_forward(be, y, bias, keep=True):
    """GELU(y + bias), y [..., F] owned (overwritten with x = y + bias), bias [F]. keep=False
    (inference): GELU is written over y chunk by chunk, Phi(x) only kept per chunk, and the
    cache is None (the same values, two [..., F] arrays fewer)."""
    if be.fused:
        out, cdf = kernels.bias_gelu(y, bias)
        return out, ((y, cdf) if keep else None)
    y += bias
    if keep:
        return gelu_forward(be, y)
    yf = be.xp.ascontiguousarray(y).reshape(-1)                   # y is owned and contiguous: a view
    be.map_chunks(lambda s, e: be.xp.multiply(yf[s:e], _phi(be, yf[s:e]), out=yf[s:e]), yf.size)
    return yf.reshape(y.shape), None


def _gelu_grad_into(be, x, cdf, d_y, d_x):
    """d_x = d_y * (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi), on (flat) slices."""
    pdf = x * x
    pdf *= -0.5
    be.xp.exp(pdf, out=pdf)
    pdf *= x.dtype.type(INV_SQRT2PI)
    pdf *= x
    pdf += cdf
    be.xp.multiply(pdf, d_y, out=d_x)


def gelu_backward(be, d_y, cache):
    """y = x Phi(x)  =>  dy/dx = Phi(x) + x phi(x)."""
    x, cdf = cache
    if be.fused:
        return kernels.gelu_grad(d_y, x, cdf)
    d_y = be.xp.ascontiguousarray(d_y)
    d_x = be.xp.empty(d_y.shape, d_y.dtype)
    xf, cf, df, of = x.reshape(-1), cdf.reshape(-1), d_y.reshape(-1), d_x.reshape(-1)
    be.map_chunks(lambda s, e: _gelu_grad_into(be, xf[s:e], cf[s:e], df[s:e], of[s:e]), x.size)
    return d_x


def dropout_forward(be, x, p, streams, site):
    """Inverted dropout: zero with probability p, scale the rest by 1/(1-p).

    `streams` (dropout.DropoutStreams) gives each text its own mask at each `site`; with
    p == 0 or streams None it is the identity. The cache is the boolean keep-mask (1 byte
    an element) and the scale."""
    if not p or streams is None:
        return x, None
    keep = streams.keep_mask(be, site, x.shape, p)
    scale = x.dtype.type(1.0 / (1.0 - p))
    return _scale_kept(be, x, keep, scale), (keep, scale)


def _scale_kept(be, x, keep, scale):
    """x * keep * scale, in flat chunks on all cores."""
    x, keep = be.xp.ascontiguousarray(x), be.xp.ascontiguousarray(keep)
    out = be.xp.empty(x.shape, x.dtype)
    xf, kf, of = x.reshape(-1), keep.reshape(-1), out.reshape(-1)

    def chunk(s, e):
        be.xp.multiply(xf[s:e], kf[s:e], out=of[s:e])
        of[s:e] *= scale
    be.map_chunks(chunk, x.size)
    return out


def dropout_backward(be, d_y, cache):
    """y = x * keep / (1 - p)  =>  dx = dy * keep / (1 - p)."""
    if cache is None:
        return d_y
    keep, scale = cache
    return _scale_kept(be, d_y, keep, scale)


def softmax_forward(be, scores):
    """Row softmax over the last axis, in place on `scores` (which must be owned)."""
    scores -= scores.max(axis=-1, keepdims=True)
    be.xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def scaled_masked_softmax(be, scores, scale, mask_bias):
    """softmax(scores * scale + mask_bias), in place on owned scores [B, N, T, T]; mask_bias [B, 1, 1, T]."""
    if be.fused:
        return kernels.scaled_masked_softmax(scores, scale, mask_bias)
    scores = be.xp.ascontiguousarray(scores)

    def texts(s, e):                                        # scores[s:e] [b, N, T, T]
        scores[s:e] *= scores.dtype.type(scale)
        scores[s:e] += mask_bias[s:e]
        softmax_forward(be, scores[s:e])
    be.map_rows(texts, scores.shape[0], scores[0].size)
    return scores


def softmax_backward(be, d_probs, probs):
    """p = softmax(s) row-wise  =>  ds = p * (dp - sum_j(dp_j p_j)).
    Masked entries have p = 0 and so get no gradient. d_probs is owned (overwritten)."""
    if be.fused:
        return kernels.softmax_grad(d_probs, probs)
    d_probs = be.xp.ascontiguousarray(d_probs)                      # reshaped views below write into it
    d2, p2 = d_probs.reshape(-1, probs.shape[-1]), probs.reshape(-1, probs.shape[-1])

    def rows(s, e):
        d2[s:e] *= p2[s:e]
        d2[s:e] -= p2[s:e] * d2[s:e].sum(axis=-1, keepdims=True)
    be.map_rows(rows, d2.shape[0], d2.shape[1])
    return d_probs


def batched_matmul(be, a, b):
    """a @ b for stacks of small matrices [B, N, ., .]: on the CPU the texts (leading axis) are
    spread over the thread pool, each product on one BLAS thread; on CuPy one batched call."""
    if be.is_cuda:
        return a @ b
    out = be.xp.empty(a.shape[:-1] + b.shape[-1:], dtype=be.xp.result_type(a, b))

    def texts(s, e):
        be.xp.matmul(a[s:e], b[s:e], out=out[s:e])
    with be.blas_serial():
        be.map_rows(texts, a.shape[0], out[0].size)
    return out


def attention_forward(be, q, k, v, mask_bias, num_heads, dropout_p=0.0, streams=None, site=0):
    """Masked multi-head scaled dot-product attention.

    q, k, v [B, T, H]; mask_bias [B, 1, 1, T] (0 for real tokens, a huge negative number
    for padding) -> context [B, T, H].
    """
    B, T, H = q.shape
    D = H // num_heads
    q_heads = q.reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)     # [B, N, T, D]
    k_heads = k.reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)     # [B, N, T, D]
    v_heads = v.reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)     # [B, N, T, D]
    scores = batched_matmul(be, q_heads, k_heads.transpose(0, 1, 3, 2))   # [B, N, T, T]
    probs = scaled_masked_softmax(be, scores, 1.0 / math.sqrt(D), mask_bias)
    probs_dropped, drop = dropout_forward(be, probs, dropout_p, streams, site)   # [B, N, T, T]
    ctx = batched_matmul(be, probs_dropped, v_heads)                    # [B, N, T, D]
    ctx = ctx.transpose(0, 2, 1, 3).reshape(B, T, H)                    # [B, T, H]
    return ctx, (q_heads, k_heads, v_heads, probs, drop)


def attention_backward(be, d_ctx, cache):
    """Back through ctx = dropout(softmax(q k^T / sqrt(D) + mask)) v, per head.
    d_ctx [B, T, H] -> (d_q, d_k, d_v) each [B, T, H]."""
    q_heads, k_heads, v_heads, probs, drop = cache
    B, N, T, D = q_heads.shape
    d_ctx = d_ctx.reshape(B, T, N, D).transpose(0, 2, 1, 3)           # [B, N, T, D]
    probs_dropped = dropout_backward(be, probs, drop)                   # what multiplied v (dropout is linear)
    d_v = batched_matmul(be, probs_dropped.transpose(0, 1, 3, 2), d_ctx)   # [B, N, T, D]
    del probs_dropped
    d_probs = batched_matmul(be, d_ctx, v_heads.transpose(0, 1, 3, 2))    # [B, N, T, T]
    d_probs = dropout_backward(be, d_probs, drop)
    d_scores = softmax_backward(be, d_probs, probs)                     # [B, N, T, T]
    d_scores *= q_heads.dtype.type(1.0 / math.sqrt(D))
    d_q = batched_matmul(be, d_scores, k_heads)                         # [B, N, T, D]
    d_k = batched_matmul(be, d_scores.transpose(0, 1, 3, 2), q_heads)   # [B, N, T, D]

    def merge(t):                                                       # [B, N, T, D] -> [B, T, H]
        return t.transpose(0, 2, 1, 3).reshape(B, T, N * D)
    return merge(d_q), merge(d_k), merge(d_v)


def mask_bias_from(be, attention_mask, dtype):
    """[B, T] 0/1 mask -> additive bias [B, 1, 1, T]: 0 where attended, dtype-min where padded.
    This is what `transformers` adds before the softmax; exp() of it is exactly 0."""
    m = be.xp.asarray(attention_mask)
    return ((1 - m.astype(dtype)) * be.xp.finfo(dtype).min)[:, None, None, :]


def mean_pool_forward(be, hidden, attention_mask):
    """Mean over real tokens (special tokens included, as sentence-transformers does).
    hidden [B, T, H], attention_mask [B, T] -> [B, H]."""
    m = attention_mask.astype(hidden.dtype)[:, :, None]            # [B, T, 1]
    count = be.xp.maximum(m.sum(axis=1), 1e-9)                      # [B, 1]
    return (hidden * m).sum(axis=1) / count, (m, count)


def mean_pool_backward(be, d_out, cache):
    """out = sum_t(h_t m_t) / count  =>  d_h[b, t] = d_out[b] * m[b, t] / count[b]."""
    m, count = cache
    return (d_out / count)[:, None, :] * m                         # [B, T, H]


def cls_pool_forward(be, hidden):
    """The first token's state. hidden [B, T, H] -> [B, H]."""
    return hidden[:, 0], hidden.shape


def cls_pool_backward(be, d_out, shape):
    """out = h[:, 0]  =>  d_h is d_out at position 0 and zero elsewhere."""
    d_h = be.xp.zeros(shape, dtype=d_out.dtype)                    # [B, T, H]
    d_h[:, 0] = d_out
    return d_h


def l2_normalize_forward(be, x, eps=1e-12):
    """x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize."""
    norm = be.xp.sqrt((x * x).sum(axis=-1, keepdims=True))         # [B, 1]
    norm = be.xp.maximum(norm, eps)
    return x / norm, (x, norm)


def l2_normalize_backward(be, d_y, cache):
    """y = x / n, n = max(||x||, eps). Where n = ||x||: dx = (dy - y (dy . y)) / n."""
    x, norm = cache
    y = x / norm
    d_x = d_y - y * (d_y * y).sum(axis=-1, keepdims=True)
    d_x /= norm
    return d_x
