"""Data-parallel training on one machine: one process on N threads against N MPI ranks on one
thread each, the same global batch and step, in one run.

    python benchmarks/data_parallel.py --model weights/multilingual-e5-small [--ranks 2] [--steps 4]

The batch is train_step.py's mlqa-hybrid case (batch 0 of epoch 0 of minihbt's hybrid sampler on
MLQA-R, 32 triplets, queries 32 and passages 96 tokens). Each side runs in its own processes: a
warm-up step, then --steps timed steps of minihbt.loss_and_grads (dropout on, the word table's
gradient as rows), rowgrad.clip_grad_norm at 1.0 and rowgrad.AdamW (lr 3e-5). Printed per side:
seconds a step, real tokens a second (all ranks together), and for the ranks the seconds a step
spends in collectives (gathering embeddings, the word table's rows, the all-reduce of the other
gradients) and the bytes one rank puts on the wire a step: the table's rows against what the
dense [V, H] table would be. Needs mpi4py and an mpirun (pip install -e ".[mpi]") and ../shared.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                            # this checkout's minihbt first
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
from train_step import PASSAGE_LEN                  # noqa: E402  (the cases' limits, as train_step.py)
from train_step_inputs import build_batch           # noqa: E402


def child(args):
    """One side's steps; rank 0 (or the one process) prints a JSON line of its measurements."""
    import numpy as np
    import minihbt
    from minihbt import comm as comm_module, rowgrad
    from minihbt.parallel import pool_for
    comm = comm_module.from_environment("cpu")
    with open(args.batch_file, encoding="utf-8") as f:
        batch = json.load(f)
    model = minihbt.load_model(args.model)
    opt = rowgrad.AdamW({k: model.params[k] for k in model.trainable_names()}, lr=3e-5, backend=model.backend,
                        pool=pool_for(model.backend))
    timed = {"comm_seconds": 0.0, "table_bytes": 0, "dense_bytes": 0, "tokens": 0}
    for i in range(args.steps + 1):
        stats = {}
        if i == 1:
            comm.barrier()
            start = time.perf_counter()
        _, grads = minihbt.loss_and_grads(model, batch["queries"], batch["positives"], batch["negatives"],
                                          dropout=True, seed=i, max_query_length=batch["max_query_length"],
                                          max_passage_length=batch["max_passage_length"], return_numpy=False,
                                          stats=stats, table_rows=True, comm=comm)
        rowgrad.clip_grad_norm(grads, 1.0)
        opt.step(model.params, grads)
        if i >= 1:
            stats["tokens"] = sum(comm.allgather_object(stats["tokens"]))
            for k in timed:
                timed[k] += stats.get(k, 0)
    comm.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    if comm.is_root:
        word = model.params["embeddings.word_embeddings.weight"]
        print(json.dumps({"ranks": comm.size, "threads": pool_for(model.backend).threads, "seconds": seconds,
                          "tokens_per_second": timed["tokens"] / args.steps / seconds,
                          "comm_seconds": timed["comm_seconds"] / args.steps,
                          "table_mb": timed["table_bytes"] / args.steps / 1e6,
                          "dense_mb": timed["dense_bytes"] / args.steps / 1e6,
                          "dense_table_mb": word.size * word.itemsize / 1e6, "numpy": np.__version__}))


def run_side(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"data_parallel.py: {' '.join(cmd[:4])} ... failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory of multilingual-e5-small")
    ap.add_argument("--ranks", type=int, default=2, help="ranks, and the one process's threads (default 2)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up (default 4)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    for bad, message in ((args.steps < 1 or args.ranks < 2, "--steps takes an integer >= 1, --ranks one >= 2"),
                         (not os.path.isdir(args.model), f"--model {args.model}: not a directory"),
                         (not os.path.isdir(os.path.join(SHARED, "data", "mlqa-r")), f"needs {SHARED}/data/mlqa-r"),
                         (mpirun is None, "no mpirun (pip install -e '.[mpi]')")):
        if bad:
            sys.exit(f"data_parallel.py: {message}")
    inputs = types.SimpleNamespace(data=os.path.join(SHARED, "data", "xquad-r"), mlqa_batch=0, query_len=32,
                                   mlqa_data=os.path.join(SHARED, "data", "mlqa-r"), passage_len=PASSAGE_LEN)
    batch = build_batch("mlqa-hybrid", 32, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(batch, f)
        me = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--batch-file", path,
              "--steps", str(args.steps)]
        threads = lambda n: dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n),
                                 OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        one = run_side(me, threads(args.ranks))
        many = run_side([mpirun, "-np", str(args.ranks), "-x", "OMP_NUM_THREADS", "-x", "OPENBLAS_NUM_THREADS"] + me,
                        threads(1))
    print(f"mlqa-hybrid batch of 32 triplets, {args.steps} timed steps; machine: {os.cpu_count()} cores")
    for name, r in ((f"1 process, {one['threads']} threads", one), (f"{many['ranks']} ranks, 1 thread each", many)):
        print(f"{name:>26}: {r['seconds']:.2f} s/step, {r['tokens_per_second']:.0f} tokens/s")
    print(f"ranks / one process throughput: {many['tokens_per_second'] / one['tokens_per_second']:.2f}x")
    print(f"collectives: {many['comm_seconds']:.3f} s/step; sent by one rank a step: word-table rows "
          f"{many['table_mb']:.2f} MB (the dense table would be {many['dense_table_mb']:.0f} MB), other gradients "
          f"{many['dense_mb']:.1f} MB")


if __name__ == "__main__":
    main()
