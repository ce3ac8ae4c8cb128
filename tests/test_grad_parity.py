"""Whole-model gradients and an AdamW trajectory equal PyTorch's (fixtures recorded by
tests/fixtures/make_fixtures.py with torch; dropout off, float32). torch is not needed here."""
import functools
import os

import numpy as np
import pytest

import minihbt
from minihbt.config import ModelConfig
from minihbt.step import loss_and_grads
from minihbt.backend import to_numpy
from minihbt.optim import AdamW, clip_grad_norm, linear_schedule
from minihbt.weights import expected_shapes
from conftest import FIXTURES, TINY
from fixtures.spec import ADAMW, ME5_GRADS, TEMPERATURE, TRIPLETS


def split(triplets):
    return [t[0] for t in triplets], [t[1] for t in triplets], [t[2] for t in triplets]


@functools.lru_cache(maxsize=None)
def minihbt_grads(kind, device="cpu"):
    model = minihbt.load_model(TINY[kind], pooling="mean", device=device)
    return loss_and_grads(model, *split(TRIPLETS), temperature=TEMPERATURE)


def reference(kind):
    return np.load(os.path.join(TINY[kind], "grads.npz"))


def all_tensor_names(kind):
    """Every parameter of the checkpoint, as config.json implies it (pooler included for BERT)."""
    cfg = ModelConfig.from_file(os.path.join(TINY[kind], "config.json"))
    return list(expected_shapes(cfg, pooler=(kind == "bert")))


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_loss_matches_torch(kind, device):
    loss, grads = minihbt_grads(kind, device)
    assert abs(loss - float(reference(kind)["loss"])) <= 1e-5
    # every tensor is covered: the reference's, minihbt's and the config's names are the same set
    ref_names = {k[len("grad/"):] for k in reference(kind).files if k.startswith("grad/")}
    assert set(grads) == ref_names == set(all_tensor_names(kind))


@pytest.mark.parametrize("kind,name", [(k, n) for k in ("xlmr", "bert") for n in all_tensor_names(k)])
def test_gradient_matches_torch(kind, name, device):
    _, grads = minihbt_grads(kind, device)
    g_torch = reference(kind)["grad/" + name]
    g = grads[name]
    assert g.shape == g_torch.shape and g.dtype == np.float32
    assert np.abs(g - g_torch).max() <= 1e-4 * max(1.0, np.abs(g_torch).max())


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_ten_adamw_steps_match_torch(kind, device):
    ref = reference(kind)
    a = ADAMW
    model = minihbt.load_model(TINY[kind], pooling="mean", device=device)
    opt = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=a["lr"], betas=a["betas"], eps=a["eps"],
                weight_decay=a["weight_decay"], backend=model.backend)
    losses, norms = [], []
    for step in range(a["steps"]):
        batch = TRIPLETS[step % 2:] if step % 2 else TRIPLETS          # as the fixture script
        loss, grads = loss_and_grads(model, *split(batch), temperature=TEMPERATURE)
        grads = {k: model.xp.asarray(v) for k, v in grads.items()}
        norms.append(clip_grad_norm(grads, a["clip"]))
        opt.step(model.params, grads, lr=linear_schedule(step, a["lr"], a["warmup"], a["steps"]))
        losses.append(loss)
    assert max(norms) > a["clip"]                                      # clipping was exercised
    np.testing.assert_allclose(norms, ref["adamw_grad_norms"], rtol=1e-4)
    assert np.abs(np.array(losses) - ref["adamw_losses"]).max() <= 1e-5
    assert losses[-1] < losses[0] / 2
    for name, p in model.params.items():
        assert np.abs(to_numpy(p) - ref["final/" + name]).max() <= 1e-5, name


def test_me5_loss_and_gradients_match_torch(me5_dir):
    ref = np.load(os.path.join(FIXTURES, "me5_grads.npz"))
    model = minihbt.load_model(me5_dir)
    loss, grads = loss_and_grads(model, *split(TRIPLETS), temperature=TEMPERATURE)
    assert abs(loss - float(ref["loss"])) <= 1e-5
    assert sorted(k[len("grad/"):] for k in ref.files if k.startswith("grad/")) == sorted(ME5_GRADS)
    for name in ME5_GRADS:
        g_torch = ref["grad/" + name]
        assert np.abs(grads[name] - g_torch).max() <= 1e-4 * max(1.0, np.abs(g_torch).max()), name
