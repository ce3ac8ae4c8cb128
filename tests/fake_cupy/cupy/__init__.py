"""A strict stand-in for CuPy, backed by NumPy: minihbt's CUDA path runs on it without a GPU.

tests/conftest.py puts tests/fake_cupy first on sys.path (and PYTHONPATH) when MINIHBT_FAKE_CUPY=1,
so `import cupy` and `import cupyx` find these packages ahead of any real CuPy. The library
never imports this package by name; it imports `cupy`, and gets this.

Strict where CuPy is strict, so that code which would fail on a GPU fails here:
- device arrays are a type of their own (`ndarray`, holding a NumPy array); `np.asarray(x)`,
  `np.array(x)`, `np.float32(x)` on one raise TypeError, as CuPy's implicit conversion does;
  `.get()` and `cupy.asnumpy` copy to the host, `cupy.asarray` copies to the device;
- a NumPy array given to an operator, ufunc, routine or kernel raises TypeError, and so does
  host data assigned into a device array (NumPy index arrays are accepted, as CuPy does);
- `np.<ufunc>` / `np.<function>` on a device array runs this module's function of that name,
  or raises TypeError where it has none; reductions return 0-d device arrays;
- `cupy.empty` is filled with NaN (integers with 0x5A bytes), so a value never written shows;
- kernels (ElementwiseKernel, RawModule / RawKernel) check every launch against their
  signature: argument count, dtypes, C-contiguity of pointer arguments, the grid's bounds, and
  scalar types (a Python float for a `float` parameter is a bug: CuPy passes it as a double);
  they compute with the NumPy reference each minihbt kernel has (_kernels.KERNELS) and
  write the rows the grid covers, nothing else;
- `add.at`, atomic on a GPU, adds in a shuffled order, different on every call, so that a
  result depending on the order of atomic adds shows;
- NCCL (cupy.cuda.nccl): ranks are threads of one process; bytes move between live arrays of
  this module, each pointer range checked (see cuda.py);
- anything else raises AttributeError or TypeError saying it is "not in the stand-in".

What it cannot show: the numerics of the CUDA kernel bodies (they are compiled by NVRTC in
tests/test_kernels.py, never run here), TF32 (GEMMs are NumPy's), memory at real sizes, speed.

The surface (the names minihbt, its programs, benchmarks/gpu_check*.py and the tests use):
    module: ndarray, asarray, array, asnumpy, ascontiguousarray, empty, empty_like, zeros,
      zeros_like, ones, full, arange, concatenate, stack, where, broadcast_to, cumsum,
      flatnonzero, argsort, argpartition, take_along_axis, unique, matmul, allclose,
      array_equal, finfo, iinfo, dtype, the dtypes, inf, nan, pi, newaxis, get_array_module,
      get_default_memory_pool, ElementwiseKernel, RawModule, RawKernel, __version__
    ufuncs (with out=, dtype=): add (and add.at), subtract, multiply, divide, true_divide,
      power, negative, exp, log, sqrt, tanh, abs, absolute, maximum, minimum, equal,
      not_equal, less, less_equal, greater, greater_equal, logical_and, logical_or,
      logical_not, bitwise_and, bitwise_or, bitwise_xor, invert, left_shift, right_shift, sign,
      isfinite, isnan
    ndarray: shape, dtype, ndim, size, nbytes, itemsize, strides, T, flags, data.ptr, get,
      set, copy, astype, reshape, transpose, swapaxes, ravel, flatten, squeeze, view, fill,
      sum, mean, max, min, prod, any, all, argmax, argmin, std, var, cumsum, clip, dot,
      nonzero, take, repeat, sort, argsort, round, tolist, item, indexing, the operators
    cupy.cuda: runtime (getDeviceCount, deviceSynchronize, getDeviceProperties), Device,
      Stream, get_current_stream, nccl (NcclCommunicator with allGather, allReduce(SUM),
      destroy; get_unique_id, the NCCL_* types and NCCL_SUM, available)
    cupy._core._routines_linalg: COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32, set_compute_type,
      get_compute_type;  cupyx.scipy.special: erf
"""
import sys
import weakref

