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
