"""The CPU thread pool: independent pieces of work (the length groups of a batch, the tensors
of an optimiser step) side by side, with the same bits as one thread.

The mathematics (layers.py, encoder.py, step.py) knows nothing of this module. Work is given
to the pool whole: each piece runs on one thread with BLAS held to one thread, and results are
handed back, and summed by the caller, in item order. So every result is bit for bit what a
one-thread run computes, for any number of threads (a single piece's products then use one
core: the price of that guarantee). NumPy releases the GIL in its ufuncs and BLAS calls, so
the pieces do run side by side. On CuPy everything runs one piece after another.
"""
import collections
import contextlib
import os
import threading
import weakref
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController, threadpool_info

_POOLS = weakref.WeakKeyDictionary()     # backend.Backend -> its Pool


def pool_for(backend):
    """The Pool the fast path of `backend` (each loaded model has its own) runs on, made on first use."""
    if backend not in _POOLS:
        _POOLS[backend] = Pool(cuda=backend.is_cuda)
    return _POOLS[backend]


class Pool:
    """A thread pool of `threads` threads (default: as many as BLAS uses, which follows
    OMP_NUM_THREADS / OPENBLAS_NUM_THREADS and the CPU affinity); `threads` may be changed."""

    def __init__(self, threads=None, cuda=False):
        self.threads = threads or blas_threads()
        self.cuda = cuda
        self._executor, self._size = None, 0
        self._local = threading.local()          # .serial: this thread runs one piece of map_ordered
        self._blas = None if cuda else ThreadpoolController().select(user_api="blas")

    @contextlib.contextmanager
    def blas_serial(self):
        """BLAS on one thread inside the block (a no-op inside a piece, where it already is)."""
        if self._blas is None or getattr(self._local, "serial", False):
            yield
            return
        with self._blas.limit(limits=1):
            yield

    def parallel(self, n_items):
        """Whether map_ordered runs `n_items` items side by side (else one after another)."""
        return not self.cuda and self.threads > 1 and not getattr(self._local, "serial", False) and n_items > 1

    def map_ordered(self, fn, items, then, order=None, window=None):
        """then(fn(item)) for each item, in item order; `then` runs in the calling thread.

        Side by side (several items, several threads, the CPU), fn runs on the pool, each item on
        one thread. Items start in `order` (a permutation of their indices, e.g. the costliest
        first, so that no thread idles at the end; default: item order), and at most `window` of
        them are started and not yet handed to `then` (a result that finishes early waits for the
        earlier items: the window bounds the memory in flight). The window defaults to threads + 1
        in item order and to all the items with an `order`; an order that would have to start an
        item beyond the window before `then` can take it is refused. Otherwise the items run one
        after another in the calling thread, in item order. BLAS is on one thread either way."""
        items = list(items)
        if window is None:
            window = self.threads + 1 if order is None else max(1, len(items))
        order = list(range(len(items))) if order is None else list(order)
        check_order(order, len(items), window)
        with self.blas_serial():
            if not self.parallel(len(items)):
                for it in items:
                    then(fn(it))
                return
            pool, run, pending = self._pool(), self._one_thread(fn), {}
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

    def map(self, fn, items):
        """[fn(item) for item in items], side by side as map_ordered runs them."""
        out = []
        self.map_ordered(fn, items, out.append)
        return out

    def _one_thread(self, fn):
        def run(item):
            self._local.serial = True
            try:
                return fn(item)
            finally:
                self._local.serial = False
        return run

    def _pool(self):
        if self._executor is None or self._size != self.threads:      # `threads` may be changed after use
            self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="minihbt")
            self._size = self.threads
        return self._executor


def check_order(order, n, window):
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


def blas_threads():
    """Threads NumPy's BLAS runs matrix products on (the same setting sizes the pool)."""
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
