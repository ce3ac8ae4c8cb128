"""Data-parallel training over MPI ranks is the one-process step: the exact answer to how the
gradient flows back through the all-gather and how it is scaled (data_parallel.Shard's docstring
derives it: no 1/N, no N; the parameter gradients summed over the ranks).

Each test launches `mpirun -np 2` (tests/dp_worker.py is one rank, or train.py itself) and
compares with one process: loss and every gradient per tensor within tol * max(1, max|b|), tol
1e-12 in float64 and 1e-5 in float32; 20 float64 steps within 1e-10; train.py's losses within
1e-5 relative. Skipped, with the reason, where mpi4py or mpirun is missing (.ci/run installs both)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dp_worker
import minihbt
from minihbt import step
from test_comm import ROOT, find_mpirun, launch, needs_mpi
from conftest import TINY, shared_path

TOL = {"float64": 1e-12, "float32": 1e-5}


def close(a, b, tol):
    return np.abs(np.asarray(a, np.float64) - b).max() <= tol * max(1.0, np.abs(b).max())


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    rc, stdout, stderr, _ = launch(2, [os.path.join(ROOT, "tests", "dp_worker.py"), "step", str(out)], timeout=300)
    assert rc == 0, stdout + stderr
    return out


@needs_mpi
@pytest.mark.parametrize("case", sorted(dp_worker.CASES))
def test_one_step_on_two_ranks_is_the_one_process_step(two_rank_steps, case):
    """Dropout on (masks are per text, drawn from its place in the global batch), GradCache,
    both candidate modes: each rank's loss and every gradient equal the plain one-process step's."""
    kind, load, kw = dp_worker.case_options(case)
    model = minihbt.load_model(TINY[kind], **load)
    plain = {k: v for k, v in kw.items() if k not in ("group_tokens", "chunk_size")}
    loss, grads = step.loss_and_grads(model, *dp_worker.BATCH, **plain)
    tol = TOL[load["dtype"]]
    for rank in (0, 1):
        got = np.load(two_rank_steps / f"{case}-rank{rank}.npz")
        assert abs(float(got["loss"]) - loss) <= tol * max(1.0, abs(loss)), rank
        assert sorted(k for k in got.files if k != "loss") == sorted(grads)
        for name, g in grads.items():
            assert close(got[name], g, tol), (rank, name)
    if kw["dropout"]:                                   # dropout is on: another seed, another loss
        assert abs(step.loss_and_grads(model, *dp_worker.BATCH, **{**plain, "seed": 8})[0] - loss) > 1e-6


@needs_mpi
def test_twenty_steps_on_two_ranks_are_twenty_steps_in_one_process(tmp_path):
    rc, stdout, stderr, _ = launch(2, [os.path.join(ROOT, "tests", "dp_worker.py"), "train20", str(tmp_path)],
                                   timeout=300)
    assert rc == 0, stdout + stderr
    model = minihbt.load_model(TINY["xlmr"], dtype="float64", pooling="mean")
    start = {k: np.array(v) for k, v in model.params.items()}
    params = {k: model.params[k] for k in model.trainable_names()}
    opt = step.AdamW(params, lr=1e-3, weight_decay=0.1, backend=model.backend)
    for i in range(20):
        step.train_step(model, opt, *dp_worker.train_batches(i), lr=1e-3 * (20 - i) / 20, max_grad_norm=0.5,
                        dropout=True, seed=i)
    for rank in (0, 1):
        got = np.load(tmp_path / f"train20-rank{rank}.npz")
        for name, p in model.params.items():
            assert close(got[name], p, 1e-10), (rank, name)
    assert not np.array_equal(start["encoder.layer.0.output.dense.weight"], model.params["encoder.layer.0.output.dense.weight"])


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@needs_mpi
def test_train_py_on_two_ranks_and_resumed_on_one(tmp_path):
    """train.py, float32, 5 steps on the tiny fixture: under mpirun -np 2 every step's loss is the
    one-process run's within 1e-5 relative; the 2-rank run stopped at step 3 and resumed in one
    process continues the same run; rank 0 alone wrote the log."""
    data = tmp_path / "tiny.jsonl"
    words = {l: [f"{l}{i}" for i in range(50)] for l in ("aa", "bb", "cc")}
    with open(data, "w", encoding="utf-8") as f:
        for g in range(40):
            for l, w in words.items():
                f.write(json.dumps({"id": f"{g}-{l}", "lang": l, "query": f"{w[g]} {w[(g * 7) % 50]} ?",
                                    "positive": f"{w[g]} {w[(g * 3) % 50]} .", "negatives": [f"{w[(g + 1) % 50]} ."],
                                    "group": str(g)}) + "\n")
    program = os.path.join(ROOT, "train.py")
    argv = lambda out, steps: [program, "--model", TINY["xlmr"], "--train", str(data), "--batch-size", "4", "--lr",
                               "1e-3", "--warmup", "2", "--quiet", "--steps", str(steps), "--out", str(out)]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for ranks, args in ((1, argv(one, 5)), (2, argv(two, 5)), (2, argv(resumed, 3)),
                        (1, [program, "--resume", str(resumed), "--steps", "5", "--quiet"])):
        rc, so, se, _ = launch(ranks, args, timeout=300)
        assert rc == 0, so + se
    a, b, c = losses(one), losses(two), losses(resumed)
    assert len(a) == len(b) == len(c) == 5
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, c)), (a, c)
    assert a[0] != a[4]


@needs_mpi
def test_a_batch_the_ranks_do_not_divide_is_refused_in_one_line(tmp_path):
    rc, so, se, seconds = launch(2, [os.path.join(ROOT, "train.py"), "--model", TINY["xlmr"], "--train",
                                     str(tmp_path / "absent.jsonl"), "--batch-size", "5", "--out", str(tmp_path / "o")],
                                 timeout=120)
    lines = [line for line in se.splitlines() if line.startswith("train.py:")]
    assert rc == 2 and any("--batch-size 5: expected a multiple of the 2 ranks" in line for line in lines), se
    assert len([line for line in lines if "--batch-size" in line]) == 1           # from rank 0 only


def numbers(tree, path=""):
    """{path: number} of every number in a JSON tree."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{path}/{i}").items()}
    return {path: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@needs_mpi
def test_evaluate_py_on_two_ranks_gives_one_process_figures(tmp_path):
    """evaluate.py under mpirun -np 2 encodes the queries and candidates in two shards and computes
    the metrics once: every figure within 1e-6 of one process's, every embedding within 1e-6 (so,
    with unit vectors of 384 dimensions, a score moves by at most 2 sqrt(384) 1e-6 < 4e-5: a
    ranking can differ only between candidates whose scores are within 4e-5 of each other)."""
    from minihbt import demo
    world = demo.make_world(seed=3, n_languages=3, n_entities=10, n_relations=4)
    demo.lareqa_files(world, str(tmp_path / "data"), "eval")
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        rc, so, se, _ = launch(ranks, [os.path.join(ROOT, "evaluate.py"), "--model", TINY["xlmr"], "--data",
                                       str(tmp_path / "data"), "--out", str(out / "res.json"), "--cache",
                                       str(out / "cache")], timeout=300)
        assert rc == 0, so + se
        assert so.count(" languages, ") == 1                          # one summary: rank 0's
        with open(out / "res.json", encoding="utf-8") as f:
            res = json.load(f)
        (cache,) = (out / "cache").iterdir()
        runs[ranks] = (numbers({k: v for k, v in res.items() if k not in ("seconds", "model")}), dict(np.load(cache)))
    (one, one_emb), (two, two_emb) = runs[1], runs[2]
    assert one.keys() == two.keys() and len(one) > 50
    assert all(abs(one[k] - two[k]) <= 1e-6 for k in one), max(abs(one[k] - two[k]) for k in one)
    assert one_emb.keys() == two_emb.keys() and all(np.abs(one_emb[k] - two_emb[k]).max() <= 1e-6 for k in one_emb)


@needs_mpi
def test_the_real_model_on_two_ranks_is_the_one_process_step(me5_dir, tmp_path):
    """multilingual-e5-small, train_step.py's mlqa-hybrid batch (32 triplets of MLQA-R), float32,
    dropout on: the step over 2 ranks against the same step in one process, loss and every
    gradient within 1e-5 (float32 rounding: the ranks form other length groups and sum in
    another order)."""
    data = shared_path("data", "mlqa-r")
    if not os.path.isdir(data):
        pytest.skip(f"{data} is absent: the real-model comparison is skipped")
    rc, so, se, _ = launch(2, [os.path.join(ROOT, "tests", "dp_worker.py"), "real", str(tmp_path), me5_dir, data],
                           timeout=600)
    assert rc == 0, so + se
    with open(tmp_path / "real.json", encoding="utf-8") as f:
        res = json.load(f)
    assert abs(res["loss"] - res["loss_one_process"]) <= 1e-5 * abs(res["loss_one_process"])
    assert len(res["errors"]) == 197 and max(res["errors"].values()) <= 1e-5, sorted(res["errors"].items(),
                                                                                    key=lambda kv: -kv[1])[:3]


@needs_mpi
def test_ranks_launched_with_different_settings_are_refused_in_one_line(tmp_path):
    """mpirun with two app contexts (rank 0: --lr 1e-3, rank 1: --lr 2e-3): refused before any
    model is loaded, exit 2, one line from rank 0 naming the setting."""
    data = tmp_path / "tiny.jsonl"
    data.write_text(json.dumps({"lang": "aa", "query": "q ?", "positive": "p ."}) + "\n")
    args = [os.path.join(ROOT, "train.py"), "--model", TINY["xlmr"], "--train", str(data), "--batch-size", "2",
            "--out", str(tmp_path / "out")]
    from minihbt.comm import MPI
    over = ["--oversubscribe"] if "Open MPI" in MPI.Get_library_version() else []
    cmd = [find_mpirun(), *over, "-np", "1", sys.executable, *args, "--lr", "1e-3", ":",
           "-np", "1", sys.executable, *args, "--lr", "2e-3"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "ranks disagree on setting 'lr'" in lines[0] and "rank 1 has 0.002" in lines[0], lines
    assert not (tmp_path / "out").exists()                                   # nothing made before the check
