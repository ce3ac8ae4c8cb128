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
With dropout on, CPU and GPU agree only if they draw the same masks: the result is recorded
either way, and the record says which dropout definition each side used.
"""
import time

import numpy as np

from gpu_check_common import TINY_XLMR, find_tokenizer, find_xquad, load_train_step, relative_error, xlmr_base

LR, STEPS = 1e-4, 3
TOL = {"loss": 1e-5, "grads": 1e-4, "weights_norm": 1e-3}


def train_steps(model_dir, device, dropout, batch, lengths, fused=False):
    """(losses, step-1 gradients, final weights, initial weights) as NumPy, after STEPS steps."""
    import minihbt
    from minihbt import kernels
    from minihbt.backend import to_numpy
    from minihbt.optim import AdamW, clip_grad_norm
    model = minihbt.load_model(model_dir, device=device, pooling="mean")
    if hasattr(kernels, "set_fused"):
        kernels.set_fused(fused)
    names = model.trainable_names()
    w0 = {k: to_numpy(model.params[k]).copy() for k in names}
    opt = AdamW({k: model.params[k] for k in names}, lr=LR, weight_decay=0.01, xp=model.xp)
    queries, positives, negatives = batch
    losses, grads0 = [], None
    try:
        for step in range(STEPS):
            loss, grads = minihbt.loss_and_grads(model, queries, positives, negatives, temperature=0.05,
                                                 dropout=dropout, seed=1000 + step, max_query_length=lengths[0],
                                                 max_passage_length=lengths[1], return_numpy=False)
            if grads0 is None:
                grads0 = {k: to_numpy(grads[k]) for k in names}
            clip_grad_norm(model.xp, grads, 1.0)
            opt.step(model.params, grads)
            losses.append(float(loss))
    finally:
        if hasattr(kernels, "set_fused"):
            kernels.set_fused(False)
    return losses, grads0, {k: to_numpy(model.params[k]) for k in names}, w0


def compare(cpu, other):
    """The three measures of the module docstring, as floats."""
    (lc, gc, wc, w0), (lo, go, wo, _) = cpu, other
    loss = relative_error(lo, lc, floor=1e-12)
    g_scale = max(1.0, max(float(np.abs(g).max()) for g in gc.values()))
    grads = max(float(np.abs(go[k] - gc[k]).max()) for k in gc) / g_scale
    diff = np.sqrt(sum(float(((wo[k] - wc[k]).astype(np.float64) ** 2).sum()) for k in wc))
    moved = np.sqrt(sum(float(((wc[k] - w0[k]).astype(np.float64) ** 2).sum()) for k in wc))
    return {"loss_rel": loss, "grads_rel": grads, "weights_norm_rel": diff / max(moved, 1e-30),
            "weights_max_abs": max(float(np.abs(wo[k] - wc[k]).max()) for k in wc),
            "losses_cpu": lc, "losses_other": lo}


def dropout_masks_agree(device):
    """Whether the CPU and `device` draw the same dropout masks for the same text and seed,
    tried on the layer that makes them (a string: the answer, or why it could not be asked)."""
    if device == "cpu":
        return "not asked (cpu run)"
    try:
        import cupy
        from minihbt import layers
        masks = [layers.RowDropout([[7, 0, 0], [7, 0, 1]], [5, 3]).keep_mask(xp, (2, 6, 16), 0.1, np.float32)
                 for xp in (np, cupy)]
        same = np.array_equal(masks[0], cupy.asnumpy(masks[1]))
        return "same masks on both" if same else "different masks (two dropout definitions)"
    except Exception as e:                        # the dropout layer was refactored: say so, do not guess
        return f"could not compare ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


def run_model(args, rec, label, model_dir, batch, lengths, runs):
    other = args.device
    results = {}
    for dropout in (False, True):
        t0 = time.perf_counter()
        cpu = train_steps(model_dir, "cpu", dropout, batch, lengths)
        for name, fused in runs:
            r = compare(cpu, train_steps(model_dir, other, dropout, batch, lengths, fused=fused))
            key = f"{label}, dropout {'on' if dropout else 'off'}, {other}{' fused' if fused else ''}"
            results[key] = r
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
    triplets = load_train_step().long_triplets(8, data_dir)
    batch = ([t[0] for t in triplets], [t[1] for t in triplets], [[t[2]] for t in triplets])
    rec.figure("setup", {"lr": LR, "steps": STEPS, "triplets": len(triplets), "tolerances": TOL,
                         "dropout masks cpu vs device": dropout_masks_agree(args.device), "data": data_note, "tokenizer (base)": tok_note})
    from minihbt import kernels
    fused = [("plain", False)] + ([("fused", True)] if hasattr(kernels, "set_fused") and args.device == "cuda"
                                  else [])
    run_model(args, rec, "tiny-xlmr", TINY_XLMR, batch, (32, 64), fused)
    if args.limit - (time.perf_counter() - t0) < 45:
        rec.note("under 45 s left: the random XLM-R base not compared, only the tiny model")
        return
    run_model(args, rec, "xlmr-base (random)", xlmr_base(args.work, tok_dir, args.smoke), batch, (32, 64),
              [("plain", False)])
