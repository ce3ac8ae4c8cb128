"""The communicator of data-parallel training, transport only: who the other ranks are, how
arrays reach them. What is sent, gathered and reduced is data_parallel.py's business.

Why MPI. World size and rank come from the MPI launcher (`mpirun -np N python train.py ...`)
through mpi4py: no home-made sockets, ports or rendezvous, and every cluster scheduler can start
an MPI job. Importing this module does not start MPI (`mpi4py.rc.initialize = False`);
`from_environment` does, where a launcher's variables (OMPI_COMM_WORLD_SIZE, PMIX_RANK, ...) say
one started this process; without a launcher or with one rank it returns `SingleProcess`, which
has the same interface (one process runs the code path of N); one of N ranks without mpi4py is an error.

Why NCCL through CuPy. On device "cuda" each rank takes GPU local_rank % device_count and arrays
move GPU to GPU over NCCL (`cupy.cuda.nccl`), never through the host; MPI only broadcasts NCCL's
unique id and exchanges small host metadata (counts, shapes, hashes). NCCL's allGather needs one count on all ranks: each pads its
part to the largest count (known after the counts exchange), the receivers drop the padding.
`NcclCommunicator.single()` is a one-rank NCCL communicator from a local unique id, without MPI.

Sparse rows. A sparse table gradient (the embedding rows a batch touched) is sorted unique int64
row ids [n_r] (numpy, under NCCL too) and values [n_r, H], n_r different per rank. `allgather_rows` exchanges
the counts (checking H and dtype agree), then gathers ids and values: every rank gets all pairs in rank order,
and sums duplicate ids in one fixed order (rowgrad.sum_rows_in_order). It reports the bytes this rank sent
(its rows, padded under NCCL) and received; a dense allreduce would move the whole table.

Determinism. `allreduce_sum` gathers every rank's array and adds them in rank order on every
rank, ((x0 + x1) + x2) + ...: IEEE addition is correctly rounded, so every rank, CPU or GPU, gets
the same bits, those of one process adding the N parts in that order. MPI_Allreduce and NCCL's
allReduce give all ranks one result, but in an order that depends on the implementation, the
algorithm picked for the size, and N. The cost: each rank receives N-1 arrays (a ring allreduce,
about 2 arrays' worth), holds N copies, does N-1 additions; `exact=False` uses the library's sum.
`agree` compares hashes of the settings; on a difference every rank raises one SettingsMismatch.
A rank failing alone must not leave the others in a collective: `abort` prints one line and
calls MPI_Abort, which stops every rank; `abort_on_error` wraps a block in it."""
import contextlib
import os
import sys
import warnings
from collections import namedtuple

import numpy as np

from .backend import to_numpy
from .files import value_digest

try:                                   # optional: only multi-process runs need it (pip install .[mpi])
    import mpi4py
    mpi4py.rc.initialize = False       # from_environment starts MPI; importing this module does not
    mpi4py.rc.finalize = True          # MPI_Finalize at exit when from_environment started it
    from mpi4py import MPI
except Exception:                      # no mpi4py, or no MPI library for it to load
    MPI = None

try:                                   # optional: only device="cuda" with several ranks needs NCCL
    import cupy
    with warnings.catch_warnings():    # CuPy warns at import when libnccl is missing
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if not getattr(nccl, "available", False):
        nccl = None
except Exception:
    cupy = nccl = None

LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
SUMMABLE = (np.dtype(np.float32), np.dtype(np.float64))

# all ranks' rows in rank order: ids [sum n_r], values [sum n_r, H], counts [n_r per rank]; bytes_sent:
# this rank's ids and values on the wire (padding included); bytes_received: the other ranks' parts
GatheredRows = namedtuple("GatheredRows", "ids values counts bytes_sent bytes_received")


class CommError(RuntimeError):
    """A collective cannot go ahead (ranks disagree on shapes, a missing library, ...)."""


class SettingsMismatch(CommError):
    """The ranks do not hold the same settings."""


def launched_by_mpi():
    """True where an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx) started this process."""
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


def one_line(text):
    return " ".join(str(text).split())                         # newlines and runs of spaces: one space


def _first_difference(tables):
    """The first key (in rank 0's order, then other ranks' extra keys) whose hash is not the same everywhere."""
    keys = list(dict.fromkeys(k for table in tables for k in table))
    return next(k for k in keys if len({table.get(k) for table in tables}) > 1)


def _check_rows(ids, values):
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise ValueError(f"row ids must be a 1-D int64 array, got {ids.dtype} of shape {tuple(ids.shape)}")
    if values.ndim != 2 or values.shape[0] != ids.shape[0]:
        raise ValueError(f"values must be [n, H] with n = {ids.shape[0]} row ids, got shape {tuple(values.shape)}")
    if ids.shape[0] > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("row ids must be sorted and unique")


