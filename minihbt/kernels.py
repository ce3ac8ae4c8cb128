"""Fused CuPy kernels: their CUDA sources and the functions that launch them.

`layers.py` owns the mathematics; `FUSED` below is layers with some operations served by a
kernel (the encoder takes it as its `ops` when the Backend's `fused` is on: CuPy, float32).
Each plain operation is the reference its kernel must reproduce (tests/test_kernels.py
compares them on a GPU). One launch replaces several element-wise passes:

    gelu             cdf = Phi(x); out = x * cdf                   (ElementwiseKernel)
    gelu_grad        dx = dy * (cdf + x * phi(x))                   (ElementwiseKernel)
    add_layernorm    LayerNorm(x + residual), keeping xhat, rstd    (RawKernel, a block a row)
    layernorm_grad   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))   (RawKernel)
    masked_softmax   softmax(s + mask_bias), in place                      (RawKernel)
    softmax_grad     ds = p (dp - sum(dp p)), in place on dp                   (RawKernel)
    adamw            the whole AdamW update of one tensor                      (ElementwiseKernel)

Every launcher takes and returns CuPy float32 arrays.
"""
import functools
import math
import types

from . import layers

try:
    import cupy
except Exception:            # the kernels exist only where CuPy does; nothing here runs without it
    cupy = None

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x):
    """GELU(x) -> (out, cdf), x [...]."""
    cdf = cupy.empty_like(x)
    out = cupy.empty_like(x)
    _elementwise("gelu")(x, cdf, out)
    return out, cdf


def gelu_grad(d_y, x, cdf):
    """d_y * d/dx (x Phi(x))."""
    return _elementwise("gelu_grad")(d_y, x, cdf)


def add_layernorm(x, residual, gamma, beta, eps):
    """LayerNorm(x + residual) over the last axis -> (y, xhat, rstd)."""
    H = x.shape[-1]
    x, residual = cupy.ascontiguousarray(x), cupy.ascontiguousarray(residual)
    y = cupy.empty_like(x)
    xhat = cupy.empty_like(x)
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    _raw("add_layernorm_fwd")((x.size // H,), (_BLOCK,), (x, residual, gamma, beta, y, xhat, rstd,
                                                       cupy.int32(H), cupy.float32(eps)))
    return y, xhat, rstd


def layernorm_grad(d_y, xhat, rstd, gamma):
    """The input gradient of y = xhat * gamma + beta (see layers.layernorm_backward)."""
    H = xhat.shape[-1]
    d_y = cupy.ascontiguousarray(d_y)
    d_x = cupy.empty_like(xhat)
    _raw("layernorm_bwd")((xhat.size // H,), (_BLOCK,), (d_y, xhat, rstd, gamma, d_x, cupy.int32(H)))
    return d_x


def masked_softmax(scores, mask_bias):
    """softmax(scores + mask_bias) over the last axis, in place on contiguous scores [B, N, T, S]
    (already scaled: layers.attention_forward scales q); mask_bias [B, 1, 1, S]."""
    B, N, T, S = scores.shape
    bias = cupy.ascontiguousarray(mask_bias).reshape(B, S)
    _raw("masked_softmax")((B * N * T,), (_BLOCK,), (scores, bias, cupy.int32(S), cupy.int32(N * T)))
    return scores


def softmax_grad(d_probs, probs):
    """ds = p (dp - sum_j dp_j p_j), in place on contiguous d_probs."""
    S = probs.shape[-1]
    _raw("softmax_bwd")((probs.size // S,), (_BLOCK,), (d_probs, probs, cupy.int32(S)))
    return d_probs


def adamw(p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size):
    """One in-place AdamW update of p, m, v (the formula of step.adamw_update)."""
    _elementwise("adamw")(g, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size, p, m, v)


# ----------------------------------------------------------------------------- CuPy kernels

_BLOCK = 256          # threads a row for the row kernels (a multiple of 32)
_cache = {}

_ELEMENTWISE = {
    # name: (in_params, out_params, operation); same operation order as the references
    "gelu": ("T x", "T cdf, T out",
             f"cdf = erf(x * (T){_INV_SQRT2!r}); cdf = cdf + (T)1; cdf = cdf * (T)0.5; out = x * cdf;"),
    "gelu_grad": ("T dy, T x, T cdf", "T dx",
                  f"T pdf = exp((T)-0.5 * x * x); pdf = pdf * (T){_INV_SQRT2PI!r}; pdf = pdf * x; "
                  "pdf = pdf + cdf; dx = dy * pdf;"),
    "adamw": ("T g, T decay, T one_minus_b1, T b2, T one_minus_b2, T inv_bc2_sqrt, T eps, T step_size",
              "T p, T m, T v",
              "p = p * decay; m = m + (g - m) * one_minus_b1; v = v * b2 + (g * g) * one_minus_b2; "
              "T denom = sqrt(v) * inv_bc2_sqrt + eps; p = p - (m / denom) * step_size;"),
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

extern "C" __global__ void masked_softmax(float* s, const float* bias, int S, int rows_per_batch) {
    __shared__ float buf[33];
    size_t row = blockIdx.x, off = row * S;
    const float* br = bias + (row / rows_per_batch) * S;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < S; i += blockDim.x) { float v = s[off + i] + br[i]; s[off + i] = v; m = fmaxf(m, v); }
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


def _elementwise(name):
    if name not in _cache:
        _cache[name] = cupy.ElementwiseKernel(*_ELEMENTWISE[name], name="minihbt_" + name)
    return _cache[name]


def _raw(name):
    if name not in _cache:
        module = _cache.get("_module")
        if module is None:
            module = _cache["_module"] = cupy.RawModule(code=_ROW_SOURCE)
        _cache[name] = module.get_function(name)
    return _cache[name]


# ----------------------------------------------------------------------------- the fused ops


def _add_layernorm_forward(be, x, residual, gamma, beta, eps):
    y, xhat, rstd = add_layernorm(x, residual, gamma, beta, eps)
    return y, (xhat, rstd, gamma)


def _layernorm_backward(be, d_y, cache):
    xhat, rstd, gamma = cache
    H = xhat.shape[-1]
    d_gamma = (d_y * xhat).reshape(-1, H).sum(axis=0)
    d_beta = d_y.reshape(-1, H).sum(axis=0)
    return layernorm_grad(d_y, xhat, rstd, gamma), d_gamma, d_beta


def _gelu_forward(be, x):
    out, cdf = gelu(cupy.ascontiguousarray(x))
    return out, (x, cdf)


def _gelu_backward(be, d_y, cache):
    x, cdf = cache
    return gelu_grad(d_y, x, cdf)


def _softmax(be, scores, mask_bias):
    return masked_softmax(cupy.ascontiguousarray(scores), mask_bias)


def _softmax_grad(be, d_probs, probs):
    return softmax_grad(cupy.ascontiguousarray(d_probs), probs)


FUSED = types.SimpleNamespace(**{name: getattr(layers, name) for name in dir(layers) if not name.startswith("_")})
FUSED.add_layernorm_forward = _add_layernorm_forward
FUSED.layernorm_backward = _layernorm_backward
FUSED.gelu_forward = _gelu_forward
FUSED.gelu_backward = _gelu_backward
FUSED.attention_forward = functools.partial(layers.attention_forward, softmax=_softmax)
FUSED.attention_backward = functools.partial(layers.attention_backward, softmax_grad=_softmax_grad)


def ops_for(be):
    """The encoder's operations on this Backend: FUSED where its `fused` is on, else layers."""
    return FUSED if be.fused else layers
