"""FlagEmbedding's own fine-tuning step (examples/flagembedding_step.py) against minihbt's, with
`python -m minihbt.check step` on the tiny fixtures in float64: aligned, it passes tensor for
tensor; on a batch with a false negative it is named at `mask` (it masks no repeated text); in
its cross-device mode on 2 CPU ranks every parameter gradient is exactly half the batch loss's
(FlagEmbedding's 1/W scale: a non-differentiable all-gather, then DDP's average). Without torch
or FlagEmbedding the example says what to install in one line.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from minihbt.check import bundle, export_cmd, step_cmd
from conftest import TINY
from test_check_step import CLEAN, first_divergence, run, tensors, write_batch
from fixtures.spec import TRIPLETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "flagembedding_step.py")
# FlagEmbedding's own defaults, so that only the prefixes, lr and weight decay need passing to it.
ALIGNED = ("--pooling", "cls", "--temperature", "0.02", "--max-query-len", "32", "--max-passage-len", "128")
# CLEAN with the third triplet's negative replaced by the first triplet's positive: a false
# negative for query 0 (its own positive again, among the negatives), which minihbt masks out of
# every row (column 6 repeats column 0) and FlagEmbedding keeps.
FALSE_NEGATIVE = CLEAN[:2] + [(CLEAN[2][0], CLEAN[2][1], [CLEAN[0][1]])] + CLEAN[3:]
BATCHES = {"clean": CLEAN, "false-negative": FALSE_NEGATIVE, "triplets": TRIPLETS}

needs_flagembedding = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("FlagEmbedding") is None,
    reason="torch or FlagEmbedding is not installed: FlagEmbedding's step is not run (CI installs both)")


def export(tmp_path, model, batch):
    folder = tmp_path / f"golden-{model}-{batch}"
    argv = ["--model", TINY[model], "--dtype", "float64", "--out", str(folder), *ALIGNED,
            "--batch", write_batch(tmp_path / f"{batch}.jsonl", BATCHES[batch])]
    assert export_cmd.main(argv) == 0
    return str(folder)


def flagembedding(bundle_path, out, *flags):
    """Run the example in its own process: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, EXAMPLE, "--bundle", bundle_path, "--out", str(out), *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return done.returncode, done.stdout, done.stderr


@needs_flagembedding
@pytest.mark.parametrize("model", ["xlmr", "bert"])
def test_the_aligned_step_passes(tmp_path, capsys, model):
    path = export(tmp_path, model, "clean")
    status, _, err = flagembedding(path, tmp_path / "theirs")
    assert status == 0, err
    status, out, _ = run(step_cmd.main, [path, str(tmp_path / "theirs")], capsys)
    assert status == 0 and "not provided" not in out, out                 # every tensor of the bundle


@needs_flagembedding
def test_a_false_negative_is_named_at_mask(tmp_path, capsys):
    path = export(tmp_path, "xlmr", "false-negative")
    assert not tensors(path)["mask"][:, 6].any()                           # minihbt masks it
    status, _, err = flagembedding(path, tmp_path / "theirs")
    assert status == 0, err
    status, out, _ = run(step_cmd.main, [path, str(tmp_path / "theirs")], capsys)
    assert status == 1 and first_divergence(out) == "mask", out


@needs_flagembedding
def test_cross_device_gradients_are_one_over_w(tmp_path, capsys):
    """2 ranks: the loss, scores and embeddings' gradients are the batch's; every parameter
    gradient (and so the norm clipping sees) is exactly 1/2 of it."""
    path = export(tmp_path, "xlmr", "clean")
    status, _, err = flagembedding(path, tmp_path / "theirs", "--cross-device", "2")
    assert status == 0, err
    status, out, _ = run(step_cmd.main, [path, str(tmp_path / "theirs")], capsys)
    assert status == 1 and first_divergence(out) == "grad/encoder.layer.1.output.LayerNorm.weight", out
    theirs, ours = load_file(str(tmp_path / "theirs" / "tensors.safetensors")), tensors(path)
    parameter_grads = [n for n in ours if bundle.family(n) == "param_grad"]      # grad/P and grad_norm
    assert len(parameter_grads) == len(bundle.BLOCK_BACKWARD) * 2 + len(bundle.EMBEDDINGS_BACKWARD) + 1
    for name in parameter_grads:                                           # every one, and the gradient norm
        scale = max(1.0, np.abs(ours[name]).max())
        assert np.abs(theirs[name] - 0.5 * ours[name]).max() <= 1e-12 * scale, name


def test_without_flagembedding_it_says_what_to_install(tmp_path):
    hide = ("import runpy, sys; sys.modules['FlagEmbedding'] = None; "
            f"sys.argv = [{EXAMPLE!r}, '--bundle', {str(tmp_path)!r}, '--out', {str(tmp_path / 'o')!r}]; "
            f"runpy.run_path({EXAMPLE!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "pip install FlagEmbedding" in done.stderr and "Traceback" not in done.stderr


@needs_flagembedding
def test_unequal_groups_are_refused(tmp_path):
    """FlagEmbedding's train_group_size is one number: triplets with 0 to 2 negatives are refused."""
    status, _, err = flagembedding(export(tmp_path, "xlmr", "triplets"), tmp_path / "theirs")
    assert status == 2 and "same number of negatives" in err and len(err.strip().splitlines()) == 1, err
