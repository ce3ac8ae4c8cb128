"""The programs at their edge: bad invocations, protected runs, signals, one-language evaluation.

The table below holds bad invocations of train.py, evaluate.py and `python -m minihbt.download`.
Each must end with the expected exit status (2: a bad setting, argparse's convention; 1: an
error of the library, such as a damaged checkpoint), print no traceback, and name the flag or
file at fault. Cases marked `before_loading` run with the model loader and the data readers
replaced by a function that fails the test: they prove the check comes before any work.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import evaluate
import minihbt
import minihbt.data
import train
from conftest import CUDA_SKIP, TINY
from minihbt import demo, download
from minihbt.checkpoint import remove_partial_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"train": train.main, "evaluate": evaluate.main, "download": download.main}
PROG_NAMES = {"train": "train.py", "evaluate": "evaluate.py", "download": "python -m minihbt.download"}


def write_jsonl(path):
    """40 parallel groups in 3 made-up languages (a tiny word list each)."""
    words = {l: [f"{l}{i}" for i in range(50)] for l in ("aa", "bb", "cc")}
    with open(path, "w", encoding="utf-8") as f:
        for g in range(40):
            for l, w in words.items():
                f.write(json.dumps({"id": f"{g}-{l}", "lang": l, "query": f"{w[g]} {w[(g * 7) % 50]} ?",
                                    "positive": f"{w[g]} {w[(g * 3) % 50]} .", "group": str(g)}) + "\n")
    return str(path)


def tiny_run(data, out, *extra):
    return train.main(["--model", TINY["xlmr"], "--train", data, "--batch-size", "4", "--lr", "1e-3",
                       "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Everything the table refers to: training data, a finished 2-step run, a LAReQA set of
    3 synthetic languages with a model for it, a damaged model, a plain file, an empty folder."""
    root = tmp_path_factory.mktemp("cli")
    world = demo.make_world(seed=0, n_languages=3, n_entities=6, n_relations=3)
    broken = root / "broken-model"
    shutil.copytree(TINY["xlmr"], broken)
    (broken / "config.json").write_text('{"model_type": "xlm-roberta", ')
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a folder\n")
    (root / "unknown.json").write_text('{"data": []}\n')
    p = {"model": TINY["xlmr"], "data": write_jsonl(root / "tiny.jsonl"), "run": str(root / "run"),
         "lareqa": demo.lareqa_files(world, str(root / "lareqa"), "eval"),
         "emodel": demo.make_model(world, str(root / "emodel")), "broken": str(broken),
         "file": str(root / "file.txt"), "empty": str(root / "empty"), "missing": str(root / "missing"),
         "tmp": str(root)}
    tiny_run(p["data"], p["run"], "--steps", "2", "--save-every", "1")
    return p


