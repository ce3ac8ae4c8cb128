"""The one place that decides the array module `xp` (NumPy or CuPy) and the compute dtype.

Every other module receives `xp` from here (through the model object) and never asks
"am I on a GPU?" itself. Data crosses to the host only at the edges: `to_numpy`.
"""
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


def erf(xp, x):
    """Element-wise error function for numpy (scipy.special) or cupy (cupyx.scipy.special)."""
    if xp is np:
        from scipy.special import erf as _erf
    else:
        from cupyx.scipy.special import erf as _erf
    return _erf(x)
