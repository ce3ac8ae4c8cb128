"""Stage 5 of the GPU check: three training steps on the CPU and on the GPU from the same
weights, batch and seeds, compared.

Each step: minihbt.loss_and_grads (in-batch InfoNCE, temperature 0.05), global-norm
clipping at 1.0, AdamW (lr 1e-4, weight decay 0.01). Models: the tiny fixture
(tests/fixtures/tiny-xlmr), then the random XLM-R base if the stage has time left. Runs:
dropout off, dropout on, and (tiny model) the GPU with fused kernels on.

Tolerances (float32 on both sides; GEMMs sum in different orders, nothing else differs):
    losses            |loss_gpu - loss_cpu| <= 1e-5 |loss_cpu| at every step
    step-1 gradients  max |g_gpu - g_cpu| <= 1e-4 max(1, max |g_cpu|)   (the README's float32 bound)
    weights, 3 steps  ||w_gpu - w_cpu|| <= 1e-3 ||w_cpu - w_0||   (norm over all parameters: the
                      difference is a small part of what training moved; the largest single
                      difference is recorded too, since Adam turns a gradient that is zero up
                      to rounding into a full step whose sign rounding decides)
With dropout on, CPU and GPU agree only if they draw the same masks (one counter-based hash
on both sides, minihbt/dropout.py): the result is recorded either way, beside that module's
own statement of its definition.
"""
import time

import numpy as np

from gpu_check_common import (TINY_XLMR, clip_gradients, find_tokenizer, find_xquad, gpu_memory_mb, load_model_with,
                              long_triplets, optimizer_for, relative_error, synchronize, xlmr_base)

LR, STEPS = 1e-4, 3
TOL = {"loss": 1e-5, "grads": 1e-4, "weights_norm": 1e-3}


def train_steps(model_dir, device, dropout, batch, lengths, fused=False, tf32=False, steps=STEPS, lr=LR):
    """Train `steps` steps: a dict with the losses, the step-1 gradients, the initial and final
    weights (NumPy), the wall time of each step; or {"skipped": why} where this minihbt lacks
    a switch asked for."""
    import minihbt
    from minihbt.backend import to_numpy
    model, why = load_model_with(model_dir, device, tf32=tf32, fused=fused)
    if model is None:
        return {"skipped": why}
    names = model.trainable_names()
    w0 = {k: to_numpy(model.params[k]).copy() for k in names}
    opt = optimizer_for(model, lr)
    queries, positives, negatives = batch
    losses, grads0, seconds = [], None, []
    for step in range(steps):
        t0 = time.perf_counter()
        loss, grads = minihbt.loss_and_grads(model, queries, positives, negatives, temperature=0.05,
                                             dropout=dropout, seed=1000 + step, max_query_length=lengths[0],
                                             max_passage_length=lengths[1], return_numpy=False)
        if grads0 is None:              # copies: on the CPU to_numpy is the array itself, which clipping scales
            grads0 = {k: to_numpy(grads[k]).copy() for k in names}
        clip_gradients(model, grads, 1.0)
        opt.step(model.params, grads)
        synchronize(model)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"losses": losses, "grads0": grads0, "w0": w0, "seconds": seconds,
            "weights": {k: to_numpy(model.params[k]) for k in names}, "memory_mb": gpu_memory_mb(model.xp)}


def compare(cpu, other):
    """The three measures of the module docstring, as floats."""
    lc, gc, wc, w0 = cpu["losses"], cpu["grads0"], cpu["weights"], cpu["w0"]
    lo, go, wo = other["losses"], other["grads0"], other["weights"]
    loss = relative_error(lo, lc, floor=1e-12)
    g_scale = max(1.0, max(float(np.abs(g).max()) for g in gc.values()))
    grads = max(float(np.abs(go[k] - gc[k]).max()) for k in gc) / g_scale
    diff = np.sqrt(sum(float(((wo[k] - wc[k]).astype(np.float64) ** 2).sum()) for k in wc))
    moved = np.sqrt(sum(float(((wc[k] - w0[k]).astype(np.float64) ** 2).sum()) for k in wc))
    return {"loss_rel": loss, "grads_rel": grads, "weights_norm_rel": diff / max(moved, 1e-30),
            "weights_max_abs": max(float(np.abs(wo[k] - wc[k]).max()) for k in wc),
            "losses_cpu": lc, "losses_other": lo}


def dropout_definition():
    """What this checkout says of its dropout masks on CPU and GPU (the first line of
    minihbt/dropout.py's docstring), or that it has no such module."""
    try:
        from minihbt import dropout
    except ImportError:
        return "minihbt has no dropout module: CPU and GPU masks may come from different generators"
    return (dropout.__doc__ or "").strip().splitlines()[0]


def run_model(args, rec, label, model_dir, batch, lengths, runs):
    other = args.device
    results = {}
    for dropout in (False, True):
        t0 = time.perf_counter()
        cpu = train_steps(model_dir, "cpu", dropout, batch, lengths)
        for name, fused in runs:
            key = f"{label}, dropout {'on' if dropout else 'off'}, {other}{' fused' if fused else ''}"
            run = train_steps(model_dir, other, dropout, batch, lengths, fused=fused)
            if "skipped" in run:
                rec.note(f"{key}: not run: {run['skipped']}")
                continue
            r = results[key] = compare(cpu, run)
            rec.figure("parity", results)
            for measure, tol in TOL.items():
                value = r[f"{measure}_rel"]
                rec.check(f"{key}: {measure}", value <= tol, f"{value:.2e}", f"<= {tol:g}")
            print(f"  {key}: largest single weight difference {r['weights_max_abs']:.2e}; "
                  f"losses cpu {[round(x, 6) for x in r['losses_cpu']]}, "
                  f"{other} {[round(x, 6) for x in r['losses_other']]}")
        print(f"  ({label}, dropout {'on' if dropout else 'off'}: {time.perf_counter() - t0:.1f} s)")


def stage5(args, rec):
    t0 = time.perf_counter()
    tok_dir, tok_note = find_tokenizer()
    data_dir, data_note = find_xquad(args.work)
    triplets = long_triplets(8, data_dir)
    batch = ([t[0] for t in triplets], [t[1] for t in triplets], [[t[2]] for t in triplets])
    rec.figure("setup", {"lr": LR, "steps": STEPS, "triplets": len(triplets), "tolerances": TOL,
                         "dropout": dropout_definition(), "data": data_note, "tokenizer (base)": tok_note})
    fused = [("plain", False)] + ([("fused", True)] if args.device == "cuda" else [])
    run_model(args, rec, "tiny-xlmr", TINY_XLMR, batch, (32, 64), fused)
    if args.limit - (time.perf_counter() - t0) < 45:
        rec.note("under 45 s left: the random XLM-R base not compared, only the tiny model")
        return
    run_model(args, rec, "xlmr-base (random)", xlmr_base(args.work, tok_dir, args.smoke), batch, (32, 64),
              [("plain", False)])
