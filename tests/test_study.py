"""study.py on a tiny grid: the demo's synthetic world (3 languages, one unseen in direction A),
a tiny random encoder, 3 training steps a run. Checks: the run files and what they record,
per-query ranks that reproduce every figure, skipping finished runs, resuming a run stopped
during training, after training, or by Ctrl-C, the report from the result files alone,
--verify, and settings checked before anything is loaded."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import study
import train
from minihbt import cli, demo, training
from minihbt.parallel import blas_info, blas_threads
from minihbt.files import exclusive_lock, live_processes, presence
from minihbt.study import grid as study_grid, load_study, paper, runner as study_runner
from minihbt.study.runner import Interrupted
from minihbt.study.data import DirectionBootstrap, StudyResults
from minihbt.study.perquery import METRICS, RankFile, unit_values
from minihbt.study.progress import SESSION_STEPS, Progress
from minihbt.study.verdicts import fmt_difference, judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data directories and the start model: A trains on qa, qb and evaluates on qa, qb, qc;
    B trains on all three and evaluates on qa, qb."""
    root = tmp_path_factory.mktemp("world")
    w = demo.make_world(0, n_languages=3, n_entities=8, n_relations=3)
    train3 = demo.lareqa_files(w, str(root / "data" / "train3"), "train")
    eval3 = demo.lareqa_files(w, str(root / "data" / "eval3"), "eval")
    for split, src in (("train2", train3), ("eval2", eval3)):
        os.makedirs(root / "data" / split)
        for lang in ("qa", "qb"):
            shutil.copy(os.path.join(src, f"{lang}.json"), root / "data" / split)
    demo.make_model(w, str(root / "model"))
    return root


