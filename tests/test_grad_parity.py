"""Whole-model gradients and an AdamW trajectory equal PyTorch's (fixtures recorded by
tests/fixtures/make_fixtures.py with torch; dropout off, float32). torch is not needed here."""
import functools
import json
import os

import numpy as np
import pytest

import minihbt
from minihbt.config import ModelConfig

from minihbt.backend import to_numpy
from minihbt.step import AdamW, clip_grad_norm, linear_schedule, loss_and_grads
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


def test_the_padding_row_is_not_trained_as_in_torch(tmp_path):
    """multilingual-E5's config names <s> (id 0, the first token of every text) its pad_token_id,
    and torch's nn.Embedding(padding_idx=pad_token_id) never gives that row a gradient. The
    fixture: tiny-bert with pad_token_id set to [CLS], the id that starts each of its texts;
    torch's loss and whole word-table gradient (that row 0) against the plain and the fast path."""
    import shutil
    from minihbt import fast_step
    ref = np.load(os.path.join(TINY["bert"], "pad_quirk.npz"))
    quirk = shutil.copytree(TINY["bert"], tmp_path / "tiny-bert-pad-quirk")
    config = json.loads((quirk / "config.json").read_text())
    (quirk / "config.json").write_text(json.dumps({**config, "pad_token_id": int(ref["pad_token_id"])}))
    model = minihbt.load_model(str(quirk), pooling="mean")
    cls_row = int(ref["pad_token_id"])
    g_torch = ref["word_grad"]
    for compute in (loss_and_grads, fast_step.loss_and_grads):
        loss, grads = compute(model, *split(TRIPLETS), temperature=TEMPERATURE)
        assert abs(loss - float(ref["loss"])) <= 1e-5
        g = grads["embeddings.word_embeddings.weight"]
        assert not g[cls_row].any() and not g_torch[cls_row].any()
        assert np.abs(g - g_torch).max() <= 1e-4 * max(1.0, np.abs(g_torch).max())
    # the row would get a gradient if it were trained: the fixture can see the difference
    _, trained = loss_and_grads(minihbt.load_model(TINY["bert"], pooling="mean"), *split(TRIPLETS),
                                temperature=TEMPERATURE)
    assert np.abs(trained["embeddings.word_embeddings.weight"][cls_row]).max() > 1e-3
