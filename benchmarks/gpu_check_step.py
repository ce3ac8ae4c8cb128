"""Stage 3 of the GPU check: one training step, minihbt vs PyTorch + transformers.

The measurement is benchmarks/train_step.py's own: its child processes
(`train_step.py --child minihbt|torch ...`, one per library and precision), its triplets,
token count, FLOP count, datasheet peaks and printed report. This stage drives the
children itself because train_step.py's parent builds multilingual-e5-small from
../shared for the XLM-R tokenizer even when --model is given, and ../shared does not
travel to the device machine; here the model is the random XLM-R base built from the
carried tokenizer (gpu_check_common.xlmr_base).

Per precision (fp32 and tf32 on cuda): minihbt, minihbt with the fused kernels (where
minihbt/kernels.py reads MINIHBT_FUSED), PyTorch. Recorded: ms/step, tokens/s, MFU, peak
GPU memory, the allocator size after each step, the losses; checked against the issue's
targets (throughput >= 1.0x PyTorch at fp32 and TF32, MFU at TF32 >= 40%, peak memory <=
PyTorch's, no allocator growth after the first timed step).
"""
import json
import math
import os
import subprocess
import sys
import time
import types

from gpu_check_common import HERE, ROOT, find_tokenizer, find_xquad, load_train_step, xlmr_base
from gpu_check_tests import FUSED_ENV, fused_switches


def sizes(args):
    """(triplets, query tokens, passage tokens, timed steps, precisions) of this run."""
    if args.smoke:
        return 2, 16, 24, 1, ["fp32"]
    return 100, 32, 128, 3, ["fp32", "tf32"]


def child(which, model_dir, data_dir, precision, args, env_extra, limit):
    """One train_step.py child: its JSON line, or {"skipped": why}."""
    n, q_len, p_len, steps, _ = sizes(args)
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--child", which, "--model", model_dir,
           "--shape", "xlmr-base", "--device", args.device, "--precision", precision, "--data", data_dir,
           "--triplets", str(n), "--query-len", str(q_len), "--passage-len", str(p_len), "--steps", str(steps),
           "--threads", str(os.cpu_count())]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **env_extra)
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {limit:.0f} s"}
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        last = out.stderr.strip().splitlines()
        return {"skipped": "failed: " + (last[-1] if last else f"exit code {out.returncode}")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def figures(r, flops, tokens, precision, train_step, gpu):
    """ms/step, tokens/s, MFU, peak memory and allocator trace of one child's result."""
    if "skipped" in r:
        return r
    peak, card = train_step.peak_flops(r.get("device") or "", precision) if gpu else (None, None)
    pool = [m for m in r["gpu_mb"] if m is not None]
    return {"ms_per_step": r["seconds"] * 1e3, "tokens_per_s": tokens / r["seconds"],
            "mfu": flops / r["seconds"] / peak if peak else None, "peak_card": card, "device": r.get("device"),
            "peak_gpu_mb": max(pool) if pool else None, "allocator_mb_after_each_step": r["gpu_mb"],
            "peak_rss_mb": r["peak_mb"], "losses": r["losses"]}


def setup(args, rec):
    """The model, data, token and FLOP counts of this run, recorded; returns what the children need."""
    train_step = load_train_step()
    tok_dir, tok_note = find_tokenizer()
    data_dir, data_note = find_xquad(args.work)
    model_dir = xlmr_base(args.work, tok_dir, args.smoke)
    n, q_len, p_len, steps, precisions = sizes(args)
    triplets = train_step.long_triplets(n, data_dir)
    counts = types.SimpleNamespace(query_len=q_len, passage_len=p_len)
    tq, tp, Tq, Tp = train_step.count_tokens(model_dir, triplets, counts)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    from safetensors import safe_open
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        n_nonembed = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                         if ".embeddings." not in "." + k and "pooler" not in k)
    flops = train_step.flops_per_step(config, n_nonembed, tq, tp, Tq, Tp)
    rec.figure("setup", {"tokenizer": tok_note, "data": data_note, "triplets": len(triplets),
                         "query_len": q_len, "passage_len": p_len, "timed_steps": steps,
                         "real_tokens_per_step": tq + tp, "padded_lengths": [Tq, Tp],
                         "non_embedding_params": n_nonembed, "tflop_per_step": flops / 1e12,
                         "driver": "train_step.py children (--child minihbt|torch), driven by gpu_check_step.py"})
    print(f"  {len(triplets)} triplets, {tq} + {tp} real tokens a step, {flops / 1e12:.2f} TFLOP a step")
    return train_step, model_dir, data_dir, flops, tq + tp, precisions