def make_config(world, path, steps=STEPS, **recipe):
    cfg = {"name": "tiny", "description": "a test grid", "model": str(world / "model"),
           "data_root": str(world / "data"),
           "directions": {"A": {"train": ["train2"], "eval": "eval3", "about": "qa, qb -> qa, qb, qc"},
                          "B": {"train": ["train3"], "eval": "eval2"}},
           "conditions": {"base": None, "xx": {"sampler": "xx"}, "xy": {"sampler": "xy"},
                          "hybrid": {"sampler": "hybrid", "alpha": 0.5}},
           "seeds": [0, 1],
           "recipe": {"batch_size": 4, "steps": steps, "lr": 1e-3, "warmup": 1, "max_query_len": 16,
                      "max_passage_len": 16, "save_every": 0, **recipe},
           "evaluation": {"batch_size": 16, "max_length": 30},
           "report": {"bootstrap_resamples": 1000, "comparisons": [["hybrid", "xx"], ["xy", "xx"],
                                                                    ["hybrid", "base+centered"]]}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return str(path)


def flags(config, out):
    return ["--config", config, "--results", str(out / "results"), "--runs", str(out / "runs"), "--progress-every", "0"]


@pytest.fixture(scope="module")
def grid(world, tmp_path_factory):
    """Direction A run in full (base + 3 conditions x 2 seeds); direction B left missing."""
    out = tmp_path_factory.mktemp("grid")
    config = make_config(world, out / "study.json")
    assert study.main(flags(config, out) + ["--only", "direction=A"]) == 0
    return config, out, load_study(config, ROOT, results_root=str(out / "results"), runs_root=str(out / "runs"))


def result(out, run_id):
    with open(out / "results" / "tiny" / f"{run_id}.json", encoding="utf-8") as f:
        return json.load(f)


def test_grid_writes_one_record_per_run(grid):
    config, out, st = grid
    files = sorted(os.listdir(out / "results" / "tiny" / "A"))
    stems = ["base"] + [f"{c}-seed{s}" for c in ("hybrid", "xx", "xy") for s in (0, 1)]
    assert files == sorted([s + ".json" for s in stems] + [s + ".npz" for s in stems])
    assert not os.path.exists(out / "results" / "tiny" / "B")
    rec = result(out, "A/xy-seed1")
    assert (rec["run"], rec["condition"], rec["seed"]) == ("A/xy-seed1", "xy", 1)
    assert rec["settings"]["train"] == {"batch_size": 4, "steps": STEPS, "lr": 1e-3, "warmup": 1, "max_query_len": 16,
                                        "max_passage_len": 16, "save_every": 0, "sampler": "xy", "seed": 1}
    assert rec["seen"] == ["qa", "qb"] and rec["unseen"] == ["qc"] and rec["train_languages"] == ["qa", "qb"]
    assert len(rec["loss_curve"]["loss"]) == STEPS and set(rec["loss_curve"]["kind"]) == {"xy"}
    assert rec["command"].endswith("--verify A/xy-seed1") and "--seed 1" in rec["train_command"]
    assert rec["evaluate_commands"]["centered"].endswith("--center-languages")
    assert set(rec["minihbt"]) == {"version", "commit", "dirty", "same_bits_any_threads"} and rec["machine"]["cpus"] >= 1
    assert rec["seconds"]["train_steps"] == STEPS and rec["seconds"]["evaluate"] > 0
    plain, centered = rec["results"]["plain"], rec["results"]["centered"]
    assert plain["center_languages"] is False and centered["center_languages"] is True
    assert len(plain["cross"]["per_pair"]) == 6 and plain != centered
    assert result(out, "A/base")["loss_curve"] is None and result(out, "A/base")["settings"]["train"] is None
    # weights, optimizer state and embeddings are gone; the training log stays
    assert sorted(os.listdir(out / "runs" / "tiny" / "A" / "xy-seed1")) == ["log.jsonl", "study_state.json"]


def test_per_query_ranks_reproduce_every_figure(grid):
    config, out, st = grid
    for run_id in ("A/base", "A/hybrid-seed0"):
        rec, ranks = result(out, run_id), RankFile(str(out / "results" / "tiny" / f"{run_id}.npz"))
        for variant in ("plain", "centered"):
            for metric in METRICS:
                units, figures = ranks.units(variant, metric), unit_values(rec["results"][variant], metric)
                assert set(units) == set(figures)
                for unit, (ids, values) in units.items():
                    assert values.mean() == pytest.approx(figures[unit], abs=1e-12)
                    assert len(ids) == len(values)


def test_finished_runs_are_skipped(grid, monkeypatch):
    config, out, st = grid
    before = {p: (out / "results" / "tiny" / "A" / p).read_bytes() for p in os.listdir(out / "results" / "tiny" / "A")}

    def boom(*a, **k):
        raise AssertionError("a finished run was trained or encoded again")
    monkeypatch.setattr(training, "train", boom)
    monkeypatch.setattr("minihbt.encode", boom)
    assert study.main(flags(config, out) + ["--only", "direction=A"]) == 0
    assert before == {p: (out / "results" / "tiny" / "A" / p).read_bytes() for p in before}


def test_report_from_result_files_alone(grid, monkeypatch):
    config, out, st = grid

    def boom(*a, **k):
        raise AssertionError("the report must not load a model or data")
    for name in ("minihbt.load_model", "minihbt.encode", "minihbt.data.load_lareqa"):
        monkeypatch.setattr(name, boom)
    shutil.rmtree(out / "runs")                                       # nothing but the result files
    assert study.main(flags(config, out) + ["--report"]) == 0
    text = (out / "results" / "tiny" / "REPORT.md").read_text()
    assert "**Missing runs (7):** B/base, B/xx-seed0" in text and "## Direction B\n\nNo runs yet." in text
    blas = blas_info()
    threads = f"{blas['threads']} thread{'s' if blas['threads'] > 1 else ''}"
    assert f"; BLAS: {blas['library']} {blas['version']} ({blas['architecture']}): {threads} 7 runs\n" in text
    xx = [result(out, f"A/xx-seed{s}")["results"]["plain"]["mono"]["map"] for s in (0, 1)]
    half = 12.706204736174696 * abs(xx[0] - xx[1]) / 2                # t_{0.975,1} s / sqrt(2), s = |a - b| / sqrt(2)
    assert f"| xx | 2 | {np.mean(xx):.3f} ± {half:.3f}".replace("0.", ".") in text
    for claim in ("hybrid ≥ X-X on Cr. and Mul.", "hybrid ≥ X-Y on Mo.", "reduce the language bias",
                  "best or tied-best", "carry to unseen languages", "training-free fix"):
        row = next(l for l in text.splitlines() if claim in l)
        assert any(f"| {v} |" in row for v in ("holds", "refuted", "not separable"))
    assert "| qc | unseen |" in text and "| hybrid − base+centered |" in text
    if (out / "results" / "tiny" / "metrics-A.png").exists():
        assert "![training loss, direction A](loss-A.png)" in text
    else:
        assert "matplotlib is not installed" in text
    # the bootstrap's observed difference is the difference of the seed means of the table
    boot = DirectionBootstrap(StudyResults(st), "A", 1000, 0)
    # verdicts are judged on the interval with the seeds resampled too, the questions-only one quoted
    judged = [judge("bias", boot.difference(a, "xx", "bias", interval="seeds")) for a in ("xy", "hybrid")]
    verdict = "holds" if judged == ["holds"] * 2 else "refuted" if "refuted" in judged else "not separable"
    row = next(l for l in text.splitlines() if "reduce the language bias" in l)
    assert f"| {verdict} |" in row and row.count("(questions only: [") == 2
    wide, narrow = (boot.difference("xy", "xx", "bias", interval=i) for i in ("seeds", "questions"))
    assert wide["difference"] == narrow["difference"] and wide["high"] - wide["low"] >= narrow["high"] - narrow["low"]
    for metric in ("cr_map", "mul_map", "bias"):
        key = METRICS[metric]
        mean = lambda c: np.mean([r["results"]["plain"][key[1]][key[2]]                    # noqa: E731
                                  for r in (result(out, f"A/{c}-seed{s}") for s in (0, 1))])
        d = boot.difference("hybrid", "xx", metric)
        assert d["difference"] == pytest.approx(mean("hybrid") - mean("xx"), abs=1e-12) and d["low"] <= d["high"]


def test_the_paper_beside_a_direction_on_a_set_it_reports(grid, monkeypatch):
    config, out, st = grid
    figs = {"XLM-R": {"xx": (.792, .674, .547, 410.2), "xy": (.755, .700, .593, 295.4), "hybrid": (.798, .705, .593, 286.6)}}
    monkeypatch.setitem(paper.FIGURES, "eval3", figs)                 # direction A evaluates on eval3
    assert paper.figures_for(str(out / "data" / "XQuAD-R/")) is paper.FIGURES["xquad-r"]
    assert study.main(flags(config, out) + ["--report"]) == 0
    text = (out / "results" / "tiny" / "REPORT.md").read_text()
    a, b = text.split("## Direction B")
    assert "### Beside the paper" in a and "### Beside the paper" not in b
    # by hand from the figures: hybrid - xx = .798 - .792, .705 - .674, .593 - .547, 286.6 - 410.2
    assert "| hybrid − xx | paper, XLM-R | +.006 | +.031 | +.046 | -123.6 |" in a
    assert "| xy − xx | paper, XLM-R | -.037 | +.026 | +.046 | -114.8 |" in a
    boot = DirectionBootstrap(StudyResults(st), "A", 1000, 0)
    ours = next(l for l in a.splitlines() if l.startswith("| hybrid − xx | this study |"))
    assert fmt_difference("bias", boot.difference("hybrid", "xx", "bias", interval="seeds")) in ours


def test_differences_seed_by_seed(grid):
    config, out, st = grid
    assert study.main(flags(config, out) + ["--report"]) == 0
    text = (out / "results" / "tiny" / "REPORT.md").read_text().split("## Direction B")[0]
    rows = {l.split(" | ")[0][2:]: l.split(" | ")[1:] for l in text.split("### Differences seed by seed")[1]
            .split("###")[0].splitlines() if l.startswith("| hybrid")}

    def value(run_id, key):
        return result(out, run_id)["results"]["plain"]["multi"][key]
    by_hand = [value(f"A/hybrid-seed{s}", "map") - value(f"A/xx-seed{s}", "map") for s in (0, 1)]
    side = sum((x > 0) == (sum(by_hand) > 0) for x in by_hand)
    cell = " ".join(f"{x:+.3f}".replace("0.", ".", 1) for x in by_hand) + f" ({side}/2)"
    assert rows["hybrid − xx"][2] == cell                             # Mo., Cr., Mul., bias: Mul. is third
    base = result(out, "A/base")["results"]["centered"]["bias"]["rank_distance"]
    hybrid = [result(out, f"A/hybrid-seed{s}")["results"]["plain"]["bias"]["rank_distance"] for s in (0, 1)]
    assert rows["hybrid − base+centered"][3].startswith(" ".join(f"{h - base:+.1f}" for h in hybrid) + " (")


def test_resume_a_run_stopped_during_training(grid, tmp_path, capsys):
    config, out, st = grid
    run = next(r for r in st.runs() if r.id == "A/hybrid-seed0")
    run_dir = tmp_path / "runs" / "tiny" / "A" / "hybrid-seed0"
    argv = st.train_argv(run, str(run_dir))
    argv[argv.index("--steps") + 1] = "2"                            # the state a stop after step 2 leaves
    train.main(argv + ["--quiet"])
    (run_dir / ".tmp-checkpoint-3").mkdir()                          # and a save cut short after step 3
    assert study.main(flags(config, tmp_path) + ["--only", "A/hybrid-seed0"]) == 0
    assert (f"A/hybrid-seed0: removed .tmp-checkpoint-3 (left by an interrupted save) from {run_dir}"
            in capsys.readouterr().err)
    again, clean = result(tmp_path, "A/hybrid-seed0"), result(out, "A/hybrid-seed0")
    assert again["results"] == clean["results"] and again["loss_curve"] == clean["loss_curve"]
    assert again["seconds"]["train_sessions"] == 1 and again["seconds"]["train_steps"] == 1   # only step 3 here


def test_the_shown_train_command_is_what_the_run_trains_with(grid):
    """train.py's command a run shows (the dry run, its JSON's train_command), read by train.py's own
    parser, gives the TrainSettings the study trains the run with: both come from Study.train_values."""
    config, out, st = grid
    trained = [r for r in st.runs() if st.conditions[r.condition] is not None]
    assert len(trained) == 12
    for run in trained:
        argv = st.train_argv(run) + ["--device", "cpu", "--quiet"]
        problems = cli.Problems()
        shown = cli.build_settings(training.TrainSettings, vars(train.build_parser().parse_args(argv)), {}, problems)
        assert problems.lines == [] and shown == study_runner.train_settings(st, run, "cpu")
        if run.direction == "A":
            command = "python train.py " + shlex.join(st.train_argv(run, display=True) + ["--device", "cpu"])
            assert result(out, run.id)["train_command"] == command


def test_a_run_killed_before_its_first_checkpoint_starts_over(grid, tmp_path):
    config, out, st = grid
    run_dir = tmp_path / "runs" / "tiny" / "A" / "xx-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')   # a SIGKILL left a log and no checkpoint
    assert study.main(flags(config, tmp_path) + ["--only", "A/xx-seed1"]) == 0
    again, clean = result(tmp_path, "A/xx-seed1"), result(out, "A/xx-seed1")
    assert again["results"] == clean["results"] and again["loss_curve"] == clean["loss_curve"]


def test_resume_after_training_evaluates_only(grid, tmp_path, monkeypatch, capsys):
    config, out, st = grid

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("minihbt.study.runner.evaluate_run", stop)
    with pytest.raises(SystemExit) as e:
        study.main(flags(config, tmp_path) + ["--only", "A/xy-seed1"])
    assert e.value.code == 130 and "interrupted during A/xy-seed1" in capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny" / "A" / "xy-seed1" / "final").is_dir()
    monkeypatch.undo()

    def boom(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(training, "train", boom)
    assert study.main(flags(config, tmp_path) + ["--only", "A/xy-seed1"]) == 0
    assert result(tmp_path, "A/xy-seed1")["results"] == result(out, "A/xy-seed1")["results"]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_and_the_plan_shows_the_resume_point(world, tmp_path, signum, code):
    config = make_config(world, tmp_path / "study.json", steps=100000)
    cmd = [sys.executable, os.path.join(ROOT, "study.py")] + flags(config, tmp_path) + ["--only", "A/xx-seed0"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "runs" / "tiny" / "A" / "xx-seed0" / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted during A/xx-seed0" in err and "the same command resumes it" in err
    ckpt = [d for d in os.listdir(log.parent) if d.startswith("checkpoint-")]
    assert len(ckpt) == 1
    plan = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env, check=True).stdout
    assert f"trained {ckpt[0].split('-')[1]}/100000" in plan


def test_verify_reproduces_a_run_and_catches_a_change(grid, tmp_path, capsys):
    config, out, st = grid
    assert study.main(flags(config, out) + ["--verify", "A/xy-seed0"]) == 0
    assert "A/xy-seed0: reproduced" in capsys.readouterr().out
    shutil.copytree(out / "results", tmp_path / "results")
    path = tmp_path / "results" / "tiny" / "A" / "xy-seed0.json"
    rec = json.loads(path.read_text())
    rec["results"]["plain"]["multi"]["map"] += 1e-3
    path.write_text(json.dumps(rec))
    assert study.main(flags(config, tmp_path) + ["--verify", "A/xy-seed0"]) == 1
    said = capsys.readouterr().out
    assert "NOT reproduced" in said and "plain.multi.map" in said
    assert "largest |difference| by metric: map 0.001 (plain.multi.map)" in said          # mAP named first
    threads = rec["machine"]["blas"]["threads"]
    assert threads == blas_threads() and rec["minihbt"]["same_bits_any_threads"] is True
    rec["results"]["plain"]["multi"]["map"] -= 1e-3
    rec["machine"]["blas"]["threads"] = threads + 1                 # made on more BLAS threads than this process has
    path.write_text(json.dumps(rec))
    assert study.main(flags(config, tmp_path) + ["--verify", "A/xy-seed0"]) == 0    # the thread count does not matter
    assert "A/xy-seed0: reproduced" in capsys.readouterr().out
    del rec["minihbt"]["same_bits_any_threads"]                     # a run made before it stopped mattering
    path.write_text(json.dumps(rec))
    with pytest.raises(SystemExit) as e:
        study.main(flags(config, tmp_path) + ["--verify", "A/xy-seed0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"made with {threads + 1} BLAS thread(s)" in err
    assert f"OPENBLAS_NUM_THREADS={threads + 1} python study.py" in err and len(err.splitlines()) == 1


def test_an_interrupted_verify_says_so_in_one_line(grid, monkeypatch, capsys):
    config, out, st = grid

    def stop(*a, **k):
        raise Interrupted("terminated", code=143)
    monkeypatch.setattr("minihbt.study.verify.verify", stop)
    with pytest.raises(SystemExit) as e:
        study.main(flags(config, out) + ["--verify", "A/xy-seed0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 143 and err[-1] == "study.py: --verify A/xy-seed0 interrupted; run again, it starts from nothing"


def test_changed_settings_are_refused(world, grid, tmp_path, capsys):
    config, out, st = grid
    other = make_config(world, tmp_path / "study.json", lr=2e-3)
    with pytest.raises(SystemExit) as e:
        study.main(flags(other, out) + ["--only", "A/xx-seed0", "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "xx-seed0.json: made with another settings" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("change,flag_args,message", [
    ({"recipe": {"lr": -1}}, [], "recipe.lr: expected a number > 0, got -1"),
    ({"recipe": {"lrr": 1}}, [], "recipe.lrr: unknown key"),
    ({"recipe": {"steps": 2.5}}, [], "recipe.steps: expected an integer >= 1"),
    ({"seeds": [0, 0]}, [], "seeds: expected a list of distinct integers"),
    ({"conditions": {"odd": {"alpha": 0.3}}}, [], "conditions.odd.sampler: required"),
    ({"report": {"bootstrap_resamples": 100}}, [], "report.bootstrap_resamples: expected an integer >= 1000"),
    ({"report": {"comparisons": [["hybrid", "nothing"]]}}, [], "report.comparisons[0]"),
    ({"model": "/nonexistent/model"}, [], "no config.json there"),
    ({"directions": {"A": {"train": ["nope"], "eval": "eval3"}}}, [], "direction A: "),
    ({}, ["--only", "A/zz-seed0"], "--only A/zz-seed0: no such run"),
    ({}, ["--only", "colour=red"], "unknown key 'colour'"),
    ({}, ["--progress-every", "-1"], "--progress-every: expected a number of seconds >= 0"),
    ({}, ["--report", "--verify", "A/base"], "--report and --verify cannot be combined"),
    ({}, ["--device", "tpu"], "argument --device: invalid choice"),
])
def test_bad_settings_are_refused_before_anything_runs(world, tmp_path, capsys, change, flag_args, message):
    config = make_config(world, tmp_path / "study.json")
    with open(config, encoding="utf-8") as f:
        cfg = json.load(f)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key != "directions" else value
    with open(config, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(SystemExit) as e:
        study.main(flags(config, tmp_path) + flag_args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_progress_estimate_uses_measured_times_only():
    class Run:
        def __init__(self, rid, direction):
            self.id, self.direction = rid, direction
    a1, a2, b1 = Run("A/x-seed0", "A"), Run("A/x-seed1", "A"), Run("B/base", "B")
    finished = [{"direction": "A", "seconds": {"train": 100.0, "train_steps": 50, "evaluate": 30.0}}]
    now = [0.0]
    lines = []
    p = Progress("t", 4, [(a1, 50, "A"), (a2, 50, "A"), (b1, 0, "B")], finished, every=0, clock=lambda: now[0])
    p.stream = type("S", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})()
    # 2 s a step, 30 s an evaluation on A; B's evaluation time is unknown
    assert p.time_left() == (2 * (50 * 2.0 + 30.0), ["evaluation time on B"])
    assert "left: at least 4 min 20 s (not yet measured: evaluation time on B)" in p.line()
    p.begin(a1)
    p.trained(100.0, 50)                                               # a1 trained at 2 s a step too
    now[0] = 10.0
    p.evaluating("encoding")
    now[0] = 25.0
    assert p.time_left()[0] == pytest.approx(15.0 + 130.0)            # a1: 30 - 15 s spent; then a2
    assert "run 2/4 A/x-seed0: encoding (evaluating for 15 s)" in p.line()
    assert lines[0].startswith("[t] run 2/4 A/x-seed0: starting | 1/4 runs done")


def test_progress_prefers_this_invocations_own_times(tmp_path):
    """Earlier runs went at 2 s a step and 30 s an evaluation; this invocation (say, two study
    processes side by side) measures 3 s a step and 45 s: once it has timed SESSION_STEPS steps
    and an evaluation, the estimate is its own."""
    class Run:
        def __init__(self, rid):
            self.id, self.direction = rid, "A"
    a1, a2 = Run("A/x-seed0"), Run("A/x-seed1")
    finished = [{"direction": "A", "seconds": {"train": 100.0, "train_steps": 50, "evaluate": 30.0}}]
    now, log = [0.0], tmp_path / "log.jsonl"
    p = Progress("t", 3, [(a1, 50, "A"), (a2, 50, "A")], finished, every=0, clock=lambda: now[0])
    p.stream = type("S", (), {"write": lambda self, s: None, "flush": lambda self: None})()
    p.begin(a1)
    p.training(str(log), 0, 50)
    log.write_text("{}\n" * (SESSION_STEPS - 1))
    now[0] = 3.0 * (SESSION_STEPS - 1)
    assert p.seconds_per_step() == pytest.approx((100.0 + now[0]) / (50 + SESSION_STEPS - 1))   # too few of its own
    log.write_text("{}\n" * SESSION_STEPS)
    now[0] = 3.0 * SESSION_STEPS
    assert p.seconds_per_step() == pytest.approx(3.0)
    p.trained(150.0, 50)
    p.evaluating("encoding")
    now[0] = 195.0
    p.finished({"direction": "A", "seconds": {"train": 150.0, "train_steps": 50, "evaluate": 45.0},
                "results": {"plain": {"mono": {"map": 0}, "cross": {"map": 0}, "multi": {"map": 0},
                                      "bias": {"rank_distance": 0}}}})
    assert p.step_time == [100.0 + 150.0, 50 + 50]                    # a1's training counted once
    assert p.time_left() == (pytest.approx(50 * 3.0 + 45.0), [])


def test_progress_counts_every_session_of_a_finished_runs_training_once():
    """A run trained by an earlier invocation (stopped before its evaluation) is finished here
    without `trained`; a resumed run's `trained` counts only this invocation's steps: either
    way its JSON's training (every session) ends up in the estimate once."""
    class Run:
        def __init__(self, rid):
            self.id, self.direction = rid, "A"
    a1, a2, a3 = Run("A/x-seed0"), Run("A/x-seed1"), Run("A/x-seed2")
    p = Progress("t", 3, [(a1, 0, "A"), (a2, 20, "A"), (a3, 50, "A")], [], every=0, clock=lambda: 0.0)
    p.stream = type("S", (), {"write": lambda self, s: None, "flush": lambda self: None})()
    results = {"plain": {"mono": {"map": 0}, "cross": {"map": 0}, "multi": {"map": 0}, "bias": {"rank_distance": 0}}}
    p.begin(a1)
    p.finished({"direction": "A", "seconds": {"train": 100.0, "train_steps": 50, "evaluate": 30.0}, "results": results})
    assert p.step_time == [100.0, 50]
    p.begin(a2)
    p.trained(60.0, 20)                                               # steps 31..50, here; 1..30 took 90 s before
    assert p.step_time == [160.0, 70]
    p.finished({"direction": "A", "seconds": {"train": 150.0, "train_steps": 50, "evaluate": 30.0}, "results": results})
    assert p.step_time == [250.0, 100]
    assert p.time_left() == (pytest.approx(50 * 3.0 + 30.0), [])       # a3 at this invocation's own 3 s a step


@pytest.mark.parametrize("recipe,refusal", [
    ({"xx_weighting": "uniform"}, "A/xy-seed0: train.py would refuse its settings: --xx-weighting"),
    ({"max_query_len": 31}, "A/xx-seed0: train.py would refuse its settings: --max-query-len 31: expected an "
                            "integer in [2, 30] for this model (30 positions)")])
def test_a_recipe_train_py_would_refuse_is_refused_before_any_run(world, tmp_path, capsys, monkeypatch, recipe,
                                                                  refusal):
    """The recipe is shared by every condition: --xx-weighting reaching an xy run, or a length past
    the model's positions, is refused by train.py, so study.py must refuse the grid up front,
    naming the run and the flag."""
    config = make_config(world, tmp_path / "study.json", **recipe)

    def boom(*a, **k):
        raise AssertionError("trained although the settings are refused")
    monkeypatch.setattr(training, "train", boom)
    with pytest.raises(SystemExit) as e:
        study.main(flags(config, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and refusal in err
    assert "Traceback" not in err and not (tmp_path / "results").exists()


def test_a_run_another_process_holds_is_left_to_it(grid, tmp_path, capsys):
    config, out, st = grid
    mine = load_study(config, ROOT, results_root=str(tmp_path / "results"), runs_root=str(tmp_path / "runs"))
    held = next(r for r in mine.runs() if r.id == "A/xx-seed0")
    other = str(tmp_path / "runs" / "tiny" / ".process-otherhost-1-0.lock")   # the other process's presence
    with exclusive_lock(mine.lock_path(held)) as got, exclusive_lock(other):     # it works on A/xx-seed0
        assert got
        assert study.main(flags(config, tmp_path) + ["--only", "A/xx-seed0", "--only", "A/base"]) == 0
        err = capsys.readouterr().err
        assert "(2 study processes on this grid)" in err                            # the ETA is shared
        skipped = [l for l in err.splitlines() if "A/xx-seed0: being run by another study process, skipped" in l]
        assert len(skipped) == 2                                                     # tried again at the end
        assert skipped[-1].endswith("1/2 runs done, nothing left for this process; 1 being run by another study process")
        assert err.strip().splitlines()[-1].startswith(
            "study.py: 1 run(s) done, 0 already finished; 1 still being run by another study process (A/xx-seed0)")
        assert result(tmp_path, "A/base")["results"] == result(out, "A/base")["results"]
        assert not os.path.exists(mine.result_path(held)) and not os.path.exists(mine.run_dir(held))
        with exclusive_lock(mine.lock_path(held)) as again:           # held means held, in any process
            assert not again
        plan = subprocess.run([sys.executable, os.path.join(ROOT, "study.py")] + flags(config, tmp_path) + ["--dry-run"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
        assert "1 study process(es) working on this grid now" in plan
        assert [l.split()[1:3] for l in plan.splitlines() if "A/xx-seed0 " in l] == [["running", "now"]]
    assert study.main(flags(config, tmp_path) + ["--only", "A/xx-seed0"]) == 0      # released: this one runs it
    assert result(tmp_path, "A/xx-seed0")["results"] == result(out, "A/xx-seed0")["results"]


def test_a_run_whose_holder_stops_is_taken_over_at_the_end(grid, tmp_path, monkeypatch, capsys):
    config, out, st = grid
    mine = load_study(config, ROOT, results_root=str(tmp_path / "results"), runs_root=str(tmp_path / "runs"))
    held = next(r for r in mine.runs() if r.id == "A/xy-seed0")
    holder = exclusive_lock(mine.lock_path(held))
    assert holder.__enter__()
    skip = Progress.elsewhere

    def and_then_the_holder_stops(self, run, res=None):
        skip(self, run, res)
        holder.__exit__(None, None, None)                             # e.g. Ctrl-C in the other shell
    monkeypatch.setattr(Progress, "elsewhere", and_then_the_holder_stops)
    assert study.main(flags(config, tmp_path) + ["--only", "A/xy-seed0", "--only", "A/xx-seed1"]) == 0
    err = capsys.readouterr().err
    assert err.count("A/xy-seed0: being run by another study process, skipped") == 1
    assert err.strip().splitlines()[-1].startswith("study.py: 2 run(s) done, 0 already finished; results in")
    for run_id in ("A/xy-seed0", "A/xx-seed1"):
        assert result(tmp_path, run_id)["results"] == result(out, run_id)["results"]


def test_a_run_finished_by_another_process_meanwhile_is_not_run_again(grid, tmp_path, monkeypatch, capsys):
    config, out, st = grid
    made = study_grid.make_progress

    def then_another_process_finishes_it(*a, **k):                   # after this process planned A/xy-seed1
        progress = made(*a, **k)
        os.makedirs(tmp_path / "results" / "tiny" / "A")
        for ext in (".json", ".npz"):
            shutil.copy(out / "results" / "tiny" / "A" / f"xy-seed1{ext}", tmp_path / "results" / "tiny" / "A")
        return progress

    def boom(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(study_grid, "make_progress", then_another_process_finishes_it)
    monkeypatch.setattr(training, "train", boom)
    assert study.main(flags(config, tmp_path) + ["--only", "A/xy-seed1"]) == 0
    err = capsys.readouterr().err
    assert "A/xy-seed1: finished by another study process, skipped | 1/1 runs done, grid done" in err
    assert "study.py: 0 run(s) done, 0 already finished, 1 finished by another study process;" in err


def test_two_study_processes_share_one_grid(world, grid, tmp_path):
    """Two processes started together on the same runs: every run is trained and evaluated
    exactly once, whichever way they interleave, and gives the figures of a single process."""
    config = make_config(world, tmp_path / "study.json")
    cmd = [sys.executable, os.path.join(ROOT, "study.py")] + flags(config, tmp_path) + [
        "--only", "A/xx-seed0", "--only", "A/xy-seed0", "--only", "A/hybrid-seed1"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    done_here = [int(e.strip().splitlines()[-1].split()[1]) for e in errs]      # "study.py: N run(s) done, ..."
    assert sum(done_here) == 3, errs
    for run_id in ("A/xx-seed0", "A/xy-seed0", "A/hybrid-seed1"):
        assert sum(e.count(f"{run_id}: done in") for e in errs) == 1, errs
        assert result(tmp_path, run_id)["seconds"]["train_sessions"] == 1
        assert result(tmp_path, run_id)["results"] == result(grid[1], run_id)["results"]


def test_two_verifies_of_one_run_do_not_share_a_scratch_directory(grid):
    config, out, st = grid
    run = next(r for r in st.runs() if r.id == "A/xy-seed0")
    scratch = os.path.join(st.runs_root, ".verify", "tiny", "A", "xy-seed0.lock")
    with exclusive_lock(scratch) as got:
        assert got
        with pytest.raises(SystemExit) as e:
            study.main(flags(config, out) + ["--verify", run.id])
    assert e.value.code == "study.py: --verify A/xy-seed0: another process is verifying this run now; wait for it to end"


def test_presence_counts_the_live_processes_only(tmp_path):
    folder = str(tmp_path / "grid")
    assert live_processes(folder) == 0
    with presence(folder) as processes:
        assert processes() == 1 and live_processes(folder) == 1
        other = os.path.join(folder, ".process-999999999.lock")       # another process's mark
        with exclusive_lock(other):
            assert processes() == 2 and live_processes(folder) == 2
        assert processes() == 1                                       # it ended (or was killed): not counted
    assert os.listdir(folder) == [".process-999999999.lock"] and live_processes(folder) == 0


def test_progress_shares_the_time_left_among_processes():
    a1, a2, a3 = (type("R", (), {"id": f"A/xx-seed{i}", "direction": "A"})() for i in range(3))
    finished = [{"direction": "A", "seconds": {"train": 100.0, "train_steps": 100, "evaluate": 50.0}}]
    now, n = [0.0], [1]
    p = Progress("t", 3, [(a1, 100, "A"), (a2, 100, "A"), (a3, 100, "A")], finished, every=0,
                 clock=lambda: now[0], processes=lambda: n[0])
    p.current = a1
    assert p.time_left() == (450.0, [])                # 3 runs x (100 steps x 1 s + 50 s evaluation)
    n[0] = 2
    assert p.time_left() == (225.0, []) and p.line().endswith("left: about 3 min 45 s (2 study processes on this grid)")
    n[0] = 5
    assert p.time_left() == (150.0, [])                # never less than this process's own run
    p.current = None
    p.elsewhere(a1)                                    # another process holds a1: still in the time left
    p.elsewhere(a2, {"direction": "A", "seconds": {"train": 100.0, "train_steps": 100, "evaluate": 50.0}})
    assert p.done == 1 and p.time_left() == (60.0, [])  # (a1 + a3) / 5 processes
    p.elsewhere(a3)
    assert p.line().endswith("1/3 runs done, nothing left for this process; 2 being run by another study process")


def test_a_stop_during_the_last_training_step_stops_before_the_evaluation(grid, tmp_path, monkeypatch, capsys):
    config, out, st = grid
    step = training.train_step

    def sigterm_in_the_last_step(model, optimizer, s, batch, i, *comm):
        if i == STEPS - 1:
            os.kill(os.getpid(), signal.SIGTERM)                      # lands inside the training loop's GracefulStop
        return step(model, optimizer, s, batch, i, *comm)

    def boom(*a, **k):
        raise AssertionError("evaluated after a stop")
    monkeypatch.setattr(training, "train_step", sigterm_in_the_last_step)
    monkeypatch.setattr("minihbt.study.runner.evaluate_run", boom)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            study.main(flags(config, tmp_path) + ["--only", "A/xx-seed1"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert e.value.code == 143 and "A/xx-seed1: trained; stopped before its evaluation" in err
    assert (tmp_path / "runs" / "tiny" / "A" / "xx-seed1" / "final").is_dir()
    monkeypatch.undo()
    monkeypatch.setattr(training, "train", boom)                          # the same command only evaluates now
    assert study.main(flags(config, tmp_path) + ["--only", "A/xx-seed1"]) == 0
    assert result(tmp_path, "A/xx-seed1")["results"] == result(out, "A/xx-seed1")["results"]


def test_progress_notices_runs_other_processes_finish():
    a1, a2, a3 = (type("R", (), {"id": f"A/xx-seed{i}", "direction": "A"})() for i in range(3))
    res = {"direction": "A", "seconds": {"train": 100.0, "train_steps": 100, "evaluate": 50.0},
           "results": {"plain": {"mono": {"map": .5}, "cross": {"map": .4}, "multi": {"map": .3},
                                 "bias": {"rank_distance": 10.0}}}}
    finished = set()
    p = Progress("t", 3, [(a1, 100, "A"), (a2, 100, "A"), (a3, 100, "A")], [res], every=0, clock=lambda: 0.0,
                 finished_elsewhere=lambda run: res if run.id in finished else None)
    p.begin(a1)
    assert p.line().startswith("[t] run 1/3 A/xx-seed0: starting | 0/3 runs done")
    finished.add(a2.id)                                # another process finishes a2 while this one runs a1
    p.training("/nonexistent/log.jsonl", 0, 100)
    assert p.done == 1 and [t[0] for t in p.todo] == [a1, a3]
    p.finished(res)
    p.elsewhere(a2, res)                               # reached later: counted once
    assert p.done == 2
    p.begin(a3)
    assert p.line().startswith("[t] run 3/3 A/xx-seed2: starting | 2/3 runs done")
