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
train.py's own code (in this process), then evaluates with evaluate.py's: the same
embeddings plain and with per-language centring. It writes
results/study/<name>/<direction>/<condition>-seed<k>.json (every figure, settings, commit,
wall times, loss curve, the command that reproduces it) and a .npz of per-query ranks
(for the paired bootstrap). Run directories are runs/study/<name>/...; an interrupted run
resumes exactly where its last checkpoint left it (Ctrl-C saves one), a finished run is
skipped, and weights and optimizer state are deleted after evaluation unless --keep-models.
Several processes may run one grid side by side (e.g. one per core, each on one BLAS thread):
each locks the run it works on and skips the runs another one holds or has finished.
"""
import argparse
import math
import os
import shlex
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "study", "hbt-me5-small.json")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"study.py: {message} (see --help)\n")


def build_parser():
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--config", default=DEFAULT_CONFIG, help="the study's JSON config (default study/hbt-me5-small.json)")
    a("--model", help="start model directory, in place of the config's `model` (default: the config's)")
    a("--data-root", help="directory holding the datasets, in place of the config's `data_root` "
                           "(default: the config's)")
    a("--results", help="results root (default results/study in the repository); files go to RESULTS/<name>/")
    a("--runs", help="run directories root (default runs/study in the repository)")
    a("--only", action="append", metavar="SELECTION",
      help="run only these runs, repeatable: a run id (A/xy-seed1, A/base) or key=value terms joined by commas "
           "(direction=A,condition=xy,seed=1); default: the whole grid")
    a("--dry-run", action="store_true", help="print the plan (each run's state and command) and the estimated time; "
                                             "run nothing")
    a("--report", action="store_true", help="write RESULTS/<name>/REPORT.md and its figures from the result files "
                                            "alone; run nothing")
    a("--verify", metavar="RUN", help="re-run one finished run (its id, e.g. A/hybrid-seed0) from nothing in a "
                                      "scratch directory and compare every figure with its stored result (to 1e-6)")
    a("--keep-models", action="store_true", help="keep each run's weights, optimizer state and embeddings "
                                                 "(default: deleted once the run is evaluated; a checkpoint of "
                                                 "multilingual-e5-small with its optimizer state is 1.4 GB)")
    a("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (NumPy, default) or cuda (CuPy)")
    a("--progress-every", type=float, default=60.0, metavar="SECONDS",
      help="print the progress line every SECONDS while a run works (default 60; 0: only when a phase changes)")
    return ap


def check_flags(args):
    """Combinations and ranges argparse cannot check; raises SettingError."""
    from minihbt.study import SettingError
    if not (math.isfinite(args.progress_every) and args.progress_every >= 0):
        raise SettingError(f"--progress-every: expected a number of seconds >= 0, got {args.progress_every}")
    modes = [f for f, on in (("--report", args.report), ("--verify", args.verify), ("--dry-run", args.dry_run)) if on]
    if len(modes) > 1:
        raise SettingError(f"{modes[0]} and {modes[1]} cannot be combined")
    if args.only and (args.report or args.verify):
        why = "the report covers every run" if args.report else "--verify names its run"
        raise SettingError(f"--only does not combine with {modes[0]} ({why})")
    for flag, path in (("--config", args.config), ("--model", args.model), ("--data-root", args.data_root)):
        if path is not None and not os.path.exists(path):
            raise SettingError(f"{flag} {path}: not found")


def reproduce_flags(study, args):
    """The study.py flags that point another invocation at the same study files."""
    flags = ["--config", study.display(args.config)]
    for flag, value in (("--model", args.model), ("--data-root", args.data_root), ("--results", args.results),
                        ("--runs", args.runs)):
        if value:
            flags += [flag, study.display(value)]
    return flags + (["--device", args.device] if args.device != "cpu" else [])


def is_finished(study, run):
    return os.path.exists(study.result_path(run)) and os.path.exists(study.result_path(run, ".npz"))


def steps_left(study, run):
    from minihbt.study.progress import steps_in_run_dir
    if study.conditions[run.condition] is None:
        return 0
    return study.train_settings(run)["steps"] - steps_in_run_dir(study.run_dir(run))


def make_progress(study, runs, pending, every, stream=None, processes=None):
    from minihbt.study.progress import Progress
    finished = []
    for run in study.runs():
        if is_finished(study, run):
            finished.append(read_result(study, run))
    todo = [(r, steps_left(study, r), r.direction) for r in pending]
    return Progress(study.name, len(runs), todo, finished, stream=stream, every=every, processes=processes,
                    finished_elsewhere=lambda run: read_result(study, run) if is_finished(study, run) else None)


def grid_folder(study):
    """Where the study processes working on this grid mark their presence (files.presence)."""
    return os.path.join(study.runs_root, study.name)


def run_state(study, run):
    from minihbt.files import is_locked
    if is_finished(study, run):
        return "finished"
    if is_locked(study.lock_path(run)):
        return "running now"
    if study.conditions[run.condition] is not None:
        steps = study.train_settings(run)["steps"]
        done = steps - steps_left(study, run)
        if done:
            return f"trained {done}/{steps}" if done < steps else "trained"
    return "to do"


def dry_run(study, runs, pending, args):
    from minihbt.files import live_processes
    from minihbt.study import SettingError
    from minihbt.study.config import check_inputs
    from minihbt.study.progress import human
    print(f"study {study.name} ({study.display(study.path)}): {len(runs)} runs selected, "
          f"{len(runs) - len(pending)} finished, {len(pending)} to do")
    print(f"results in {study.display(study.results_dir)}/, run directories in "
          f"{study.display(os.path.join(study.runs_root, study.name))}/ (commands run from the repository root)")
    for d, direction in study.directions.items():
        mine = [r for r in runs if r.direction == d]
        if not mine:
            continue
        print(f"direction {d}: train on {', '.join(study.display(p) for p in direction.train)}, evaluate on "
              f"{study.display(direction.eval)} (every run: plain and centered)")
        for run in mine:
            what = ("python train.py " + shlex.join(study.train_argv(run, study.run_dir(run), display=True))
                    if study.conditions[run.condition] is not None else f"no training: {study.display(study.model)}")
            print(f"  {run.id:16s} {run_state(study, run):16s} {what}")
    try:
        check_inputs(study, pending)
        check_train_settings(study, pending)
    except SettingError as e:
        print(f"not ready: {e}")
    live = live_processes(grid_folder(study))
    if live:
        print(f"{live} study process(es) working on this grid now")
    left, missing = make_progress(study, runs, pending, 0, processes=lambda: max(1, live)).time_left()
    if not pending:
        print("nothing to do")
    elif missing:
        print(f"estimated time: unknown until measured ({', '.join(missing)})"
              + (f"; at least {human(left)}" if left else ""))
    else:
        print(f"estimated time: about {human(left)} (from the measured times of finished runs)")
    return 0


def check_train_settings(study, runs):
    """Every planned training run's train.py settings, checked by train.py's own rules before any
    run starts (a combination train.py refuses would otherwise stop the grid hours in)."""
    import train
    from minihbt.study import SettingError
    for run in runs:
        if study.conditions[run.condition] is None:
            continue
        problems = train.setting_problems(study.train_argv(run, study.run_dir(run)))
        if problems:
            raise SettingError(f"{run.id}: train.py would refuse its settings: {problems[0]}")


def run_grid(study, runs, pending, args):
    """Run the pending runs in order. Each run is locked while this process works on it, so that
    several study processes (e.g. one per core) share one grid: a run another process holds or
    has finished is skipped, and the held ones are tried once more at the end (their holder
    may have been stopped)."""
    import train
    from minihbt.files import LOCKING, presence
    from minihbt.study.runner import Context, Interrupted, RunError, git_info
    ctx = Context(study, train.main, None, device=args.device, keep_models=args.keep_models,
                  flags=reproduce_flags(study, args), git=git_info(HERE))
    if not LOCKING:
        print("study.py: note: no file locking (flock) on this platform: run one study process per grid", file=sys.stderr)
    outcome, current = {}, None
    stop_on_sigterm()
    try:
        with presence(grid_folder(study)) as processes:
            ctx.progress = make_progress(study, runs, pending, args.progress_every, processes=processes)
            with ctx.progress:
                for second_try in (False, True):
                    for run in [r for r in pending if not second_try or outcome[r.id] == "held"]:
                        current = run
                        outcome[run.id] = work_on(ctx, study, run)
                current = None
    except RunError as e:
        sys.exit(f"study.py: {e}")
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"study.py: interrupted{' during ' + current.id if current else ''}{': ' + str(e) if str(e) else ''}; "
              "the same command resumes it", file=sys.stderr)
        sys.exit(getattr(e, "code", 130))
    said = list(outcome.values())
    held = [r for r, o in outcome.items() if o == "held"]
    others = (f", {said.count('finished')} finished by another study process" if "finished" in said else "") + (
        f"; {len(held)} still being run by another study process ({', '.join(held)}): the report has them "
        "once it ends" if held else "")
    print(f"study.py: {said.count('here')} run(s) done, {len(runs) - len(pending)} already finished{others}; results "
          f"in {study.display(study.results_dir)}/; the report: python study.py "
          f"{shlex.join(reproduce_flags(study, args))} --report", file=sys.stderr)
    return 0


def work_on(ctx, study, run):
    """Run `run` here unless another study process holds it or has finished it; returns "here",
    "finished" (by another process) or "held" (by another process now)."""
    from minihbt.files import exclusive_lock
    from minihbt.study.runner import execute
    with exclusive_lock(study.lock_path(run)) as mine:
        if mine and not is_finished(study, run):
            execute(ctx, run)
            return "here"
    if is_finished(study, run):
        ctx.progress.elsewhere(run, read_result(study, run))
        return "finished"
    ctx.progress.elsewhere(run)
    return "held"


def read_result(study, run):
    import json
    with open(study.result_path(run), encoding="utf-8") as f:
        return json.load(f)


def check_same_blas_threads(study, run, flag_value):
    """A run made before minihbt's results stopped depending on the thread count reproduces bit
    for bit only on as many BLAS threads as it was made with."""
    from minihbt.parallel import blas_threads
    from minihbt.study import SettingError
    record = read_result(study, run)
    if (record.get("minihbt") or {}).get("same_bits_any_threads"):
        return                                        # made by code whose results do not depend on it
    made = (record.get("machine") or {}).get("blas") or {}
    if made.get("threads") and made["threads"] != blas_threads():
        raise SettingError(f"--verify {flag_value}: the run was made with {made['threads']} BLAS thread(s), this "
                           f"process has {blas_threads()} (float32 sums round differently); run it as "
                           f"OPENBLAS_NUM_THREADS={made['threads']} python study.py ...")


def stop_on_sigterm():
    """SIGTERM outside training (train.py has its own handler) stops the program at once."""
    from minihbt.study.runner import Interrupted

    def terminated(signum, frame):
        raise Interrupted("terminated", code=128 + signum)
    signal.signal(signal.SIGTERM, terminated)


def verify_run(study, run, args):
    from minihbt.study.runner import Context, Interrupted, RunError, git_info
    from minihbt.study.verify import verify
    import train
    ctx = Context(study, train.main, None, device=args.device, keep_models=args.keep_models,
                  flags=reproduce_flags(study, args), git=git_info(HERE))
    ctx.progress = make_progress(study, [run], [run], args.progress_every)
    stop_on_sigterm()
    try:
        with ctx.progress:
            ok, res, saved = verify(ctx, run)
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
    from minihbt.study.data import ReportError
    from minihbt.study.report import write_report
    try:
        path = write_report(study, "python study.py " + shlex.join(reproduce_flags(study, args) + ["--report"]))
    except ReportError as e:
        sys.exit(f"study.py: {e}")
    print(f"study.py: wrote {study.display(path)}", file=sys.stderr)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    from minihbt.study import SettingError, load_study, select_runs
    from minihbt.study.config import check_inputs
    from minihbt.study.runner import check_existing
    try:
        check_flags(args)
        study = load_study(args.config, HERE, model=args.model, data_root=args.data_root, results_root=args.results,
                           runs_root=args.runs)
        runs = select_runs(study, [args.verify] if args.verify else args.only)
        check_existing(study, runs)
        if args.report:
            return report(study, args)
        pending = [r for r in runs if not is_finished(study, r)]
        if args.verify and pending:
            raise SettingError(f"--verify {args.verify}: the run has no result yet (run it first)")
        if args.verify:
            check_same_blas_threads(study, runs[0], args.verify)
        if args.dry_run:
            return dry_run(study, runs, pending, args)
        check_inputs(study, runs if args.verify else pending)
        check_train_settings(study, runs if args.verify else pending)
    except SettingError as e:
        print(f"study.py: {e}", file=sys.stderr)
        sys.exit(2)
    if args.verify:
        return verify_run(study, runs[0], args)
    return run_grid(study, runs, pending, args)


if __name__ == "__main__":
    sys.exit(main())