def config(paths, name, content):
    path = os.path.join(paths["tmp"], name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


TRAIN = "--model {model} --train {data} --out {tmp}/new"
EVAL = "--model {emodel} --data {lareqa}"
# (program, arguments, exit status, words the message must hold, checked before loading)
CASES = [
    ("train", TRAIN + " --lr -1", 2, ["--lr", "> 0"], True),
    ("train", TRAIN + " --lr 0", 2, ["--lr"], True),
    ("train", TRAIN + " --lr nan", 2, ["--lr"], True),
    ("train", TRAIN + " --warmup -5", 2, ["--warmup", ">= 0"], True),
    ("train", TRAIN + " --schedule linear --decay-steps -3", 2, ["--decay-steps", ">= 1"], True),
    ("train", TRAIN + " --decay-steps 10", 2, ["--decay-steps", "--schedule linear"], True),
    ("train", TRAIN + " --schedule linear --steps 100 --decay-steps 50", 2, ["--decay-steps", "--steps"], True),
    ("train", TRAIN + " --schedule linear --warmup 2000", 2, ["--warmup"], True),
    ("train", TRAIN + " --steps 0", 2, ["--steps", ">= 1"], True),
    ("train", TRAIN + " --steps -1", 2, ["--steps"], True),
    ("train", TRAIN + " --steps abc", 2, ["--steps"], True),
    ("train", TRAIN + " --save-every -1", 2, ["--save-every"], True),
    ("train", TRAIN + " --max-grad-norm -1", 2, ["--max-grad-norm", ">= 0"], True),
    ("train", TRAIN + " --temperature 0", 2, ["--temperature"], True),
    ("train", TRAIN + " --max-query-len 0", 2, ["--max-query-len", ">= 2"], True),
    ("train", TRAIN + " --max-passage-len 1", 2, ["--max-passage-len"], True),
    ("train", TRAIN + " --grad-cache-chunk -1", 2, ["--grad-cache-chunk"], True),
    ("train", TRAIN + " --alpha 1.5", 2, ["--alpha", "[0, 1]"], True),
    ("train", TRAIN + " --sampler xx --alpha 0.3", 2, ["--alpha", "--sampler hybrid"], True),
    ("train", TRAIN + " --sampler xy --xx-weighting proportional", 2, ["--xx-weighting"], True),
    ("train", TRAIN + " --batch-size 0", 2, ["--batch-size"], True),
    ("train", TRAIN + " --max-negatives -1", 2, ["--max-negatives"], True),
    ("train", TRAIN + " --weight-decay -0.1", 2, ["--weight-decay"], True),
    ("train", TRAIN + " --seed -1", 2, ["--seed"], True),
    ("train", TRAIN + " --sampler zz", 2, ["--sampler"], True),
    ("train", TRAIN + " --tf32", 2, ["--tf32", "--device cuda"], True),
    ("train", TRAIN + " --config {missing}.json", 2, ["--config", "missing.json"], True),
    ("train", TRAIN + " --config CFG:lr", 2, ["--lr", '"fast"', "CFG:lr"], True),
    ("train", TRAIN + " --config CFG:bogus", 2, ["bogus"], True),
    ("train", TRAIN + " --config CFG:notjson", 2, ["--config", "not valid JSON"], True),
    ("train", TRAIN + " --config CFG:list", 2, ["--config", "JSON object"], True),
    ("train", TRAIN + " --config CFG:steps", 2, ["--steps", "2.5"], True),
    ("train", TRAIN + " --config CFG:bool", 2, ["--symmetric"], True),
    ("train", "--demo-seeds abc", 2, ["--demo-seeds"], True),
    ("train", "--demo --demo-seeds 0,0", 2, ["--demo-seeds"], True),
    ("train", "--demo --model {model}", 2, ["--model", "demo"], True),
    ("train", "--demo --steps 0", 2, ["--steps"], True),
    ("train", "--model {missing} --train {data} --out {tmp}/new", 2, ["--model", "missing"], True),
    ("train", "--train {data} --out {tmp}/new", 2, ["--model is required"], True),
    ("train", "--model {model} --train {missing}.jsonl --out {tmp}/new", 2, ["--train", "missing.jsonl"], True),
    ("train", "--resume {missing}", 2, ["--resume", "no checkpoint"], True),
    ("train", "--resume {run}/final --steps 5", 2, ["(--resume {run})"], True),
    ("train", "--resume {run} --steps 5 --temperature 0.1", 2, ["--temperature", "0.05"], True),
    ("train", "--resume {run} --steps 5 --overwrite", 2, ["--overwrite", "--resume"], True),
    ("train", "--resume {run} --steps 2", 2, ["--steps", "already at step 2"], True),
    ("train", "--model {model} --train {data} --out {run}", 2, ["--out", "--resume {run}", "--overwrite"], True),
    ("train", "--model {model} --train {data} --out {file}", 2, ["--out", "file.txt"], True),
    ("train", TRAIN + " --device cuda", 2, ["--device cuda"], True),
    ("train", TRAIN + " --max-query-len 200 --steps 1 --batch-size 4", 2, ["--max-query-len 200", "[2, 128]"], True),
    ("train", "--model {model} --train {file} --out {tmp}/new", 2, ["--train", "file.txt", "not training data",
                                                                    "SQuAD-format .json", ".jsonl"], True),
    ("train", "--model {model} --train {tmp}/unknown.json --out {tmp}/new", 2, ["unknown.json", "not training data",
                                                                                "LANG=PATH"], True),
    ("train", TRAIN + " --pooling pooler --steps 1 --batch-size 4", 1, ["pooler"], False),
    ("train", "--model {broken} --train {data} --out {tmp}/new --steps 1 --batch-size 4", 1, ["config.json"], False),
    ("evaluate", EVAL + " --batch-size 0", 2, ["--batch-size", ">= 1"], True),
    ("evaluate", EVAL + " --batch-size x", 2, ["--batch-size"], True),
    ("evaluate", EVAL + " --sample 0", 2, ["--sample", ">= 1"], True),
    ("evaluate", EVAL + " --max-length 1", 2, ["--max-length"], True),
    ("evaluate", EVAL + " --languages qa,", 2, ["--languages", "empty"], True),
    ("evaluate", EVAL + " --languages zz,qa", 2, ["--languages zz", "qa,qb,qc"], True),
    ("evaluate", "--model {emodel} --data {missing}", 2, ["--data", "missing"], True),
    ("evaluate", "--model {emodel} --data {empty}", 2, ["--data", "{{lang}}.json"], True),
    ("evaluate", "--model {missing} --data {lareqa}", 2, ["--model", "missing"], True),
    ("evaluate", "--data {lareqa}", 2, ["--model"], True),
    ("evaluate", EVAL + " --candidates both", 2, ["--candidates"], True),
    ("evaluate", EVAL + " --out {file}/r.json", 2, ["--out", "file.txt"], True),
    ("evaluate", EVAL + " --out {empty}", 2, ["--out", "a folder"], True),
    ("evaluate", EVAL + " --report {file}/r.md", 2, ["--report", "file.txt"], True),
    ("evaluate", EVAL + " --report {tmp}/r.png", 2, ["--report", ".png"], True),
    ("evaluate", EVAL + " --out {tmp}/r.json --report {tmp}/r.json", 2, ["--out", "--report"], True),
    ("evaluate", EVAL + " --device cuda", 2, ["--device cuda"], True),
    ("evaluate", EVAL + " --cache {file}", 2, ["--cache", "file.txt"], True),
    ("evaluate", EVAL + " --out {tmp}/new/deeper/r.json --batch-size 0", 2, ["--batch-size"], True),
    ("evaluate", EVAL + " --max-length 100", 2, ["--max-length 100", "[2, 30]"], True),
    ("evaluate", "--model {broken} --data {lareqa}", 1, ["config.json"], False),
    ("download", "nonsense-name", 2, ["nonsense-name"], True),
    ("download", "", 2, ["NAME"], True),
    ("download", "xquad-r mlqa-r --dir {tmp}/d", 2, ["--dir"], True),
    ("download", "xquad-r --from {missing}", 2, ["--from", "missing"], True),
    ("download", "xquad-r --from {empty}", 2, ["--from", "xquad-r/"], True),
    ("download", "labse --from {empty}", 2, ["--from", "config.json"], True),
    ("download", "labse multilingual-e5-small --from {emodel}", 2, ["--from", "one model"], True),
    ("download", "xquad-r --dir {file}", 2, ["--dir", "file.txt"], True),
]
CONFIGS = {"lr": {"lr": "fast"}, "bogus": {"bogus": 1}, "notjson": "{not json", "list": [1, 2],
           "steps": {"steps": 2.5}, "bool": {"symmetric": "yes"}}


def expand(text, paths):
    for name, content in CONFIGS.items():
        text = text.replace(f"CFG:{name}", config(paths, f"CFG:{name}", content))
    return text.format(**paths)


def call(program, argv, capsys):
    """(exit status, stderr) of PROGRAMS[program](argv), run in this process."""
    try:
        status = PROGRAMS[program](argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def forbid_loading(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the settings were checked")
    for module, name in ((minihbt, "load_model"), (minihbt.data, "load_lareqa"),
                         (minihbt.data, "read_training_data"), (download, "download_dataset"),
                         (download, "download_model")):
        monkeypatch.setattr(module, name, loaded)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and {c[0] for c in CASES} == set(PROGRAMS)


@pytest.mark.parametrize("program,args,status,words,before_loading", CASES,
                         ids=[f"{c[0]}:{c[1].replace(TRAIN, '').replace(EVAL, '').strip()}" for c in CASES])
def test_bad_invocation(paths, capsys, monkeypatch, program, args, status, words, before_loading):
    if "--device cuda" in args and CUDA_SKIP is None:
        pytest.skip("this machine has a usable GPU: --device cuda is a valid setting here")
    if before_loading:
        forbid_loading(monkeypatch)
    code, err = call(program, expand(args, paths).split(), capsys)
    assert code == status, err
    assert "Traceback" not in err and "AssertionError" not in err
    for word in words:
        assert word.format(**paths) in err, (word, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"{PROG_NAMES[program]}: error: "), err
    assert not os.path.exists(os.path.join(paths["tmp"], "new", "log.jsonl"))      # nothing was trained
    assert not os.path.exists(os.path.join(paths["tmp"], "new"))                  # nor a folder made for the run


def test_errors_are_one_line_per_problem_all_at_once(paths, capsys):
    args = expand(TRAIN + " --lr -1 --steps 0 --temperature 0 --config CFG:bogus", paths).split()
    code, err = call("train", args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 4
    assert all(line.startswith("train.py: error: ") for line in err.strip().splitlines())


def run_script(args, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          **kw)


def test_exit_statuses_of_real_processes(paths):
    r = run_script(["train.py", *expand(TRAIN + " --lr -1", paths).split()])
    assert r.returncode == 2 and r.stderr == "train.py: error: --lr -1.0: expected a number > 0\n"
    r = run_script(["evaluate.py", *expand(EVAL + " --batch-size 0", paths).split()])
    assert r.returncode == 2 and r.stderr.startswith("evaluate.py: error: --batch-size 0") and "Traceback" not in r.stderr
    r = run_script(["-m", "minihbt.download", "nonsense-name"])
    assert r.returncode == 2 and "nonsense-name" in r.stderr and "Traceback" not in r.stderr


def test_library_error_is_one_line_and_minihbt_debug_shows_the_traceback(paths):
    args = ["evaluate.py", *expand("--model {broken} --data {lareqa}", paths).split()]
    r = run_script(args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"evaluate.py: error: {paths['broken']}")
    r = run_script(args, env={"MINIHBT_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def log_steps(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_a_new_run_refuses_an_existing_one_and_leaves_it_untouched(paths, tmp_path, capsys):
    run = tmp_path / "run"
    tiny_run(paths["data"], run, "--steps", "2", "--save-every", "1")
    before = {p: (run / p).stat().st_mtime_ns for p in ("log.jsonl", "final", "checkpoint-1")}
    code, err = call("train", ["--model", TINY["xlmr"], "--train", paths["data"], "--out", str(run)], capsys)
    assert code == 2 and f"--resume {run}" in err and "--overwrite" in err
    assert {p: (run / p).stat().st_mtime_ns for p in before} == before and log_steps(run) == [1, 2]


def test_overwrite_clears_the_old_run_and_keeps_other_files(paths, tmp_path):
    run = tmp_path / "run"
    tiny_run(paths["data"], run, "--steps", "3", "--save-every", "1")
    (run / "notes.txt").write_text("mine")
    tiny_run(paths["data"], run, "--steps", "2", "--save-every", "0", "--seed", "1", "--overwrite")
    assert sorted(os.listdir(run)) == ["final", "log.jsonl", "notes.txt"]            # checkpoint-1, -2 gone
    assert log_steps(run) == [1, 2]
    assert json.loads((run / "final" / "trainer_state.json").read_text())["settings"]["seed"] == 1


def test_overwrite_refuses_to_delete_the_model_it_starts_from(paths, tmp_path, capsys):
    run = tmp_path / "run"
    tiny_run(paths["data"], run, "--steps", "1", "--save-every", "0")
    code, err = call("train", ["--model", str(run / "final"), "--train", paths["data"], "--out", str(run),
                               "--overwrite", "--steps", "1"], capsys)
    assert code == 2 and "--overwrite" in err and "--model" in err and "Traceback" not in err
    assert (run / "final" / "tokenizer.json").exists()                             # nothing deleted


def test_partial_checkpoints_are_cleared_and_a_cut_swap_is_undone(tmp_path):
    run = tmp_path / "run"
    for name in (".tmp-checkpoint-4", ".old-checkpoint-2", "checkpoint-2", ".old-final", ".tmp-final"):
        (run / name).mkdir(parents=True)
        (run / name / "marker").write_text(name)
    (run / "log.tmp-123.jsonl").write_text("")
    (run / ".tmp-mydata").mkdir()                                                   # the user's, not a save's
    (run / ".old-notes.txt").write_text("mine")
    removed = remove_partial_checkpoints(str(run))
    assert sorted(removed) == [".old-checkpoint-2", ".tmp-checkpoint-4", ".tmp-final", "log.tmp-123.jsonl"]
    assert sorted(os.listdir(run)) == [".old-notes.txt", ".tmp-mydata", "checkpoint-2", "final"]
    assert (run / "final" / "marker").read_text() == ".old-final"                  # the last complete version
    assert (run / "checkpoint-2" / "marker").read_text() == "checkpoint-2"


def test_resume_clears_partial_checkpoints_and_continues_from_the_restored_one(paths, tmp_path):
    run = tmp_path / "run"
    tiny_run(paths["data"], run, "--steps", "2", "--save-every", "1")
    os.replace(run / "final", run / ".old-final")                                 # a swap cut between renames
    shutil.copytree(run / ".old-final", run / ".tmp-final")
    (run / ".tmp-checkpoint-7").mkdir()
    tiny_run(paths["data"], run, "--resume", str(run), "--steps", "3")
    assert not [p for p in os.listdir(run) if p.startswith((".tmp-", ".old-"))]
    assert log_steps(run) == [1, 2, 3]                                             # resumed at step 2, not 1
    assert json.loads((run / "final" / "trainer_state.json").read_text())["step"] == 3


def test_sigterm_finishes_the_step_saves_and_exits_143(paths, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", TINY["xlmr"], "--train", paths["data"],
           "--batch-size", "4", "--steps", "100000", "--save-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    steps = len(log.read_text().splitlines())
    ckpt = out / f"checkpoint-{steps}"
    assert "SIGTERM" in err and f"--resume {out}" in err and "Traceback" not in err
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps
    minihbt.load_model(str(ckpt))
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_evaluate_on_one_language_reports_mo_only(paths, tmp_path, capsys):
    common = ["--model", paths["emodel"], "--data", paths["lareqa"], "--cache", ""]
    full = evaluate.main(common)
    one = evaluate.main(common + ["--languages", "qb,qb", "--out", str(tmp_path / "o" / "r.json"),
                                  "--report", str(tmp_path / "o" / "r.md")])
    printed = capsys.readouterr().out
    assert one["languages"] == ["qb"]                                              # de-duplicated
    # Mo. of qb ranks qb's questions against qb's candidates: the same in both evaluations
    for key in ("map", "r@1", "mrr"):
        assert one["mono"]["per_language"]["qb"][key] == pytest.approx(full["mono"]["per_language"]["qb"][key],
                                                                        abs=1e-12)
    saved = json.loads((tmp_path / "o" / "r.json").read_text())
    assert saved["cross"]["map"] is None and saved["multi"]["map"] is None and saved["bias"]["rank_distance"] is None
    assert set(saved["not_applicable"]) == {"cross", "multi", "bias"} and full["not_applicable"] == {}
    assert "Cr.     map          n/a" in printed and "n/a (one language" in printed
    assert "| qb | " in (tmp_path / "o" / "r.md").read_text() and "n/a" in (tmp_path / "o" / "r.md").read_text()
    assert np.isfinite(saved["mono"]["map"])
