"""The CUDA path on the CuPy stand-in (tests/fake_cupy, MINIHBT_FAKE_CUPY=1): the stand-in catches
bugs planted in minihbt's own code; the fast step is deterministic where atomics are not;
data-parallel training over NCCL on 2 and 4 thread ranks equals the one-process step with
bit-identical ranks; train.py and evaluate.py run with --device cuda; benchmarks/gpu_check.py's stages
run in their smoke form (stages 3 and 4: minihbt's side, the PyTorch side recorded as needing a GPU).
Skipped without the stand-in."""
import inspect
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import minihbt
from conftest import TINY
from fixtures.spec import TEMPERATURE, TRIPLETS
from minihbt import comm, encoder, kernels, layers, rowgrad, step
from minihbt import fast_step as fast_step_module
from thread_ranks import ThreadHost, World

pytestmark = pytest.mark.skipif(not getattr(kernels.cupy, "STAND_IN", False),
                                reason="runs on the CuPy stand-in only (MINIHBT_FAKE_CUPY=1)")
Q, P, N = ([t[0] for t in TRIPLETS[:4]], [t[1] for t in TRIPLETS[:4]], [t[2] for t in TRIPLETS[:4]])   # 4: 2 or 4 ranks


def fast_step(fused=False, **kw):
    model = minihbt.load_model(TINY["xlmr"], device="cuda", fused_kernels=fused)
    return fast_step_module.loss_and_grads(model, Q, P, N, temperature=TEMPERATURE, dropout=True, seed=7, **kw)


def bits(grads):
    return {name: np.ascontiguousarray(g).tobytes() for name, g in grads.items()}


# ---------------------------------------------------------------- planted bugs, each caught

def plant(monkeypatch, module, function, old, new):
    """Replace `module.function` by its own source with `old` replaced by `new` (a planted bug)."""
    source = textwrap.dedent(inspect.getsource(getattr(module, function)))
    assert source.count(old) == 1, (function, old)
    made = {}
    exec(compile(source.replace(old, new), module.__file__, "exec"), vars(module), made)
    monkeypatch.setattr(module, function, made[function])


def test_the_unplanted_fused_step_runs():
    loss, grads = fast_step(fused=True)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())


def test_planted_missing_get_is_caught(monkeypatch):
    plant(monkeypatch, fast_step_module, "loss_and_grads", "to_numpy(g) if not", "np.asarray(g) if not")
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        fast_step()


def test_planted_host_mask_in_where_is_caught(monkeypatch):
    plant(monkeypatch, step, "info_nce_forward", "xp.where(xp.asarray(mask),", "xp.where(mask,")
    with pytest.raises(TypeError, match="NumPy array"):
        fast_step()


def test_planted_python_float_for_a_float_parameter_is_caught(monkeypatch):
    plant(monkeypatch, kernels, "add_layernorm", "cupy.float32(eps)", "float(eps)")
    with pytest.raises(TypeError, match="Python float as a double"):
        fast_step(fused=True)


def test_planted_grid_past_the_end_is_caught(monkeypatch):
    plant(monkeypatch, kernels, "softmax_grad", "((probs.size // S,)", "((probs.size // S + 1,)")
    with pytest.raises(TypeError, match="out-of-bounds"):
        fast_step(fused=True)


def test_planted_grid_short_of_the_rows_is_caught(monkeypatch):
    """Half the rows never written: they hold what cupy.empty gave, NaN on the stand-in."""
    plant(monkeypatch, kernels, "add_layernorm", "((x.size // H,)", "((x.size // H // 2,)")
    loss, grads = fast_step(fused=True)
    assert not np.isfinite(loss) or not all(np.isfinite(g).all() for g in grads.values())


# ---------------------------------------------------------------- determinism where atomics are shuffled

def test_two_fast_steps_have_the_same_bits_and_add_at_would_not(monkeypatch):
    runs = [fast_step(table_rows=False) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and bits(runs[0][1]) == bits(runs[1][1])

    def add_at(be, inverse, at, d_rows, n):                          # the old formulation: atomic adds
        out = be.xp.zeros((n, d_rows.shape[1]), dtype=d_rows.dtype)
        be.xp.add.at(out, be.asarray(inverse), d_rows[be.asarray(at)])
        return out
    monkeypatch.setattr(rowgrad, "sum_rows_in_order", add_at)
    runs = [fast_step(table_rows=False) for _ in range(2)]
    assert bits(runs[0][1])[encoder.WORD_TABLE] != bits(runs[1][1])[encoder.WORD_TABLE]


# ---------------------------------------------------------------- data-parallel over NCCL, ranks as threads

def dp_run(ranks, steps=5):
    """Each rank's (losses, step-1 gradients, weights after each step) of `steps` clipped AdamW steps."""
    host = World(ranks)
    batches = [(Q[s % 2:] + Q[:s % 2], P[s % 2:] + P[:s % 2], N[s % 2:] + N[:s % 2]) for s in range(steps)]

    def rank(r):
        c = comm.NcclCommunicator.over(ThreadHost(host, r)) if ranks > 1 else comm.SingleProcess()
        model = minihbt.load_model(TINY["xlmr"], device="cuda")
        opt = rowgrad.AdamW(model.params, lr=1e-3, backend=model.backend)
        losses, first, weights = [], None, []
        for s, (q, p, n) in enumerate(batches):
            loss, grads = fast_step_module.loss_and_grads(model, q, p, n, temperature=TEMPERATURE, dropout=True, seed=s,
                                                table_rows=True, return_numpy=False, comm=c)
            if first is None:
                first = {k: (rowgrad.dense(model.backend, g).get()) for k, g in grads.items()}
            rowgrad.clip_grad_norm(grads, 1.0)
            opt.step(model.params, grads)
            losses.append(loss)
            weights.append({k: v.get().tobytes() for k, v in model.params.items()})
        c.close()
        return losses, first, weights
    with ThreadPoolExecutor(ranks) as pool:
        return [f.result(timeout=600) for f in [pool.submit(rank, r) for r in range(ranks)]]


@pytest.fixture(scope="module")
def one_process():
    return dp_run(1)[0]


@pytest.mark.parametrize("ranks", [2, 4])
def test_nccl_data_parallel_equals_one_process_with_identical_ranks(one_process, ranks):
    losses1, grads1, _ = one_process
    results = dp_run(ranks)
    for losses, grads, weights in results:
        assert abs(losses[0] - losses1[0]) <= 1e-5 * abs(losses1[0])
        for name, g in grads1.items():
            assert np.abs(grads[name] - g).max() <= 1e-5 * max(1.0, np.abs(g).max()), name   # as test_data_parallel
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, losses1))
    for s in range(len(results[0][2])):                              # after every step, every rank alike
        assert all(r[2][s] == results[0][2][s] for r in results[1:]), f"ranks' weights differ after step {s + 1}"


