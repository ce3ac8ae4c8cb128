"""The two sides of `train_step.py`, each run in its own child process: one training step of minihbt
and the same step in PyTorch + transformers, timed (`time_side`) or profiled (`profile_side`).

Both sides: the batch's queries with the prefix "query: ", its candidates (every positive,
then every triplet's negatives) with "passage: ", each list padded to its own longest text
and truncated to the case's limits; mean pooling, L2 normalisation, in-batch InfoNCE at
temperature 0.05 with row i's target in column i; dropout on (--no-dropout: off on both);
global-norm clipping at 1.0; AdamW (lr 3e-5, weight decay 0.01 except biases and LayerNorms)
over every parameter that gets a gradient (the unused pooler excluded on both). The parent guarantees that no
text repeats in the batch, so minihbt's duplicate mask keeps every candidate and the two
losses are the same function.
"""
import json
import resource
import time

from matmul_rate import blas_summary
from train_step_inputs import candidate_texts


def run_minihbt(model_dir, batch, args):
    """(step, memory, device_name) for minihbt, or (None, why-not)."""
    import numpy as np
    import minihbt
    try:                           # this checkout: the word table's gradient as rows (rowgrad.py)
        from minihbt.rowgrad import AdamW, clip_grad_norm
        rows_api = True
        try:
            from minihbt.parallel import pool_for
        except ImportError:
            pool_for = None
    except ImportError:            # a --baseline revision from before it
        from minihbt.optim import AdamW, clip_grad_norm
        rows_api = False

    if args.precision == "mixed":
        return None, "mixed precision is not implemented in minihbt"
    trainable = lambda m: {k: m.params[k] for k in m.trainable_names()}
    if rows_api:
        model = minihbt.load_model(model_dir, device=args.device, tf32=args.precision == "tf32")
        pool = pool_for(model.backend) if pool_for else model.pool      # a --baseline before parallel.pool_for
        opt = AdamW(trainable(model), lr=3e-5, weight_decay=0.01, backend=model.backend, pool=pool)
        clip = lambda grads, **rows: clip_grad_norm(grads, 1.0)
    elif hasattr(minihbt, "Backend"):
        model = minihbt.load_model(model_dir, device=args.device, tf32=args.precision == "tf32")
        opt = AdamW(trainable(model), lr=3e-5, weight_decay=0.01, backend=model.backend)
        clip = lambda grads, **rows: clip_grad_norm(grads, 1.0, **rows)
    else:                          # a --baseline revision from before the Backend (xp passed instead)
        from minihbt.backend import set_tf32
        model = minihbt.load_model(model_dir, device=args.device)
        set_tf32(model.xp, args.precision == "tf32")
        opt = AdamW(trainable(model), lr=3e-5, weight_decay=0.01, xp=model.xp)
        clip = lambda grads: clip_grad_norm(model.xp, grads, 1.0)
    xp = model.xp
    seeds = iter(range(1000))
    group = {} if args.group_tokens is None else {"group_tokens": args.group_tokens or None}
    if rows_api:
        group["table_rows"] = True

    def step():
        stats = {}
        loss, grads = minihbt.loss_and_grads(
            model, batch["queries"], batch["positives"], batch["negatives"], temperature=0.05,
            dropout=not args.no_dropout, seed=next(seeds), max_query_length=batch["max_query_length"],
            max_passage_length=batch["max_passage_length"], return_numpy=False, stats=stats, **group)
        rows = stats.get("table_rows")                # None at revisions from before it
        if rows is None:
            clip(grads)
            opt.step(model.params, grads)
        else:
            clip(grads, rows=rows)
            opt.step(model.params, grads, rows=rows)
        if xp is not np:
            xp.cuda.runtime.deviceSynchronize()
        return float(loss), stats.get("tokens")

    def memory():
        return None if xp is np else xp.get_default_memory_pool().total_bytes() / 2 ** 20

    def device_name():
        return xp.cuda.runtime.getDeviceProperties(0)["name"].decode() if xp is not np else None
    return (step, memory, device_name), f"numpy {np.__version__}; {blas_summary()}"


def run_torch(model_dir, batch, args):
    """(step, memory, device_name) for PyTorch + transformers, or (None, why-not)."""
    import contextlib
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(dev).train(not args.no_dropout)   # default attention (sdpa)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("pooler.")]
    params = [p for _, p in named]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-5)
    norm = torch.nn.functional.normalize
    queries = ["query: " + t for t in batch["queries"]]
    candidates = ["passage: " + t for t in candidate_texts(batch)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.precision == "mixed" else \
        contextlib.nullcontext

    def embed(texts, max_len):
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(dev)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return norm((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1), int(enc["attention_mask"].sum())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            q, nq = embed(queries, batch["max_query_length"])
            c, nc = embed(candidates, batch["max_passage_length"])
            scores = q @ c.T / 0.05                                   # [B, M]; column i is row i's target
            loss = torch.nn.functional.cross_entropy(scores.float(), torch.arange(len(queries), device=dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return float(loss), nq + nc

    def memory():
        return torch.cuda.max_memory_reserved() / 2 ** 20 if cuda else None

    def device_name():
        return torch.cuda.get_device_name(0) if cuda else None
    libs = (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
            f"transformers {transformers.__version__}")
    return (step, memory, device_name), libs


def _make(args):
    with open(args.batch_file, encoding="utf-8") as f:
        batch = json.load(f)
    made, about = (run_minihbt if args.child in ("minihbt", "profile") else run_torch)(args.model, batch, args)
    return made, about


def time_side(args):
    """Child: one warm-up step, then --steps timed steps; prints one JSON line."""
    made, about = _make(args)
    if made is None:
        print(json.dumps({"skipped": about}))
        return
    step, memory, device_name = made
    step()                                                          # warm-up
    times, losses, pool, tokens = [], [], [memory()], None
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, tokens = step()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        pool.append(memory())
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"seconds": sum(times) / len(times), "step_seconds": times, "peak_mb": after.ru_maxrss / 1024,
                      "gpu_mb": pool, "losses": losses, "device": device_name(), "tokens": tokens,
                      "cores_busy": cpu / sum(times), "libraries": about}))


def profile_side(args):
    """Child: a warm-up step, one plain timed step, then one step under cProfile; prints the groups as JSON."""
    import cProfile
    import pstats
    import minihbt
    from train_step_profile import group_profile

    made, _ = _make(args)
    step = made[0]
    step()                                                          # warm-up
    t0 = time.perf_counter()
    step()
    plain = time.perf_counter() - t0
    profiler = cProfile.Profile()
    profiler.runcall(step)
    result = group_profile(pstats.Stats(profiler), minihbt.__file__)
    print(json.dumps(dict(result, plain_seconds=plain)))