import numpy as np

from . import _core, cuda  # noqa: F401  (cupy._core, cupy.cuda as CuPy has them)

__version__ = "13.0.0+stand-in"
STAND_IN = True                      # tests ask `getattr(cupy, "STAND_IN", False)`

float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
bool_, dtype, finfo, iinfo = np.bool_, np.dtype, np.finfo, np.iinfo
inf, nan, pi, newaxis = np.inf, np.nan, np.pi, None

_SCALARS = (bool, int, float, complex, np.generic)
_LIVE = weakref.WeakValueDictionary()          # address -> the NumPy buffer behind device arrays


def not_in_stand_in(what):
    return f"{what} is not in the stand-in (tests/fake_cupy/cupy): add it there if minihbt needs it"


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _is_live(ptr, nbytes):
    """Whether [ptr, ptr + nbytes) lies inside one live device buffer."""
    for address, buf in list(_LIVE.items()):
        if address <= ptr and ptr + nbytes <= address + buf.nbytes:
            return True
    return False


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class _Flags:
    def __init__(self, a):
        self.c_contiguous, self.f_contiguous = a.flags.c_contiguous, a.flags.f_contiguous


class ndarray:
    """A device array: a NumPy array that refuses to be taken for one."""

    __array_priority__ = 100

    def __init__(self, a):
        if not isinstance(a, np.ndarray):
            raise TypeError(not_in_stand_in(f"cupy.ndarray over {type(a).__name__}"))
        self._a = a
        root = _root(a)
        if root.size:
            _LIVE[root.ctypes.data] = root

    # --- what CuPy refuses
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        own = _UFUNCS.get(ufunc.__name__)
        if own is None:
            raise TypeError(not_in_stand_in(f"numpy.{ufunc.__name__} on a device array"))
        if method == "__call__":
            return own(*inputs, **kwargs)
        if method == "at" and ufunc.__name__ == "add":
            return own.at(*inputs, **kwargs)
        raise TypeError(not_in_stand_in(f"numpy.{ufunc.__name__}.{method} on a device array"))

    def __array_function__(self, func, types, args, kwargs):
        own = globals().get(func.__name__)
        if own is None or not callable(own) or func.__name__.startswith("_"):
            raise TypeError(not_in_stand_in(f"numpy.{func.__name__} on a device array"))
        return own(*args, **kwargs)

    def __getattr__(self, name):
        raise AttributeError(not_in_stand_in(f"cupy.ndarray.{name}"))

    # --- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _Pointer(self._a.ctypes.data))
    T = property(lambda self: ndarray(self._a.T))

    # --- host <-> device, explicitly
    def get(self, stream=None, order="C", out=None):
        if out is not None:
            raise TypeError(not_in_stand_in("ndarray.get(out=)"))
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape:
            raise ValueError("ndarray.set takes a NumPy array of the same shape")
        self._a[...] = arr

    def tolist(self):
        return self._a.tolist()

    def item(self):
        return self._a.item()

    def __float__(self):
        return float(self._one("float()"))

    def __int__(self):
        return int(self._one("int()"))

    def __bool__(self):
        return bool(self._one("bool()"))

    def __complex__(self):
        return complex(self._one("complex()"))

    def _one(self, what):
        if self._a.size != 1:
            raise TypeError(f"{what} of a device array of size {self._a.size}: only size-1 arrays convert")
        return self._a.reshape(-1)[0]

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d device array")
        return (self[i] for i in range(len(self._a)))

    def __repr__(self):
        return "array(" + repr(self._a)[6:] if repr(self._a).startswith("array(") else f"array({self._a!r})"

    __str__ = lambda self: str(self._a)
    __hash__ = None

    # --- indexing
    def __getitem__(self, key):
        key = _index(key)
        out = self._a[key]
        if isinstance(out, np.generic):                       # CuPy gives a 0-d view, never a scalar
            out = self._a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
        return ndarray(out)

    def __setitem__(self, key, value):
        self._a[_index(key)] = _operand(value, "a value assigned into a device array")

    # --- methods
    def copy(self, order="C"):
        return ndarray(self._a.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return ndarray(self._a.astype(dtype, order=order, copy=copy))

    def reshape(self, *shape, order="C"):
        return ndarray(self._a.reshape(*shape, order=order))

    def view(self, dtype=None):
        return ndarray(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        self._a.fill(_operand(value, "ndarray.fill"))


def _forward(name):
    def method(self, *args, **kwargs):
        args = [_operand(a, f"ndarray.{name}") if isinstance(a, (ndarray, np.ndarray)) else a for a in args]
        kwargs = {k: _operand(v, f"ndarray.{name}") if isinstance(v, (ndarray, np.ndarray)) else v
                  for k, v in kwargs.items()}
        return _wrap(getattr(self._a, name)(*args, **kwargs))
    method.__name__ = name
    return method


for _name in ("transpose", "swapaxes", "ravel", "flatten", "squeeze", "sum", "mean", "max", "min", "prod",
              "any", "all", "argmax", "argmin", "std", "var", "cumsum", "clip", "dot", "nonzero", "take", "repeat",
              "sort", "argsort", "round"):
    setattr(ndarray, _name, _forward(_name))


def _operand(x, what):
    """The NumPy value behind a device array or scalar; TypeError for host arrays and the rest."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    if isinstance(x, np.ndarray):
        raise TypeError(f"a NumPy array given to {what}: CuPy takes device arrays only (cupy.asarray it first)")
    raise TypeError(not_in_stand_in(f"a {type(x).__name__} given to {what}"))


def _index(key):
    """An index for the NumPy array behind a device array: device and NumPy index arrays, ints,
    slices, None, Ellipsis and lists (CuPy copies host index arrays to the device itself)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, (np.ndarray, list, slice, int, np.integer, type(None), type(Ellipsis))):
        return key
    raise TypeError(not_in_stand_in(f"an index of type {type(key).__name__}"))


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):                             # a reduction's result: a 0-d device array
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


