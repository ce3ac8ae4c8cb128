"""One run of the study: train (minihbt.training, resumable), evaluate plain and centred, write its files.

Each stage can be interrupted and picked up again:
1. training, in runs/study/<name>/<direction>/<condition>-seed<k>/: an interrupted run goes
   from its latest checkpoint (bit-for-bit the run an uninterrupted one would have been);
   it is finished when final/ holds the planned step;
2. embeddings.npz in the same directory (tied to the model files), so a stop during the
   metrics does not encode again;
3. results/study/<name>/<direction>/<condition>-seed<k>.npz (per-query ranks), then .json:
   the JSON's presence marks the run done; a finished run is skipped.
Then weights, optimizer state and embeddings are deleted unless --keep-models (log.jsonl stays).
"""
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import CheckpointError, ConfigError, DeviceError, __version__, encode, load_model, training
from ..parallel import blas_info
from ..checkpoint import latest_checkpoint, read_trainer_state, remove_partial_checkpoints
from ..data import DataError, load_lareqa
from ..evaluation import DEFINITIONS, center_languages, evaluate
from ..training import Stopped, TrainSettings, make_settings, saved_settings
from ..files import atomic_path, sha256_file, source_digest, stat_digest, write_json
from ..weights import checkpoint_files
from .config import SettingError, languages_in
from .perquery import save_ranks
from .progress import count_steps

STUDY_STATE = "study_state.json"          # training wall time of a run, summed over sessions
EMBEDDINGS = "embeddings.npz"
RESUME_MAY_CHANGE = {"steps", "save_every"}    # train.py --resume accepts new values of these


class RunError(Exception):
    """A run failed; the message (one line) says which run and why."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: what the run has so far is kept; the same command resumes it.
    `code` is the exit status to end with (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, message="", code=130):
        super().__init__(message)
        self.code = code


@dataclass
class Context:
    study: object
    progress: object
    device: str = "cpu"
    keep_models: bool = False
    flags: list = field(default_factory=list)   # study.py flags that select this study's files
    datasets: dict = field(default_factory=dict)
    git: dict = None


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas_info()}


def expected_record(study, run):
    """What a run's result must record to belong to this study as configured now."""
    direction = study.directions[run.direction]
    trained = study.conditions[run.condition] is not None
    return {"model": study.display(study.model), "eval_data": study.display(direction.eval),
            "train_data": [study.display(p) for p in direction.train] if trained else None,
            "settings": {"train": {**study.train_settings(run), "seed": run.seed} if trained else None,
                         "evaluation": study.evaluation}}


def latest_trainer_state(run_dir):
    """The trainer state ({"step", "settings", ...}) of a run directory's latest checkpoint, or
    None: no checkpoint, or one that another study process removed while this one read it
    (its run is trained)."""
    try:
        ckpt = latest_checkpoint(run_dir)
        return read_trainer_state(ckpt) if ckpt else None
    except (OSError, ValueError):
        return None


def check_existing(study, runs):
    """Finished results and run directories must match the configured settings (else SettingError:
    nothing the user made is overwritten or silently mixed in)."""
    for run in runs:
        path = study.result_path(run)
        if os.path.exists(path):
            try:
                saved = study.read_result(run)
            except (OSError, ValueError) as e:
                raise SettingError(f"{study.display(path)}: not a readable result ({e}); move it away") from None
            want = expected_record(study, run)
            for key in ("model", "eval_data", "train_data", "settings"):
                if saved.get(key) != want[key]:
                    raise SettingError(f"{study.display(path)}: made with another {key} ({json.dumps(saved.get(key))}"
                                       f", configured: {json.dumps(want[key])}); move it away or rename the study")
        state = latest_trainer_state(study.run_dir(run)) if study.conditions[run.condition] is not None else None
        if state and not os.path.exists(path):
            saved = state["settings"]
            want = {**study.train_settings(run), "seed": run.seed}
            differ = [k for k, v in want.items() if saved.get(k) != v and k not in RESUME_MAY_CHANGE]
            if os.path.abspath(saved.get("model") or "") != study.model:
                differ.append("model")
            if differ:
                raise SettingError(f"{study.display(study.run_dir(run))}: an unfinished run with another {differ[0]} "
                                   f"({json.dumps(saved.get(differ[0]))}); remove the directory or rename the study")


