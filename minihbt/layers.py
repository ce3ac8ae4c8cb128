"""The encoder's operations as free functions: `x_forward(...) -> (out, cache)`.

`cache` holds exactly what the matching backward needs; inference simply drops it.
Every function takes the array module `xp` (numpy or cupy) so the same code runs on
CPU and GPU. Shapes: B batch, T tokens, H hidden, F FFN width, N heads, D = H / N.
"""
import math

from . import kernels as K
from .backend import erf


def embedding_forward(xp, table, ids):
    """Row gather. table [V, H], ids [B, T] -> [B, T, H]."""
    out = table[ids]                                     # [B, T, H]
    return out, (ids, table.shape)


def embedding_backward(xp, d_out, cache, d_table=None):
    """out[b, t] = table[ids[b, t]], so d_table[v] = sum of d_out[b, t] over the (b, t) with
    ids[b, t] == v: a scatter-add into the rows that were used (the rest stay 0).
    Pass `d_table` to add into an existing gradient instead of allocating [V, H] zeros."""
    ids, shape = cache
    if d_table is None:
        d_table = xp.zeros(shape, dtype=d_out.dtype)              # [V, H]
    xp.add.at(d_table, ids.reshape(-1), d_out.reshape(-1, shape[1]))
    return d_table


def linear_forward(xp, x, weight, bias):
    """y = x W^T + b as one 2-D GEMM. x [..., I], weight [O, I] (HF layout), bias [O] -> [..., O].
    With bias None the caller adds it (fused into the next operation, see kernels.bias_gelu)."""
    x2 = x.reshape(-1, x.shape[-1])                      # [M, I]
    y = x2 @ weight.T                                    # [M, O]
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x2, weight, x.shape)


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