class ufunc:
    """A NumPy ufunc on device arrays and scalars only; out= must be a device array."""

    def __init__(self, name):
        self.__name__, self._f = name, getattr(np, name)

    def __call__(self, *inputs, out=None, dtype=None, **kwargs):
        if kwargs:
            raise TypeError(not_in_stand_in(f"cupy.{self.__name__}(..., {', '.join(kwargs)}=)"))
        args = [_operand(x, f"cupy.{self.__name__}") for x in inputs]
        if out is not None:
            if isinstance(out, tuple) and len(out) == 1:
                out = out[0]
            if not isinstance(out, ndarray):
                raise TypeError(f"cupy.{self.__name__}: out= must be a device array, not {type(out).__name__}")
            self._f(*args, out=out._a, dtype=dtype)
            return out
        return _wrap(self._f(*args, dtype=dtype) if dtype is not None else self._f(*args))

    def at(self, a, indices, values):
        """Atomic on a GPU: the updates are applied in a shuffled order, new on every call."""
        if self.__name__ != "add":
            raise TypeError(not_in_stand_in(f"cupy.{self.__name__}.at"))
        if not isinstance(a, ndarray) or not isinstance(indices, ndarray):
            raise TypeError("cupy.add.at takes a device array and device indices")
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise TypeError(not_in_stand_in("cupy.add.at with other than a 1-D integer index array"))
        idx = indices._a
        vals = np.broadcast_to(_operand(values, "cupy.add.at"), (len(idx),) + a.shape[1:])
        order = np.random.default_rng().permutation(len(idx))
        np.add.at(a._a, idx[order], vals[order])

    def __getattr__(self, name):
        raise AttributeError(not_in_stand_in(f"cupy.{self.__name__}.{name}"))