class _Collectives:
    """What every communicator shares, built on three primitives of the subclass:
    allgather_object, _gather (arrays of known per-rank counts) and _native_sum."""

    rank, size = 0, 1
    _pads = False              # True where every rank's part is padded to the largest (NCCL)
    _moved = staticmethod(lambda host: host)         # a numpy array as the arrays this communicator moves

    @property
    def is_root(self):
        return self.rank == 0

    def _agreed_meta(self, what, x):
        """Every rank's leading count, after checking trailing shape and dtype agree (all ranks raise alike)."""
        metas = self.allgather_object((int(x.shape[0]), tuple(x.shape[1:]), np.dtype(x.dtype).str))
        if len({m[1:] for m in metas}) > 1:
            shown = ", ".join(f"rank {r}: {m[1]} {np.dtype(m[2]).name}" for r, m in enumerate(metas))
            raise CommError(f"{what}: ranks disagree on the trailing shape or dtype ({shown})")
        return [m[0] for m in metas]

    def allgather(self, x):
        """All ranks' `x` concatenated along axis 0 in rank order; the leading dimension may differ."""
        out, _ = self._gather(x, self._agreed_meta("allgather", x))
        return out

    def allreduce_sum(self, x, inplace=False, exact=True):
        """The sum of every rank's `x` (float32/float64, one shape on all ranks), the same bits on
        every rank. exact=True: ((x0 + x1) + x2) + ..., in rank order (see the module docstring);
        exact=False: the library's reduction (MPI_SUM / ncclSum). inplace=True writes it into x."""
        if np.dtype(x.dtype) not in SUMMABLE:
            raise ValueError(f"allreduce_sum sums float32 or float64 arrays, not {x.dtype}")
        if exact:
            parts = self.allgather(x[None])
            total = parts[0].copy()
            for part in parts[1:]:
                total += part
        else:
            self._agreed_meta("allreduce_sum", x[None])
            total = self._native_sum(x)
        if inplace:
            x[...] = total
        return x if inplace else total

    def allgather_rows(self, ids, values):
        """A sparse table gradient from every rank, concatenated in rank order (see GatheredRows);
        the ids are numpy arrays, here and in the result, whichever arrays the communicator moves."""
        _check_rows(ids, values)
        counts = self._agreed_meta("allgather_rows", values)       # checks H and dtype agree
        all_ids, ids_sent = self._gather(self._moved(ids), counts)
        all_values, values_sent = self._gather(values, counts)
        row_bytes = 8 + values.shape[1] * values.dtype.itemsize
        received = ((self.size - 1) * max(counts) if self._pads else sum(counts) - counts[self.rank]) * row_bytes
        return GatheredRows(to_numpy(all_ids), all_values, counts, ids_sent + values_sent, received)

    def agree(self, settings):
        """Check that every rank holds the same settings (a dict); else every rank raises
        SettingsMismatch naming the first differing key and each rank's value."""
        digests = {str(k): value_digest(v) for k, v in settings.items()}
        if len(set(self.allgather_object(value_digest(digests)))) == 1:          # the order of the keys aside
            return
        key = _first_difference(self.allgather_object(digests))
        mine = {str(k): v for k, v in settings.items()}
        shown = self.allgather_object(repr(mine[key])[:60] if key in mine else "no such key")
        raise SettingsMismatch(f"ranks disagree on setting {key!r}: "
                               + ", ".join(f"rank {r} has {v}" for r, v in enumerate(shown)))

    def abort(self, message, code=1):
        """Print one line from this rank and stop every rank now (never returns, never hangs)."""
        print(f"minihbt rank {self.rank}/{self.size}: {one_line(message)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self._abort(code)

    @contextlib.contextmanager
    def abort_on_error(self):
        """Run a block; an exception in it aborts every rank with its one line (with one rank it
        propagates as usual, to the caller's own error handling)."""
        try:
            yield self
        except Exception as e:
            if self.size == 1:
                raise
            self.abort(f"{type(e).__name__}: {e}")

    def close(self):
        """Release what the communicator holds (the NCCL communicator); a no-op elsewhere."""


class SingleProcess(_Collectives):
    """The communicator of one process: no MPI, the same interface and code path."""

    def allgather_object(self, obj):
        return [obj]

    def bcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def _gather(self, x, counts):
        return x.copy(), 0

    def _native_sum(self, x):
        return x.copy()

    def _abort(self, code):
        os._exit(code)                     # abort() flushed stdout and stderr


class MpiCommunicator(_Collectives):
    """Host (NumPy) arrays over an mpi4py communicator (MPI.COMM_WORLD by default)."""

    def __init__(self, comm=None):
        if MPI is None:
            raise CommError("MpiCommunicator needs mpi4py and an MPI library: pip install 'minihbt[mpi]'")
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def _gather(self, x, counts):
        x = np.ascontiguousarray(x)
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((sum(counts),) + x.shape[1:], x.dtype)
        self.comm.Allgatherv(x, [out, [c * row for c in counts]])
        return out, x.nbytes

    def _native_sum(self, x):
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=MPI.SUM)
        return out

    def _abort(self, code):
        self.comm.Abort(code)


