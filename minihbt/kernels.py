"""Fused GPU kernels, each beside the NumPy reference it must reproduce.

Every function here takes `xp` and computes exactly what its reference computes. On the
CPU, and on the GPU unless fused kernels are switched on, the reference runs: it is the
composition of the plain operations of `layers.py` / `optim.py`, so NumPy results do not
depend on this module at all. With CuPy and fused kernels on (`set_fused(True)` or the
environment variable MINIHBT_FUSED=1) and float32 arrays, one kernel launch replaces
several element-wise passes:

    bias_gelu        x = y + b; cdf = Phi(x); out = x * cdf        (ElementwiseKernel)
    gelu_grad        dx = dy * (cdf + x * phi(x))                   (ElementwiseKernel)
    add_layernorm    LayerNorm(x + residual), keeping xhat, rstd    (RawKernel, a block a row)
    layernorm_grad   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))   (RawKernel)
    scaled_masked_softmax   softmax(s * scale + mask_bias), in place           (RawKernel)
    softmax_grad     ds = p (dp - sum(dp p)), in place on dp                   (RawKernel)
    adamw            the whole AdamW update of one tensor                      (ElementwiseKernel)

Fused kernels are OFF by default: they have not yet been run on a GPU by this project (no
GPU was lent to the session that wrote them). `tests/test_kernels.py` compares each with
its reference under CuPy and is skipped where CuPy sees no GPU; switch them on by default
only once it passes there.
"""
import math
import os

_fused = os.environ.get("MINIHBT_FUSED", "0") == "1"
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def set_fused(enabled):
    """Use the fused CuPy kernels (True) or the reference operations (False) from now on."""
    global _fused
    _fused = bool(enabled)


def fused_enabled(xp, *arrays):
    """True where a fused kernel will run: CuPy arrays, kernels switched on, all float32."""
    return _fused and xp.__name__ == "cupy" and all(a.dtype == xp.float32 for a in arrays)


# ----------------------------------------------------------------------------- references
# The plain operations, written as layers.py / optim.py write them (same order of floating
# point operations, so on NumPy the results are bit-identical to the unfused model).

def bias_gelu_reference(xp, y, bias):
    from .layers import gelu_forward
    y += bias
    return gelu_forward(xp, y)


def gelu_grad_reference(xp, d_y, x, cdf):
    from .layers import gelu_backward
    return gelu_backward(xp, d_y, (x, cdf))


def add_layernorm_reference(xp, x, residual, gamma, beta, eps):
    from .layers import layernorm_forward
    x += residual
    return layernorm_forward(xp, x, gamma, beta, eps)


def layernorm_grad_reference(xp, d_y, xhat, rstd, gamma):
    d_xhat = d_y * gamma
    d_x = d_xhat - d_xhat.mean(axis=-1, keepdims=True)
    d_x -= xhat * (d_xhat * xhat).mean(axis=-1, keepdims=True)
    d_x *= rstd
    return d_x


def scaled_masked_softmax_reference(xp, scores, scale, mask_bias):
    from .layers import softmax_forward
    scores *= scores.dtype.type(scale)
    scores += mask_bias
    return softmax_forward(xp, scores)


def softmax_grad_reference(xp, d_probs, probs):
    from .layers import softmax_backward
    return softmax_backward(xp, d_probs, probs)


def adamw_reference(xp, p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size):
    from .optim import _adamw_update
    _adamw_update(p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size)


# ----------------------------------------------------------------------------- dispatch

def bias_gelu(xp, y, bias):
    """GELU(y + bias), y [..., F] owned (overwritten with y + bias), bias [F].
    Returns (out, (x, cdf)) with x = y + bias: the cache `layers.gelu_backward` takes."""
    if not fused_enabled(xp, y, bias):
        return bias_gelu_reference(xp, y, bias)
    cdf = xp.empty_like(y)
    out = xp.empty_like(y)
    _k("bias_gelu")(bias, y, cdf, out)
    return out, (y, cdf)


