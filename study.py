"""Run the HBT study: a grid of train-then-evaluate runs, with intervals, verdicts and a report.

    python ../shared/tools/build_me5_small.py weights/multilingual-e5-small     # the model, once
    python study.py --dry-run                     # the plan: every run, its state and its command
    python study.py --only direction=A            # run direction A (base + 3 conditions x 3 seeds)
    python study.py                               # run the whole grid (finished runs are skipped)
    python study.py --report                      # results/study/<name>/REPORT.md from the result files
    python study.py --verify A/hybrid-seed0       # re-run one run from nothing and compare its figures

The grid comes from a JSON config (default study/hbt-me5-small.json; see minihbt/study/config.py):
directions (train on one set, evaluate zero-shot on another), conditions (an untrained
`base`, and batch types: xx, xy, hybrid), seeds, and one training recipe. A run trains with
train.py's loop (minihbt.training, in this process), then evaluates the way evaluate.py
does: the same embeddings plain and with per-language centring. It writes
results/study/<name>/<direction>/<condition>-seed<k>.json (every figure, settings, commit,
wall times, loss curve, the command that reproduces it) and a .npz of per-query ranks
(for the paired bootstrap). Run directories are runs/study/<name>/...; an interrupted run
resumes exactly where its last checkpoint left it (Ctrl-C saves one), a finished run is
skipped, and weights and optimizer state are deleted after evaluation unless --keep-models.
Several processes may run one grid side by side (e.g. one per core, each on one BLAS thread):
each locks the run it works on and skips the runs another one holds or has finished.
"""
import os
import shlex
import sys
from dataclasses import dataclass
from typing import List, Optional

from minihbt import cli
from minihbt.cli import setting
from minihbt.files import LOCKING, git_info
from minihbt.study import SettingError, grid, load_study, select_runs, verify
from minihbt.study.data import ReportError
from minihbt.study.report import write_report
from minihbt.study.runner import Context, Interrupted, RunError, check_existing

PROG = "study.py"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "study", "hbt-me5-small.json")


@dataclass
class StudySettings:
    """study.py's flags; each default is written once, here."""
    config: str = setting(DEFAULT_CONFIG, "the study's JSON config", default_text="study/hbt-me5-small.json")
    model: Optional[str] = setting(None, "start model directory, in place of the config's `model`",
                                   default_text="the config's")
    data_root: Optional[str] = setting(None, "directory holding the datasets, in place of the config's `data_root`",
                                       default_text="the config's")
    results: Optional[str] = setting(None, "results root; files go to RESULTS/<name>/",
                                     default_text="results/study in the repository")
    runs: Optional[str] = setting(None, "run directories root", default_text="runs/study in the repository")
    only: Optional[List[str]] = setting(None, "run only these runs, repeatable: a run id (A/xy-seed1, A/base) or "
                                              "key=value terms joined by commas (direction=A,condition=xy,seed=1)",
                                        repeat=True, metavar="SELECTION", default_text="the whole grid")
    dry_run: bool = setting(False, "print the plan (each run's state and command) and the estimated time; run nothing")
    report: bool = setting(False, "write RESULTS/<name>/REPORT.md and its figures from the result files alone; run "
                                  "nothing")
    verify: Optional[str] = setting(None, "re-run one finished run (its id, e.g. A/hybrid-seed0) from nothing in a "
                                          "scratch directory and compare every figure with its stored result (to "
                                          "1e-6)", metavar="RUN")
    keep_models: bool = setting(False, "keep each run's weights, optimizer state and embeddings (else deleted once "
                                       "the run is evaluated; a checkpoint of multilingual-e5-small with its "
                                       "optimizer state is 1.4 GB)")
    device: str = setting("cpu", "cpu (NumPy) or cuda (CuPy)", choices=("cpu", "cuda"))
    progress_every: float = setting(60.0, "print the progress line every SECONDS while a run works (0: only when a "
                                          "phase changes)", metavar="SECONDS")


def check_flags(argv):
    """The settings, their combinations and paths, all checked before the study is read."""
    problems = cli.Problems()
    args, _ = cli.parse_settings(PROG, __doc__, StudySettings, argv, problems)
    if not 0 <= args.progress_every < float("inf"):     # by hand: the message says "seconds"
        problems.add(f"--progress-every: expected a number of seconds >= 0, got {args.progress_every}")
    modes = [f for f, on in (("--report", args.report), ("--verify", args.verify), ("--dry-run", args.dry_run)) if on]
    if len(modes) > 1:
        problems.add(f"{modes[0]} and {modes[1]} cannot be combined")
    if args.only and (args.report or args.verify):
        why = "the report covers every run" if args.report else "--verify names its run"
        problems.add(f"--only does not combine with {modes[0]} ({why})")
    for flag, path in (("--config", args.config), ("--model", args.model), ("--data-root", args.data_root)):
        if path is not None and not os.path.exists(path):
            problems.add(f"{flag} {path}: not found")
    problems.stop_if_any()
    return args