def _train_state(run_dir):
    try:
        with open(os.path.join(run_dir, STUDY_STATE), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {"train_seconds": 0.0, "train_steps": 0, "sessions": 0}


def train_settings(study, run, device):
    """The TrainSettings of a trained run, from Study.train_values as its shown command is (a
    problem with them: SettingError)."""
    settings, problems = make_settings({**study.train_values(run), "quiet": True, "device": device})
    if problems:
        raise SettingError(f"{run.id}: train.py would refuse its settings: {problems[0]}")
    return settings


def train(ctx, run):
    """Train the run (or resume it, or find it trained); returns its final/ directory."""
    study, out = ctx.study, ctx.study.run_dir(run)
    steps = study.train_settings(run)["steps"]
    removed = remove_partial_checkpoints(out)      # a cut save may have left the latest as .old-NAME
    if removed:
        print(f"{run.id}: removed {', '.join(removed)} (left by an interrupted save) from {out}", file=sys.stderr)
    ckpt = latest_checkpoint(out)
    start = 0
    if ckpt:
        state = read_trainer_state(ckpt)
        start = state["step"]
        if os.path.basename(ckpt) == "final" and start == steps:
            return ckpt
        settings = TrainSettings(**{**saved_settings(state), "steps": steps, "device": ctx.device, "out": out})
    else:
        settings = train_settings(study, run, ctx.device)
        if os.path.isdir(out):      # no checkpoint: what a hard kill left (a log, no weights) is the study's own
            shutil.rmtree(out)      # a fresh start: its log and earlier times do not count
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.jsonl")
    ctx.progress.training(log, start, steps)
    t0 = time.perf_counter()
    try:
        trained = training.train(settings, resume_from=ckpt)
    except Stopped as e:                            # Ctrl-C or SIGTERM: the loop saved a checkpoint first
        raise Interrupted(f"{run.id}: training stopped at a saved checkpoint", code=128 + e.signum) from None
    except (CheckpointError, ConfigError, DeviceError, ValueError, OSError) as e:
        raise RunError(f"{run.id}: training failed: {e}") from None
    finally:
        seconds, done = time.perf_counter() - t0, max(0, count_steps(log) - start)
        state = _train_state(out)
        write_json(os.path.join(out, STUDY_STATE), {"train_seconds": state["train_seconds"] + seconds,
                                                     "train_steps": state["train_steps"] + done,
                                                     "sessions": state["sessions"] + 1})
        ctx.progress.trained(seconds, done)
    if not ctx.keep_models:
        for name in os.listdir(out):
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(out, name))
    if trained.signum:              # asked during the last step: the loop finished it and saved final/
        raise Interrupted(f"{run.id}: trained; stopped before its evaluation", code=128 + trained.signum)
    return trained.path


def _embedding_key(study, model_path, rs, device):
    parts = {"code": source_digest(), "device": device,
             "config": sha256_file(os.path.join(model_path, "config.json")),
             "weights": [stat_digest(p) for p in checkpoint_files(model_path)],
             "data": [stat_digest(p) for p in rs.files], "evaluation": study.evaluation}
    return json.dumps(parts, sort_keys=True)


def embed(ctx, run, model_path, rs):
    """Query embeddings per language and candidate embeddings, as evaluate.py makes them
    (one encode call per query language, one for all candidates); kept in the run directory.
    Returns (queries, candidates, seconds the encoding took, model loading included)."""
    study = ctx.study
    path, key = os.path.join(study.run_dir(run), EMBEDDINGS), _embedding_key(study, model_path, rs, ctx.device)
    if os.path.exists(path):
        with np.load(path) as z:
            if str(z["key"]) == key:
                return {l: z["q/" + l] for l in rs.languages}, z["candidates"], float(z["seconds"])
    t0 = time.perf_counter()                                     # model loading counts as encoding time
    try:
        model = load_model(model_path, device=ctx.device)
    except (CheckpointError, ConfigError, DeviceError, FileNotFoundError) as e:
        raise RunError(f"{run.id}: {e}") from None
    ev = study.evaluation
    kw = dict(batch_size=ev["batch_size"], max_length=ev["max_length"])
    ctx.progress.evaluating(f"encoding {sum(len(v) for v in rs.queries.values())} questions "
                            f"({len(rs.languages)} languages)")
    queries = {lang: encode(model, [q for _, q in rs.queries[lang]], kind="query", **kw)
               for lang in rs.languages}
    ctx.progress.evaluating(f"encoding {len(rs.cand_text)} candidates")
    cands = encode(model, rs.cand_text, kind="passage",
                           pairs=rs.cand_context if ev["candidates"] == "pair" else None, **kw)
    seconds = time.perf_counter() - t0
    os.makedirs(study.run_dir(run), exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, key=np.array(key), seconds=np.array(seconds), candidates=cands,
                 **{"q/" + l: e for l, e in queries.items()})
    return queries, cands, seconds