_UFUNCS = {name: ufunc(name) for name in (
    "add", "subtract", "multiply", "divide", "true_divide", "power", "negative", "exp", "log", "sqrt", "tanh",
    "abs", "absolute", "maximum", "minimum", "equal", "not_equal", "less", "less_equal", "greater",
    "greater_equal", "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor",
    "invert", "left_shift", "right_shift", "sign", "isfinite", "isnan")}
_UFUNCS["absolute"] = _UFUNCS["abs"] = ufunc("absolute")
globals().update(_UFUNCS)


def _operator(name, reflected=False, inplace=False):
    f = _UFUNCS[name]

    def op(self, other):
        if isinstance(other, np.ndarray):
            raise TypeError(f"a NumPy array given to a device array's operator ({name}): cupy.asarray it first")
        if not isinstance(other, (ndarray,) + _SCALARS):
            return NotImplemented
        if inplace:
            return f(self, other, out=self)
        return f(other, self) if reflected else f(self, other)
    return op


for _op, _name in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
                   ("pow", "power"), ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"),
                   ("lshift", "left_shift"), ("rshift", "right_shift")):
    setattr(ndarray, f"__{_op}__", _operator(_name))
    setattr(ndarray, f"__r{_op}__", _operator(_name, reflected=True))
    setattr(ndarray, f"__i{_op}__", _operator(_name, inplace=True))
for _op, _name in (("eq", "equal"), ("ne", "not_equal"), ("lt", "less"), ("le", "less_equal"), ("gt", "greater"),
                   ("ge", "greater_equal")):
    setattr(ndarray, f"__{_op}__", _operator(_name))
ndarray.__neg__ = lambda self: negative(self)          # noqa: F821 (from _UFUNCS)
ndarray.__invert__ = lambda self: invert(self)         # noqa: F821
ndarray.__abs__ = lambda self: absolute(self)          # noqa: F821
ndarray.__pos__ = lambda self: self.copy()


def _matmul(a, b, what="matmul"):
    return _wrap(np.matmul(_operand(a, what), _operand(b, what)))


ndarray.__matmul__ = lambda self, other: _matmul(self, other, "the @ operator")
ndarray.__rmatmul__ = lambda self, other: _matmul(other, self, "the @ operator")
matmul = _matmul


# ----------------------------------------------------------------------------- routines