def stage3(args, rec):
    deadline = time.monotonic() + args.limit - 10
    train_step, model_dir, data_dir, flops, tokens, precisions = setup(args, rec)
    env_switch, _ = fused_switches()
    variants = [("minihbt", "minihbt", {}), ("torch", "torch", {})]
    if env_switch:
        variants.insert(1, ("minihbt_fused", "minihbt", {FUSED_ENV: "1"}))
    else:
        rec.note(f"minihbt/kernels.py no longer reads {FUSED_ENV}: no fused-kernel variant timed")
    gpu = args.device == "cuda"
    results, started = {}, 0
    for precision in precisions:
        res = {}
        for name, which, env in variants:
            left = len(precisions) * len(variants) - started                # children still to run, this one included
            limit = max(1.0, (deadline - time.monotonic()) / left)          # a fair share of what is left
            started += 1
            print(f"  [{precision}] {name} (at most {limit:.0f} s) ...", flush=True)
            res[name] = child(which, model_dir, data_dir, precision, args, env, limit)
            results.setdefault(precision, {})[name] = figures(res[name], flops, tokens, precision, train_step, gpu)
            rec.figure("results", results)
        train_step.report(precision, {"minihbt": res["minihbt"], "torch": res["torch"]}, flops, tokens, gpu)
        if "minihbt_fused" in res:
            f = results[precision]["minihbt_fused"]
            print(f"  minihbt with fused kernels: {f.get('ms_per_step', float('nan')):.1f} ms/step"
                  if "skipped" not in f else f"  minihbt with fused kernels: {f['skipped']}")
    targets(rec, results, gpu)


def targets(rec, results, gpu):
    """The issue's targets, each with the measured value (only what was measured is checked)."""
    for precision, r in results.items():
        m, t, fz = r.get("minihbt", {}), r.get("torch", {}), r.get("minihbt_fused", {})
        if "ms_per_step" in m and "ms_per_step" in t:
            ratio = t["ms_per_step"] / m["ms_per_step"]
            rec.check(f"{precision}: throughput minihbt/PyTorch", ratio >= 1.0, f"{ratio:.2f}x", ">= 1.0x")
            if gpu and m["peak_gpu_mb"] and t["peak_gpu_mb"]:
                rec.check(f"{precision}: peak GPU memory minihbt <= PyTorch", m["peak_gpu_mb"] <= t["peak_gpu_mb"],
                          f"{m['peak_gpu_mb']:.0f} MB vs {t['peak_gpu_mb']:.0f} MB", "<=")
        if "ms_per_step" in m and gpu:
            pool = m["allocator_mb_after_each_step"]
            rec.check(f"{precision}: allocator does not grow after the first timed step", max(pool[1:]) <= pool[1],
                      f"{[round(x) for x in pool]} MB", "no growth after the first timed step")
            if precision == "tf32" and m["mfu"] is not None:
                rec.check("tf32: minihbt MFU", m["mfu"] >= 0.40, f"{m['mfu']:.1%} of the {m['peak_card']} peak",
                          ">= 40%")
        if "ms_per_step" in m and "ms_per_step" in fz:
            rec.figure(f"{precision}: fused speed-up", m["ms_per_step"] / fz["ms_per_step"])
