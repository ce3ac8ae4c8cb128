"""Training checkpoints: a Hugging Face model directory plus the state to resume exactly.

    OUT/checkpoint-N/        config.json, model.safetensors, tokenizer files,
                             sentence-transformers files (modules.json, 1_Pooling/, 2_Normalize/),
                             optimizer.npz (AdamW moments), trainer_state.json (step, settings,
                             sampler state)
    OUT/final/               the same after the last step

A checkpoint is written into a hidden temporary directory and renamed into place, so an
interruption never leaves a half-written checkpoint-N. Nothing else is needed to resume:
batches are a pure function of (seed, epoch) and dropout of (seed, step).
"""
import json
import os
import re
import shutil

import numpy as np


STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.npz"


def save_checkpoint(out_dir, name, model, optimizer, state):
    """Write OUT/name atomically (temp dir + rename); returns its path."""
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model.save(tmp)
    opt = optimizer.state_dict()
    arrays = {f"m/{k}": v for k, v in opt.pop("m").items()}
    arrays.update({f"v/{k}": v for k, v in opt.pop("v").items()})
    np.savez(os.path.join(tmp, OPTIMIZER_FILE), **arrays)
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({**state, "optimizer": opt}, f, indent=1)
    if os.path.exists(final):                       # an older checkpoint of the same name: replace it
        old = os.path.join(out_dir, f".old-{name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir):
    """The checkpoint of `run_dir` with the most steps (checkpoint-N or final), or None."""
    if not os.path.isdir(run_dir):
        return None
    found = []
    for d in os.listdir(run_dir):
        state = os.path.join(run_dir, d, STATE_FILE)
        if (d == "final" or re.fullmatch(r"checkpoint-\d+", d)) and os.path.exists(state):
            with open(state, encoding="utf-8") as f:
                found.append((json.load(f)["step"], d == "final", d))
    return os.path.join(run_dir, max(found)[2]) if found else None


def load_training_state(ckpt_dir, optimizer):
    """Restore AdamW moments into `optimizer`; return the trainer state dict."""
    with open(os.path.join(ckpt_dir, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    with np.load(os.path.join(ckpt_dir, OPTIMIZER_FILE)) as z:
        opt = dict(state["optimizer"])
        opt["m"] = {k[2:]: z[k] for k in z.files if k.startswith("m/")}
        opt["v"] = {k[2:]: z[k] for k in z.files if k.startswith("v/")}
    missing = set(optimizer.m) - set(opt["m"])
    if missing:
        raise ValueError(f"{ckpt_dir}/{OPTIMIZER_FILE}: no AdamW state for {sorted(missing)[:3]}")
    optimizer.load_state_dict(opt)
    return state