def _take_gpu(index):
    """Make GPU index % device_count current: None, or why it cannot be done (one line)."""
    try:
        if cupy is None or nccl is None:
            raise CommError("CuPy with NCCL is not importable (pip install cupy-cuda12x nvidia-nccl-cu12)")
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            raise CommError("CuPy sees no GPU")
        cupy.cuda.Device(index % count).use()
    except Exception as e:
        return one_line(f"{type(e).__name__}: {e}")
    return None


class NcclCommunicator(_Collectives):
    """CuPy arrays over NCCL, one GPU per rank; metadata and objects go through `host` (an
    MpiCommunicator, or SingleProcess for `single()`). Built by `over` or `single`."""

    _pads = True
    _moved = staticmethod(lambda host: cupy.asarray(host))

    def __init__(self, host, unique_id):
        self.host, self.rank, self.size = host, host.rank, host.size
        self.device_id = cupy.cuda.Device().id
        self.nccl = nccl.NcclCommunicator(host.size, unique_id, host.rank)

    @classmethod
    def over(cls, host, local_rank=None):
        """Each rank takes GPU local_rank % device_count (rank % device_count on one node); rank 0's
        NCCL unique id is broadcast over `host`. Every rank raises alike if one lacks CuPy, NCCL or a GPU."""
        problem = _take_gpu(host.rank if local_rank is None else local_rank)
        problems = [f"rank {r}: {p}" for r, p in enumerate(host.allgather_object(problem)) if p]
        if problems:
            raise CommError("device='cuda' needs CuPy, NCCL and a GPU on every rank; " + "; ".join(problems))
        return cls(host, host.bcast_object(nccl.get_unique_id() if host.is_root else None))

    @classmethod
    def single(cls, device=0):
        """A one-rank NCCL communicator on GPU `device`, from a local unique id: no MPI needed."""
        problem = _take_gpu(device)
        if problem:
            raise CommError(f"a one-rank NCCL communicator needs CuPy, NCCL and a GPU: {problem}")
        return cls(SingleProcess(), nccl.get_unique_id())

    def allgather_object(self, obj):
        return self.host.allgather_object(obj)

    def bcast_object(self, obj, root=0):
        return self.host.bcast_object(obj, root=root)

    def barrier(self):
        cupy.cuda.get_current_stream().synchronize()
        self.host.barrier()

    def _gather(self, x, counts):
        """NCCL allGather needs one count: pad to the largest, gather bytes, drop the padding."""
        x = cupy.ascontiguousarray(x)
        most, tail = max(counts), x.shape[1:]
        send = x
        if x.shape[0] < most:
            send = cupy.zeros((most,) + tail, x.dtype)
            send[:x.shape[0]] = x
        recv = cupy.empty((self.size, most) + tail, x.dtype)
        if send.nbytes:
            self.nccl.allGather(send.data.ptr, recv.data.ptr, send.nbytes, nccl.NCCL_UINT8,
                                cupy.cuda.get_current_stream().ptr)
        return cupy.concatenate([recv[r, :c] for r, c in enumerate(counts)]), send.nbytes

    def _native_sum(self, x):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty_like(x)
        kind = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[np.dtype(x.dtype)]
        self.nccl.allReduce(x.data.ptr, out.data.ptr, x.size, kind, nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        return out

    def _abort(self, code):
        self.host._abort(code)

    def close(self):
        if self.nccl is not None:
            self.nccl.destroy()
            self.nccl = None


def from_environment(device="cpu"):
    """The communicator of this process: SingleProcess when not launched under MPI (mpi4py
    missing, no launcher, or one rank); else an MpiCommunicator, or on device 'cuda' an
    NcclCommunicator (which selects this rank's GPU: call this before building the model)."""
    if MPI is None:
        if int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1) > 1:
            raise CommError("launched as one of several ranks, but mpi4py (or the MPI library it loads) is not "
                            "importable: pip install -e '.[mpi]'")
        return SingleProcess()
    if not MPI.Is_initialized():
        if not launched_by_mpi():
            return SingleProcess()
        MPI.Init_thread(MPI.THREAD_SERIALIZED)
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return SingleProcess()
    host = MpiCommunicator(world)
    if str(device).startswith("cuda"):
        node = world.Split_type(MPI.COMM_TYPE_SHARED)         # this node's ranks
        local, _ = node.Get_rank(), node.Free()
        return NcclCommunicator.over(host, local_rank=local)
    return host
