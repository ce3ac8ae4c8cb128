"""Train a multilingual dense retriever with hybrid batches (HBT, arXiv 2408.10536).

    python train.py                      # the built-in demo: a synthetic world, no download
    python train.py --model weights/multilingual-e5-small --train ../shared/data/mlqa/MLQA_V1/dev \\
                    --sampler hybrid --batch-size 32 --steps 200 --out runs/hbt

The recipe: read the training sets (one source per --train), compose batches with the
chosen sampler (xx: one language per batch; xy: query and passages in two languages of the
same parallel group; hybrid: xx with probability alpha, else xy), and for each batch take
one AdamW step on the InfoNCE loss (cosine / temperature, in-batch candidates, duplicates
masked), with global-norm clipping and a warm-up. Checkpoints are Hugging Face
directories that open in transformers and sentence-transformers.

Exact resume: batches are a pure function of (seed, epoch), dropout of (seed, step), and
the optimiser state is saved with each checkpoint; `--resume OUT` continues from the latest
checkpoint and gives bit-for-bit the run that would have happened without the stop.
Ctrl-C finishes the current step, saves a checkpoint and exits (a second Ctrl-C aborts).
A non-finite loss stops the run with a message; the last good checkpoint stays.

A JSON config file (--config) may set any flag by its long name (dashes or underscores);
flags given on the command line win.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np

DEFAULTS = dict(sampler="hybrid", alpha=0.5, batch_size=100, lr=3e-5, weight_decay=0.01, warmup=0,
                schedule="constant", decay_steps=None, steps=1000, max_query_len=64, max_passage_len=256,
                temperature=0.05, candidates="inbatch", symmetric=False, seed=0, device="cpu", out="runs/hbt",
                save_every=500, resume=None, grad_cache_chunk=0, max_grad_norm=1.0, max_negatives=1,
                xx_weighting="uniform", pooling=None, model=None, train=None, quiet=False, tf32=False,
                fused_kernels=False)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--config", help="JSON file setting any of these flags (command-line flags win)")
    a("--model", help="Hugging Face model directory to start from (config.json, safetensors, tokenizer.json)")
    a("--train", action="append", metavar="PATH",
      help="training data, repeatable, one source each: a SQuAD-format .json file, a directory of them, or a .jsonl "
           "file (see README). The language comes from a 'lang' field or the file name (ar.json, "
           "arabic_tydiqa_dev.json, dev-context-ar-question-ar.json); LANG=PATH forces it. Batches never mix "
           "sources; a source is drawn in proportion to its size")
    a("--sampler", choices=["xx", "xy", "hybrid"], help="batch composition (default hybrid)")
    a("--alpha", type=float, help="hybrid: probability of a monolingual (xx) batch (default 0.5, the paper's best)")
    a("--xx-weighting", choices=["uniform", "proportional"],
      help="xx: draw the batch language uniformly (the paper's rule, default) or in proportion to its data")
    a("--batch-size", type=int, help="triplets per batch (default 100, as in the paper)")
    a("--max-negatives", type=int, help="hard negatives per triplet, other sentences of the paragraph (default 1)")
    a("--lr", type=float, help="peak learning rate (default 3e-5, as in the paper)")
    a("--weight-decay", type=float, help="AdamW weight decay, not applied to biases and LayerNorm (default 0.01)")
    a("--warmup", type=int, help="linear warm-up steps from 0 to --lr (default 0)")
    a("--schedule", choices=["constant", "linear"],
      help="after warm-up: constant (default; runs can be extended with --resume) or linear decay to 0 at "
           "--decay-steps")
    a("--decay-steps", type=int, help="linear schedule: the step at which lr reaches 0 (default: --steps)")
    a("--steps", type=int, help="total optimiser steps of the run (default 1000)")
    a("--max-query-len", type=int, help="query truncation in tokens (default 64)")
    a("--max-passage-len", type=int, help="passage truncation in tokens (default 256)")
    a("--temperature", type=float, help="InfoNCE temperature on cosine scores (default 0.05)")
    a("--candidates", choices=["inbatch", "paper"],
      help="inbatch: all positives and negatives of the batch (default); paper: own positive + all negatives (Eq. 1)")
    a("--symmetric", action="store_true", default=None, help="add the passage->query loss term (default off)")
    a("--max-grad-norm", type=float, help="clip the global gradient norm to this (default 1.0; 0 disables)")
    a("--grad-cache-chunk", type=int, help="GradCache: embed N texts at a time, so memory is bounded by N, not "
                                           "the batch; same gradients (default 0 = off)")
    a("--pooling", choices=["mean", "cls", "pooler"], help="default: the checkpoint's own, else mean")
    a("--seed", type=int, help="seed of batches and dropout (default 0)")
    a("--device", choices=["cpu", "cuda"], help="cpu (NumPy, default) or cuda (CuPy)")
    a("--tf32", action="store_true", default=None,
      help="cuda only: float32 GEMMs on TF32 tensor cores (faster, ~1e-3 relative error; default off)")
    a("--fused-kernels", action="store_true", default=None,
      help="cuda only: fused CuPy kernels for bias+GELU, residual+LayerNorm, softmax and AdamW "
           "(default off: not yet verified on a GPU, see minihbt/kernels.py)")
    a("--out", help="run directory: checkpoint-N/, final/ (each a Hugging Face directory with optimizer.npz and "
                    "trainer_state.json beside the weights), log.jsonl (default runs/hbt)")
    a("--save-every", type=int, help="checkpoint every N steps (default 500; 0 = only at the end)")
    a("--quiet", action="store_true", default=None, help="no progress bar or messages (default off)")
    a("--demo", action="store_true", help="run the built-in demo (what `python train.py` with no arguments does): "
                                          "a synthetic parallel world, a tiny model trained from scratch with xx, xy "
                                          "and hybrid batches, evaluated with evaluate's code; see minihbt/demo.py")
    a("--demo-seeds", default="0", help="demo: comma-separated world/model seeds (default 0)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint up to --steps; its "
                                      "settings are reused, --steps/--save-every/--device may change")
    return ap


def resolve_args(argv):
    """Defaults < config file < command line; on --resume, the run's saved settings."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "demo", "demo_seeds")}
    settings = dict(DEFAULTS)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                cfg = {k.replace("-", "_"): v for k, v in json.load(f).items()}
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"train.py: --config {args.config}: {e}")
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            sys.exit(f"train.py: --config {args.config}: unknown keys {sorted(unknown)}")
        settings.update(cfg)
    settings.update(given)
    if settings["resume"]:
        from minihbt.checkpoint import STATE_FILE, latest_checkpoint
        ckpt = latest_checkpoint(settings["resume"])
        if ckpt is None:
            sys.exit(f"train.py: --resume {settings['resume']}: no checkpoint-N with {STATE_FILE} in it")
        with open(os.path.join(ckpt, STATE_FILE), encoding="utf-8") as f:
            saved = json.load(f)["settings"]
        changeable = {"steps", "save_every", "device", "tf32", "fused_kernels"}
        changed = {k for k in given if k in saved and k not in changeable | {"resume"} and given[k] != saved[k]}
        if changed:
            sys.exit(f"train.py: --resume: {sorted(changed)} differ from the run's saved settings; "
                     "only --steps, --save-every, --device, --tf32 and --fused-kernels may change")
        settings = {**saved, **{k: given[k] for k in changeable if k in given}, "resume": settings["resume"],
                    "out": settings["resume"], "checkpoint": ckpt}
    for need in ("model", "train"):
        if not settings.get(need) and not settings.get("checkpoint"):
            sys.exit(f"train.py: --{need} is required (see --help)")
    return settings


