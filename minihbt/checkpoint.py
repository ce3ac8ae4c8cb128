"""Training runs on disk: checkpoints that resume exactly, and the run folder that holds them.

    OUT/checkpoint-N/        config.json, model.safetensors, tokenizer files,
                             sentence-transformers files (modules.json, 1_Pooling/, 2_Normalize/),
                             optimizer.npz (AdamW moments), trainer_state.json (step, settings,
                             sampler state)
    OUT/final/               the same after the last step
    OUT/log.jsonl            one line per step

A checkpoint is written into a hidden `.tmp-NAME` folder and renamed into place (an older
NAME is moved to `.old-NAME` for the moment of the swap), so an interruption never leaves a
half-written checkpoint-N. `remove_partial_checkpoints` clears what an interruption left
behind. Nothing else is needed to resume: batches are a pure function of (seed, epoch) and
dropout of (seed, step).
"""
import json
import os
import re
import shutil

import numpy as np

from .files import write_json, write_text
from .weights import CheckpointError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.npz"
LOG_FILE = "log.jsonl"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+|final")
PARTIAL_PREFIXES = (".tmp-", ".old-")


def save_checkpoint(out_dir, name, model, optimizer, state):
    """Write OUT/name atomically (temp dir + rename); returns its path."""
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model.save(tmp)
    opt = optimizer.state_dict()
    arrays = {f"{moment}/{k}": v for moment in ("m", "v") for k, v in opt.pop(moment).items()}
    np.savez(os.path.join(tmp, OPTIMIZER_FILE), **arrays)
    write_json(os.path.join(tmp, STATE_FILE), {**state, "optimizer": opt}, indent=1)
    if os.path.exists(final):                       # an older checkpoint of the same name: replace it
        old = os.path.join(out_dir, f".old-{name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def read_trainer_state(ckpt_dir):
    """The trainer_state.json of a checkpoint (a dict with step and settings); a damaged one
    is a CheckpointError naming the file."""
    path = os.path.join(ckpt_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("settings"), dict)):
        raise CheckpointError(f"{path}: expected an object with an integer 'step' and a 'settings' object")
    return state


def is_checkpoint(path):
    """Whether `path` is a checkpoint folder (checkpoint-N or final, with its trainer state)."""
    name = os.path.basename(os.path.normpath(path))
    return bool(CHECKPOINT_NAME.fullmatch(name)) and os.path.isfile(os.path.join(path, STATE_FILE))


def latest_checkpoint(run_dir):
    """The checkpoint of `run_dir` with the most steps (checkpoint-N or final), or None."""
    if not os.path.isdir(run_dir):
        return None
    found = [(read_trainer_state(os.path.join(run_dir, d))["step"], d == "final", d)
             for d in os.listdir(run_dir) if is_checkpoint(os.path.join(run_dir, d))]
    return os.path.join(run_dir, max(found)[2]) if found else None


def load_training_state(ckpt_dir, optimizer):
    """Restore AdamW moments into `optimizer`; return the trainer state dict."""
    state = read_trainer_state(ckpt_dir)
    with np.load(os.path.join(ckpt_dir, OPTIMIZER_FILE)) as z:
        opt = dict(state["optimizer"])
        opt["m"] = {k[2:]: z[k] for k in z.files if k.startswith("m/")}
        opt["v"] = {k[2:]: z[k] for k in z.files if k.startswith("v/")}
    missing = set(optimizer.m) - set(opt["m"])
    if missing:
        raise CheckpointError(f"{ckpt_dir}/{OPTIMIZER_FILE}: no AdamW state for {sorted(missing)[:3]}")
    optimizer.load_state_dict(opt)
    return state


# ----------------------------------------------------------------------------- the run folder

def run_contents(run_dir):
    """What makes `run_dir` a run: its log.jsonl, checkpoint-N and final folders (sorted names)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d == LOG_FILE or CHECKPOINT_NAME.fullmatch(d))


def clear_run(run_dir):
    """Delete the run in `run_dir` (log, checkpoint folders, partial saves of them); other
    files stay. Returns the names removed."""
    removed = remove_partial_checkpoints(run_dir) + run_contents(run_dir)
    for name in run_contents(run_dir):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and is_checkpoint(path):
            shutil.rmtree(path)
        elif name == LOG_FILE:
            os.remove(path)
        else:
            removed.remove(name)                              # a checkpoint-N that holds no checkpoint: kept
    return removed


def remove_partial_checkpoints(run_dir):
    """Clear what an interrupted save left in `run_dir`: `.tmp-NAME` folders (never complete
    until renamed) and `.old-NAME` ones. If the swap was cut between its two renames, NAME is
    missing and `.old-NAME` is the last complete version: it is put back. Also the log's
    temporary copies. Returns the names removed."""
    if not os.path.isdir(run_dir):
        return []
    removed = []
    for entry in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, entry)
        prefix, name = entry[:5], entry[5:]
        if prefix not in PARTIAL_PREFIXES or not CHECKPOINT_NAME.fullmatch(name):
            if re.fullmatch(r"log\.tmp-\d+\.jsonl", entry):           # the log's temporary copy
                os.remove(path)
                removed.append(entry)
            continue                                                  # not ours: a user's file stays
        if prefix == ".old-" and not os.path.exists(os.path.join(run_dir, name)):
            os.replace(path, os.path.join(run_dir, name))
        else:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(entry)
    return removed


def prepare_run_folder(run_dir, step, overwrite):
    """Ready `run_dir` for a run starting at `step`: delete the old run first (overwrite),
    clear what an interrupted save left, cut the log back to `step` (a resumed run rewrites
    what came after). Returns what it did, as lines for the user."""
    said = []
    removed = clear_run(run_dir) if overwrite else []
    if removed:
        said.append(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
    removed = remove_partial_checkpoints(run_dir)
    if removed:
        said.append(f"removed {', '.join(removed)} (left by an interrupted save) from {run_dir}")
    truncate_log(run_dir, step)
    return said


def truncate_log(run_dir, step):
    """Keep only the log lines of steps <= step (a resumed run rewrites what came after); a
    last line cut short by a kill is dropped."""
    path = os.path.join(run_dir, LOG_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"{path}: line {i + 1} is not valid JSON; the log is damaged") from None
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))
