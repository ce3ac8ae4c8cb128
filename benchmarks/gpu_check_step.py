"""Stage 3 of the GPU check: one training step, minihbt vs PyTorch + transformers.

Part 1 is benchmarks/train_step.py itself, run as its own documentation says (`--device cuda`:
XLM-R base shape with random weights, 100 triplets, queries 32 / passages 128 tokens,
minihbt vs PyTorch + transformers, each side in its own process), here at fp32 and TF32,
given this run's random XLM-R base (--model) and the carried XQuAD-R (--data), since
../shared, from which it would build them, does not travel. Its own printout goes to the
log; where it has --json, its figures are recorded and checked against the issue's targets
(throughput >= 1.0x PyTorch at fp32 and TF32, MFU at TF32 >= 40% where a datasheet peak is
known, peak GPU memory <= PyTorch's, no allocator growth after the first timed step).

Part 2 times minihbt alone, fused kernels off and on (and TF32 off and on), through the
public API (load_model's switches, loss_and_grads, clipping, AdamW) on the same batch,
dropout on: the figures that decide whether fused kernels should be on by default.

On the tests' CuPy stand-in (no GPU) part 1 times minihbt's side alone (train_step.py --sides
minihbt) and records the PyTorch side and its targets as needing a GPU, neither passed nor failed.
"""
import json
import os
import subprocess
import sys
import time

from gpu_check_common import HERE, ROOT, find_tokenizer, find_xquad, long_triplets, torch_needs_gpu, xlmr_base
from gpu_check_parity import train_steps

# Datasheet peaks, dense, FLOP/s: (fp32, tf32 tensor core); the card's name as CUDA reports it contains the key.
PEAKS = [("H100 PCIe", (51e12, 378e12)), ("H100 NVL", (60e12, 417.5e12)), ("H100", (67e12, 494.7e12)),
         ("H200", (67e12, 494.7e12)), ("A100", (19.5e12, 156e12)), ("L4", (30.3e12, 60e12))]


def sizes(args):
    """(triplets, query tokens, passage tokens, timed steps, precisions) of this run."""
    if args.smoke:
        return 2, 16, 24, 1, ["fp32"]
    return 100, 32, 128, 3, ["fp32", "tf32"]


def train_step_command(args, model_dir, data_dir, json_path, torch_why):
    """train_step.py's command line, using only the flags its --help lists; minihbt's side alone
    where the PyTorch side needs a GPU (torch_why says why)."""
    script = os.path.join(HERE, "train_step.py")
    helptext = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    n, q_len, p_len, steps, precisions = sizes(args)
    cmd = [sys.executable, script, "--device", args.device, "--shape", "xlmr-base", "--model", model_dir,
           "--data", data_dir, "--precision", ",".join(precisions), "--triplets", str(n), "--query-len", str(q_len),
           "--passage-len", str(p_len), "--steps", str(steps)]
    optional = [("--case", "xquad-long"), ("--json", json_path)] + ([("--matmul-size", "0")] if args.smoke else []) \
        + ([("--sides", "minihbt")] if torch_why else [])
    for flag, value in optional:
        if flag in helptext:
            cmd += [flag, value]
    return cmd, "--json" in helptext


