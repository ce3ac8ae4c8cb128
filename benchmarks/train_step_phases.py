"""Where the wall time of minihbt's CPU training step goes, phase by phase, and how many cores
each phase keeps busy.

    python benchmarks/train_step_phases.py --model weights/multilingual-e5-small [--case xquad] [--steps 6]

Runs the step of `train_step.py` (the same batch, dropout on, clipping at 1.0, AdamW at lr
3e-5) `--steps` times in this process, on the threads NumPy's BLAS has (OPENBLAS_NUM_THREADS
to change them), and prints for each step the wall time and cores busy (process CPU time /
wall time) of: forward (both sides' length groups), loss, backward (every group's backward
and the gradients' sums), clipping, AdamW (both told the word table's rows, as train.py
does); then how many of the word table's rows had a gradient. The first step or two include
first-touch page faults of the optimizer state; read the later ones. Unlike `--profile` of
train_step.py, which sees only the calling thread, this shows the threads at work.
"""
import argparse
import os
import resource
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # this checkout's minihbt first
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared"))
from train_step import PASSAGE_LEN                  # noqa: E402  (the cases' limits, as train_step.py)
from train_step_inputs import build_batch           # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory of multilingual-e5-small")
    ap.add_argument("--case", choices=["xquad", "mlqa-hybrid"], default="xquad", help="the batch (default xquad)")
    ap.add_argument("--steps", type=int, default=6, help="steps to run (default 6)")
    args = ap.parse_args()
    data = os.path.join(SHARED, "data", "xquad-r" if args.case == "xquad" else "mlqa-r")
    for bad, message in ((args.steps < 1, "--steps takes an integer >= 1"),
                         (not os.path.isdir(args.model), f"--model {args.model}: not a directory"),
                         (not os.path.isdir(data), f"the {args.case} case needs {data} (../shared beside the checkout)")):
        if bad:
            print(f"train_step_phases.py: {message}", file=sys.stderr)
            sys.exit(2)
    import minihbt
    from minihbt import fast_step
    from minihbt.parallel import pool_for
    from minihbt.encoder import WORD_TABLE
    from minihbt.rowgrad import AdamW, clip_grad_norm

    inputs = types.SimpleNamespace(data=os.path.join(SHARED, "data", "xquad-r"), mlqa_batch=0, query_len=32,
                                   mlqa_data=os.path.join(SHARED, "data", "mlqa-r"),
                                   passage_len=PASSAGE_LEN)
    batch = build_batch(args.case, 32, inputs)
    model = minihbt.load_model(args.model)
    opt = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=3e-5, weight_decay=0.01,
                backend=model.backend, pool=pool_for(model.backend))
    marks = []

    def mark(name):
        use = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((name, time.perf_counter(), use.ru_utime + use.ru_stime))
    embed_sides = fast_step.embed_sides

    def timed_embed_sides(*a, **k):                    # the step's forward, and its backward closure
        mark("start")
        emb, backward, n = embed_sides(*a, **k)
        mark("forward")

        def timed_backward(d_emb, grads, table):
            mark("loss")
            backward(d_emb, grads, table)
            mark("backward")
        return emb, timed_backward, n
    fast_step.embed_sides = timed_embed_sides
    print(f"case {args.case}, {pool_for(model.backend).threads} threads; per phase: wall seconds, cores busy")
    for i in range(args.steps):
        marks.clear()
        stats = {}
        _, grads = minihbt.loss_and_grads(model, batch["queries"], batch["positives"], batch["negatives"],
                                          temperature=0.05, dropout=True, seed=i, max_query_length=32,
                                          max_passage_length=batch["max_passage_length"], return_numpy=False,
                                          stats=stats, table_rows=True)
        clip_grad_norm(grads, 1.0)
        mark("clip")
        opt.step(model.params, grads)
        mark("adamw")
        total = marks[-1][1] - marks[0][1]
        parts = [f"{name} {t1 - t0:.2f} s x{(c1 - c0) / max(t1 - t0, 1e-9):.2f}"
                 for (_, t0, c0), (name, t1, c1) in zip(marks, marks[1:])]
        print(f"step {i + 1}: {total:.2f} s = " + ", ".join(parts), flush=True)
    word = model.params[WORD_TABLE].shape[0]
    print(f"word-table rows with a gradient in the last step: {len(grads[WORD_TABLE].ids):,} of {word:,};"
          f" rows AdamW has updated so far: {int(opt.live[WORD_TABLE].sum()):,}")


if __name__ == "__main__":
    main()
