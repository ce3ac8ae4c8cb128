"""NumPy or CuPy, decided once: a `Backend` holds the device, the compute dtype and the array
module `xp` (numpy or cupy), and every other module asks it instead of testing the array module
itself. Data crosses to the host only at the edges (`to_numpy`). It also holds erf, which NumPy
lacks. How work is spread over CPU threads is parallel.py's business, not this module's.
"""
import math

import numpy as np

try:                                  # optional: only device="cuda" needs it
    import cupy
    from cupyx.scipy.special import erf as _cupy_erf
    from cupy._core import _routines_linalg as _cupy_linalg
except Exception:                     # no CuPy (or a broken install): device="cuda" is refused with a clear error
    cupy = None

DTYPES = {"float32": np.float32, "float64": np.float64}
ERF_CHUNK = 1 << 15       # float32 erf runs on chunks of this many elements (128 KB: in a core's L2 cache)


class DeviceError(RuntimeError):
    """The requested device cannot be used (e.g. cuda without CuPy or without a GPU)."""


def get_dtype(dtype):
    """Map 'float32'/'float64' (or the numpy type) to a numpy dtype; anything else is an error."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported compute dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[name])


def _cuda_module(device):
    """CuPy, checked to see a GPU (and switched to device 'cuda:N' if named)."""
    if cupy is None:
        raise DeviceError(f"device={device!r} needs CuPy, which is not installed. Install the build matching "
                          "your CUDA, e.g. `pip install cupy-cuda12x`, or use device='cpu'.")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cudaErrorNoDevice, driver missing, ...
        raise DeviceError(f"device={device!r}: CuPy is installed but no usable GPU was found ({e}).") from None
    if n == 0:
        raise DeviceError(f"device={device!r}: CuPy is installed but sees no GPU.")
    if ":" in str(device):
        cupy.cuda.Device(int(str(device).split(":")[1])).use()
    return cupy


class Backend:
    """Array module, dtype and GPU switches, decided once.

    device: "cpu" (NumPy) or "cuda"/"cuda:N" (CuPy; an error if no GPU is usable, never a
        silent fallback). dtype: "float32" or "float64". tf32: float32 GEMMs on TF32 tensor
        cores (CuPy only; ~1e-3 relative error). cuBLAS keeps this per process: True or False
        sets it, None leaves it as the last Backend set it. fused: the fused CuPy kernels of
        kernels.py serve the encoder's ops (CuPy and float32 only; see kernels.FUSED).
    """

    def __init__(self, device="cpu", dtype="float32", tf32=False, fused=False):
        self.device = str(device)
        if self.device == "cpu":
            self.xp = np
        elif self.device in ("cuda", "gpu") or self.device.startswith("cuda:"):
            self.xp = _cuda_module(self.device)
        else:
            raise DeviceError(f"unknown device {device!r}: use 'cpu' or 'cuda'.")
        self.is_cuda = self.xp is not np
        self.dtype = get_dtype(dtype)
        if self.is_cuda and tf32 is not None:
            mode = _cupy_linalg.COMPUTE_TYPE_TF32 if tf32 else _cupy_linalg.COMPUTE_TYPE_DEFAULT
            _cupy_linalg.set_compute_type(np.float32, mode)       # CuPy's own switch (cuBLAS compute type)
        self.tf32 = self.is_cuda and (bool(tf32) if tf32 is not None else _tf32_on())
        self.fused = bool(fused) and self.is_cuda and self.dtype == np.float32

    def __repr__(self):
        return (f"Backend({self.device!r}, {self.dtype.name}" + (", tf32" if self.tf32 else "")
                + (", fused" if self.fused else "") + ")")

    def asarray(self, x, dtype=None):
        return self.xp.asarray(x, dtype=dtype)

    def erf(self, x):
        """Element-wise error function. CuPy: cupyx.scipy.special.erf. NumPy float64: math.erf
        element by element (exact; float64 is for verification). NumPy float32: the Eigen/XLA
        rational approximation (max abs error 5e-7)."""
        if self.is_cuda:
            return _cupy_erf(x)
        if x.dtype != np.float32:
            return _erf_exact(x)
        flat, out = np.ascontiguousarray(x).reshape(-1), np.empty(x.shape, np.float32)
        for start in range(0, flat.size, ERF_CHUNK):          # its dozen passes over a chunk stay in cache
            out.reshape(-1)[start:start + ERF_CHUNK] = _erf_f32(flat[start:start + ERF_CHUNK])
        return out


def _tf32_on():
    """Whether cuBLAS currently runs float32 GEMMs on TF32 (False where CuPy cannot say)."""
    get = getattr(_cupy_linalg, "get_compute_type", None)
    return get is not None and get(np.float32) == _cupy_linalg.COMPUTE_TYPE_TF32


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


_erf_exact = np.vectorize(math.erf, otypes=[np.float64])