# ---------------------------------------------------------------- the programs

def test_train_resume_and_evaluate_with_device_cuda(tmp_path):
    import evaluate
    import train
    from minihbt import demo
    data = tmp_path / "train.jsonl"
    words = {lang: [f"{lang}{i}" for i in range(20)] for lang in ("aa", "bb")}
    data.write_text("".join(json.dumps({"id": f"{g}-{lang}", "lang": lang, "query": f"{w[g]} {w[(g * 7) % 20]} ?",
                                        "positive": f"{w[g]} {w[(g * 3) % 20]} .", "group": str(g)}) + "\n"
                            for g in range(12) for lang, w in words.items()))
    out = tmp_path / "run"
    common = ["--model", TINY["xlmr"], "--train", str(data), "--batch-size", "4", "--lr", "1e-3", "--device", "cuda",
              "--out", str(out), "--quiet"]
    train.main(common + ["--steps", "2", "--save-every", "1"])
    train.main(common + ["--steps", "3", "--resume", str(out)])
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.isfinite(losses).all()
    world = demo.make_world(seed=0, n_languages=2, n_entities=6, n_relations=3)
    report = evaluate.main(["--model", str(out / "final"), "--data", demo.lareqa_files(world, str(tmp_path / "eval"),
                                                                                       "eval"),
                            "--device", "cuda", "--cache", ""])
    assert 0 <= report["mono"]["map"] <= 1


def gpu_check(tmp_path, *args):
    """benchmarks/gpu_check.py with `args` (--out is tmp_path/out), in its own process, as gpu_check.sh runs it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ["PYTHONPATH"], root]))
    return subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), *args,
                           "--out", str(tmp_path / "out")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def smoke_stage(tmp_path, stage):
    """Stage `stage` in its smoke form on --device cuda: the process's result and the stage's record."""
    res = gpu_check(tmp_path, "stage", str(stage), "--work", str(tmp_path / "work"), "--limit", "300",
                    "--device", "cuda", "--smoke")
    assert res.returncode == 0 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"][str(stage)]
    assert record["checks"] and not [c for c in record["checks"] if not c["passed"]], record["checks"]
    return res, record


@pytest.mark.parametrize("stage", [2, 5])
def test_gpu_check_stage_smoke_on_the_stand_in(tmp_path, stage):
    """benchmarks/gpu_check.py's stage 2 (fused kernels, train.py --device cuda) and stage 5 (CPU
    against GPU training steps: its CPU gradients were once clipped in place before comparison)."""
    _, record = smoke_stage(tmp_path, stage)
    if stage == 2:                        # train.py's switches found (once missed: its source never spells them)
        names = [c["name"] for c in record["checks"]]
        assert {"train.py fused losses vs plain", "train.py tf32 losses vs plain"} <= set(names), names


def test_gpu_check_stage_1_smoke_runs_cuda_tests_on_the_stand_in(tmp_path):
    _, record = smoke_stage(tmp_path, 1)
    (pytest_run,) = [v for k, v in record["figures"].items() if k.startswith("pytest ")]
    cuda = pytest_run["counts"]["cuda"]
    assert cuda["passed"] >= 5 and cuda["failed"] + cuda["errors"] == 0, pytest_run
    assert [c["name"] for c in record["checks"]][-1] == "CUDA tests ran"


@pytest.mark.parametrize("stage", [3, 4])
def test_gpu_check_stages_3_and_4_run_minihbt_and_say_pytorch_needs_a_gpu(tmp_path, stage):
    """minihbt's side runs on the stand-in; the PyTorch side is recorded as needing a GPU (never as
    FAIL), and the summary says so and exits 0."""
    _, record = smoke_stage(tmp_path, stage)
    if stage == 3:
        (case,) = record["figures"]["train_step.py"]["cases"]
        assert "seconds" in case["sides"]["minihbt"] and "torch" not in case["sides"]
        assert all("ms_per_step" in r for r in record["figures"]["minihbt fused kernels off/on"].values())
    else:
        results = record["figures"]["encoding"]["results"]
        assert results["minihbt"]["fp32"]["texts_per_s"] > 0 and "sentence-transformers" not in results
        assert not [k for k in record["figures"]["retrieval"] if k.startswith("torch")]
    needs = record["needs_gpu"]
    assert len(needs) == 2 and all("stand-in" in part["reason"] for part in needs), needs
    summary = gpu_check(tmp_path, "summary")
    lines = summary.stdout.splitlines()
    assert summary.returncode == 0 and not [line for line in lines if line.strip().startswith("FAIL")]
    assert len([line for line in lines if line.strip().startswith("NEEDS-GPU")]) == 2, summary.stdout
