"""The encoder's operations as free functions: `x_forward(...) -> (out, cache)`.

`cache` holds exactly what the matching backward needs; inference simply drops it.
Every function takes the array module `xp` (numpy or cupy) so the same code runs on
CPU and GPU. Shapes: B batch, T tokens, H hidden, F FFN width, N heads, D = H / N.
"""
import math

from .backend import erf


def embedding_forward(xp, table, ids):
    """Row gather. table [V, H], ids [B, T] -> [B, T, H]."""
    out = table[ids]                                     # [B, T, H]
    return out, (ids, table.shape)


def linear_forward(xp, x, weight, bias):
    """y = x W^T + b as one 2-D GEMM. x [..., I], weight [O, I] (HF layout), bias [O] -> [..., O]."""
    x2 = x.reshape(-1, x.shape[-1])                      # [M, I]
    y = x2 @ weight.T                                    # [M, O]
    y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0]), x2


def layernorm_forward(xp, x, gamma, beta, eps):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis. x [..., H]."""
    mean = x.mean(axis=-1, keepdims=True)                # [..., 1]
    xc = x - mean                                        # [..., H]
    var = (xc * xc).mean(axis=-1, keepdims=True)         # [..., 1] biased variance, as torch
    rstd = 1.0 / xp.sqrt(var + eps)                      # [..., 1]
    xhat = xc
    xhat *= rstd                                         # [..., H] normalised
    y = xhat * gamma                                     # [..., H]
    y += beta
    return y, (xhat, rstd, gamma)


def gelu_forward(xp, x):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). x [...]."""
    cdf = erf(xp, x * (1.0 / math.sqrt(2.0)))          # [...]
    cdf += 1.0
    cdf *= 0.5                                           # Phi(x)
    return x * cdf, (x, cdf)


def dropout_forward(xp, x, p, rng):
    """Inverted dropout: zero with probability p, scale the rest by 1/(1-p).

    `rng` is an explicit random state (numpy/cupy Generator), so a forward can be replayed
    exactly by re-creating the same state. With p == 0 or rng None it is the identity.
    """
    if not p or rng is None:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p        # [...] bool
    scale = keep * x.dtype.type(1.0 / (1.0 - p))          # [...]
    return x * scale, scale


def attention_forward(xp, q, k, v, mask_bias, num_heads, dropout_p=0.0, rng=None):
    """Masked multi-head scaled dot-product attention.

    q, k, v [B, T, H]; mask_bias [B, 1, 1, T] (0 for real tokens, a huge negative number
    for padding) -> context [B, T, H].
    """
    B, T, H = q.shape
    D = H // num_heads
    qh = q.reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)      # [B, N, T, D]
    kh = k.reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)      # [B, N, T, D]
    vh = v.reshape(B, T, num_heads, D).transpose(0, 2, 1, 3)      # [B, N, T, D]
    scores = qh @ kh.transpose(0, 1, 3, 2)                         # [B, N, T, T]
    scores *= q.dtype.type(1.0 / math.sqrt(D))
    scores += mask_bias
    probs = softmax_forward(xp, scores)                            # [B, N, T, T]
    probs_d, drop = dropout_forward(xp, probs, dropout_p, rng)     # [B, N, T, T]
    ctx = probs_d @ vh                                             # [B, N, T, D]
    ctx = ctx.transpose(0, 2, 1, 3).reshape(B, T, H)               # [B, T, H]
    return ctx, (qh, kh, vh, probs, drop, num_heads)


def softmax_forward(xp, scores):
    """Row softmax over the last axis, in place on `scores` (which must be owned)."""
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def mask_bias_from(xp, attention_mask, dtype):
    """[B, T] 0/1 mask -> additive bias [B, 1, 1, T]: 0 where attended, dtype-min where padded.

    This is what `transformers` adds before the softmax; exp() of it is exactly 0.
    """
    m = xp.asarray(attention_mask)
    neg = xp.finfo(dtype).min
    return ((1 - m.astype(dtype)) * neg)[:, None, None, :]


def mean_pool_forward(xp, hidden, attention_mask):
    """Mean over real tokens (special tokens included, as sentence-transformers does).
    hidden [B, T, H], attention_mask [B, T] -> [B, H]."""
    m = attention_mask.astype(hidden.dtype)[:, :, None]            # [B, T, 1]
    count = xp.maximum(m.sum(axis=1), 1e-9)                         # [B, 1]
    return (hidden * m).sum(axis=1) / count, (m, count)


def cls_pool_forward(xp, hidden):
    """The first token's state. hidden [B, T, H] -> [B, H]."""
    return hidden[:, 0], hidden.shape


def l2_normalize_forward(xp, x, eps=1e-12):
    """x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize."""
    norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))            # [B, 1]
    norm = xp.maximum(norm, eps)
    return x / norm, (x, norm)