def gelu_grad(xp, d_y, x, cdf):
    """d/dx of x Phi(x), times d_y."""
    if not fused_enabled(xp, d_y, x, cdf):
        return gelu_grad_reference(xp, d_y, x, cdf)
    return _k("gelu_grad")(d_y, x, cdf)


def add_layernorm(xp, x, residual, gamma, beta, eps):
    """LayerNorm(x + residual) over the last axis; x is owned (overwritten).
    Returns (y, (xhat, rstd, gamma)): the cache `layers.layernorm_backward` takes."""
    if not fused_enabled(xp, x, residual, gamma, beta):
        return add_layernorm_reference(xp, x, residual, gamma, beta, eps)
    H = x.shape[-1]
    rows = x.size // H
    x, residual = xp.ascontiguousarray(x), xp.ascontiguousarray(residual)
    y = xp.empty_like(x)
    xhat = xp.empty_like(x)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    _raw("add_layernorm_fwd")((rows,), (_BLOCK,), (x, residual, gamma, beta, y, xhat, rstd,
                                                  xp.int32(H), xp.float32(eps)))
    return y, (xhat, rstd, gamma)


def layernorm_grad(xp, d_y, xhat, rstd, gamma):
    """The input gradient of y = xhat * gamma + beta (see layers.layernorm_backward)."""
    if not fused_enabled(xp, d_y, xhat, rstd, gamma):
        return layernorm_grad_reference(xp, d_y, xhat, rstd, gamma)
    H = xhat.shape[-1]
    d_y = xp.ascontiguousarray(d_y)
    d_x = xp.empty_like(xhat)
    _raw("layernorm_bwd")((xhat.size // H,), (_BLOCK,), (d_y, xhat, rstd, gamma, d_x, xp.int32(H)))
    return d_x


def scaled_masked_softmax(xp, scores, scale, mask_bias):
    """softmax(scores * scale + mask_bias) over the last axis, in place on `scores` [B, N, T, T]
    (owned, contiguous); mask_bias [B, 1, 1, T]."""
    if not fused_enabled(xp, scores, mask_bias) or not scores.flags.c_contiguous:
        return scaled_masked_softmax_reference(xp, scores, scale, mask_bias)
    B, N, T, S = scores.shape
    bias = xp.ascontiguousarray(mask_bias).reshape(B, S)
    _raw("scaled_masked_softmax")((B * N * T,), (_BLOCK,), (scores, bias, xp.int32(S), xp.int32(N * T),
                                                           xp.float32(scale)))
    return scores


def softmax_grad(xp, d_probs, probs):
    """p = softmax(s)  =>  ds = p (dp - sum_j dp_j p_j); d_probs is owned (overwritten)."""
    if not fused_enabled(xp, d_probs, probs) or not (d_probs.flags.c_contiguous and probs.flags.c_contiguous):
        return softmax_grad_reference(xp, d_probs, probs)
    S = probs.shape[-1]
    _raw("softmax_bwd")((probs.size // S,), (_BLOCK,), (d_probs, probs, xp.int32(S)))
    return d_probs


def adamw(xp, p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size):
    """One in-place AdamW update of p, m, v (see optim.py for the formula)."""
    if not fused_enabled(xp, p, g, m, v):
        return adamw_reference(xp, p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps,
                               step_size)
    _k("adamw")(g, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size, p, m, v)


# ----------------------------------------------------------------------------- CuPy kernels

_BLOCK = 256          # threads a row for the row kernels (a multiple of 32)
_cache = {}

_ELEMENTWISE = {
    # name: (in_params, out_params, operation); same operation order as the references
    "bias_gelu": ("T b", "T x, T cdf, T out",
                  f"x = x + b; cdf = erf(x * (T){_INV_SQRT2!r}); cdf = cdf + (T)1; cdf = cdf * (T)0.5; "
                  "out = x * cdf;"),
    "gelu_grad": ("T dy, T x, T cdf", "T dx",
                  f"T pdf = exp((T)-0.5 * x * x); pdf = pdf * (T){_INV_SQRT2PI!r}; pdf = pdf * x; "
                  "pdf = pdf + cdf; dx = dy * pdf;"),
    "adamw": ("T g, T decay, T omb1, T b2, T omb2, T ibc2, T eps, T step", "T p, T m, T v",
              "p = p * decay; m = m + (g - m) * omb1; v = v * b2 + (g * g) * omb2; "
              "T denom = sqrt(v) * ibc2 + eps; p = p - (m / denom) * step;"),
}

_ROW_SOURCE = r"""
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// Sum (is_max = false) or maximum (true) of v over the block; every thread gets the result.
__device__ float block_reduce(float v, bool is_max, float* buf) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();                                  // buf may still be read from a previous call
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < nwarps ? buf[lane] : (is_max ? NEG_INF : 0.f);
        w = is_max ? warp_max(w) : warp_sum(w);
        if (lane == 0) buf[32] = w;
    }
    __syncthreads();
    return buf[32];
}

extern "C" __global__ void add_layernorm_fwd(const float* x, const float* r, const float* gamma,
        const float* beta, float* y, float* xhat, float* rstd, int H, float eps) {
    __shared__ float buf[33];
    size_t off = (size_t)blockIdx.x * H;
    float s = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) { float a = x[off + i] + r[off + i]; xhat[off + i] = a; s += a; }
    float mean = block_reduce(s, false, buf) / H;
    float q = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) { float c = xhat[off + i] - mean; xhat[off + i] = c; q += c * c; }
    float rs = 1.f / sqrtf(block_reduce(q, false, buf) / H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float h = xhat[off + i] * rs;
        xhat[off + i] = h;
        y[off + i] = h * gamma[i] + beta[i];
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
}

extern "C" __global__ void layernorm_bwd(const float* dy, const float* xhat, const float* rstd,
        const float* gamma, float* dx, int H) {
    __shared__ float buf[33];
    size_t off = (size_t)blockIdx.x * H;
    float a = 0.f, b = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float d = dy[off + i] * gamma[i];
        a += d; b += d * xhat[off + i];
    }
    a = block_reduce(a, false, buf) / H;
    b = block_reduce(b, false, buf) / H;
    float rs = rstd[blockIdx.x];
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        dx[off + i] = (dy[off + i] * gamma[i] - a - xhat[off + i] * b) * rs;
}

extern "C" __global__ void scaled_masked_softmax(float* s, const float* bias, int S, int rows_per_batch,
        float scale) {
    __shared__ float buf[33];
    size_t row = blockIdx.x, off = row * S;
    const float* br = bias + (row / rows_per_batch) * S;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < S; i += blockDim.x) { float v = s[off + i] * scale + br[i]; s[off + i] = v; m = fmaxf(m, v); }
    m = block_reduce(m, true, buf);
    float z = 0.f;
    for (int i = threadIdx.x; i < S; i += blockDim.x) { float e = expf(s[off + i] - m); s[off + i] = e; z += e; }
    z = block_reduce(z, false, buf);
    for (int i = threadIdx.x; i < S; i += blockDim.x) s[off + i] = s[off + i] / z;
}

extern "C" __global__ void softmax_bwd(float* dp, const float* p, int S) {
    __shared__ float buf[33];
    size_t off = (size_t)blockIdx.x * S;
    float t = 0.f;
    for (int i = threadIdx.x; i < S; i += blockDim.x) t += dp[off + i] * p[off + i];
    t = block_reduce(t, false, buf);
    for (int i = threadIdx.x; i < S; i += blockDim.x) dp[off + i] = dp[off + i] * p[off + i] - p[off + i] * t;
}
"""


def _k(name):
    if name not in _cache:
        import cupy
        _cache[name] = cupy.ElementwiseKernel(*_ELEMENTWISE[name], name="minihbt_" + name)
    return _cache[name]


def _raw(name):
    if name not in _cache:
        import cupy
        module = _cache.get("_module")
        if module is None:
            module = _cache["_module"] = cupy.RawModule(code=_ROW_SOURCE)
        _cache[name] = module.get_function(name)
    return _cache[name]