class StopFlag:
    """First Ctrl-C: finish the step, save, exit. Second: abort at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)


def demo(argv):
    """The built-in demo (minihbt/demo.py): trains three tiny models and prints their table."""
    from minihbt import demo as world
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join("runs", "demo")
    steps = args.steps or world.DEMO_STEPS
    seeds = [int(x) for x in args.demo_seeds.split(",")]
    print(f"minihbt demo: a synthetic parallel world ({world.DESCRIPTION}); a tiny XLM-R-shaped encoder "
          f"trained from scratch for {steps} steps with each batch type, then evaluated (runs in {out}/)")
    t0 = time.perf_counter()
    table = world.run(main, out, seeds=seeds, steps=steps)
    print()
    print(world.format_table(table))
    print(f"\n{time.perf_counter() - t0:.0f} s. X-X batches leave the languages unaligned (low Cr./Mul. mAP, large "
          "bias); X-Y batches align them; hybrid batches keep X-X's Mo. quality while aligning. "
          "Real data: see README.md.")
    return table


def main(argv=None):
    if argv is None and len(sys.argv) == 1 or "--demo" in (sys.argv[1:] if argv is None else argv):
        return demo(sys.argv[1:] if argv is None else argv)
    s = resolve_args(argv)
    say = (lambda *a: None) if s["quiet"] else (lambda *a: print(*a, file=sys.stderr))
    import minihbt
    from minihbt.checkpoint import load_training_state, save_checkpoint
    from minihbt.data import DataError, read_training_data
    from minihbt.step import loss_and_grads
    from minihbt.optim import AdamW, clip_grad_norm, scheduled_lr
    from minihbt.sampler import HBTSampler
    from tqdm.auto import tqdm

    # data and batches
    try:
        examples = []
        for spec in s["train"]:
            ex, report = read_training_data(spec)
            examples += ex
            for line in report:
                say(line)
        sampler = HBTSampler(examples, s["batch_size"], sampler=s["sampler"], alpha=s["alpha"], seed=s["seed"],
                             xx_language_weighting=s["xx_weighting"], max_negatives=s["max_negatives"])
    except (DataError, ValueError) as e:
        sys.exit(f"train.py: {e}")
    # model and optimiser
    start = s.get("checkpoint") or s["model"]
    model = minihbt.load_model(start, device=s["device"], pooling=s["pooling"], tf32=s.get("tf32"),
                               fused_kernels=s.get("fused_kernels"))
    model.path = start
    opt = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=s["lr"], weight_decay=s["weight_decay"],
                backend=model.backend)
    step = 0
    if s.get("checkpoint"):
        step = load_training_state(s["checkpoint"], opt)["step"]
        say(f"resuming {s['checkpoint']} at step {step}")
    os.makedirs(s["out"], exist_ok=True)
    settings = {k: v for k, v in s.items() if k not in ("resume", "checkpoint")}
    log_path = os.path.join(s["out"], "log.jsonl")
    _truncate_log(log_path, step)
    say(f"{len(examples)} examples, {len(sampler)} batches per epoch of {s['batch_size']}; {model}")

    def save(name):
        state = {"step": step, "settings": settings, "sampler": sampler.state_dict(), "minihbt": minihbt.__version__}
        return save_checkpoint(s["out"], name, model, opt, state)

    stop = StopFlag()
    epoch_batches, bar = (None, None), tqdm(total=s["steps"], initial=step, desc="train", unit="step",
                                            disable=s["quiet"])
    with open(log_path, "a", encoding="utf-8") as log:
        while step < s["steps"]:
            epoch, index = divmod(step, len(sampler))
            if epoch_batches[0] != epoch:
                epoch_batches = (epoch, sampler.batches(epoch))
            batch = epoch_batches[1][index]
            t0 = time.perf_counter()
            stats = {}
            loss, grads = loss_and_grads(
                model, [t.query for t in batch.triplets], [t.positive for t in batch.triplets],
                [list(t.negatives) for t in batch.triplets], temperature=s["temperature"],
                candidates=s["candidates"], symmetric=s["symmetric"], dropout=True,
                seed=int(np.random.SeedSequence([s["seed"], step]).generate_state(1)[0]),
                max_query_length=s["max_query_len"], max_passage_length=s["max_passage_len"],
                chunk_size=s["grad_cache_chunk"] or None, return_numpy=False, stats=stats)
            if not math.isfinite(loss):
                bar.close()
                sys.exit(f"train.py: the loss is {loss} at step {step} (batch {index} of epoch {epoch}, {batch.kind}); "
                         f"stopping. The last good checkpoint is kept in {s['out']}; try a lower --lr or --warmup.")
            norm = clip_grad_norm(grads, s["max_grad_norm"]) if s["max_grad_norm"] else float("nan")
            lr = scheduled_lr(step, s["lr"], s["warmup"], s["schedule"], s["decay_steps"] or s["steps"])
            opt.step(model.params, grads, lr=lr)
            del grads
            step += 1
            dt = time.perf_counter() - t0
            log.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "kind": batch.kind,
                                  "lang": batch.lang, "source": batch.source, "tokens": stats["tokens"],
                                  "seconds": round(dt, 4)}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{stats['tokens'] / dt:.0f}", kind=batch.kind)
            if stop.requested:
                bar.close()
                path = save(f"checkpoint-{step}")
                print(f"stopped at step {step}; saved {path}; continue with --resume {s['out']}", file=sys.stderr)
                sys.exit(130)
            if s["save_every"] and step % s["save_every"] == 0 and step < s["steps"]:
                save(f"checkpoint-{step}")
    bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path = save("final")
    say(f"done: {step} steps; model in {path}")
    return path


def _truncate_log(path, step):
    """Keep only the log lines of steps <= step (a resumed run rewrites what came after)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
