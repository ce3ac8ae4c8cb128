"""Stages 1 and 2 of the GPU check: the test suite, then the fused kernels.

Stage 1 runs the CUDA tests of `tests` (ids naming cuda or gpu; they run where CuPy sees a
GPU; the real-weight tests skip, saying why, where ../shared is absent) and records the
counts from pytest's JUnit XML (tests with "cuda" in their id counted apart too), the
failures with their first line. Its smoke form runs the CUDA tests of three quick files.

Stage 2 runs tests/test_kernels.py (each fused kernel against its NumPy reference) by
itself, again with the fused kernels' environment switch on where minihbt/kernels.py still
reads one, then train.py for 3 steps on the tiny fixture: plain, --fused-kernels and
--tf32 (each where train.py still has the flag), losses compared with the README's
tolerances (float32 and fused: 1e-5 relative; TF32: 2e-3 relative).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from gpu_check_common import ROOT, TINY_XLMR, relative_error

FUSED_ENV = "MINIHBT_FUSED"
LOSS_TOL = {"fused": 1e-5, "tf32": 2e-3}


def junit_counts(path):
    """Counts of a pytest JUnit XML file: all tests and the CUDA-parametrised ones (ids with
    'cuda'), the failed/errored ids with the first line of their message, skip reasons."""
    counts = {k: 0 for k in ("tests", "passed", "failed", "errors", "skipped")}
    cuda = dict(counts)
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": test_id, "outcome": outcome, "message": (message or [""])[0][:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "").strip()[:200]
                skips[reason] = skips.get(reason, 0) + 1
        for c in ((counts, cuda) if "cuda" in test_id else (counts,)):
            c["tests"] += 1
            c[outcome] += 1
    return {"all": counts, "cuda": cuda, "failures": failures, "skip_reasons": skips}


def run_pytest(targets, xml_path, limit, env_extra=None, workers=1):
    """pytest on `targets` within `limit` seconds; (JUnit counts or None, summary line, seconds).
    With pytest-timeout installed one hung test fails alone; with pytest-xdist and workers > 1
    the test files are shared among that many processes (each file kept in one)."""
    extra = ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []
    if workers > 1 and importlib.util.find_spec("xdist"):
        extra += ["-n", str(workers), "--dist", "loadfile"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
           *extra, *targets]
    env = dict(os.environ, **(env_extra or {}))
    print("  $ python", " ".join(cmd[1:]), " ".join(f"{k}={v}" for k, v in (env_extra or {}).items()))
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:]
        print(tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
        return None, f"pytest did not finish within {limit:.0f} s", time.perf_counter() - t0
    print(out.stdout[-6000:], out.stderr[-2000:], sep="\n")
    lines = [l for l in out.stdout.strip().splitlines() if l.strip()]
    summary = lines[-1] if lines else f"exit code {out.returncode}"
    counts = junit_counts(xml_path) if os.path.exists(xml_path) else None
    return counts, summary, time.perf_counter() - t0


def record_pytest(rec, key, counts, summary, seconds):
    rec.figure(key, {"summary": summary, "seconds": round(seconds, 1), "counts": counts})
    if counts is None:
        rec.check(f"{key}: pytest finished", False, summary, "finishes within the stage's time limit")
        return
    a, c = counts["all"], counts["cuda"]
    print(f"  {key}: {a['passed']} passed, {a['failed']} failed, {a['errors']} errors, {a['skipped']} skipped; "
          f"CUDA tests: {c['passed']} passed, {c['failed'] + c['errors']} failed, {c['skipped']} skipped")
    rec.check(f"{key}: no failures", a["failed"] + a["errors"] == 0, f"{a['failed'] + a['errors']} failed",
              "0 failed")


# Stage 1 runs the CUDA tests only (ids naming cuda or gpu): not the MPI tests (the device machine
# has no MPI library) nor the CPU-only rest, which CI runs.
CUDA_TESTS = ["tests", "-k", "cuda or gpu", "--ignore=tests/test_comm.py", "--ignore=tests/test_data_parallel.py"]
# The smoke form: the CUDA tests of three quick files, 17 tests: the fused kernels against the plain
# ops and PyTorch, the fast step against the plain one with fused kernels off and on, the encoder's
# hidden states and pooled embeddings against transformers.
SMOKE_CUDA_TESTS = ["tests/test_kernels.py", "tests/test_fast_path.py", "tests/test_encoder_parity.py",
                    "-k", "cuda or gpu"]


def stage1(args, rec):
    targets = SMOKE_CUDA_TESTS if args.smoke else CUDA_TESTS
    workers = 1 if args.smoke else min(4, max(1, (os.cpu_count() or 1) // 4))
    counts, summary, secs = run_pytest(targets, os.path.join(args.work, "stage1-pytest.xml"), args.limit - 15,
                                       workers=workers)
    record_pytest(rec, "pytest " + " ".join(targets), counts, summary, secs)
    if counts and args.device == "cuda":
        ran = counts["cuda"]["passed"]
        rec.check("CUDA tests ran", ran > 0, f"{ran} CUDA tests passed", "> 0 (CuPy sees a GPU)")


def fused_switches():
    """Which fused-kernel switches this checkout still has: the environment variable read by
    minihbt/kernels.py, and train.py's flags (as its --help lists them: they are made from its
    settings' names, so its source never spells them)."""
    with open(os.path.join(ROOT, "minihbt", "kernels.py"), encoding="utf-8") as f:
        env = FUSED_ENV in f.read()
    helptext = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout
    flags = set(re.findall(r"(--fused-kernels|--tf32)\b", helptext))
    return env, flags


