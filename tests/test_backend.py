"""The CPU thread pool: map_ordered's order, its one-thread BLAS, nesting and errors."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from minihbt.backend import Backend


def blas_threads_now():
    return next(i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_map_ordered_hands_results_over_in_item_order(threads):
    be = Backend("cpu", threads=threads)
    seen, workers, blas = [], set(), []
    before = blas_threads_now()

    def work(i):
        workers.add(threading.current_thread().name)
        blas.append(blas_threads_now())
        return i * i
    be.map_ordered(work, range(20), seen.append)
    assert seen == [i * i for i in range(20)]
    assert set(blas) == {1} and blas_threads_now() == before           # one BLAS thread inside, restored after
    assert all(n.startswith("minihbt") for n in workers) == (threads > 1)


def test_a_piece_runs_its_own_passes_serially_and_nesting_does_not_deadlock():
    be = Backend("cpu", threads=2)
    inner = []

    def work(i):
        names = set()
        be.map_chunks(lambda s, e: names.add(threading.current_thread().name), 1 << 20, chunk=1 << 10)
        be.map_ordered(lambda j: j, range(4), inner.append)             # nested: one after another, in this thread
        return names == {threading.current_thread().name}
    out = []
    be.map_ordered(work, range(6), out.append)
    assert out == [True] * 6 and inner == list(range(4)) * 6


def test_an_error_in_a_piece_reaches_the_caller_with_blas_restored():
    be = Backend("cpu", threads=2)
    before, done = blas_threads_now(), []

    def work(i):
        if i == 3:
            raise ValueError("piece 3")
        return np.ones(4) @ np.ones(4)
    with pytest.raises(ValueError, match="piece 3"):
        be.map_ordered(work, range(10), done.append)
    assert done == [4.0] * 3 and blas_threads_now() == before


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_clip_grad_norm_has_the_same_bits_on_the_thread_pool(threads):
    """The global norm from chunk sums computed across the pool equals, bit for bit, the sums
    one thread adds in order (float64 per 1 << 20 float32 chunk, per tensor, then over
    tensors); the scaling is the same multiplication, contiguous or not."""
    from minihbt import optim
    rng = np.random.default_rng(3)
    shapes = {"big": (3 * optim.SUM_CHUNK + 12345,), "w": (384, 1536), "b": (7,), "empty": (0,)}
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads["strided"] = rng.standard_normal((1536, 384)).astype(np.float32).T       # not C-contiguous
    want = 0
    for g in grads.values():
        flat, per = g.reshape(-1), 0
        for s in range(0, flat.size, optim.SUM_CHUNK):
            c = flat[s:s + optim.SUM_CHUNK].astype(np.float64)
            per = per + (c * c).sum()
        want = want + per
    want = float(np.sqrt(want))
    scaled = {k: g * np.float32(0.5 / (want + 1e-6)) for k, g in grads.items()}
    norm = optim.clip_grad_norm(grads, 0.5, Backend("cpu", "float32", threads=threads))
    assert norm == want
    assert all(np.array_equal(grads[k], scaled[k]) for k in grads)
    assert optim.clip_grad_norm({k: g.copy() for k, g in grads.items()}, 1e9) == optim.clip_grad_norm(
        {k: g.copy() for k, g in grads.items()}, 1e9, Backend("cpu", "float32", threads=threads))


@pytest.mark.parametrize("shape", [(9000, 384), (4099, 300), (3000, 7), (200, 64)])
def test_clip_grad_norm_on_table_rows_has_the_bits_of_the_dense_pass(shape):
    """A table gradient that is 0 outside the rows named in `rows` is summed from the 128-element
    blocks those rows touch, on NumPy's pairwise tree: the norm and the clipped tensors equal,
    bit for bit, those of reading every element (whole chunks of 1 << 20 and a shorter last one,
    rows not a multiple of 128 wide, rows listed that are 0, no rows at all); rows out of range
    or not integers are refused."""
    from minihbt import optim
    assert optim._pairwise_emulated(), "NumPy's float64 sum is no longer the pairwise tree emulated"
    rng = np.random.default_rng(sum(shape))
    for n_rows in (0, 1, 40, shape[0] // 3):
        table = np.zeros(shape, np.float32)
        rows = rng.choice(shape[0], n_rows, replace=False)
        table[rows] = rng.standard_normal((n_rows, shape[1])) * np.exp(3 * rng.standard_normal((n_rows, shape[1])))
        listed = np.concatenate([rows, rng.choice(shape[0], 5)])                  # and a few rows that are 0
        dense = {"w": rng.standard_normal((30, 20)).astype(np.float32), "t": table.copy()}
        sparse = {k: g.copy() for k, g in dense.items()}
        norm = optim.clip_grad_norm(dense, 0.5, Backend("cpu", threads=2))
        assert optim.clip_grad_norm(sparse, 0.5, Backend("cpu", threads=2), rows={"t": listed}) == norm
        assert all(np.array_equal(dense[k], sparse[k]) for k in dense)
    for bad in ([-1], [shape[0]], [0.5]):
        with pytest.raises(ValueError, match="rows of t: integers in"):
            optim.clip_grad_norm({"t": np.zeros(shape, np.float32)}, 1.0, rows={"t": np.array(bad)})


def test_clip_grad_norm_on_table_rows_float64_strided_and_without_the_emulation(monkeypatch):
    """The same bits as the dense pass for a float64 table, for a table that is not C-contiguous
    (read whole), and where the pairwise emulation does not hold (summed whole, scaled on its
    rows); a negative or NaN max_norm is refused."""
    from minihbt import optim
    rng = np.random.default_rng(7)
    rows = rng.choice(3000, 50, replace=False)

    def table(dtype):
        t = np.zeros((3000, 384), dtype)
        t[rows] = rng.standard_normal((50, 384))
        return t
    for emulated in (True, False):
        monkeypatch.setattr(optim, "_EMULATED", [emulated])
        for t in (table(np.float64), np.asfortranarray(table(np.float32))):
            dense, sparse = {"t": t.copy(order="K")}, {"t": t.copy(order="K")}
            norm = optim.clip_grad_norm(dense, 0.1, Backend("cpu", threads=2))
            assert optim.clip_grad_norm(sparse, 0.1, Backend("cpu", threads=2), rows={"t": rows}) == norm
            assert np.array_equal(dense["t"], sparse["t"]) and not np.array_equal(dense["t"], t)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm must be a number >= 0"):
            optim.clip_grad_norm({"t": np.ones(3, np.float32)}, bad)


def test_lazy_zeros_are_zeros_that_can_be_written():
    from minihbt.backend import lazy_zeros
    for shape, dtype in (((10001, 3), np.float32), ((0, 4), np.float64), ((5,), np.int64)):
        z = lazy_zeros(shape, dtype)
        assert z.shape == shape and z.dtype == dtype and not z.any() and z.flags.writeable and z.flags.c_contiguous
        z[...] = 1
        assert z.sum() == z.size


def test_map_ordered_starts_items_in_the_order_given_and_hands_them_over_in_item_order():
    """`order` decides which items the pool starts first (e.g. the costliest); `then` still sees
    every result in item order, although later items finish first."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    submitted = []

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, item):
            submitted.append(item)
            return super().submit(fn, item)
    be = Backend("cpu", threads=2)
    be._pool, be._pool_size = RecordingPool(max_workers=2), 2
    seen = []

    def work(i):
        time.sleep(0.002 * i)                                           # later items take longer
        return i * 10
    be.map_ordered(work, range(8), seen.append, order=[7, 6, 5, 4, 3, 2, 1, 0])
    assert submitted == [7, 6, 5, 4, 3, 2, 1, 0]
    assert seen == [i * 10 for i in range(8)]
    one, one_seen = Backend("cpu", threads=1), []                      # one thread: item order, in this thread
    one.map_ordered(lambda i: (i, threading.current_thread().name), range(4), one_seen.append, order=[3, 2, 1, 0])
    assert [i for i, _ in one_seen] == [0, 1, 2, 3]
    assert {name for _, name in one_seen} == {threading.current_thread().name}
    with pytest.raises(ValueError, match="permutation"):
        be.map_ordered(work, range(3), seen.append, order=[0, 0, 1])


