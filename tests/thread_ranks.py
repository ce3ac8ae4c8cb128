"""Ranks as threads of one process: a host communicator for NcclCommunicator on the CuPy stand-in,
whose NCCL ranks are threads too (tests/test_comm.py, tests/test_fake_cupy.py)."""
import threading

from minihbt import comm


class World:
    """n threads exchanging one item each, in rank order."""

    def __init__(self, n):
        self.n, self.slots, self.sync = n, [None] * n, threading.Barrier(n, timeout=120)

    def exchange(self, rank, item):
        self.slots[rank] = item
        self.sync.wait()
        got = list(self.slots)
        self.sync.wait()
        return got


class ThreadHost(comm.SingleProcess):
    """The host communicator of one thread-rank."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.n

    def allgather_object(self, obj):
        return self.world.exchange(self.rank, obj)

    def bcast_object(self, obj, root=0):
        return self.allgather_object(obj)[root]

    def barrier(self):
        self.allgather_object(None)
