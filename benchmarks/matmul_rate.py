"""The machine's float32 matrix rate, the yardstick for the benchmarks' useful-FLOP rates.

    python benchmarks/matmul_rate.py [--size 4096] [--repeats 3]

Times NumPy `a @ b` for two float32 (size x size) matrices of standard-normal values
(2 size^3 FLOP each), after one untimed product, and prints the best of `repeats` as JSON
with the BLAS that ran it and its thread count. The benchmarks run this file as a child
process with the same thread environment (OMP/OPENBLAS/MKL_NUM_THREADS) as the steps they
time, so both use the same threads; a GEMM this size is about the best rate NumPy reaches
on the machine, so "useful FLOP/s as a fraction of it" says how much of the machine a step
uses.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def pin_cores(threads):
    """Restrict this process, and the children it starts from now on, to `threads` of the cores
    it may run on, so that every side of a benchmark gets the same cores whatever thread pools
    its library sizes from the core count. Returns the cores kept (None where the OS cannot)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        cores = cores[:threads]
        os.sched_setaffinity(0, cores)
    return cores


def blas_summary():
    """'openblas 0.3.31, 2 threads' for each BLAS/OpenMP library NumPy (and anything imported) loaded."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed: BLAS threads unknown"
    pools = [f"{i.get('internal_api')} {i.get('version') or '?'}, {i.get('num_threads')} threads"
             for i in threadpool_info()]
    return "; ".join(pools) or "no BLAS/OpenMP pool found"


def measure(size, repeats):
    """Best float32 matmul rate in FLOP/s over `repeats` products of (size x size) matrices."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = a @ b                                                     # untimed: page-in and thread start-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return {"size": size, "repeats": repeats, "flop": 2.0 * size ** 3, "seconds": best,
            "flops": 2.0 * size ** 3 / best, "numpy": np.__version__, "blas": blas_summary()}


def measure_in_child(size, repeats, env):
    """`measure` in a fresh process with environment `env` (the thread settings of the run)."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "matmul_rate.py"), "--size", str(size),
                          "--repeats", str(repeats)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()
        raise RuntimeError(f"matmul reference failed: {tail[-1] if tail else 'exit code ' + str(out.returncode)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(ref):
    """One line naming the size, the repetitions, the rate and the BLAS threads of a `measure` result."""
    n = ref["size"]
    return (f"NumPy float32 ({n} x {n}) @ ({n} x {n}), {ref['flop'] / 1e9:.3g} GFLOP, best of {ref['repeats']}: "
            f"{ref['flops'] / 1e9:.1f} GFLOP/s (numpy {ref['numpy']}; {ref['blas']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    ap.add_argument("--repeats", type=int, default=3, help="timed products, the best is kept (default 3)")
    args = ap.parse_args()
    for bad, msg in ((not 1 <= args.size <= 32768, "--size takes an integer in 1..32768"),
                     (args.repeats < 1, "--repeats takes an integer >= 1")):
        if bad:
            print(f"matmul_rate.py: {msg}", file=sys.stderr)
            sys.exit(2)
    print(json.dumps(measure(args.size, args.repeats)))


if __name__ == "__main__":
    main()
