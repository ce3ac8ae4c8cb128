"""The grid of runs (study.py's work): each run's state, the plan, and running the pending runs.

Several study processes may share one grid: each locks the run it works on (files.exclusive_lock)
and marks its presence in the grid's folder, so the others skip the run and share the time left.
"""
import os
import shlex
import signal

from ..files import exclusive_lock, is_locked, live_processes, presence
from .config import SettingError, check_inputs
from .progress import Progress, human
from .runner import Interrupted, execute, latest_trainer_state, train_settings


def steps_in_run_dir(run_dir):
    """Steps already trained in a run directory (its latest checkpoint), 0 if none."""
    state = latest_trainer_state(run_dir)
    return state["step"] if state else 0


def steps_left(study, run):
    if study.conditions[run.condition] is None:
        return 0
    return study.train_settings(run)["steps"] - steps_in_run_dir(study.run_dir(run))


def run_state(study, run):
    if study.is_finished(run):
        return "finished"
    if is_locked(study.lock_path(run)):
        return "running now"
    if study.conditions[run.condition] is not None:
        steps, done = study.train_settings(run)["steps"], steps_in_run_dir(study.run_dir(run))
        if done:
            return f"trained {done}/{steps}" if done < steps else "trained"
    return "to do"


def grid_folder(study):
    """Where the study processes working on this grid mark their presence (files.presence)."""
    return os.path.join(study.runs_root, study.name)


def make_progress(study, runs, pending, every, stream=None, processes=None):
    finished = [study.read_result(run) for run in study.runs() if study.is_finished(run)]
    todo = [(r, steps_left(study, r), r.direction) for r in pending]
    return Progress(study.name, len(runs), todo, finished, stream=stream, every=every, processes=processes,
                    finished_elsewhere=lambda run: study.read_result(run) if study.is_finished(run) else None)


def check_ready(study, runs, device):
    """The runs' model and data exist (config.check_inputs) and each training run's settings pass
    train.py's own rules, before any run starts (else SettingError, not a stop hours into the grid)."""
    check_inputs(study, runs)
    for run in runs:
        if study.conditions[run.condition] is not None:
            train_settings(study, run, device)


def dry_run(study, runs, pending, device):
    """Print the plan: every selected run, its state and its train.py command, and the time left."""
    print(f"study {study.name} ({study.display(study.path)}): {len(runs)} runs selected, "
          f"{len(runs) - len(pending)} finished, {len(pending)} to do")
    print(f"results in {study.display(study.results_dir)}/, run directories in "
          f"{study.display(grid_folder(study))}/ (commands run from the repository root)")
    for d, direction in study.directions.items():
        mine = [r for r in runs if r.direction == d]
        if not mine:
            continue
        print(f"direction {d}: train on {', '.join(study.display(p) for p in direction.train)}, evaluate on "
              f"{study.display(direction.eval)} (every run: plain and centered)")
        for run in mine:
            what = ("python train.py " + shlex.join(study.train_argv(run, display=True))
                    if study.conditions[run.condition] is not None else f"no training: {study.display(study.model)}")
            print(f"  {run.id:16s} {run_state(study, run):16s} {what}")
    try:
        check_ready(study, pending, device)
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


def run_grid(ctx, runs, pending, every, outcome):
    """Run the pending runs in order, filling `outcome` (run id -> "here", "finished" or "held" by
    another process; "working" while this one works on it). Held runs are tried once more at the
    end (their holder may have been stopped)."""
    with presence(grid_folder(ctx.study)) as processes:
        ctx.progress = make_progress(ctx.study, runs, pending, every, processes=processes)
        with ctx.progress:
            for second_try in (False, True):
                for run in [r for r in pending if not second_try or outcome[r.id] == "held"]:
                    outcome[run.id] = "working"
                    outcome[run.id] = work_on(ctx, run)


def work_on(ctx, run):
    """Run `run` here unless another study process holds it or has finished it; returns "here",
    "finished" (by another process) or "held" (by another process now)."""
    study = ctx.study
    with exclusive_lock(study.lock_path(run)) as mine:
        if mine and not study.is_finished(run):
            execute(ctx, run)
            return "here"
    if study.is_finished(run):
        ctx.progress.elsewhere(run, study.read_result(run))
        return "finished"
    ctx.progress.elsewhere(run)
    return "held"


def stop_on_sigterm():
    """SIGTERM outside training (the training loop has its own handler) stops the work at once."""
    def terminated(signum, frame):
        raise Interrupted("terminated", code=128 + signum)
    signal.signal(signal.SIGTERM, terminated)