def test_map_ordered_in_item_order_keeps_at_most_threads_results_waiting():
    """Without `order`, a slow first item holds back the start of the others: no more than
    threads + 1 items are started before `then` has the first result (bounded memory)."""
    import time
    be = Backend("cpu", threads=2)
    started, at_first_then = [], []

    def work(i):
        started.append(i)
        time.sleep(0.2 if i == 0 else 0.001)
        return i

    def then(i):
        if i == 0:
            at_first_then.append(len(started))
    be.map_ordered(work, range(12), then)
    assert sorted(started) == list(range(12)) and at_first_then[0] <= 3


def test_map_ordered_with_a_window_starts_in_order_and_keeps_at_most_window_in_flight():
    """An order and a window together: items start in that order, never more than `window`
    started and not yet handed to `then`; an order that cannot keep to its window is refused
    before anything runs, and so is a window that is not a positive integer."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    from minihbt.model import _costliest_last_window
    submitted, in_flight, most = [], set(), []
    lock = threading.Lock()

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, item):
            with lock:
                submitted.append(item)
                in_flight.add(item)
                most.append(len(in_flight))
            return super().submit(fn, item)
    be = Backend("cpu", threads=2)
    be._pool, be._pool_size = RecordingPool(max_workers=2), 2
    seen = []

    def then(i):
        with lock:
            in_flight.discard(i)
        seen.append(i)
    costs = [1, 5, 5, 5, 5, 5, 1, 5]                   # the XQuAD step's backward: a small group third from last
    order = _costliest_last_window(costs, 3)
    assert order == [0, 1, 2, 3, 4, 5, 7, 6]
    be.map_ordered(lambda i: time.sleep(0.001 * costs[i]) or i, range(8), then, order=order, window=3)
    assert submitted == order and seen == list(range(8)) and max(most) <= 3
    assert _costliest_last_window([3, 1, 2], 5) == [0, 2, 1]          # fewer items than the window: all sorted
    assert _costliest_last_window([2, 2, 2, 2], 2) == [0, 1, 2, 3]    # ties keep item order
    ran = []
    with pytest.raises(ValueError, match="beyond a window of 3"):
        be.map_ordered(ran.append, range(5), then, order=[0, 4, 3, 2, 1], window=3)
    for bad in (0, 1.5, "3", True):
        with pytest.raises(ValueError, match="window must be an integer >= 1"):
            be.map_ordered(ran.append, range(3), then, order=[0, 1, 2], window=bad)
    assert ran == []
    for threads in (1, 2):                           # any window that fits runs every item, results in item order
        got = []
        Backend("cpu", threads=threads).map_ordered(lambda i: i * i, range(6), got.append, order=[1, 0, 3, 2, 5, 4],
                                                    window=2)
        assert got == [i * i for i in range(6)]


def test_an_interrupt_while_waiting_leaves_no_piece_running_or_to_start():
    """Ctrl-C while map_ordered waits for an item that `order` starts last: when the interrupt
    reaches the caller every piece that started has finished, and none starts afterwards."""
    import os
    import signal
    import time
    be = Backend("cpu", threads=2)
    events = []

    def work(i):
        events.append(("start", i))
        time.sleep(0.3)
        events.append(("end", i))
        return i
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)    # whatever another test left
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            be.map_ordered(work, range(4), lambda r: None, order=[3, 2, 1, 0])
    finally:
        signal.signal(signal.SIGINT, previous)
    at_return = list(events)
    time.sleep(0.8)
    started = {i for e, i in at_return if e == "start"}
    assert started and started == {i for e, i in at_return if e == "end"}
    assert events == at_return                                          # nothing started or ran on after
