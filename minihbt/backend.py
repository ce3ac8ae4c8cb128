"""The one place that decides the array module `xp` (NumPy or CuPy) and the compute dtype.

Every other module receives `xp` from here (through the model object) and never asks
"am I on a GPU?" itself. Data crosses to the host only at the edges: `to_numpy`.
"""
import math
import os

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64}


class DeviceError(RuntimeError):
    """The requested device cannot be used (e.g. cuda without CuPy or without a GPU)."""


def get_xp(device="cpu"):
    """Return the array module for `device`: numpy for "cpu", cupy for "cuda".

    Asking for cuda where CuPy is missing or sees no GPU is an error, never a silent
    fallback to the CPU.
    """
    if device == "cpu":
        return np
    if device in ("cuda", "gpu") or str(device).startswith("cuda:"):
        try:
            import cupy
        except ImportError as e:
            raise DeviceError(
                f"device={device!r} needs CuPy, which is not importable ({e}). "
                "Install the build matching your CUDA, e.g. `pip install cupy-cuda12x`, "
                "or use device='cpu'.") from None
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # cudaErrorNoDevice, driver missing, ...
            raise DeviceError(f"device={device!r}: CuPy is installed but no usable GPU was found ({e}).") from None
        if n == 0:
            raise DeviceError(f"device={device!r}: CuPy is installed but sees no GPU.")
        if ":" in str(device):
            cupy.cuda.Device(int(str(device).split(":")[1])).use()
        return cupy
    raise DeviceError(f"unknown device {device!r}: use 'cpu' or 'cuda'.")


def get_dtype(dtype):
    """Map 'float32'/'float64' (or the numpy type) to a numpy dtype; anything else is an error."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported compute dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[name])


def to_numpy(x):
    """Bring an array to the host as numpy (a no-op for numpy arrays)."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    return get() if get is not None else np.asarray(x)


# float32 erf: the rational approximation Eigen and XLA use (erf(x) = x P(x^2) / Q(x^2) on
# [-4, 4], +-1 outside): max abs error 5e-7 against double-precision erf, a few float32 ulps.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)
_CHUNK = 1 << 17   # elements per chunk: small enough to stay in cache between passes
_pool = None


def _erf_f32(x):
    xc = np.clip(x, -4.0, 4.0)
    x2 = xc * xc
    p = x2 * np.float32(_ERF_P[0])          # Horner: p = ((c0 x2 + c1) x2 + c2) ...
    p += np.float32(_ERF_P[1])
    for c in _ERF_P[2:]:
        p *= x2
        p += np.float32(c)
    p *= xc
    q = x2 * np.float32(_ERF_Q[0])
    q += np.float32(_ERF_Q[1])
    for c in _ERF_Q[2:]:
        q *= x2
        q += np.float32(c)
    p /= q
    return p


def parallel_chunks(fn, n, chunk=_CHUNK):
    """Call fn(start, stop) over [0, n) in chunks of `chunk`, on all cores.

    NumPy's ufuncs release the GIL, so threads give real parallelism; chunking keeps a
    multi-pass formula in cache between its passes.
    """
    global _pool
    ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(ranges) <= 1 or (os.cpu_count() or 1) == 1:
        for s, e in ranges:
            fn(s, e)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="minihbt")
    for _ in _pool.map(lambda r: fn(*r), ranges):
        pass


def parallel_map(fn, x, out_dtype=None):
    """Apply an element-wise `fn` to numpy `x` in cache-sized chunks on all cores (new array)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, dtype=out_dtype or x.dtype)

    def work(s, e):
        out[s:e] = fn(flat[s:e])
    parallel_chunks(work, flat.size)
    return out.reshape(x.shape)


def erf(xp, x):
    """Element-wise error function.

    CuPy: cupyx.scipy.special.erf. NumPy float64: math.erf element by element (exact; float64
    is for verification, e.g. gradient checks). NumPy float32: the Eigen/XLA rational
    approximation above (max abs error 5e-7), chunked over all cores.
    """
    if xp is not np:
        from cupyx.scipy.special import erf as cupy_erf
        return cupy_erf(x)
    if x.dtype == np.float32:
        return parallel_map(_erf_f32, x)
    return _erf_exact(x)


_erf_exact = np.vectorize(math.erf, otypes=[np.float64])


def set_tf32(xp, enabled):
    """Let cuBLAS use TF32 tensor cores for float32 GEMMs (True) or not (False, the default:
    exact float32, as on the CPU). Only CuPy is affected; on NumPy this is a no-op.

    TF32 rounds GEMM inputs to 10 mantissa bits (products accumulate in float32): results
    move by about 1e-3 relative, beyond the float32 tolerances of the parity tests.
    The environment variable CUPY_TF32=1 set before CuPy's first GEMM has the same effect.
    """
    if xp is np:
        return
    from cupy._core import _routines_linalg as rl       # CuPy's own switch for this (cuBLAS compute type)
    rl.set_compute_type(np.float32, rl.COMPUTE_TYPE_TF32 if enabled else rl.COMPUTE_TYPE_DEFAULT)
