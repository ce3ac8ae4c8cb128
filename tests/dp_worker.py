"""One rank of tests/test_data_parallel.py's runs: `mpirun -np N python tests/dp_worker.py SCENARIO OUT`.

step     minihbt.loss_and_grads over the ranks (minihbt.comm) for every case of CASES; each rank
         saves its loss and gradients to OUT/<case>-rank<r>.npz
train20  20 clipped AdamW steps in float64 through the library (fast_step.loss_and_grads over the
         ranks, rowgrad.clip_grad_norm, rowgrad.AdamW); each rank saves its parameters
real     multilingual-e5-small (argv: MODEL_DIR MLQA_R_DIR), float32, dropout on: the step of
         train_step.py's mlqa-hybrid batch (32 triplets) over the ranks; rank 0 also computes it in
         one process and writes OUT/real.json: both losses and each gradient's error
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's minihbt
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # conftest: the fixtures

import minihbt  # noqa: E402
from minihbt import comm as comm_module, fast_step, rowgrad  # noqa: E402
from minihbt.parallel import pool_for  # noqa: E402
from minihbt.data import read_training_data  # noqa: E402
from minihbt.sampler import HBTSampler  # noqa: E402
from conftest import TINY  # noqa: E402

LONG = " ".join(["ein sehr langer satz mit vielen woertern"] * 3)
# 4 triplets (2 a rank on 2 ranks) with 1, 0, 2 and 1 negatives, of very different lengths;
# the last negative repeats the second positive (masked as a duplicate in every mode)
BATCH = (["kurz?", "what is " + LONG, "wer?", "a b c d e f g h"],
         ["p" + LONG, "p2 short", "p3 " + LONG[:40], "p4"],
         [["n1 " + LONG[:80]], [], ["n3", "n3b mittel"], ["p2 short"]])
CASES = {
    "xlmr-f64": dict(kind="xlmr", dtype="float64", dropout=False),
    "xlmr-f64-dropout": dict(kind="xlmr", dtype="float64", dropout=True),
    "bert-f64-dropout-paper-symmetric": dict(kind="bert", dtype="float64", dropout=True, candidates="paper",
                                             symmetric=True),
    "xlmr-f64-dropout-gradcache": dict(kind="xlmr", dtype="float64", dropout=True, chunk_size=1),
    "bert-f32-dropout": dict(kind="bert", dtype="float32", dropout=True),
    "xlmr-f32-gradcache-paper": dict(kind="xlmr", dtype="float32", dropout=False, chunk_size=1, candidates="paper"),
}
SEED = 7


def case_options(case):
    """(load_model keywords, loss_and_grads keywords) of a case."""
    c = dict(CASES[case])
    model = dict(dtype=c.pop("dtype"), pooling="mean")
    return c.pop("kind"), model, dict(temperature=0.05, seed=SEED, group_tokens=24, **c)


def train_batches(step):
    """The batch of step `step` of the 20-step run: the triplets rotated (4 a batch)."""
    k = step % 4
    return tuple(x[k:] + x[:k] for x in BATCH)


def train20(model, comm):
    params = {k: model.params[k] for k in model.trainable_names()}
    opt = rowgrad.AdamW(params, lr=1e-3, weight_decay=0.1, backend=model.backend, pool=pool_for(model.backend))
    for step in range(20):
        _, grads = fast_step.loss_and_grads(model, *train_batches(step), dropout=True, seed=step, group_tokens=24,
                                         table_rows=True, comm=comm)
        rowgrad.clip_grad_norm(grads, 0.5)
        opt.step(model.params, grads, lr=1e-3 * (20 - step) / 20)
    return {k: np.asarray(v) for k, v in model.params.items()}


def real(comm, out, model_dir, data_dir):
    """The real-model comparison: errors as max|a - b| / max(1, max|b|), b the one-process step's."""
    examples, _ = read_training_data(data_dir)
    batch = HBTSampler(examples, 32, sampler="hybrid", alpha=0.5, seed=0, max_negatives=1).batches(0)[0]
    texts = ([t.query for t in batch.triplets], [t.positive for t in batch.triplets],
             [list(t.negatives) for t in batch.triplets])
    model = minihbt.load_model(model_dir)
    kw = dict(dropout=True, seed=3, max_query_length=32, max_passage_length=96)
    loss, grads = fast_step.loss_and_grads(model, *texts, comm=comm, **kw)
    if comm.rank:
        return
    loss_one, grads_one = fast_step.loss_and_grads(model, *texts, **kw)
    errors = {k: float(np.abs(grads[k] - g).max() / max(1.0, float(np.abs(g).max()))) for k, g in grads_one.items()}
    with open(os.path.join(out, "real.json"), "w", encoding="utf-8") as f:
        json.dump({"kind": batch.kind, "loss": loss, "loss_one_process": loss_one, "errors": errors}, f)


def main(scenario, out, *args):
    comm = comm_module.from_environment("cpu")
    with comm.abort_on_error():
        if scenario == "step":
            for case in CASES:
                kind, load, kw = case_options(case)
                model = minihbt.load_model(TINY[kind], **load)
                loss, grads = fast_step.loss_and_grads(model, *BATCH, comm=comm, **kw)
                np.savez(os.path.join(out, f"{case}-rank{comm.rank}.npz"), loss=loss, **grads)
        elif scenario == "real":
            real(comm, out, *args)
        elif scenario == "train20":
            params = train20(minihbt.load_model(TINY["xlmr"], dtype="float64", pooling="mean"), comm)
            np.savez(os.path.join(out, f"train20-rank{comm.rank}.npz"), **params)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
