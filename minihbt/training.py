"""The training loop: batches, model and optimiser, one AdamW step per batch, checkpoints.

`TrainSettings` holds every setting of a run (train.py's flags; the study and the demo fill it
in). `train(settings, comm)` runs it over the ranks of `comm` (or in one process) and returns
Trained; resuming from a checkpoint continues bit for bit (train.py's docstring says how). The
first Ctrl-C or SIGTERM finishes the step, saves and raises Stopped; a non-finite loss raises
NonFiniteLoss, the last good checkpoint kept.
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import List, NamedTuple, Optional

import numpy as np

from . import __version__, data
from .bars import progress_bar
from .batchlog import BatchLog
from .checkpoint import LOG_FILE, load_training_state, prepare_run_folder, save_checkpoint
from .cli import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Problems, Range, build_settings, flag_of, setting
from .comm import SingleProcess
from .config import ConfigError, ModelConfig
from .fast_step import loss_and_grads
from .model import load_model
from .parallel import pool_for
from .rowgrad import AdamW, clip_grad_norm
from .sampler import HBTSampler
from .step import scheduled_lr


@dataclass
class TrainSettings:
    """Every setting of a training run: the flags, the --config keys, and what each
    checkpoint saves for --resume. Each default is written once, here."""
    model: Optional[str] = setting(None, "Hugging Face model directory to start from (config.json, safetensors, "
                                         "tokenizer.json); required unless --resume", metavar="DIR")
    train: Optional[List[str]] = setting(None, "training data, repeatable, one source each (batches never mix "
                                               "sources): a SQuAD-format .json file, a folder of them, or a .jsonl "
                                               "file; LANG=PATH forces the language (see README). Required unless "
                                               "--resume", repeat=True, metavar="PATH")
    sampler: str = setting("hybrid", "batch composition", choices=("xx", "xy", "hybrid"))
    alpha: float = setting(0.5, "hybrid: probability of a monolingual (xx) batch", accepted=FRACTION,
                           note=", the paper's best")
    xx_weighting: str = setting("uniform", "xx and hybrid: draw the batch language uniformly (the paper's rule) or "
                                           "in proportion to its data", choices=("uniform", "proportional"))
    batch_size: int = setting(100, "triplets per batch", accepted=AT_LEAST_1, note=", as in the paper")
    max_negatives: int = setting(1, "hard negatives per triplet, other sentences of the paragraph", accepted=AT_LEAST_0)
    lr: float = setting(3e-5, "peak learning rate", accepted=POSITIVE, note=", as in the paper")
    weight_decay: float = setting(0.01, "AdamW weight decay, not on biases and LayerNorm", accepted=AT_LEAST_0)
    warmup: int = setting(0, "linear warm-up steps from 0 to --lr", accepted=AT_LEAST_0)
    schedule: str = setting("constant", "after warm-up: constant (runs can be extended with --resume) or linear "
                                        "decay to 0 at --decay-steps", choices=("constant", "linear"))
    decay_steps: Optional[int] = setting(None, "with --schedule linear: the step at which lr reaches 0, more than "
                                               "--warmup and at least --steps", accepted=AT_LEAST_1,
                                         default_text="--steps")
    steps: int = setting(1000, "total optimiser steps of the run", accepted=AT_LEAST_1)
    max_query_len: int = setting(64, "query truncation in tokens, at most the model's positions", accepted=Range(2),
                                 note=", or the model's limit if lower")
    max_passage_len: int = setting(256, "passage truncation in tokens, at most the model's positions",
                                   accepted=Range(2), note=", or the model's limit if lower")
    temperature: float = setting(0.05, "InfoNCE temperature on cosine scores", accepted=POSITIVE)
    candidates: str = setting("inbatch", "inbatch: all positives and negatives of the batch; paper: own positive "
                                         "+ all negatives (Eq. 1)", choices=("inbatch", "paper"))
    symmetric: bool = setting(False, "add the passage->query loss term")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this; 0 disables", accepted=AT_LEAST_0)
    grad_cache_chunk: int = setting(0, "GradCache: embed N texts at a time, so memory is bounded by N, not the "
                                       "batch; same gradients; 0 = off", accepted=AT_LEAST_0)
    pooling: Optional[str] = setting(None, "pooling", choices=("mean", "cls", "pooler"),
                                     default_text="the checkpoint's own, else mean")
    seed: int = setting(0, "seed of batches and dropout", accepted=AT_LEAST_0)
    device: str = setting("cpu", "cpu (NumPy) or cuda (CuPy)", choices=("cpu", "cuda"))
    tf32: bool = setting(False, "cuda only: float32 GEMMs on TF32 tensor cores (faster, ~1e-3 relative error)")
    fused_kernels: bool = setting(False, "cuda only: one CuPy kernel each for GELU, residual+LayerNorm, the masked "
                                         "softmax (with their gradients) and the AdamW update (not yet verified on a "
                                         "GPU, see minihbt/kernels.py)")
    out: str = setting(os.path.join("runs", "hbt"), "run directory: checkpoint-N/, final/ (Hugging Face directories "
                       "with optimizer.npz and trainer_state.json beside the weights), log.jsonl", metavar="DIR")
    save_every: int = setting(500, "checkpoint every N steps; 0 = only at the end", accepted=AT_LEAST_0)
    quiet: bool = setting(False, "no progress bar or messages")
    batch_log: Optional[str] = setting(None, "write each batch a step is taken on to FILE, one JSON line a step "
                                             "(docs/batch-log.md), for `python -m minihbt.check batches`; a new run "
                                             "refuses an existing FILE unless --overwrite, a resumed one rewrites it",
                                       metavar="FILE")


RESUMABLE = ("steps", "save_every", "device", "tf32", "fused_kernels", "quiet")     # the rest stay as a run saved them
CUDA_ONLY = ("tf32", "fused_kernels")


class Stopped(Exception):
    """Ctrl-C or SIGTERM (`signum`) stopped the run; the message says where it was saved."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(ValueError):
    """The loss became inf or NaN; the message names the step and the checkpoint kept."""


