"""The NCCL path of minihbt.comm on one GPU (issue 25), without MPI: a one-rank
`NcclCommunicator.single()` runs allgather, allreduce_sum (rank-order and NCCL's own) and
allgather_rows on CuPy arrays, each compared with NumPy; one line per check.

    python benchmarks/gpu_check_nccl.py

Exit codes: 0 every check passed; 1 a check failed; 3 no GPU, with the one line
"gpu_check_nccl: no GPU (<reason>)" (as `benchmarks/gpu_check.py probe` says it);
4 CuPy sees a GPU but cannot load NCCL (one line naming the package to install).
With one rank NCCL's collectives copy: this checks the calls (pointers, byte counts, datatypes,
the stream, the empty case), not traffic between GPUs; the padding to the largest count only
acts with two ranks or more. On the device tool: command `python benchmarks/gpu_check_nccl.py`,
timeout_s 120 (it takes seconds once CuPy is up).
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                        # this checkout's minihbt, whatever is installed
sys.path.insert(0, HERE)

from gpu_check import NO_GPU_EXIT, no_gpu_reason  # noqa: E402

NO_NCCL_EXIT = 4
RESULTS = []


def check(name, fn):
    """Run one check: fn() returns (passed, detail); an exception is a failure, in one line."""
    try:
        passed, detail = fn()
    except Exception as e:
        passed, detail = False, f"{type(e).__name__}: {' '.join(str(e).split())}"
    RESULTS.append(bool(passed))
    print(f"check {'PASS' if passed else 'FAIL'}: {name}: {detail}", flush=True)


def same(np, got, expected):
    got = got.get() if hasattr(got, "get") else got
    ok = got.shape == expected.shape and got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
    return ok, f"shape {tuple(got.shape)} {got.dtype}, {'same bits' if ok else 'DIFFERENT'} as NumPy"


def run_checks(np, cupy, comm):
    c = comm.NcclCommunicator.single()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 7)).astype(np.float32)
    print(f"communicator: {type(c).__name__}, rank {c.rank}/{c.size}, GPU {c.device_id}", flush=True)
    check("allgather float32 [5, 7]", lambda: same(np, c.allgather(cupy.asarray(rows)), rows))
    check("allgather empty [0, 7]", lambda: same(np, c.allgather(cupy.asarray(rows[:0])), rows[:0]))
    ids = np.array([3, 8, 20, 41], np.int64)
    check("allgather int64 ids", lambda: same(np, c.allgather(cupy.asarray(ids)), ids))
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal((33, 17)) * 1e3).astype(dtype)
        name = np.dtype(dtype).name
        check(f"allreduce_sum {name} rank order", lambda: same(np, c.allreduce_sum(cupy.asarray(x)), x))
        check(f"allreduce_sum {name} NCCL allReduce", lambda: same(np, c.allreduce_sum(cupy.asarray(x), exact=False), x))
        y = cupy.asarray(x)
        check(f"allreduce_sum {name} in place", lambda: (c.allreduce_sum(y, inplace=True) is y and same(np, y, x)[0],
                                                         "returns its input, same bits"))
    values = rng.standard_normal((4, 6)).astype(np.float32)

    def rows_check():
        got = c.allgather_rows(cupy.asarray(ids), cupy.asarray(values))
        ok = same(np, got.ids, ids)[0] and same(np, got.values, values)[0] and got.counts == [4]
        ok = ok and got.bytes_sent == 4 * (8 + 6 * 4) and got.bytes_received == 0
        return ok, f"counts {got.counts}, bytes sent {got.bytes_sent}, received {got.bytes_received}"
    check("allgather_rows ids [4] + float32 values [4, 6]", rows_check)
    check("allgather_rows refuses unsorted ids", lambda: refuses(c, cupy.asarray(ids[::-1].copy()), cupy.asarray(values)))
    big = cupy.asarray(rng.standard_normal((50_000, 768)).astype(np.float32))

    def rate():
        c.barrier()
        start = time.perf_counter()
        got = c.allgather(big)
        c.barrier()
        seconds = time.perf_counter() - start
        return bool((got == big).all()), f"{big.nbytes / 2 ** 20:.0f} MiB in {seconds * 1e3:.1f} ms"
    check("allgather 50,000 x 768 float32", rate)
    c.close()
    check("close destroys the NCCL communicator", lambda: (c.nccl is None, "nccl handle released"))


def refuses(c, ids, values):
    try:
        c.allgather_rows(ids, values)
    except ValueError as e:
        return "sorted" in str(e), f"ValueError: {e}"
    return False, "no error"


def main():
    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check_nccl: no GPU ({reason})")
        return NO_GPU_EXIT
    import cupy
    import numpy as np
    from minihbt import comm
    if comm.nccl is None:
        print("gpu_check_nccl: CuPy sees a GPU but cannot load NCCL (pip install nvidia-nccl-cu12)")
        return NO_NCCL_EXIT
    run_checks(np, cupy, comm)
    print(f"gpu_check_nccl: {sum(RESULTS)}/{len(RESULTS)} checks passed")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
