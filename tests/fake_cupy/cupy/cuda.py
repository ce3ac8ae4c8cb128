"""cupy.cuda as minihbt uses it: devices, streams, the runtime's queries, and NCCL with its ranks
as threads of one process (each thread builds its NcclCommunicator from the same unique id).

The stand-in has `DEVICES` GPUs (MINIHBT_FAKE_CUPY_GPUS, default 1); the current device is per
thread, as in CUDA. NCCL moves bytes between live device arrays of the stand-in: every pointer
range a collective reads or writes is checked to lie inside one, and every rank must pass the
same count and type. allReduce(SUM) adds the ranks' parts in one shuffled order (the same on
every rank, as NCCL gives every rank the same result, but no fixed rank order)."""
import ctypes
import itertools
import os
import threading
import types

import numpy as np

DEVICES = int(os.environ.get("MINIHBT_FAKE_CUPY_GPUS", "1"))
_current = threading.local()


def _not_in_stand_in(what):
    return f"{what} is not in the stand-in (tests/fake_cupy/cupy): add it there if minihbt needs it"


class Device:
    def __init__(self, device=None):
        self.id = getattr(_current, "id", 0) if device is None else int(device)
        if not 0 <= self.id < DEVICES:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} of {DEVICES}")

    def use(self):
        _current.id = self.id

    def synchronize(self):
        pass


class Stream:
    ptr = 0

    def synchronize(self):
        pass


def get_current_stream():
    return Stream()


runtime = types.SimpleNamespace(
    getDeviceCount=lambda: DEVICES, deviceSynchronize=lambda: None,
    getDeviceProperties=lambda i: {"name": b"CuPy stand-in (NumPy)", "totalGlobalMem": 0, "multiProcessorCount": 0})


# ----------------------------------------------------------------------------- NCCL

class _World:
    """The ranks of one unique id: each collective is an exchange of one item per rank."""

    def __init__(self, size):
        self.size, self.slots, self.joined = size, [None] * size, set()
        self.sync = threading.Barrier(size, timeout=120)

    def exchange(self, rank, item):
        self.slots[rank] = item
        self.sync.wait()
        got = list(self.slots)
        self.sync.wait()
        return got


class _Nccl(types.ModuleType):
    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
    NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3
    available = True
    _worlds, _ids, _lock = {}, itertools.count(1), threading.Lock()
    _DTYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64, 6: np.float16,
               7: np.float32, 8: np.float64}

    def get_unique_id(self):
        return (next(self._ids),) + (0,) * 127

    def __getattr__(self, name):
        raise AttributeError(_not_in_stand_in(f"cupy.cuda.nccl.{name}"))


nccl = _Nccl("cupy.cuda.nccl")


class NcclCommunicator:
    """One rank of an NCCL communicator; the ranks of one unique id are threads of this process."""

    def __init__(self, ndev, commId, rank):
        if not 0 <= rank < ndev:
            raise ValueError(f"NCCL rank {rank} of {ndev}")
        with nccl._lock:
            world = nccl._worlds.setdefault(tuple(commId), _World(ndev))
            if world.size != ndev or rank in world.joined:
                raise RuntimeError(f"ncclInvalidUsage: rank {rank} of {ndev} joins a world of {world.size} "
                                   f"that has ranks {sorted(world.joined)}")
            world.joined.add(rank)
        self.world, self.rank, self.size = world, rank, ndev
        self.world.exchange(rank, None)                  # ncclCommInitRank returns once every rank has joined

    def _check(self, what, ptr, nbytes):
        import cupy
        if self.world is None:
            raise RuntimeError(f"{what}: the communicator was destroyed")
        if nbytes and not cupy._is_live(ptr, nbytes):
            raise RuntimeError(f"{what}: [{ptr:#x}, +{nbytes}) is not inside one live device array "
                               "(an illegal memory access on a GPU)")

    def _agree(self, what, call):
        calls = self.world.exchange(self.rank, call)
        if len(set(calls)) > 1:
            raise RuntimeError(f"{what}: the ranks passed different counts or types {calls} (NCCL hangs or corrupts)")

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):
        nbytes = count * np.dtype(nccl._DTYPES[datatype]).itemsize
        self._check("allGather's send buffer", sendbuf, nbytes)
        self._check("allGather's receive buffer", recvbuf, nbytes * self.size)
        self._agree("allGather", (count, datatype))
        parts = self.world.exchange(self.rank, ctypes.string_at(sendbuf, nbytes) if nbytes else b"")
        ctypes.memmove(recvbuf, b"".join(parts), nbytes * self.size)
        self.world.exchange(self.rank, None)             # every rank has read every send buffer

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        if op != nccl.NCCL_SUM:
            raise RuntimeError(_not_in_stand_in(f"NCCL reduction op {op}"))
        kind = np.dtype(nccl._DTYPES[datatype])
        self._check("allReduce's send buffer", sendbuf, count * kind.itemsize)
        self._check("allReduce's receive buffer", recvbuf, count * kind.itemsize)
        self._agree("allReduce", (count, datatype))
        order = np.random.default_rng().permutation(self.size) if self.rank == 0 else None
        parts = self.world.exchange(self.rank, (np.frombuffer(ctypes.string_at(sendbuf, count * kind.itemsize),
                                                              kind).copy(), order))
        order = parts[0][1]
        total = parts[order[0]][0].copy()
        for r in order[1:]:
            total += parts[r][0]
        self.world.exchange(self.rank, None)
        ctypes.memmove(recvbuf, total.tobytes(), total.nbytes)

    def destroy(self):
        self.world = None

    def __getattr__(self, name):
        raise AttributeError(_not_in_stand_in(f"NcclCommunicator.{name}"))


nccl.NcclCommunicator = NcclCommunicator
