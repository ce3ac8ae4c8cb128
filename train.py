"""Train a multilingual dense retriever with hybrid batches (HBT, arXiv 2408.10536).

    python train.py                      # the built-in demo: a synthetic world, no download
    python train.py --model weights/multilingual-e5-small --train ../shared/data/mlqa/MLQA_V1/dev \\
                    --sampler hybrid --batch-size 32 --steps 200 --out runs/hbt

The recipe: read the training sets (one source per --train), compose batches with the
chosen sampler (xx: one language per batch; xy: query and passages in two languages of the
same parallel group; hybrid: xx with probability alpha, else xy), and for each batch take
one AdamW step on the InfoNCE loss (cosine / temperature, in-batch candidates, duplicates
masked), with global-norm clipping and a warm-up. Checkpoints are Hugging Face
directories that open in transformers and sentence-transformers.

Settings: defaults (TrainSettings below) < a JSON --config file (long names, dashes or
underscores) < the command line, all checked before anything is loaded; a bad one gets one
line naming the flag and what it accepts (exit status 2). MINIHBT_DEBUG=1 shows the
traceback behind any one-line error. A new run refuses an --out that holds a run: continue
it with --resume, or start over with --overwrite.

Exact resume: batches are a pure function of (seed, epoch), dropout of (seed, step), and
the optimiser state is saved with each checkpoint; `--resume OUT` continues from the latest
checkpoint, bit for bit the run that would have happened without the stop. Ctrl-C or
SIGTERM finishes the step, saves a checkpoint and exits (130 or 143; a second one aborts).
A non-finite loss stops the run with a message; the last good checkpoint stays.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import List, NamedTuple, Optional

import numpy as np

from minihbt import cli, demo
from minihbt.batchlog import BatchLog
from minihbt.checkpoint import (LOG_FILE, is_checkpoint, latest_checkpoint, load_training_state, prepare_run_folder,
                                read_trainer_state, remove_partial_checkpoints, run_contents, save_checkpoint)
from minihbt.cli import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Problems, Range, Stop, setting
from minihbt.comm import CommError, SettingsMismatch, SingleProcess, from_environment
from minihbt.config import ConfigError, ModelConfig
from minihbt.data import language_from_filename
from minihbt.files import remove_empty_folders

PROG = "train.py"
TRAINING_FILES = ("a SQuAD-format .json file whose name gives its language (de.json, arabic_dev.json; or LANG=PATH), "
                  "a folder of them, or a .jsonl file of examples (lang, query, positive[, negatives, group])")


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
    fused_kernels: bool = setting(False, "cuda only: fused CuPy kernels for bias+GELU, residual+LayerNorm, softmax "
                                         "and AdamW (not yet verified on a GPU, see minihbt/kernels.py)")
    out: str = setting(os.path.join("runs", "hbt"), "run directory: checkpoint-N/, final/ (Hugging Face directories "
                       "with optimizer.npz and trainer_state.json beside the weights), log.jsonl", metavar="DIR")
    save_every: int = setting(500, "checkpoint every N steps; 0 = only at the end", accepted=AT_LEAST_0)
    quiet: bool = setting(False, "no progress bar or messages")
    batch_log: Optional[str] = setting(None, "write each batch a step is taken on to FILE, one JSON line a step "
                                             "(docs/batch-log.md), for `python -m minihbt.check batches`; a new run "
                                             "refuses an existing FILE unless --overwrite, a resumed one rewrites it",
                                       metavar="FILE")


RESUMABLE = ("steps", "save_every", "device", "tf32", "fused_kernels", "quiet")     # the rest stay as saved
RESUMABLE_FLAGS = ", ".join(cli.flag_of(name) for name in RESUMABLE)
CUDA_ONLY = ("tf32", "fused_kernels")


class Plan(NamedTuple):
    """resolve_args' answer; `made`: the folders it created for --out (removed again, if still
    empty, when the run fails); `comm`: the ranks of a data-parallel run (minihbt.comm; one
    process: SingleProcess)."""
    settings: TrainSettings
    checkpoint: Optional[str]
    overwrite: bool
    made: tuple
    comm: object


def build_parser():
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", metavar="FILE", help="JSON file setting any of these settings (command-line flags "
                                                     "win); checked before anything is loaded")
    cli.add_flags(ap, TrainSettings)
    ap.add_argument("--resume", metavar="DIR", help="continue the run in DIR (the run folder, not one of its "
                                                    "checkpoints) from its latest checkpoint up to --steps; its "
                                                    f"settings are reused, only {RESUMABLE_FLAGS} may change")
    ap.add_argument("--overwrite", action="store_true", help="delete the run already in --out (log.jsonl, "
                                                             "checkpoint-N/, final/) and start over (default: refuse)")
    ap.add_argument("--demo", action="store_true", help="the built-in demo, also `python train.py` alone: tiny "
                    "models trained on a synthetic parallel world with xx, xy and hybrid batches, then evaluated; "
                    "takes only --demo-seeds, --steps and --out (minihbt/demo.py)")
    ap.add_argument("--demo-seeds", metavar="SEEDS",
                    help=f"demo: comma-separated world/model seeds (default {demo.DEMO_SEEDS})")
    return ap


def resolve_args(argv):
    """The run's plan: defaults < --config file < command line; with --resume, the run's
    saved settings, of which only RESUMABLE may change. Every problem is reported at once
    (exit status 2) before any model or data is loaded."""
    args = vars(build_parser().parse_args(argv))
    config, resume, overwrite = args.pop("config"), args.pop("resume"), args.pop("overwrite")
    args.pop("demo"), args.pop("demo_seeds")
    problems = Problems()
    values = cli.read_config(config, TrainSettings, problems) if config else {}
    origins = {k: f" (from --config {config})" for k in values}
    values.update(args)
    origins.update({k: "" for k in args})
    given = frozenset(values)
    checkpoint = None
    if resume:
        checkpoint, values, origins = resume_settings(resume, values, origins, problems)
        if overwrite:
            problems.add("--overwrite: not with --resume (--resume continues the run, --overwrite deletes it)")
    settings = cli.build_settings(TrainSettings, values, origins, problems)
    check_combinations(settings, given, problems)
    check_paths(settings, resume, overwrite, problems)
    check_lengths(settings, checkpoint or settings.model, given, problems)
    cli.check_device("--device", settings.device, problems)
    comm = ranks(settings, resume, overwrite, problems)
    problems.stop_if_any()
    if comm.is_root:
        cli.make_folder("--out", settings.out, problems)
    problems.stop_if_any()
    comm.barrier()
    return Plan(settings, checkpoint, overwrite, tuple(problems.created), comm)


def ranks(s, resume, overwrite, problems):
    """The communicator of this launch (mpirun -np N: N ranks; else one process), checked: the
    batch splits evenly over the ranks, and every rank was given the same settings. Only rank 0
    prints the problems (every rank finds the same ones and exits alike)."""
    try:
        comm = from_environment(s.device)
    except CommError as e:
        problems.add(f"mpirun: {e}")
        return SingleProcess()
    cli.show_errors(comm.is_root)
    if comm.size > 1:
        if s.batch_size % comm.size:
            problems.add(f"--batch-size {s.batch_size}: expected a multiple of the {comm.size} ranks (each rank "
                         f"embeds batch-size / {comm.size} triplets of every batch)")
        try:
            comm.agree({**asdict(s), "resume": resume, "overwrite": overwrite})
        except SettingsMismatch as e:
            problems.add(f"{e}: launch every rank with the same settings")
    return comm


def setting_problems(argv):
    """The problems of a fresh run's settings on their own (types, ranges, combinations; no
    paths, device or existing runs): for programs that plan many runs, e.g. study.py."""
    args = vars(build_parser().parse_args(argv))
    for name in ("config", "resume", "overwrite", "demo", "demo_seeds"):
        args.pop(name)
    problems = Problems()
    settings = cli.build_settings(TrainSettings, args, {k: "" for k in args}, problems)
    check_combinations(settings, frozenset(args), problems)
    return problems.lines


def resume_settings(run_dir, values, origins, problems):
    """(checkpoint, values, origins) to continue the run in `run_dir`: its saved settings,
    with the RESUMABLE ones the user gave; any other change is a problem."""
    if is_checkpoint(run_dir):
        parent = os.path.dirname(os.path.normpath(run_dir)) or "."
        problems.add(f"--resume {run_dir}: a checkpoint folder; --resume takes the run folder that holds it "
                     f"(--resume {parent}) and continues from its latest checkpoint")
        return None, values, origins
    removed = remove_partial_checkpoints(run_dir)     # first: a cut swap may have left the latest as .old-NAME
    if removed:
        print(f"{PROG}: removed {', '.join(removed)} (left by an interrupted save) from {run_dir}", file=sys.stderr)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        what = "no checkpoint-N or final/ with trainer_state.json in it" if os.path.isdir(run_dir) else \
            "no such folder, so no checkpoint to resume"
        problems.add(f"--resume {run_dir}: {what}")
        return None, values, origins
    state = read_trainer_state(checkpoint)
    known = {f.name for f in fields(TrainSettings)}
    saved = {k: v for k, v in state["settings"].items() if k in known}
    changed = sorted(k for k in values if k in saved and k not in RESUMABLE + ("out",) and values[k] != saved[k])
    for k in changed:
        problems.add(f"{cli.flag_of(k)} {cli.show_value(values[k])}: the run in {run_dir} has "
                     f"{cli.show_value(saved[k])}; a resumed run keeps its settings, only {RESUMABLE_FLAGS} may change")
    if "out" in values and os.path.realpath(values["out"]) != os.path.realpath(run_dir):
        problems.add(f"--out {values['out']}: a resumed run continues in its own folder ({run_dir}); drop --out")
    steps = values.get("steps", saved.get("steps"))
    if isinstance(steps, int) and steps <= state["step"]:
        problems.add(f"--steps {steps}: the run in {run_dir} is already at step {state['step']}; give a larger "
                     "--steps to continue it")
    origin = f" (saved in {os.path.join(checkpoint, 'trainer_state.json')})"
    merged = {**saved, **{k: values[k] for k in RESUMABLE if k in values}, "out": run_dir}
    return checkpoint, merged, {k: origins.get(k, origin) if k in values else origin for k in merged}


def check_combinations(s, given, problems):
    """Settings that are fine alone but wrong together, or set where nothing reads them."""
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
    if "alpha" in given and s.sampler != "hybrid":
        problems.add(f"--alpha {s.alpha}: only with --sampler hybrid (the probability of an xx batch)")
    if "xx_weighting" in given and s.sampler == "xy":
        problems.add("--xx-weighting: only with --sampler xx or hybrid (xy batches have no single language)")
    for name in CUDA_ONLY:
        if name in given and getattr(s, name) and s.device != "cuda":
            problems.add(f"{cli.flag_of(name)}: only with --device cuda")


def check_paths(s, resume, overwrite, problems):
    """--model and --train exist; --out does not hold a run this one would overwrite."""
    if not resume:
        for flag, value in (("--model", s.model), ("--train", s.train)):
            if not value:
                problems.add(f"{flag} is required (see --help)")
        if s.model:
            cli.check_input_dir("--model", s.model, problems)
        for spec in s.train or []:
            forced = "=" in spec and not os.path.exists(spec)
            path = spec.split("=", 1)[1] if forced else spec
            if not os.path.exists(path):
                problems.add(f"--train {spec}: no such file or folder")
            elif os.path.isfile(path) and not (path.endswith(".jsonl") or path.endswith(".json") and
                                               (forced or language_from_filename(path))):
                problems.add(f"--train {spec}: not training data; expected {TRAINING_FILES}")
        found = run_contents(s.out)
        if found and not overwrite:
            problems.add(f"--out {s.out}: already holds a run ({', '.join(found)}); continue it with --resume "
                         f"{s.out}, or add --overwrite to delete it and start over")
        if s.batch_log:
            cli.check_output_file("--batch-log", s.batch_log, problems)
            if os.path.isfile(s.batch_log) and not overwrite:
                problems.add(f"--batch-log {s.batch_log}: already exists; add --overwrite to replace it (with the "
                             "run in --out), or choose another file")
        model, doomed = os.path.realpath(s.model or ""), [os.path.realpath(os.path.join(s.out, n)) for n in found]
        if overwrite and s.model and any(model == d or model.startswith(d + os.sep) for d in doomed):
            problems.add(f"--overwrite: --model {s.model} lies in the run in --out {s.out}, which --overwrite would "
                         "delete; copy it elsewhere first or choose another --out")


def check_lengths(s, model_dir, given, problems):
    """A truncation length set by the user must fit the model's position table (read from its
    config.json, before anything is loaded); a default longer than it is lowered at loading."""
    try:
        positions = ModelConfig.from_file(os.path.join(model_dir, "config.json")).max_length
    except (ConfigError, TypeError):           # no model folder, or no readable config: said elsewhere or at loading
        return
    for name in ("max_query_len", "max_passage_len"):
        if name in given and getattr(s, name) > positions:
            problems.bad_value(cli.flag_of(name), getattr(s, name),
                               f"an integer in [2, {positions}] for this model ({positions} positions)")


def load_start_model(s, checkpoint, say):
    """The model to train (the checkpoint's when resuming), a default truncation length longer
    than its position table lowered to it (a length the user set was checked: check_lengths)."""
    import minihbt
    model = minihbt.load_model(checkpoint or s.model, device=s.device, pooling=s.pooling, tf32=s.tf32,
                               fused_kernels=s.fused_kernels)
    for name in ("max_query_len", "max_passage_len"):
        if getattr(s, name) > model.max_length:
            say(f"{cli.flag_of(name)}: the model has {model.max_length} positions; using {model.max_length}")
            setattr(s, name, model.max_length)
    return model


def read_batches(s, say):
    """The training examples of every --train source, and the batch sampler over them."""
    from minihbt.data import read_training_data
    from minihbt.sampler import HBTSampler
    examples = []
    for spec in s.train:
        found, report = read_training_data(spec)
        examples += found
        for line in report:
            say(line)
    sampler = HBTSampler(examples, s.batch_size, sampler=s.sampler, alpha=s.alpha, seed=s.seed,
                         xx_language_weighting=s.xx_weighting, max_negatives=s.max_negatives)
    return examples, sampler


def train_step(model, optimizer, s, batch, step, comm=None):
    """One AdamW step on `batch` (over the ranks of `comm`, if given); returns the log record of the step."""
    from minihbt.groups import loss_and_grads
    from minihbt.rowgrad import clip_grad_norm
    from minihbt.step import scheduled_lr
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


def train(plan):
    """The training recipe: batches, model and optimiser, then one AdamW step per batch,
    a checkpoint every --save-every steps and on Ctrl-C/SIGTERM, and final/ at the end.
    Over N ranks (mpirun), every rank takes every step on its shard of the batch; rank 0
    alone writes the log, the batch log and the checkpoints; an error on one rank stops all."""
    try:
        with plan.comm.abort_on_error():
            return train_ranks(plan)
    except BaseException:
        if plan.comm.is_root:
            remove_empty_folders(plan.made)
        raise


def train_ranks(plan):
    import minihbt
    from minihbt.rowgrad import AdamW
    from minihbt.bars import progress_bar
    s, comm = plan.settings, plan.comm
    say = (lambda *a: None) if s.quiet or not comm.is_root else (lambda *a: print(*a, file=sys.stderr))
    examples, sampler = read_batches(s, say)
    model = load_start_model(s, plan.checkpoint, say)
    optimizer = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=s.lr, weight_decay=s.weight_decay,
                      backend=model.backend, pool=model.pool)
    step = load_training_state(plan.checkpoint, optimizer)["step"] if plan.checkpoint else 0
    if plan.checkpoint:
        say(f"resuming {plan.checkpoint} at step {step}")
    for line in (prepare_run_folder(s.out, step, plan.overwrite) if comm.is_root else []):
        say(line)
    comm.barrier()
    say(f"{len(examples)} examples, {len(sampler)} batches per epoch of {s.batch_size}; {model}"
        + (f"; {comm.size} ranks, {s.batch_size // comm.size} triplets each" if comm.size > 1 else ""))

    def save(name):
        state = {"step": step, "settings": asdict(s), "sampler": sampler.state_dict(), "minihbt": minihbt.__version__}
        path = save_checkpoint(s.out, name, model, optimizer, state) if comm.is_root else None
        comm.barrier()                                  # the other ranks go on once rank 0 has saved
        return path

    with cli.GracefulStop() as stop, open(os.path.join(s.out, LOG_FILE) if comm.is_root else os.devnull, "a",
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
                raise Stop(1, f"error: the loss is {record['loss']} at step {step} (batch {index} of epoch {epoch}, "
                              f"{batch.kind}); stopping. The last good checkpoint is kept in {s.out}; try a lower "
                              "--lr or --warmup.")
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
                raise Stop(128 + signum, f"stopped at step {step}; saved {path}; continue with --resume {s.out}")
        path = save("final")
    say(f"done: {step} steps; model in {path}")
    return path


@cli.program(PROG)
def main(argv=None):
    """Train (see the module docstring) or, with no arguments or --demo/--demo-seeds, run the demo."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a.startswith("--demo") for a in argv):
        return demo.main(argv, train_fn=main)
    return train(resolve_args(argv))


if __name__ == "__main__":
    main()