def reproduce_flags(study, args):
    """The study.py flags that point another invocation at the same study files."""
    flags = ["--config", study.display(args.config)]
    for flag, value in (("--model", args.model), ("--data-root", args.data_root), ("--results", args.results),
                        ("--runs", args.runs)):
        if value:
            flags += [flag, study.display(value)]
    return flags + (["--device", args.device] if args.device != "cpu" else [])


def run_grid(ctx, runs, pending, args):
    """Run the pending runs (minihbt.study.grid); a failed run ends the program (status 1), an
    interrupted one with 130 or 143 (the same command resumes it)."""
    if not LOCKING:
        print("study.py: note: no file locking (flock) on this platform: run one study process per grid", file=sys.stderr)
    outcome = {}
    grid.stop_on_sigterm()
    try:
        grid.run_grid(ctx, runs, pending, args.progress_every, outcome)
    except RunError as e:
        sys.exit(f"study.py: {e}")
    except (Interrupted, KeyboardInterrupt) as e:
        current = next((r for r, o in outcome.items() if o == "working"), None)
        print(f"study.py: interrupted{' during ' + current if current else ''}{': ' + str(e) if str(e) else ''}; "
              "the same command resumes it", file=sys.stderr)
        sys.exit(getattr(e, "code", 130))
    said = list(outcome.values())
    held = [r for r, o in outcome.items() if o == "held"]
    others = (f", {said.count('finished')} finished by another study process" if "finished" in said else "") + (
        f"; {len(held)} still being run by another study process ({', '.join(held)}): the report has them "
        "once it ends" if held else "")
    print(f"study.py: {said.count('here')} run(s) done, {len(runs) - len(pending)} already finished{others}; results "
          f"in {ctx.study.display(ctx.study.results_dir)}/; the report: python study.py "
          f"{shlex.join(ctx.flags)} --report", file=sys.stderr)
    return 0


def verify_run(ctx, run, args):
    """Run `run` again from nothing and print how its figures compare; 0 if reproduced, else 1."""
    ctx.progress = grid.make_progress(ctx.study, [run], [run], args.progress_every)
    grid.stop_on_sigterm()
    try:
        with ctx.progress:
            ok, res, saved = verify.verify(ctx, run)
    except RunError as e:
        sys.exit(f"study.py: {e}")
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"study.py: --verify {run.id} interrupted; run again, it starts from nothing", file=sys.stderr)
        sys.exit(getattr(e, "code", 130))
    made_at = saved["minihbt"]
    if made_at.get("commit") != ctx.git.get("commit") or made_at.get("dirty") or ctx.git.get("dirty"):
        print(f"note: the run was made at commit {made_at.get('commit')} (dirty: {made_at.get('dirty')}), this is "
              f"{ctx.git.get('commit')} (dirty: {ctx.git.get('dirty')})")
    print(f"{run.id}: {res['figures']} figures, max |difference| {res['max_difference']:.3g}"
          f"{' (' + res['worst'] + ')' if res['worst'] and res['max_difference'] else ''}; per-query ranks "
          f"{'identical' if res['ranks_identical'] else 'DIFFER'}; loss curve max |difference| "
          f"{res['loss_max_difference']:.3g}" + (f"; missing figures: {res['missing'][:3]}" if res["missing"] else ""))
    if not ok and res["by_metric"]:
        print(f"{run.id}: largest |difference| by metric: " + "; ".join(
            f"{metric} {d:.3g} ({name})" for metric, (d, name) in res["by_metric"].items()))
    print(f"{run.id}: {'reproduced' if ok else 'NOT reproduced'} (tolerance 1e-6)")
    return 0 if ok else 1


def report(study, args):
    try:
        path = write_report(study, "python study.py " + shlex.join(reproduce_flags(study, args) + ["--report"]))
    except ReportError as e:
        sys.exit(f"study.py: {e}")
    print(f"study.py: wrote {study.display(path)}", file=sys.stderr)
    return 0


@cli.program(PROG)
def main(argv=None):
    args = check_flags(argv)
    try:
        study = load_study(args.config, HERE, model=args.model, data_root=args.data_root, results_root=args.results,
                           runs_root=args.runs)
        runs = select_runs(study, [args.verify] if args.verify else args.only)
        check_existing(study, runs)
        if args.report:
            return report(study, args)
        pending = [r for r in runs if not study.is_finished(r)]
        if args.verify and pending:
            raise SettingError(f"--verify {args.verify}: the run has no result yet (run it first)")
        if args.verify:
            verify.check_same_blas_threads(study, runs[0], args.verify)
        if args.dry_run:
            grid.dry_run(study, runs, pending, args.device)
            return 0
        grid.check_ready(study, runs if args.verify else pending, args.device)
    except SettingError as e:
        raise cli.Stop(cli.EXIT_USAGE, f"error: {e}") from None
    ctx = Context(study, None, device=args.device, keep_models=args.keep_models, flags=reproduce_flags(study, args),
                  git=git_info(HERE))
    if args.verify:
        return verify_run(ctx, runs[0], args)
    return run_grid(ctx, runs, pending, args)


if __name__ == "__main__":
    sys.exit(main())