def loss_curve(run_dir):
    """The per-step training loss and batch kind, from the run's log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if line.strip()]
    return {"loss": [s["loss"] for s in steps], "kind": [s["kind"] for s in steps]}


def dataset(ctx, direction):
    """The evaluation set of a direction, read once per invocation."""
    if direction not in ctx.datasets:
        try:
            ctx.datasets[direction] = load_lareqa(ctx.study.directions[direction].eval)
        except DataError as e:
            raise RunError(f"direction {direction}: {e}") from None
    return ctx.datasets[direction]


def evaluate_run(ctx, run, model_path):
    """Encode once, then the metrics plain and with per-language centring (post hoc, same
    embeddings). Returns (rs, results per variant, ranks per variant, seconds)."""
    rs = dataset(ctx, run.direction)
    queries, cands, encode_seconds = embed(ctx, run, model_path, rs)
    t1 = time.perf_counter()
    ctx.progress.evaluating("ranking and metrics")
    plain, plain_ranks = evaluate(rs, queries, cands, return_ranks=True)
    t2 = time.perf_counter()
    centered_q, centered_c = center_languages(queries, cands, rs.cand_lang)
    centered, centered_ranks = evaluate(rs, centered_q, centered_c, return_ranks=True)
    t3 = time.perf_counter()
    plain["center_languages"], centered["center_languages"] = False, True
    seconds = {"encode": round(encode_seconds, 3), "metrics_plain": round(t2 - t1, 3),
               "metrics_centered": round(t3 - t2, 3)}
    return rs, {"plain": plain, "centered": centered}, {"plain": plain_ranks, "centered": centered_ranks}, seconds


def commands(ctx, run, model_path):
    """The command lines of a run: study.py's that reproduces and checks it, and the
    train.py / evaluate.py equivalents (run from the repository root)."""
    study, ev = ctx.study, ctx.study.evaluation
    trained = study.conditions[run.condition] is not None
    evaluate_argv = ["--model", study.display(model_path),
                     "--data", study.display(study.directions[run.direction].eval),
                     "--batch-size", str(ev["batch_size"]), "--max-length", str(ev["max_length"]),
                     "--candidates", ev["candidates"], "--device", ctx.device]
    return {"command": "python study.py " + shlex.join(ctx.flags + ["--verify", run.id]),
            "train_command": ("python train.py " + shlex.join(study.train_argv(run, display=True)
                                                            + ["--device", ctx.device])) if trained else None,
            "evaluate_commands": {"plain": "python evaluate.py " + shlex.join(evaluate_argv),
                                  "centered": "python evaluate.py "
                                              + shlex.join(evaluate_argv + ["--center-languages"])}}


def build_record(ctx, run, rs, results, seconds, model_path):
    """The run's JSON: identity, settings, provenance, times, loss curve, every figure."""
    study = ctx.study
    direction = study.directions[run.direction]
    trained = study.conditions[run.condition] is not None
    train_languages = sorted({l for p in direction.train for l in languages_in(p)})
    if trained:
        state = _train_state(study.run_dir(run))
        seconds = {"train": round(state["train_seconds"], 3), "train_steps": state["train_steps"],
                   "train_sessions": state["sessions"], **seconds}
    seconds["evaluate"] = round(seconds["encode"] + seconds["metrics_plain"] + seconds["metrics_centered"], 3)
    return {"study": study.name, "run": run.id, "direction": run.direction, "condition": run.condition,
            "seed": run.seed, "about": direction.about, **expected_record(study, run),
            "train_languages": train_languages, "eval_languages": list(rs.languages),
            "seen": [l for l in rs.languages if l in train_languages],
            "unseen": [l for l in rs.languages if l not in train_languages],
            "minihbt": {"version": __version__, **(ctx.git or {}), "same_bits_any_threads": True},
            "machine": machine_info(),
            "device": ctx.device, "seconds": seconds,
            "loss_curve": loss_curve(study.run_dir(run)) if trained else None,
            **commands(ctx, run, model_path),
            "results": {v: {k: x for k, x in r.items() if k != "definitions"} for v, r in results.items()},
            "definitions": DEFINITIONS, "per_query": os.path.basename(study.result_path(run, ".npz")),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def cleanup(run_dir):
    """Delete a finished run's weights, optimizer state and embeddings (log.jsonl stays)."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name == "final" or name.startswith(("checkpoint-", ".tmp-", ".old-")):
            shutil.rmtree(path)
        elif name == EMBEDDINGS:
            os.remove(path)


def execute(ctx, run):
    """Train (if the condition trains), evaluate, write the run's .npz and .json; returns the record."""
    study = ctx.study
    ctx.progress.begin(run)
    model_path = train(ctx, run) if study.conditions[run.condition] is not None else study.model
    rs, results, ranks, seconds = evaluate_run(ctx, run, model_path)
    record = build_record(ctx, run, rs, results, seconds, model_path)
    os.makedirs(os.path.dirname(study.result_path(run)), exist_ok=True)
    save_ranks(study.result_path(run, ".npz"), rs, ranks)
    write_json(study.result_path(run), record, indent=1)
    if not ctx.keep_models:
        cleanup(study.run_dir(run))
    ctx.progress.finished(record)
    return record