def asarray(a, dtype=None, order=None):
    """Device arrays as they are (cast where dtype differs); host data copied to the device."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, (list, tuple)) and any(isinstance(x, ndarray) for x in a):
        raise TypeError(not_in_stand_in("cupy.asarray of a list holding device arrays"))
    return ndarray(np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(np.array(a._a, dtype=dtype, copy=True, order=order))
    return asarray(a, dtype=dtype)


def asnumpy(a, stream=None, order="C", out=None):
    return a.get(order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


def ascontiguousarray(a, dtype=None):
    return ndarray(np.ascontiguousarray(_array(a, "cupy.ascontiguousarray"), dtype=dtype))


def _array(a, what):
    if not isinstance(a, ndarray):
        raise TypeError(f"{what} takes a device array, not {type(a).__name__}"
                        + (" (a NumPy array: cupy.asarray it first)" if isinstance(a, np.ndarray) else ""))
    return a._a


def _garbage(shape, dtype):
    """What uninitialised device memory is taken to hold: NaN, or 0x5A bytes for integers."""
    out = np.empty(shape, dtype=dtype)
    if out.dtype.kind in "fc":
        out.fill(np.nan)
    else:
        out.view(np.uint8).fill(0x5A)
    return out


def empty(shape, dtype=float, order="C"):
    return ndarray(_garbage(shape, dtype))


def empty_like(a, dtype=None, shape=None):
    src = _array(a, "cupy.empty_like")
    return ndarray(_garbage(src.shape if shape is None else shape, src.dtype if dtype is None else dtype))


def zeros(shape, dtype=float, order="C"):
    return ndarray(np.zeros(shape, dtype=dtype, order=order))


def zeros_like(a, dtype=None):
    return ndarray(np.zeros_like(_array(a, "cupy.zeros_like"), dtype=dtype))


def ones(shape, dtype=float):
    return ndarray(np.ones(shape, dtype=dtype))


def full(shape, fill_value, dtype=None):
    return ndarray(np.full(shape, _operand(fill_value, "cupy.full"), dtype=dtype))


def arange(*args, dtype=None):
    if any(not isinstance(a, (int, float, np.integer, np.floating)) for a in args):
        raise TypeError("cupy.arange takes Python or NumPy scalars")
    return ndarray(np.arange(*args, dtype=dtype))


def concatenate(arrays, axis=0, out=None, dtype=None):
    if out is not None:
        raise TypeError(not_in_stand_in("cupy.concatenate(out=)"))
    return ndarray(np.concatenate([_array(a, "cupy.concatenate") for a in arrays], axis=axis, dtype=dtype))


def stack(arrays, axis=0):
    return ndarray(np.stack([_array(a, "cupy.stack") for a in arrays], axis=axis))


def where(condition, x=None, y=None):
    if x is None and y is None:
        return _wrap(np.nonzero(_array(condition, "cupy.where's condition")))
    return ndarray(np.where(_array(condition, "cupy.where's condition"), _operand(x, "cupy.where"),
                            _operand(y, "cupy.where")))


def broadcast_to(a, shape):
    return ndarray(np.broadcast_to(_array(a, "cupy.broadcast_to"), shape))


def cumsum(a, axis=None, dtype=None):
    return ndarray(np.cumsum(_array(a, "cupy.cumsum"), axis=axis, dtype=dtype))


def flatnonzero(a):
    return ndarray(np.flatnonzero(_array(a, "cupy.flatnonzero")))


def argsort(a, axis=-1, kind=None):
    return ndarray(np.argsort(_array(a, "cupy.argsort"), axis=axis, kind="stable"))


def argpartition(a, kth, axis=-1):
    return ndarray(np.argpartition(_array(a, "cupy.argpartition"), kth, axis=axis))


def take_along_axis(a, indices, axis):
    return ndarray(np.take_along_axis(_array(a, "cupy.take_along_axis"),
                                      _array(indices, "cupy.take_along_axis's indices"), axis))


def unique(a, return_inverse=False, return_counts=False):
    return _wrap(np.unique(_array(a, "cupy.unique"), return_inverse=return_inverse, return_counts=return_counts))


def allclose(a, b, rtol=1e-05, atol=1e-08):
    return ndarray(np.asarray(np.allclose(_array(a, "cupy.allclose"), _array(b, "cupy.allclose"), rtol, atol)))


def array_equal(a, b):
    return ndarray(np.asarray(np.array_equal(_array(a, "cupy.array_equal"), _array(b, "cupy.array_equal"))))


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


class _MemoryPool:
    """The bytes of live device buffers (CuPy's pool also keeps freed blocks; this one cannot)."""

    def used_bytes(self):
        return sum(buf.nbytes for buf in list(_LIVE.values()))

    total_bytes = used_bytes

    def free_all_blocks(self):
        pass

    def __getattr__(self, name):
        raise AttributeError(not_in_stand_in(f"MemoryPool.{name}"))


_POOL = _MemoryPool()


def get_default_memory_pool():
    return _POOL


# ----------------------------------------------------------------------------- kernels

from ._kernels import ElementwiseKernel, RawKernel, RawModule  # noqa: E402,F401  (they use the above)


def __getattr__(name):
    raise AttributeError(not_in_stand_in(f"cupy.{name}"))