class Trained(NamedTuple):
    """train()'s answer: `path` holds the final model; `signum` is the signal a stop was asked
    with during the last step (the run finished it and saved final/), else None."""
    path: str
    signum: Optional[int]


class GracefulStop:
    """While active, the first Ctrl-C or SIGTERM (what batch schedulers send before killing
    a job) only sets `signum`: the loop finishes its step, saves and raises Stopped. A second
    signal stops at once (KeyboardInterrupt for Ctrl-C, Stopped for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Stopped("terminated", signum)
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint (again to abort)", file=sys.stderr)


def check_combinations(s, given, problems):
    """Settings that are fine alone but wrong together, or set where nothing reads them
    (`given`: the names the user set)."""
    if "decay_steps" in given and s.decay_steps is not None and s.schedule != "linear":
        problems.add(f"--decay-steps {s.decay_steps}: only with --schedule linear (the constant schedule never "
                     "decays)")
    if s.schedule == "linear":
        decay = s.decay_steps or s.steps
        if decay <= s.warmup:
            problems.add(f"--warmup {s.warmup}: expected less than the step where the linear schedule reaches 0 "
                         f"(--decay-steps, default --steps: {decay}); else lr is 0 after warm-up")
        elif decay < s.steps:
            problems.add(f"--decay-steps {decay}: expected at least --steps {s.steps} (else steps {decay}.."
                         f"{s.steps - 1} train at lr 0)")
    check_sampler_combinations(s, given, problems)
    for name in CUDA_ONLY:
        if name in given and getattr(s, name) and s.device != "cuda":
            problems.add(f"{flag_of(name)}: only with --device cuda")


def check_sampler_combinations(s, given, problems):
    """--alpha only with the hybrid sampler, --xx-weighting not with xy (the kit's sampler flags too)."""
    if "alpha" in given and s.sampler != "hybrid":
        problems.add(f"--alpha {s.alpha}: only with --sampler hybrid (the probability of an xx batch)")
    if "xx_weighting" in given and s.sampler == "xy":
        problems.add("--xx-weighting: only with --sampler xx or hybrid (xy batches have no single language)")


def check_lengths(s, model_dir, given, problems):
    """A truncation length set by the user must fit the model's position table (read from its
    config.json, before anything is loaded); a default longer than it is lowered at loading."""
    try:
        config = ModelConfig.from_file(os.path.join(model_dir, "config.json"))
    except (ConfigError, TypeError):           # no model folder, or no readable config: said elsewhere or at loading
        return
    for name in ("max_query_len", "max_passage_len"):
        problem = config.length_problem(getattr(s, name))
        if name in given and problem:
            problems.bad_value(flag_of(name), getattr(s, name), problem)


def saved_settings(state):
    """The TrainSettings fields of a checkpoint's trainer_state.json (older keys left out)."""
    known = {f.name for f in fields(TrainSettings)}
    return {k: v for k, v in state["settings"].items() if k in known}


def make_settings(values):
    """(TrainSettings, problems) from {name: value}, checked as train.py checks a new run's
    settings (types, ranges, combinations, lengths against the model's positions; no paths,
    device or existing runs). None and False count as not given (the defaults)."""
    values = {k: v for k, v in values.items() if v is not None and v is not False}
    problems, given = Problems(), frozenset(values)
    settings = build_settings(TrainSettings, values, {}, problems)
    check_combinations(settings, given, problems)
    check_lengths(settings, settings.model, given, problems)
    return settings, problems.lines


def load_start_model(s, checkpoint, say):
    """The model to train (the checkpoint's when resuming), a default truncation length longer
    than its position table lowered to it (train.py checks a length the user set)."""
    model = load_model(checkpoint or s.model, device=s.device, pooling=s.pooling, tf32=s.tf32,
                       fused_kernels=s.fused_kernels)
    for name in ("max_query_len", "max_passage_len"):
        if getattr(s, name) > model.max_length:
            say(f"{flag_of(name)}: the model has {model.max_length} positions; using {model.max_length}")
            setattr(s, name, model.max_length)
    return model


def read_batches(s, say):
    """The training examples of every --train source, and the batch sampler over them."""
    examples = []
    for spec in s.train:
        found, report = data.read_training_data(spec)
        examples += found
        for line in report:
            say(line)
    sampler = HBTSampler(examples, s.batch_size, sampler=s.sampler, alpha=s.alpha, seed=s.seed,
                         xx_language_weighting=s.xx_weighting, max_negatives=s.max_negatives)
    return examples, sampler


def train_step(model, optimizer, s, batch, step, comm=None):
    """One AdamW step on `batch` (over the ranks of `comm`, if given); returns the log record of the step."""
    t0, stats = time.perf_counter(), {}
    loss, grads = loss_and_grads(
        model, [t.query for t in batch.triplets], [t.positive for t in batch.triplets],
        [list(t.negatives) for t in batch.triplets], temperature=s.temperature, candidates=s.candidates,
        symmetric=s.symmetric, dropout=True, seed=int(np.random.SeedSequence([s.seed, step]).generate_state(1)[0]),
        max_query_length=s.max_query_len, max_passage_length=s.max_passage_len,
        chunk_size=s.grad_cache_chunk or None, return_numpy=False, stats=stats, table_rows=True, comm=comm)
    if not math.isfinite(loss):
        return {"step": step + 1, "loss": loss}
    norm = clip_grad_norm(grads, s.max_grad_norm) if s.max_grad_norm else float("nan")
    lr = scheduled_lr(step, s.lr, s.warmup, s.schedule, s.decay_steps or s.steps)
    optimizer.step(model.params, grads, lr=lr)
    seconds = time.perf_counter() - t0
    tokens = sum(comm.allgather_object(stats["tokens"])) if comm is not None else stats["tokens"]
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "kind": batch.kind, "lang": batch.lang,
            "source": batch.source, "tokens": tokens, "seconds": round(seconds, 4)}


