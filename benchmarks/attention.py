"""Attention's batched products: NumPy's `a @ b` on stacks of per-head matrices (BLAS's own
threads on each tiny GEMM) vs minihbt's `layers.batched_matmul` (texts spread over minihbt's
thread pool, BLAS on one thread each), forward `q @ k^T` of multi-head attention.

    python benchmarks/attention.py [--shapes 64x40,64x96,64x128,32x200,16x384] [--heads 12]
                                   [--head-dim 32] [--repeats 3] [--busy N]

--busy N starts N processes that spin on a core each for the duration, as a long job beside
the benchmark would (what made the plain product collapse). Prints the best of --repeats
for each shape; results must agree exactly.
"""
import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minihbt import layers                  # noqa: E402
from minihbt.backend import Backend         # noqa: E402


def spin(_):
    while True:
        pass


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64x40,64x96,64x128,32x200,16x384", help="texts x tokens, comma-separated")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, default=0, help="processes spinning beside the benchmark (default 0)")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        sys.exit(f"attention.py: --shapes {args.shapes}: expected e.g. 64x128,32x200")
    if min(args.heads, args.head_dim, args.repeats) < 1 or args.busy < 0 or any(min(s) < 1 for s in shapes):
        sys.exit("attention.py: --heads, --head-dim, --repeats and every shape must be >= 1, --busy >= 0")
    be, rng = Backend("cpu"), np.random.default_rng(0)
    busy = [multiprocessing.Process(target=spin, args=(i,), daemon=True) for i in range(args.busy)]
    for p in busy:
        p.start()
    print(f"q @ k^T of {args.heads} heads of {args.head_dim}, float32, best of {args.repeats}; "
          f"{be.threads} threads; {args.busy} spinning processes beside")
    try:
        for texts, tokens in shapes:
            q, k = (rng.standard_normal((texts, args.heads, tokens, args.head_dim)).astype(np.float32) for _ in "qk")
            kt = k.transpose(0, 1, 3, 2)
            assert np.array_equal(q @ kt, layers.batched_matmul(be, q, kt))
            plain = best_of(lambda: q @ kt, args.repeats)
            ours = best_of(lambda: layers.batched_matmul(be, q, kt), args.repeats)
            print(f"  {texts:4d} texts x {tokens:4d} tokens: numpy a @ b {plain * 1e3:9.1f} ms   "
                  f"batched_matmul {ours * 1e3:7.1f} ms   ({plain / ours:.1f}x)", flush=True)
    finally:
        for p in busy:
            p.terminate()


if __name__ == "__main__":
    main()