class Shares:
    """Fair shares of a stage's remaining time: each of the `count` runs still to come gets
    (time left) / (runs left), so a quick run leaves its time to those after it."""

    def __init__(self, seconds, count):
        self.deadline, self.left = time.monotonic() + seconds, count

    def next(self):
        share = max(5.0, (self.deadline - time.monotonic()) / max(1, self.left))
        self.left -= 1
        return share


def stage2(args, rec):
    env_switch, flags = fused_switches()
    rec.figure("switches", {"env": FUSED_ENV if env_switch else None, "train.py flags": sorted(flags)})
    shares = Shares(args.limit - 10, 2 + bool(env_switch) + len(flags))     # pytest runs, then train.py runs
    xml = os.path.join(args.work, "stage2-kernels.xml")
    record_pytest(rec, "test_kernels", *run_pytest(["tests/test_kernels.py"], xml, shares.next()))
    if env_switch:
        xml = os.path.join(args.work, "stage2-kernels-fused-env.xml")
        record_pytest(rec, f"test_kernels {FUSED_ENV}=1", *run_pytest(["tests/test_kernels.py"], xml, shares.next(),
                                                                       {FUSED_ENV: "1"}))
    else:
        rec.note(f"minihbt/kernels.py no longer reads {FUSED_ENV}: test_kernels.py ran once")
    train_losses(args, rec, flags, shares)
    nccl_check(args, rec)


def nccl_check(args, rec):
    """benchmarks/gpu_check_nccl.py: a one-rank NCCL communicator (no MPI library needed)."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check_nccl.py")
    if not os.path.exists(script) or args.smoke:
        rec.note("NCCL check: not in this checkout" if not os.path.exists(script) else "NCCL check: skipped (smoke)")
        return
    try:
        out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        rec.check("NCCL one-rank communicator", False, "timed out after 60 s", "exit 0")
        return
    for line in (out.stdout + out.stderr).strip().splitlines()[-12:]:
        print(line)
    rec.check("NCCL one-rank communicator", out.returncode == 0, f"exit {out.returncode}", "exit 0")


def tiny_jsonl(path, groups=24):
    """Parallel training triplets in two made-up languages (the shape of tests/test_train.py's)."""
    words = {l: [f"{l}{i}" for i in range(50)] for l in ("aa", "bb")}
    with open(path, "w", encoding="utf-8") as f:
        for g in range(groups):
            for l, w in words.items():
                f.write(json.dumps({"id": f"{g}-{l}", "lang": l, "query": f"{w[g]} {w[(g * 7) % 50]} ?",
                                    "positive": f"{w[g]} {w[(g * 3) % 50]} {w[(g * 11) % 50]} .",
                                    "negatives": [f"{w[(g + 1) % 50]} {w[(g * 5) % 50]} ."], "group": str(g)}) + "\n")


def train_losses(args, rec, flags, shares):
    """train.py, 3 steps on the tiny fixture: plain, then each still-existing switch; losses compared."""
    data = os.path.join(args.work, "tiny.jsonl")
    tiny_jsonl(data)
    runs = {"plain": []} | {name: [flag] for name, flag in (("fused", "--fused-kernels"), ("tf32", "--tf32"))
                            if flag in flags}
    losses = {}
    for name, extra in runs.items():
        out = os.path.join(args.work, f"train-{name}")
        cmd = [sys.executable, "train.py", "--model", TINY_XLMR, "--train", data, "--batch-size", "8", "--steps", "3",
               "--lr", "1e-3", "--max-query-len", "32", "--max-passage-len", "64", "--device", args.device,
               "--save-every", "0", "--quiet", "--out", out, *extra]
        print("  $ python", " ".join(cmd[1:]))
        limit = shares.next()
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            rec.check(f"train.py {name} finished", False, "timed out", f"within {limit:.0f} s")
            continue
        if res.returncode != 0:
            rec.check(f"train.py {name} finished", False, (res.stderr.strip().splitlines() or ["?"])[-1][:300],
                      "exit code 0")
            continue
        with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
            losses[name] = [json.loads(line)["loss"] for line in f]
        print(f"  train.py {name}: losses {losses[name]}")
    rec.figure("train.py losses (tiny-xlmr, 3 steps)", losses)
    for name in ("fused", "tf32"):
        if name in losses and "plain" in losses:
            err = relative_error(losses[name], losses["plain"], floor=1e-12)
            rec.check(f"train.py {name} losses vs plain", err <= LOSS_TOL[name], f"{err:.2e} relative",
                      f"<= {LOSS_TOL[name]:g} relative")