def run_train_step(args, rec, model_dir, data_dir, limit, torch_why):
    """Part 1: train_step.py with its output in the log; its JSON, or None."""
    json_path = os.path.join(args.work, "train_step.json")
    cmd, has_json = train_step_command(args, model_dir, data_dir, json_path, torch_why)
    if torch_why:
        rec.needs_gpu("train_step.py: the PyTorch + transformers side", torch_why)
    rec.figure("train_step.py command", " ".join(["python"] + cmd[1:]))
    print("  $ python", " ".join(cmd[1:]), flush=True)
    try:
        out = subprocess.run(cmd, cwd=ROOT, timeout=limit, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        for part in (e.stdout, e.stderr):
            print(part.decode(errors="replace") if isinstance(part, bytes) else (part or ""))
        rec.check("train_step.py finished", False, f"timed out after {limit:.0f} s", "within the stage's time")
        return None
    print(out.stdout, out.stderr[-4000:], sep="\n")
    rec.check("train_step.py finished", out.returncode == 0, f"exit code {out.returncode}", "exit code 0")
    failed = [line.strip() for line in out.stdout.splitlines() if "failed:" in line]
    rec.check("train_step.py: every side ran", not failed, "; ".join(failed)[:500] or "all ran",
              "no side reported as failed")
    if not has_json:
        rec.note("train_step.py has no --json: its figures are in the log only, targets not checked here")
        return None
    if not os.path.exists(json_path):
        return None
    with open(json_path, encoding="utf-8") as f:
        return json.load(f)


def peak_flops(device_name, precision):
    for key, peaks in PEAKS:
        if key in (device_name or ""):
            return peaks[{"fp32": 0, "tf32": 1}[precision]], key
    return None, None


def check_targets(rec, record, gpu, torch_why):
    """The issue's targets from train_step.py's JSON (cases[].sides.{minihbt,torch}); a layout
    it does not recognise is recorded as such rather than guessed at. Where the PyTorch side
    needs a GPU (torch_why), the targets against it are recorded as needing one."""
    try:
        cases = [(c["precision"], c["flop"], c["sides"]["minihbt"], c["sides"]["torch"] if not torch_why else None)
                 for c in record["cases"]]
    except (KeyError, TypeError) as e:
        rec.note(f"train_step.py's JSON layout not recognised ({e!r}): targets not checked; see its figures")
        return
    for precision, flop, m, t in cases:
        if t is None:                                   # minihbt's side alone
            if "seconds" not in m:
                rec.check(f"{precision}: minihbt's side ran", False, m.get("skipped", "?"), "ran")
                continue
            rec.needs_gpu(f"{precision}: throughput and peak GPU memory against PyTorch", torch_why)
        elif "seconds" not in m or "seconds" not in t:
            rec.check(f"{precision}: both sides ran", False, f"minihbt {m.get('skipped', 'ran')}, "
                      f"torch {t.get('skipped', 'ran')}", "both ran")
            continue
        else:
            ratio = t["seconds"] / m["seconds"]
            rec.check(f"{precision}: throughput minihbt/PyTorch", ratio >= 1.0, f"{ratio:.2f}x", ">= 1.0x")
            if gpu:
                pool, torch_pool = [x for x in m["gpu_mb"] if x is not None], [x for x in t["gpu_mb"] if x is not None]
                rec.check(f"{precision}: peak GPU memory minihbt <= PyTorch", max(pool) <= max(torch_pool),
                          f"{max(pool):.0f} MB vs {max(torch_pool):.0f} MB", "<=")
        if not gpu:
            continue
        rec.check(f"{precision}: minihbt allocator does not grow after the first timed step",
                  max(m["gpu_mb"][1:]) <= m["gpu_mb"][1], f"{[round(x) for x in m['gpu_mb']]} MB",
                  "no growth after the first timed step")
        peak, card = peak_flops(m.get("device"), precision)
        if peak:
            mfu = flop / m["seconds"] / peak
            rec.figure(f"{precision}: minihbt MFU", {"mfu": mfu, "card": card, "peak_flops": peak})
            if precision == "tf32":
                rec.check("tf32: minihbt MFU", mfu >= 0.40, f"{mfu:.1%} of the {card} datasheet peak", ">= 40%")


def fused_timing(args, rec, model_dir, data_dir, deadline):
    """Part 2: minihbt steps with fused kernels off and on, at each precision."""
    n, q_len, p_len, steps, precisions = sizes(args)
    triplets = long_triplets(n, data_dir)
    batch = ([t[0] for t in triplets], [t[1] for t in triplets], [[t[2]] for t in triplets])
    results = {}
    for precision in precisions:
        for fused in (False, True):
            key = f"{precision}, fused kernels {'on' if fused else 'off'}"
            if time.monotonic() > deadline:
                rec.note(f"{key}: not timed, the stage's time is up")
                continue
            run = train_steps(model_dir, args.device, True, batch, (q_len, p_len), fused=fused,
                              tf32=precision == "tf32", steps=steps + 1, lr=3e-5)
            if "skipped" in run:
                results[key] = run
            else:
                timed = run["seconds"][1:]                       # after one warm-up step
                results[key] = {"ms_per_step": 1e3 * sum(timed) / len(timed), "losses": run["losses"],
                                "allocator_mb": run["memory_mb"]}
            print(f"  minihbt {key}: {results[key]}")
            rec.figure("minihbt fused kernels off/on", results)
        off, on = results.get(f"{precision}, fused kernels off", {}), results.get(f"{precision}, fused kernels on", {})
        if "ms_per_step" in off and "ms_per_step" in on:
            rec.figure(f"{precision}: fused speed-up (off/on time)", off["ms_per_step"] / on["ms_per_step"])


def stage3(args, rec):
    deadline = time.monotonic() + args.limit - 10
    tok_dir, tok_note = find_tokenizer()
    data_dir, data_note = find_xquad(args.work)
    model_dir = xlmr_base(args.work, tok_dir, args.smoke)
    rec.figure("setup", {"tokenizer": tok_note, "data": data_note, "model": "random XLM-R base (transformers init)"})
    torch_why = torch_needs_gpu(args.device)
    record = run_train_step(args, rec, model_dir, data_dir, max(10.0, 0.7 * (deadline - time.monotonic())), torch_why)
    if record is not None:
        rec.figure("train_step.py", record)
        check_targets(rec, record, args.device == "cuda", torch_why)
    fused_timing(args, rec, model_dir, data_dir, deadline - 20)