def train(settings, comm=None, resume_from=None, overwrite=False):
    """Train as `settings` say, from checkpoint `resume_from` if given (its optimiser state and
    step), deleting the run already in settings.out if `overwrite`; returns Trained. Over the
    ranks of `comm` (mpirun), every rank takes every step on its shard of the batch; rank 0
    alone writes the log, the batch log and the checkpoints; an error on one rank stops all."""
    comm = comm or SingleProcess()
    with comm.abort_on_error():
        return train_ranks(settings, comm, resume_from, overwrite)


def train_ranks(s, comm, checkpoint, overwrite):
    say = (lambda *a: None) if s.quiet or not comm.is_root else (lambda *a: print(*a, file=sys.stderr))
    examples, sampler = read_batches(s, say)
    model = load_start_model(s, checkpoint, say)
    optimizer = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=s.lr, weight_decay=s.weight_decay,
                      backend=model.backend, pool=pool_for(model.backend))
    step = load_training_state(checkpoint, optimizer)["step"] if checkpoint else 0
    if checkpoint:
        say(f"resuming {checkpoint} at step {step}")
    if comm.is_root:
        os.makedirs(s.out, exist_ok=True)
    for line in (prepare_run_folder(s.out, step, overwrite) if comm.is_root else []):
        say(line)
    comm.barrier()
    say(f"{len(examples)} examples, {len(sampler)} batches per epoch of {s.batch_size}; {model}"
        + (f"; {comm.size} ranks, {s.batch_size // comm.size} triplets each" if comm.size > 1 else ""))

    def save(name):
        state = {"step": step, "settings": asdict(s), "sampler": sampler.state_dict(), "minihbt": __version__}
        path = save_checkpoint(s.out, name, model, optimizer, state) if comm.is_root else None
        comm.barrier()                                  # the other ranks go on once rank 0 has saved
        return path

    with GracefulStop() as stop, open(os.path.join(s.out, LOG_FILE) if comm.is_root else os.devnull, "a",
                                      encoding="utf-8") as log, \
            BatchLog(s.batch_log if comm.is_root else None, sampler, step) as batch_log, \
            progress_bar(total=s.steps, initial=step, desc="train", unit="step",
                         disable=s.quiet or not comm.is_root) as bar:
        epoch_batches = (None, None)                    # (epoch, its batches): an epoch is composed once
        while step < s.steps:
            epoch, index = divmod(step, len(sampler))
            if epoch_batches[0] != epoch:
                epoch_batches = (epoch, sampler.batches(epoch))
            batch = epoch_batches[1][index]
            record = train_step(model, optimizer, s, batch, step, comm)
            if not math.isfinite(record["loss"]):
                raise NonFiniteLoss(f"the loss is {record['loss']} at step {step} (batch {index} of epoch {epoch}, "
                                    f"{batch.kind}); stopping. The last good checkpoint is kept in {s.out}; try a "
                                    "lower --lr or --warmup.")
            step += 1
            log.write(json.dumps(record) + "\n")
            log.flush()
            batch_log.add(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens'] / max(record['seconds'], 1e-4):.0f}", kind=batch.kind)
            signum = max(comm.allgather_object(stop.signum or 0)) or None   # read once; every rank stops alike
            if step < s.steps and (signum or s.save_every and step % s.save_every == 0):
                path = save(f"checkpoint-{step}")
            if signum and step < s.steps:                       # on the last step, final/ is saved below
                raise Stopped(f"stopped at step {step}; saved {path}; continue with --resume {s.out}", signum)
        path = save("final")
    say(f"done: {step} steps; model in {path}")
    return Trained(path, stop.signum)
