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

Settings: defaults (TrainSettings, minihbt/training.py) < a JSON --config file (long names, dashes or
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
import os
import sys
from dataclasses import asdict
from typing import NamedTuple, Optional

from minihbt import cli, demo, training
from minihbt.checkpoint import is_checkpoint, latest_checkpoint, read_trainer_state, remove_partial_checkpoints, run_contents
from minihbt.cli import Problems, Stop
from minihbt.comm import CommError, SettingsMismatch, SingleProcess, from_environment
from minihbt.data import language_from_filename, spec_path
from minihbt.files import remove_empty_folders
from minihbt.training import RESUMABLE, TrainSettings, check_combinations, check_lengths, saved_settings

PROG = "train.py"
TRAINING_FILES = ("a SQuAD-format .json file whose name gives its language (de.json, arabic_dev.json; or LANG=PATH), "
                  "a folder of them, or a .jsonl file of examples (lang, query, positive[, negatives, group])")
RESUMABLE_FLAGS = ", ".join(cli.flag_of(name) for name in RESUMABLE)


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
    ap = cli.parser(PROG, __doc__, TrainSettings)
    ap.add_argument("--config", metavar="FILE", help="JSON file setting any of these settings (command-line flags "
                                                     "win); checked before anything is loaded")
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
    saved = saved_settings(state)
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


def check_paths(s, resume, overwrite, problems):
    """--model and --train exist; --out does not hold a run this one would overwrite."""
    if not resume:
        for flag, value in (("--model", s.model), ("--train", s.train)):
            if not value:
                problems.add(f"{flag} is required (see --help)")
        if s.model:
            cli.check_input_dir("--model", s.model, problems)
        for spec in s.train or []:
            forced, path = spec_path(spec)
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


def train(plan):
    """Run the plan with minihbt.training; a stop by Ctrl-C or SIGTERM ends the program with
    128 + the signal's number. A failed run leaves no empty folder that resolve_args made."""
    try:
        return training.train(plan.settings, plan.comm, plan.checkpoint, plan.overwrite).path
    except BaseException as e:
        if plan.comm.is_root:
            remove_empty_folders(plan.made)
        if isinstance(e, training.Stopped):
            raise Stop(128 + e.signum, str(e)) from None
        raise


@cli.program(PROG)
def main(argv=None):
    """Train (see the module docstring) or, with no arguments or --demo/--demo-seeds, run the demo."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a.startswith("--demo") for a in argv):
        return demo.main(argv)
    return train(resolve_args(argv))


if __name__ == "__main__":
    main()
