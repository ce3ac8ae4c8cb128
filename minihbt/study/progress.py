"""The study's progress line: which run (k of n), how far it is, and the time left for the grid.

The estimate uses only measured times: seconds per training step and seconds per evaluation
of each direction's evaluation set. This invocation's own measurements come first once it has
some (at least SESSION_STEPS steps; one finished evaluation of the direction): they were
taken under the machine's present load and thread settings, which earlier runs may not share
(e.g. two study processes side by side). Until then, the finished runs' times. What has not been
measured yet is said, never guessed: the line then gives a lower bound and names what is
missing. Lines go to stderr at every phase change and every `every` seconds in between
(plain lines, so a log file of a long background run reads well).
"""
import sys
import threading
import time

SESSION_STEPS = 10          # steps this invocation must have timed before its own rate replaces the records'


def human(seconds):
    """'2 h 05 min', '7 min 30 s', '40 s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def count_steps(log_path):
    """Complete lines of a run's log.jsonl (one per finished step)."""
    try:
        with open(log_path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


class Progress:
    """Tracks the runs of this invocation and prints the progress line.

    todo: [(run, steps_left, direction)] for the runs still to do, in order; finished:
    the JSON dicts of runs already done (their measured times seed the estimate)."""

    def __init__(self, name, total, todo, finished, stream=None, every=60.0, clock=time.monotonic, processes=None,
                 finished_elsewhere=None):
        """processes: a function returning how many study processes work on this grid now
        (this one included; see files.presence); the time left is shared among them.
        finished_elsewhere: a function run -> its JSON once it is finished, else None (the runs
        other processes finish leave this plan when noticed)."""
        self.name, self.total, self.every, self.clock = name, total, every, clock
        self.processes = processes or (lambda: 1)
        self.finished_elsewhere = finished_elsewhere
        self.stream = stream or sys.stderr
        self.todo = list(todo)
        self.held = []                                 # (run, steps, direction) another study process holds
        self.done = total - len(self.todo)
        self.step_time = [0.0, 0]                      # measured seconds, steps: finished runs
        self.eval_time = {}                            # direction -> [seconds, count]: finished runs
        for res in finished:
            self.record(res)
        self.session_steps, self.session_eval = [0.0, 0], {}          # the same, this invocation only
        self.counted = [0.0, 0]                        # the current run's training `trained` added to step_time
        self.current, self.index, self.run_start, self.phase_name = None, 0, clock(), ""
        self.train_watch = None                        # (log path, steps at start, total steps, start time)
        self.eval_direction, self.eval_start = None, None
        self._stop = threading.Event()
        self._thread = None

    def record(self, res, session=False):
        """Add a finished run's measured times (its JSON: every session's training) to the
        estimate. session: the run this invocation just finished, whose training `trained` has
        counted in part already, and whose evaluation time also counts as this invocation's own."""
        sec = res.get("seconds", {})
        if sec.get("train") and sec.get("train_steps"):
            counted = self.counted if session else (0.0, 0)
            self.step_time[0] += sec["train"] - counted[0]
            self.step_time[1] += sec["train_steps"] - counted[1]
        if "evaluate" in sec:
            targets = [self.eval_time, self.session_eval] if session else [self.eval_time]
            for times in targets:
                slot = times.setdefault(res["direction"], [0.0, 0])
                slot[0] += sec["evaluate"]
                slot[1] += 1

    # ----------------------------------------------------------------- events
    def begin(self, run):
        self.todo += [t for t in self.held if t[0] == run]             # its holder ended: this process takes it
        self.held = [t for t in self.held if t[0] != run]
        self.current, self.run_start = run, self.clock()
        self.counted = [0.0, 0]                        # none of the new run yet
        self.notice_others()
        self.index = self.done + len(self.held) + 1                     # runs done or under way, this one included
        self.say("starting")

    def training(self, log_path, start_step, total_steps):
        self.train_watch = (log_path, start_step, total_steps, self.clock())
        self.eval_direction = None
        self.say(f"training from step {start_step}" if start_step else "training")

    def trained(self, seconds, steps):
        """Training of the current run ended after `seconds` of wall time for `steps` steps."""
        if steps:
            for slot in (self.step_time, self.session_steps, self.counted):
                slot[0] += seconds
                slot[1] += steps
        self.train_watch = None
        self.todo = [(r, 0 if r == self.current else n, d) for r, n, d in self.todo]

    def evaluating(self, what):
        if self.eval_direction is None:
            self.eval_direction, self.eval_start = self.current.direction, self.clock()
        self.say(what)

    def finished(self, res):
        self.record(res, session=True)
        self.todo = [t for t in self.todo if t[0] != self.current]
        self.done += 1
        self.eval_direction = None
        r = res["results"]["plain"]
        self.say(f"done in {human(self.clock() - self.run_start)}: Mo. {r['mono']['map']:.3f}, Cr. "
                 f"{r['cross']['map']:.3f}, Mul. {r['multi']['map']:.3f} mAP, bias {r['bias']['rank_distance']:.1f}")

    def elsewhere(self, run, res=None):
        """A run of this invocation's plan is being run by another study process (res None: it
        stays in the time left, shared among the processes) or was finished by one (res: its
        JSON): either way this process does not run it."""
        self._leave(run, res)
        self.current, self.train_watch, self.eval_direction = None, None, None
        what = "finished by another study process" if res is not None else "being run by another study process"
        print(f"[{self.name}] {run.id}: {what}, skipped | {self.line().split(' | ', 1)[1]}", file=self.stream, flush=True)

    def _leave(self, run, res):
        entry = [t for t in self.todo + self.held if t[0] == run]
        self.todo = [t for t in self.todo if t[0] != run]
        self.held = [t for t in self.held if t[0] != run]
        if res is None:
            self.held += entry
        elif entry:                                    # counted once, however it was noticed
            self.record(res)
            self.done += 1

    def notice_others(self):
        """Count the runs of this plan that other study processes finished meanwhile (their JSON
        from `finished_elsewhere(run)`, None while unfinished). Called at this process's own
        events, in its main thread."""
        if self.finished_elsewhere is None:
            return
        for run, _, _ in self.todo + self.held:
            res = self.finished_elsewhere(run) if run != self.current else None
            if res is not None:
                self._leave(run, res)

    def say(self, phase):
        self.notice_others()
        self.phase_name = phase
        self.print_line()

    # ----------------------------------------------------------------- the line
    def steps_now(self):
        """(steps done, total) of the current run's training, or None."""
        if not self.train_watch:
            return None
        log_path, _, total, _ = self.train_watch
        return min(count_steps(log_path), total), total

    def seconds_per_step(self):
        (seconds, steps), (own_s, own_n) = self.step_time, self.session_steps
        if self.train_watch:
            log_path, start, _, t0 = self.train_watch
            now_steps = count_steps(log_path) - start
            if now_steps > 0:
                live = self.clock() - t0
                seconds, steps, own_s, own_n = seconds + live, steps + now_steps, own_s + live, own_n + now_steps
        if own_n >= SESSION_STEPS:
            return own_s / own_n
        return seconds / steps if steps else None

    def time_left(self):
        """(seconds, [what is not measured yet]) for the runs still to do; with several study
        processes on the grid, their share: the total over the processes, but at least what
        this process's current run has left."""
        per_step, missing, total, current = self.seconds_per_step(), [], 0.0, 0.0
        for run, steps_left, direction in self.todo + self.held:
            before = total
            if run == self.current and self.train_watch:
                done, _ = self.steps_now()
                steps_left = self.train_watch[2] - done
            if steps_left:
                if per_step is None:
                    missing.append("time per training step")
                else:
                    total += steps_left * per_step
            slot = self.session_eval.get(direction) or self.eval_time.get(direction)
            if slot is None:
                missing.append(f"evaluation time on {direction}")
            else:
                spent = self.clock() - self.eval_start if run == self.current and self.eval_direction else 0.0
                total += max(0.0, slot[0] / slot[1] - spent)
            if run == self.current:
                current = total - before
        n = self.processes()
        if n > 1:                        # the runs are shared out; this process's own run still has to end
            total = max(current, total / n)
        return total, sorted(set(missing))

    def line(self):
        where = ""
        if self.current is not None:
            where = f"run {self.index}/{self.total} {self.current.id}: {self.phase_name}"
            steps = self.steps_now()
            if steps:
                where += f", step {steps[0]}/{steps[1]}"
            elif self.eval_direction:
                where += f" (evaluating for {human(self.clock() - self.eval_start)})"
        left, missing = self.time_left()
        if not self.todo and self.held:
            eta = f"nothing left for this process; {len(self.held)} being run by another study process"
        elif not self.todo:
            eta = "grid done"
        elif missing and not left:
            eta = f"time left: not known until measured ({', '.join(missing)})"
        elif missing:
            eta = f"left: at least {human(left)} (not yet measured: {', '.join(missing)})"
        else:
            eta = f"left: about {human(left)}"
        n = self.processes()
        if n > 1 and self.todo:
            eta += f" ({n} study processes on this grid)"
        return f"[{self.name}] {where} | {self.done}/{self.total} runs done, {eta}"

    def print_line(self):
        print(self.line(), file=self.stream, flush=True)

    # ----------------------------------------------------------------- ticker
    def __enter__(self):
        if self.every > 0:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _tick(self):
        while not self._stop.wait(self.every):
            self.print_line()