class RowDropout:
    """Per-sequence dropout randomness: one random stream per text, seeded by the caller.

    The masks of a text depend only on its seed and its length, never on the batch it is in
    or on how far it is padded: for [B, T, H] activations row b draws [len_b, H] numbers, for
    [B, N, T, T] attention probabilities it draws [N, len_b, len_b]; padded positions are kept
    (they reach no output). So a text gets the same dropout whether it is embedded in one big
    batch or in a GradCache chunk, and a step can be replayed exactly.

    On NumPy each text has a numpy Generator. On CuPy the masks are made on the GPU, all
    texts at once, by a counter-based generator (`hash_uniform`): the uniform of element e
    of the c-th mask of a text with key k is fmix32(key(k, c) ^ e * golden) / 2^32, where e
    indexes the element within the text's own [len, H] or [N, len, len] block, so the same
    properties hold (and the NumPy form of the same formula is what tests check it against).
    """

    def __init__(self, seeds, lengths):
        import numpy as np
        self.seeds = seeds
        self.gens = [np.random.default_rng(s) for s in seeds]
        self.keys = None                                          # per-text hash keys, made at first use
        self.lengths = [int(n) for n in lengths]
        self.calls = 0

    def keep_mask(self, xp, shape, p, dtype):
        import numpy as np
        if xp is not np:
            return self.hash_keep_mask(xp, shape, p)
        keep = np.ones(shape, dtype=bool)
        for b, (g, n) in enumerate(zip(self.gens, self.lengths)):
            if len(shape) == 3:                                   # [B, T, H]
                keep[b, :n] = g.random((n, shape[2]), dtype=dtype) >= p
            else:                                                 # [B, N, T, T]
                keep[b, :, :n, :n] = g.random((shape[1], n, n), dtype=dtype) >= p
        return keep

    def hash_keep_mask(self, xp, shape, p):
        """The device-side masks (any xp): uniforms from `hash_uniform`, padding kept."""
        import numpy as np
        self.calls += 1
        if self.keys is None:
            self.keys = np.array([_text_key(s) for s in self.seeds], dtype=np.uint32)
        call_key = _fmix32(np.array([self.calls * 0x9E3779B9 & 0xFFFFFFFF], dtype=np.uint32))
        keys = xp.asarray(_fmix32(self.keys ^ call_key))
        lengths = xp.asarray(np.array(self.lengths))
        if len(shape) == 3:                                       # [B, T, H]: element t * H + h
            B, T, H = shape
            elem = (xp.arange(T, dtype=xp.uint32)[:, None] * xp.uint32(H) + xp.arange(H, dtype=xp.uint32))[None]
            keep = hash_uniform(xp, keys[:, None, None], elem) >= p
            keep |= xp.arange(T)[None, :, None] >= lengths[:, None, None]
        else:                                                     # [B, N, T, T]: element (n * 2048 + i) * 2048 + j
            B, N, T, _ = shape
            r = xp.arange(T, dtype=xp.uint32)
            elem = ((xp.arange(N, dtype=xp.uint32)[:, None, None] * xp.uint32(2048) + r[:, None]) * xp.uint32(2048)
                    + r)[None]
            keep = hash_uniform(xp, keys[:, None, None, None], elem) >= p
            pos = xp.arange(T)
            keep |= (pos[None, :, None] >= lengths[:, None, None])[:, None]
            keep |= (pos[None, None, :] >= lengths[:, None, None])[:, None]
        return keep


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on a uint32 array (any xp; products wrap mod 2^32)."""
    h = h ^ (h >> 16)
    h = h * h.dtype.type(0x85EBCA6B)
    h ^= h >> 13
    h *= h.dtype.type(0xC2B2AE35)
    return h ^ (h >> 16)


def _text_key(seed):
    import numpy as np
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


def hash_uniform(xp, key, elem):
    """Uniforms in [0, 1) (float32, 24 random bits) from uint32 keys and element indices
    (broadcast together): fmix32(key ^ elem * 0x9E3779B9) >> 8, times 2^-24."""
    h = _fmix32((elem * xp.uint32(0x9E3779B9)) ^ key)
    h >>= xp.uint32(8)
    u = h.astype(xp.float32)
    u *= xp.float32(2.0 ** -24)
    return u


def dropout_forward(xp, x, p, rng):
    """Inverted dropout: zero with probability p, scale the rest by 1/(1-p).

    `rng` is an explicit random state: a numpy/cupy Generator (one draw for the whole
    tensor) or a RowDropout (per-text streams). Re-creating the same state replays the same
    masks. With p == 0 or rng None it is the identity. The cache is the boolean keep-mask
    (1 byte an element) and the scale.
    """
    if not p or rng is None:
        return x, None
    if isinstance(rng, RowDropout):
        keep = rng.keep_mask(xp, x.shape, p, x.dtype)
    else:
        keep = rng.random(x.shape, dtype=x.dtype) >= p    # [...] bool
    y = x * keep
    y *= x.dtype.type(1.0 / (1.0 - p))
    return y, (keep, x.dtype.type(1.0 / (1.0 - p)))


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
    probs = K.scaled_masked_softmax(xp, scores, 1.0 / math.sqrt(D), mask_bias)   # softmax(s / sqrt D + mask)
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


# ----------------------------------------------------------------------------- backward
# Each `x_backward(xp, d_out, cache)` returns the gradient of the input(s) and, for layers
# with parameters, their gradients. `d_` names a gradient of the loss.

def linear_backward(xp, d_y, cache):
    """y = x W^T + b  =>  dx = dy W,  dW = dy^T x,  db = sum over rows of dy.
    d_y [..., O] -> (d_x [..., I], d_weight [O, I], d_bias [O])."""
    x2, weight, x_shape = cache
    d_y2 = d_y.reshape(-1, weight.shape[0])                        # [M, O]
    d_weight = d_y2.T @ x2                                         # [O, I]
    d_bias = d_y2.sum(axis=0)                                      # [O]
    d_x = (d_y2 @ weight).reshape(x_shape)                         # [..., I]
    return d_x, d_weight, d_bias


def layernorm_backward(xp, d_y, cache):
    """y = xhat * g + b, xhat = (x - mu) * rstd.
    dg = sum(dy * xhat), db = sum(dy) (over all but the last axis). With dxhat = dy * g and
    H features, differentiating mu and rstd through xhat gives
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    """
    xhat, rstd, gamma = cache
    H = xhat.shape[-1]
    d_gamma = (d_y * xhat).reshape(-1, H).sum(axis=0)              # [H]
    d_beta = d_y.reshape(-1, H).sum(axis=0)                        # [H]
    d_x = K.layernorm_grad(xp, d_y, xhat, rstd, gamma)            # [..., H], the formula above
    return d_x, d_gamma, d_beta


def gelu_backward(xp, d_y, cache):
    """y = x Phi(x)  =>  dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    x, cdf = cache
    pdf = xp.exp(-0.5 * x * x)
    pdf *= 1.0 / math.sqrt(2.0 * math.pi)
    pdf *= x
    pdf += cdf
    return d_y * pdf


