"""The CPU thread pool (parallel.Pool): map_ordered's order, its one-thread BLAS, nesting and errors."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from minihbt.parallel import Pool


def blas_threads_now():
    return next(i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_map_ordered_hands_results_over_in_item_order(threads):
    be = Pool(threads)
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


def test_nesting_runs_one_after_another_in_the_piece_and_does_not_deadlock():
    be = Pool(2)
    inner = []

    def work(i):
        names = set()
        be.map_ordered(lambda j: names.add(threading.current_thread().name), range(4), inner.append)   # nested:
        return names == {threading.current_thread().name}                                         # in this thread
    out = []
    be.map_ordered(work, range(6), out.append)
    assert out == [True] * 6 and inner == [None] * 24


def test_an_error_in_a_piece_reaches_the_caller_with_blas_restored():
    be = Pool(2)
    before, done = blas_threads_now(), []

    def work(i):
        if i == 3:
            raise ValueError("piece 3")
        return np.ones(4) @ np.ones(4)
    with pytest.raises(ValueError, match="piece 3"):
        be.map_ordered(work, range(10), done.append)
    assert done == [4.0] * 3 and blas_threads_now() == before


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
    be = Pool(2)
    be._executor, be._size = RecordingPool(max_workers=2), 2
    seen = []

    def work(i):
        time.sleep(0.002 * i)                                           # later items take longer
        return i * 10
    be.map_ordered(work, range(8), seen.append, order=[7, 6, 5, 4, 3, 2, 1, 0])
    assert submitted == [7, 6, 5, 4, 3, 2, 1, 0]
    assert seen == [i * 10 for i in range(8)]
    one, one_seen = Pool(1), []                      # one thread: item order, in this thread
    one.map_ordered(lambda i: (i, threading.current_thread().name), range(4), one_seen.append, order=[3, 2, 1, 0])
    assert [i for i, _ in one_seen] == [0, 1, 2, 3]
    assert {name for _, name in one_seen} == {threading.current_thread().name}
    with pytest.raises(ValueError, match="permutation"):
        be.map_ordered(work, range(3), seen.append, order=[0, 0, 1])


def test_map_ordered_in_item_order_keeps_at_most_threads_results_waiting():
    """Without `order`, a slow first item holds back the start of the others: no more than
    threads + 1 items are started before `then` has the first result (bounded memory)."""
    import time
    be = Pool(2)
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
    from minihbt.length_groups import costliest_last_window
    submitted, in_flight, most = [], set(), []
    lock = threading.Lock()

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, item):
            with lock:
                submitted.append(item)
                in_flight.add(item)
                most.append(len(in_flight))
            return super().submit(fn, item)
    be = Pool(2)
    be._executor, be._size = RecordingPool(max_workers=2), 2
    seen = []

    def then(i):
        with lock:
            in_flight.discard(i)
        seen.append(i)
    costs = [1, 5, 5, 5, 5, 5, 1, 5]                   # the XQuAD step's backward: a small group third from last
    order = costliest_last_window(costs, 3)
    assert order == [0, 1, 2, 3, 4, 5, 7, 6]
    be.map_ordered(lambda i: time.sleep(0.001 * costs[i]) or i, range(8), then, order=order, window=3)
    assert submitted == order and seen == list(range(8)) and max(most) <= 3
    assert costliest_last_window([3, 1, 2], 5) == [0, 2, 1]          # fewer items than the window: all sorted
    assert costliest_last_window([2, 2, 2, 2], 2) == [0, 1, 2, 3]    # ties keep item order
    ran = []
    with pytest.raises(ValueError, match="beyond a window of 3"):
        be.map_ordered(ran.append, range(5), then, order=[0, 4, 3, 2, 1], window=3)
    for bad in (0, 1.5, "3", True):
        with pytest.raises(ValueError, match="window must be an integer >= 1"):
            be.map_ordered(ran.append, range(3), then, order=[0, 1, 2], window=bad)
    assert ran == []
    for threads in (1, 2):                           # any window that fits runs every item, results in item order
        got = []
        Pool(threads).map_ordered(lambda i: i * i, range(6), got.append, order=[1, 0, 3, 2, 5, 4],
                                                    window=2)
        assert got == [i * i for i in range(6)]


def test_an_interrupt_while_waiting_leaves_no_piece_running_or_to_start():
    """Ctrl-C while map_ordered waits for an item that `order` starts last: when the interrupt
    reaches the caller every piece that started has finished, and none starts afterwards."""
    import os
    import signal
    import time
    be = Pool(2)
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
