"""The one place that decides NumPy or CuPy: a `Backend` built once per model.

A Backend holds the array module `xp`, the compute dtype and the GPU switches (TF32 GEMMs,
fused kernels). Every other module receives it (`model.backend`, passed as `be`) and asks it
instead of testing the array module itself. Data crosses to the host only at the edges:
`to_numpy`. On the CPU, element-wise passes that NumPy runs on one core are spread over a
small thread pool (`be.map_chunks`): NumPy's ufuncs release the GIL. Independent pieces of
work (the length groups of a batch) run side by side on that pool, each on one thread with
BLAS on one thread (`be.map_ordered`): their results are those of a one-thread run, the same
bits whatever the number of threads.
"""
import collections
import contextlib
import math
import mmap
import os
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

try:                                  # optional: only device="cuda" needs it
    import cupy
    from cupyx.scipy.special import erf as _cupy_erf
    from cupy._core import _routines_linalg as _cupy_linalg
except Exception:                     # no CuPy (or a broken install): device="cuda" is refused with a clear error
    cupy = None

DTYPES = {"float32": np.float32, "float64": np.float64}
CHUNK = 1 << 16           # elements per chunk of a threaded element-wise pass (fits in L2 with its temporaries)


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
    """Array module, dtype and switches, decided once.

    device: "cpu" (NumPy) or "cuda"/"cuda:N" (CuPy; an error if no GPU is usable, never a
        silent fallback). dtype: "float32" or "float64". tf32: float32 GEMMs on TF32 tensor
        cores (CuPy only; ~1e-3 relative error). cuBLAS keeps this per process: True or False
        sets it, None leaves it as the last Backend set it. fused: the fused CuPy kernels of
        kernels.py for float32 on CuPy. threads: the CPU thread pool's size, for element-wise
        passes and for the length groups that map_ordered runs side by side (default: as many
        as BLAS uses, which follows OMP_NUM_THREADS / OPENBLAS_NUM_THREADS and the CPU affinity).
    """

    def __init__(self, device="cpu", dtype="float32", tf32=False, fused=False, threads=None):
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
        self.threads = threads or blas_threads()
        self._pool, self._pool_size = None, 0
        self._local = threading.local()          # .serial: this thread runs one piece of map_ordered
        self._blas = None if self.is_cuda else ThreadpoolController().select(user_api="blas")

    def __repr__(self):
        return (f"Backend({self.device!r}, {self.dtype.name}" + (", tf32" if self.tf32 else "")
                + (", fused" if self.fused else "") + ")")

    def asarray(self, x, dtype=None):
        return self.xp.asarray(x, dtype=dtype)

    def map_chunks(self, fn, n, chunk=CHUNK):
        """Call fn(start, stop) over [0, n) in chunks of `chunk`, across the CPU's thread pool
        (chunking also keeps a multi-pass formula in cache between its passes); on CuPy,
        fn(0, n) once: one launch per operation is what a GPU wants."""
        if self.is_cuda:
            fn(0, n)
            return
        ranges = [(s, min(s + chunk, n)) for s in range(0, n, max(1, chunk))]
        if self._serial() or len(ranges) <= 1:
            for s, e in ranges:
                fn(s, e)
            return
        for _ in self._executor().map(lambda r: fn(*r), ranges):
            pass

    @contextlib.contextmanager
    def blas_serial(self):
        """BLAS on one thread inside the block: for many small products that the thread pool
        runs side by side (a multi-threaded BLAS on each tiny GEMM only adds wake-ups, and
        collapses when other processes hold the cores)."""
        if self._blas is None or getattr(self._local, "serial", False):
            yield                                    # a map_ordered piece: BLAS is on one thread already
            return
        with self._blas.limit(limits=1):
            yield

    def map_ordered(self, fn, items, then, order=None, window=None):
        """then(fn(item)) for each item, in order; `then` runs in the calling thread.

        With several items on a multi-threaded CPU, fn runs on the thread pool, the items side
        by side, each on one thread (its element-wise passes serial). They start in `order` (a
        permutation of the items' indices, e.g. the costliest first, so that no thread idles at
        the end while another finishes a long one; default: item order), and at most `window`
        of them are started and not yet handed to `then`: a result that finishes before an
        earlier item's waits for it, so the window bounds the memory in flight. The window
        defaults to threads + 1 in item order and to all the items with an `order` (for results
        that are kept anyway, like a forward pass's caches); an order that would have to start
        an item beyond the window before `then` can take it is refused. Otherwise (one item, one
        thread, or CuPy) the items run one after another in the calling thread, in item order.
        Either way BLAS is held to one thread on the CPU, so every result, and whatever `then`
        accumulates, is bit for bit what a one-thread run computes, for any number of threads (a
        single item's products then use one core: the price of that guarantee)."""
        items = list(items)
        if window is None:
            window = self.threads + 1 if order is None else max(1, len(items))
        order = list(range(len(items))) if order is None else list(order)
        _check_order(order, len(items), window)
        with self.blas_serial():
            if not self.parallel(len(items)):
                for it in items:
                    then(fn(it))
                return
            pool, run, pending = self._executor(), self._one_thread(fn), {}
            ahead = collections.deque(order)
            try:
                for k in range(len(items)):
                    while ahead and len(pending) < window:
                        j = ahead.popleft()
                        pending[j] = pool.submit(run, items[j])
                    result = pending[k].result()
                    del pending[k]                  # done: an interrupt while waiting leaves it to the wait below
                    then(result)
            finally:                        # an error or Ctrl-C: no piece left running once BLAS is restored
                for f in pending.values():
                    f.cancel()
                futures.wait(pending.values())

    def parallel(self, n_items):
        """Whether map_ordered runs `n_items` items side by side (else one after another)."""
        return not self.is_cuda and not self._serial() and n_items > 1

    def _one_thread(self, fn):
        def run(item):
            self._local.serial = True
            try:
                return fn(item)
            finally:
                self._local.serial = False
        return run

    def _serial(self):
        return self.threads == 1 or getattr(self._local, "serial", False)

    def map_rows(self, fn, rows, row_size):
        """map_chunks over the leading axis of an array of `rows` rows of `row_size` elements."""
        self.map_chunks(fn, rows, max(1, CHUNK // max(1, row_size)))

    def map_tasks(self, fn, items):
        """Call fn(item) for each item; on the CPU across the thread pool (NumPy releases the GIL)."""
        items = list(items)
        if self.is_cuda or self._serial() or len(items) <= 1:
            for it in items:
                fn(it)
            return
        for _ in self._executor().map(fn, items):
            pass

    def _executor(self):
        if self._pool is None or self._pool_size != self.threads:      # `threads` may be changed after use
            self._pool, self._pool_size = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="minihbt"), \
                self.threads
        return self._pool

    def elementwise(self, fn, *arrays, out_dtype=None):
        """out = fn(*arrays) for same-shaped arrays, chunked over the CPU's cores (one call on CuPy)."""
        if self.is_cuda:
            return fn(*arrays)
        flats = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
        out = np.empty(flats[0].shape, dtype=out_dtype or arrays[0].dtype)

        def work(s, e):
            out[s:e] = fn(*(f[s:e] for f in flats))
        self.map_chunks(work, out.size)
        return out.reshape(arrays[0].shape)

    def erf(self, x, threaded=True):
        """Element-wise error function. CuPy: cupyx.scipy.special.erf. NumPy float64: math.erf
        element by element (exact; float64 is for verification). NumPy float32: the Eigen/XLA
        rational approximation (max abs error 5e-7), chunked over all cores if `threaded`."""
        if self.is_cuda:
            return _cupy_erf(x)
        if x.dtype != np.float32:
            return _erf_exact(x)
        return self.elementwise(_erf_f32, x) if threaded else _erf_f32(x)


def _check_order(order, n, window):
    """A ValueError unless `order` is a permutation of range(n) whose every item starts within
    `window` items started and not yet handed over (map_ordered's loop, run without work)."""
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}), got {order!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    ahead, started = collections.deque(order), set()
    for k in range(n):
        while ahead and len(started) < window:
            started.add(ahead.popleft())
        if k not in started:
            raise ValueError(f"order {order!r} would start item {k} beyond a window of {window}")
        started.remove(k)


TABLE_ROWS = 10_000         # a 2-D tensor of at least this many rows is a vocabulary table (sparse gradients)


def lazy_zeros(shape, dtype):
    """np.zeros(shape, dtype) in an anonymous private mapping of ordinary 4 KiB pages, which
    cost nothing until written: for a vocabulary table's gradient, of which a batch writes a
    few thousand rows. (NumPy asks the kernel for transparent huge pages on large arrays: every
    2 MiB page a row lands in is then zeroed whole, after the kernel may have compacted memory to
    find it.) np.zeros where mmap has no such mapping (Windows)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if not size or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype)
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)            # where huge pages are the default for every mapping
    return np.frombuffer(pages, dtype=dtype).reshape(shape)


def _tf32_on():
    """Whether cuBLAS currently runs float32 GEMMs on TF32 (False where CuPy cannot say)."""
    get = getattr(_cupy_linalg, "get_compute_type", None)
    return get is not None and get(np.float32) == _cupy_linalg.COMPUTE_TYPE_TF32


def blas_threads():
    """Threads NumPy's BLAS runs matrix products on (the same setting sizes our thread pool)."""
    return _threads(_blas_pool())


def blas_info():
    """{"library", "version", "architecture", "threads"} of NumPy's BLAS: float32 results
    depend on them at rounding level (a run reproduces bit for bit only under the same)."""
    info = _blas_pool()
    return {"library": info.get("internal_api"), "version": info.get("version"),
            "architecture": info.get("architecture"), "threads": _threads(info)}


def _blas_pool():
    """threadpoolctl's record of the first BLAS library loaded ({} if none)."""
    return next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})


def _threads(info):
    if "num_threads" in info:
        return max(1, info["num_threads"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