def dropout_backward(xp, d_y, cache):
    """y = x * keep / (1 - p)  =>  dx = dy * keep / (1 - p)."""
    if cache is None:
        return d_y
    keep, scale = cache
    d_x = d_y * keep
    d_x *= scale
    return d_x


def softmax_backward(xp, d_probs, probs):
    """p = softmax(s) row-wise  =>  ds = p * (dp - sum_j(dp_j p_j)).
    Masked entries have p = 0 and so get no gradient."""
    d_s = d_probs * probs
    d_s -= probs * d_s.sum(axis=-1, keepdims=True)
    return d_s


def attention_backward(xp, d_ctx, cache):
    """Back through ctx = dropout(softmax(q k^T / sqrt(D) + mask)) v, per head.
    d_ctx [B, T, H] -> (d_q, d_k, d_v) each [B, T, H]."""
    qh, kh, vh, probs, drop, num_heads = cache
    B, N, T, D = qh.shape
    d_ctx = d_ctx.reshape(B, T, N, D).transpose(0, 2, 1, 3)       # [B, N, T, D]
    probs_d = dropout_backward(xp, probs, drop)                    # what multiplied v (dropout is linear)
    d_vh = probs_d.transpose(0, 1, 3, 2) @ d_ctx                   # [B, N, T, D]
    d_probs = d_ctx @ vh.transpose(0, 1, 3, 2)                     # [B, N, T, T]
    d_probs = dropout_backward(xp, d_probs, drop)
    d_scores = K.softmax_grad(xp, d_probs, probs)                  # [B, N, T, T], as softmax_backward
    d_scores *= qh.dtype.type(1.0 / math.sqrt(D))
    d_qh = d_scores @ kh                                           # [B, N, T, D]
    d_kh = d_scores.transpose(0, 1, 3, 2) @ qh                     # [B, N, T, D]

    def merge(t):                                                  # [B, N, T, D] -> [B, T, H]
        return t.transpose(0, 2, 1, 3).reshape(B, T, N * D)
    return merge(d_qh), merge(d_kh), merge(d_vh)


def mean_pool_backward(xp, d_out, cache, shape):
    """out = sum_t(h_t m_t) / count  =>  d_h[b, t] = d_out[b] * m[b, t] / count[b]."""
    m, count = cache
    return (d_out / count)[:, None, :] * m                         # [B, T, H]


def cls_pool_backward(xp, d_out, shape):
    """out = h[:, 0]  =>  d_h is d_out at position 0 and zero elsewhere."""
    d_h = xp.zeros(shape, dtype=d_out.dtype)                       # [B, T, H]
    d_h[:, 0] = d_out
    return d_h


def l2_normalize_backward(xp, d_y, cache):
    """y = x / n, n = max(||x||, eps). Where n = ||x||: dx = (dy - y (dy . y)) / n."""
    x, norm = cache
    y = x / norm
    d_x = d_y - y * (d_y * y).sum(axis=-1, keepdims=True)
    d_x /= norm
    return d_x
