"""One training step (forward, backward, AdamW): minihbt vs PyTorch + transformers, same run.

    python benchmarks/train_step.py [--case xquad|mlqa-hybrid|xquad-long|both] [--device cpu|cuda]
                                    [--shape me5-small|xlmr-base] [--precision fp32,tf32,mixed]
                                    [--triplets N] [--query-len N] [--passage-len N] [--steps N]
                                    [--threads N] [--model DIR] [--matmul-size N] [--profile]
                                    [--sides minihbt,torch] [--json PATH [--overwrite]]

CPU (the default): multilingual-e5-small (built from ../shared when --model is not given),
float32, 32 triplets a batch, two cases (`--case both`, the default):
- xquad: cross-lingual triplets from XQuAD-R (English question, German gold sentence,
  another German sentence of the paragraph as the negative); queries truncated to 32
  tokens, passages to 64.
- mlqa-hybrid: a real training batch, batch --mlqa-batch (default 0) of epoch 0 of
  minihbt's hybrid sampler on MLQA-R (alpha 0.5, seed 0, at most 1 negative: what
  `train.py --sampler hybrid` trains on first); queries 32, passages 96 tokens, lengths as
  they come.
The parent builds each batch once and hands the same texts to both sides. Printed per
case and side: s/step, real tokens/s, the real-token FLOP rate and its fraction of a float32
matmul rate measured in the same run (NumPy (S x S) @ (S x S), S = --matmul-size, 4096 by
default, best of 3, before and after the steps, with the same thread setting; the best is
the reference), peak memory (the process's ru_maxrss, model loading included), cores busy
(CPU time / wall time over the timed steps), the losses, and the time and memory ratios.
With --threads below the number of cores, every child (both sides, the matmul) runs pinned
to the same --threads cores, whatever thread pools its library sizes from the core count.

Real-token FLOPs of a step (forward + backward) = 6 N sum_i n_i + 12 L H sum_i n_i^2 over
the step's texts, n_i the real tokens of text i after truncation, N the non-embedding
parameters, L layers, H hidden size; padding, embeddings, pooling and the loss are not
counted (see train_step_inputs.py). For the xquad batch of me5-small this is 0.40 TFLOP.

--profile: instead of the comparison, one minihbt step of each case under cProfile, its time
grouped into linear, attention, softmax, GELU, dropout, LayerNorm, embedding, loss,
optimizer and other (see train_step_profile.py).

GPU (--device cuda): an XLM-R-base-shaped model with random weights (12 layers, hidden 768,
12 heads, FFN 3072, vocabulary 250002; the XLM-R tokenizer of the me5 build), 100 triplets
(the paper's batch) of the xquad-long case, whose texts fill every query to 32 tokens and
every passage to 128 (question + context as the query, whole contexts as passages). Each
precision in its own pair of processes: fp32 (TF32 off on both sides), tf32 (cuBLAS TF32 on
both), mixed (PyTorch: bf16 autocast; minihbt: not implemented, reported as such). Printed:
ms per step, tokens/s, MFU (the real-token FLOPs above against the datasheet peak of the
card for that precision, named), peak GPU memory (CuPy's memory pool vs
torch.cuda.max_memory_reserved), the pool size after every step (it must not grow after the
first steps), and the ratios.

Both sides: mean pooling, InfoNCE over in-batch candidates at temperature 0.05, dropout on
(--no-dropout: off on both, so that their losses agree and show that they compute the same step),
gradient clipping at 1.0, AdamW over all parameters that get a gradient (the unused pooler
excluded on both); see train_step_sides.py. After one warm-up step the mean of --steps steps
is reported (--warmup-child: an untimed child runs one step of the first side before any side
is timed). Needs torch + transformers for the peer (and CuPy for minihbt on cuda). --sides minihbt
times minihbt alone (where the peer cannot run: the GPU check on the tests' CuPy stand-in).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared"))
_SRC = sys.argv[sys.argv.index("--minihbt-src") + 1] if "--minihbt-src" in sys.argv else os.path.dirname(HERE)
sys.path.insert(0, _SRC)                            # this checkout's minihbt first (a --baseline child: that one's)
import matmul_rate                                  # noqa: E402  (benchmarks/ is the script's directory)
import train_step_inputs as inputs                  # noqa: E402
from train_step_report import print_case, print_header, print_profile   # noqa: E402

CASES = ("xquad", "mlqa-hybrid", "xquad-long")
PASSAGE_LEN = {"xquad": 64, "mlqa-hybrid": 96, "xquad-long": 128}
SIDES = (("minihbt", "minihbt"), ("torch", "pytorch+transformers"))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def fail(message):
    """A bad setting: one line naming it and what is accepted, exit status 2."""
    print(f"train_step.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--case", help="xquad, mlqa-hybrid, xquad-long, or both (= xquad,mlqa-hybrid); comma-separated "
                     "(default: both with me5-small, xquad-long with xlmr-base)")
    a("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    a("--shape", choices=["me5-small", "xlmr-base"],
      help="me5-small (real weights; default on cpu) or xlmr-base (random weights; default on cuda)")
    a("--precision", help="comma-separated, of fp32, tf32, mixed (default: fp32 on cpu, all three on cuda)")
    a("--model", help="HF directory of the --shape model (default: built from ../shared)")
    a("--data", default=os.path.join(SHARED, "data", "xquad-r"), help="XQuAD-R directory")
    a("--mlqa-data", default=os.path.join(SHARED, "data", "mlqa-r"), help="MLQA-R directory")
    a("--mlqa-batch", type=int, default=0, help="which batch of epoch 0 the mlqa-hybrid case takes (default 0)")
    a("--triplets", type=int, help="triplets per batch (default 32 on cpu, 100 on cuda)")
    a("--query-len", type=int, default=32, help="max query tokens (default 32)")
    a("--passage-len", type=int, help="max passage tokens for every case (default: xquad 64, mlqa-hybrid 96, "
                                      "xquad-long 128)")
    a("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    a("--threads", type=int, default=os.cpu_count(), help="CPU threads for both (default: all cores)")
    a("--matmul-size", type=int, default=4096, help="side of the reference float32 matmul (default 4096; 0: skip)")
    a("--matmul-repeats", type=int, default=3, help="timed reference matmuls, best kept (default 3)")
    a("--baseline", metavar="REV[,REV...]", help="also time minihbt at these git revisions (each checked out in a "
                                                  "temporary worktree) in the same run, e.g. the commit before a "
                                                  "speed-up")
    a("--minihbt-src", help=argparse.SUPPRESS)
    a("--group-tokens", type=int, help="minihbt: padded tokens per length group (default: the library's; "
                                         "0: each side as one padded batch)")
    a("--no-dropout", action="store_true", help="both sides without dropout: their losses must then agree")
    a("--warmup-child", action="store_true", help="first run one step of the first side in an untimed child "
                                                   "(a test of whether the side timed first pays for its place)")
    a("--profile", action="store_true", help="profile one minihbt step of each case instead of the comparison")
    a("--sides", default="minihbt,torch", help="the sides timed, comma-separated, of minihbt, torch "
                                                "(default both)")
    a("--json", help="also write the figures to this JSON file")
    a("--overwrite", action="store_true", help="let --json replace an existing file")
    a("--child", choices=["minihbt", "torch", "profile"], help=argparse.SUPPRESS)
    a("--batch-file", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_settings(args):
    """Fill the defaults that depend on other flags and check every setting; exits with one line if one is bad."""
    gpu = args.device == "cuda"
    args.shape = args.shape or ("xlmr-base" if gpu else "me5-small")
    args.triplets = 100 if gpu and args.triplets is None else 32 if args.triplets is None else args.triplets
    spec = args.case or ("xquad-long" if args.shape == "xlmr-base" else "both")
    args.cases = [c for part in spec.split(",") for c in (("xquad", "mlqa-hybrid") if part == "both" else (part,))]
    precisions = (args.precision or ("fp32,tf32,mixed" if gpu else "fp32")).split(",")
    sides = args.sides.split(",")
    checks = [
        (any(c not in CASES for c in args.cases) or len(set(args.cases)) != len(args.cases),
         f"--case takes xquad, mlqa-hybrid, xquad-long or both, comma-separated, each once (got {spec!r})"),
        (any(p not in ("fp32", "tf32", "mixed") for p in precisions) or (not gpu and precisions != ["fp32"]),
         "--precision takes fp32, tf32, mixed, comma-separated (tf32 and mixed only with --device cuda)"),
        (not sides or any(k not in dict(SIDES) for k in sides) or len(set(sides)) != len(sides),
         f"--sides takes minihbt, torch, comma-separated, each once (got {args.sides!r})"),
        (args.triplets < 1, "--triplets takes an integer >= 1"),
        (not 2 <= args.query_len <= 512, "--query-len takes an integer in 2..512"),
        (args.passage_len is not None and not 2 <= args.passage_len <= 512, "--passage-len takes an integer in 2..512"),
        (args.steps < 1, "--steps takes an integer >= 1"),
        (args.threads is None or args.threads < 1, "--threads takes an integer >= 1"),
        (not 0 <= args.matmul_size <= 32768, "--matmul-size takes an integer in 0..32768 (0: no reference)"),
        (args.matmul_repeats < 1, "--matmul-repeats takes an integer >= 1"),
        (args.mlqa_batch < 0, "--mlqa-batch takes an integer >= 0"),
        (args.group_tokens is not None and args.group_tokens < 0, "--group-tokens takes an integer >= 0"),
        (args.profile and gpu, "--profile profiles the CPU step: use it with --device cpu"),
        (args.overwrite and not args.json, "--overwrite goes with --json"),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    args.precisions, args.sides = precisions, sides
    args.passage_len = {c: args.passage_len or PASSAGE_LEN[c] for c in CASES}
    check_paths(args)


def check_paths(args):
    """Every directory the run reads exists, and --json names a new file in an existing directory."""
    if args.model and not all(os.path.isfile(os.path.join(args.model, f))
                              for f in ("config.json", "model.safetensors", "tokenizer.json")):
        fail(f"--model {args.model}: not a model directory (needs config.json, model.safetensors, tokenizer.json)")
    for flag, path, needed in (("--data", args.data, {"xquad", "xquad-long"} & set(args.cases)),
                               ("--mlqa-data", args.mlqa_data, "mlqa-hybrid" in args.cases)):
        if needed and not os.path.isdir(path):
            fail(f"{flag} {path}: not a directory")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            fail(f"--json {args.json}: directory {folder} does not exist")
        if os.path.exists(args.json) and not args.overwrite:
            fail(f"--json {args.json} exists; add --overwrite to replace it")


def prepare_model(args, tmp):
    """The model directory the sides load: --model, or me5-small built from ../shared, or random XLM-R base."""
    if args.model:
        return args.model
    me5 = os.path.join(tmp, "me5")
    print("building multilingual-e5-small from ../shared ...", file=sys.stderr, flush=True)
    built = subprocess.run([sys.executable, os.path.join(SHARED, "tools", "build_me5_small.py"), me5],
                           capture_output=True, text=True)
    if built.returncode != 0:
        tail = built.stderr.strip().splitlines()
        sys.exit(f"train_step.py: building multilingual-e5-small failed: {tail[-1] if tail else built.returncode}")
    if args.shape == "me5-small":
        return me5
    inputs.build_xlmr_base(os.path.join(tmp, "xlmr-base-random"), me5)
    return os.path.join(tmp, "xlmr-base-random")


def write_json(path, obj):
    from minihbt.files import write_json as atomic_write_json   # the parent only: a --baseline child may predate it
    atomic_write_json(path, obj)


@contextlib.contextmanager
def baseline_checkout(args, tmp):
    """Each --baseline REV checked out (detached) in a temporary git worktree for the run's duration;
    args.baseline_dirs maps the side's key ("baseline REV") to it."""
    root, args.baseline_dirs = os.path.dirname(HERE), {}
    try:
        for i, rev in enumerate(r for r in (args.baseline or "").split(",") if r):
            path = os.path.join(tmp, f"baseline-{i}")
            out = subprocess.run(["git", "-C", root, "worktree", "add", "--detach", path, rev],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                fail(f"--baseline {rev}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'git failed'}")
            args.baseline_dirs[f"baseline {rev}"] = path
        yield
    finally:
        for path in args.baseline_dirs.values():
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", path], capture_output=True)


def thread_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads),
                PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))


def run_child(which, batch_file, args, model_dir, precision, env):
    """One side in its own process: its JSON result, or {"skipped": why}."""
    src = []
    if which in args.baseline_dirs:
        which, src = "minihbt", ["--minihbt-src", args.baseline_dirs[which]]
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--batch-file", batch_file] + src + [
           "--model", model_dir, "--device", args.device, "--precision", precision, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--no-dropout"] if args.no_dropout else []) \
        + (["--group-tokens", str(args.group_tokens)] if args.group_tokens is not None and not src else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        tail = out.stderr.strip().splitlines()
        return {"skipped": "failed: " + tail[-1] if tail else f"failed with exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


class Progress:
    """Phase lines on stderr with the time so far and an estimate of the rest from the phases done."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def phase(self, what):
        elapsed = time.perf_counter() - self.start
        left = f", about {elapsed / self.done * (self.total - self.done):.0f} s left" if self.done else ""
        print(f"[{self.done + 1}/{self.total}] {what} (elapsed {elapsed:.0f} s{left})", file=sys.stderr, flush=True)
        self.done += 1


def describe_case(case, batch, q_lens, c_lens, config, n_nonembed):
    """The case's token counts and FLOPs, shared by the printout and the JSON."""
    positions = len(q_lens) * max(q_lens) + len(c_lens) * max(c_lens)
    return {"case": case, "about": batch["about"], "triplets": len(batch["queries"]),
            "candidates": len(c_lens), "max_query_length": batch["max_query_length"],
            "max_passage_length": batch["max_passage_length"], "query_tokens": sum(q_lens),
            "candidate_tokens": sum(c_lens), "real_tokens": sum(q_lens) + sum(c_lens), "padded_positions": positions,
            "flop": inputs.step_flops(config, n_nonembed, q_lens + c_lens),
            "padded_flop": inputs.padded_flops(config, n_nonembed, q_lens, c_lens)}


def make_cases(args, model_dir, tmp, config, n_nonembed):
    """Build each case's batch (written to a file for the children) and its description."""
    cases = []
    for case in args.cases:
        try:
            batch = inputs.build_batch(case, args.triplets, args)
        except (ValueError, OSError, KeyError) as e:      # DataError is a ValueError; all come from the settings
            fail(f"case {case}: {e}")
        path = os.path.join(tmp, f"batch-{case}.json")
        write_json(path, batch)
        q_lens, c_lens = inputs.token_lengths(model_dir, batch)
        cases.append((path, describe_case(case, batch, q_lens, c_lens, config, n_nonembed)))
    return cases


def compare(args, model_dir, cases, env, setup):
    """Time the sides (--sides) of every case and precision, bracketed by the matmul reference; returns the record."""
    reference = args.matmul_size and args.device == "cpu"
    sides_run = tuple((key, name) for key, name in SIDES if key in args.sides) + tuple(
        (key, f"minihbt at {key[len('baseline '):]}") for key in args.baseline_dirs)
    warmup = args.warmup_child
    progress = Progress(len(cases) * len(args.precisions) * len(sides_run) + (2 if reference else 0) + warmup)
    matmul = {}
    if warmup:
        progress.phase(f"untimed warm-up child ({sides_run[0][1]}, 1 step)")
        run_child(sides_run[0][0], cases[0][0], argparse.Namespace(**dict(vars(args), steps=1)), model_dir,
                  args.precisions[0], env)
    if reference:
        progress.phase(f"matmul reference {args.matmul_size}^3")
        matmul["before"] = matmul_rate.measure_in_child(args.matmul_size, args.matmul_repeats, env)
    results = []
    for path, info in cases:
        for precision in args.precisions:
            sides = {}
            for key, name in sides_run:
                progress.phase(f"case {info['case']}, {precision}, {name}")
                sides[key] = run_child(key, path, args, model_dir, precision, env)
            results.append(dict(info, precision=precision, sides=sides))
    if reference:
        progress.phase(f"matmul reference {args.matmul_size}^3 again")
        matmul["after"] = matmul_rate.measure_in_child(args.matmul_size, args.matmul_repeats, env)
        matmul["flops"] = max(matmul["before"]["flops"], matmul["after"]["flops"])
    record = dict(setup, matmul=matmul or None, cases=results)
    print_header(record)
    for result in results:
        print_case(result, matmul.get("flops"), args.device == "cuda")
    return record


def profile(args, model_dir, cases, env, setup):
    """One minihbt step of each case under cProfile, grouped; returns the record."""
    profiles = []
    for path, info in cases:
        print(f"profiling case {info['case']} ...", file=sys.stderr, flush=True)
        out = run_child("profile", path, args, model_dir, "fp32", env)
        print_profile(info, out)
        profiles.append(dict(info, profile=out))
    return dict(setup, profiles=profiles)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        import train_step_sides as sides
        return (sides.profile_side if args.child == "profile" else sides.time_side)(args)
    resolve_settings(args)
    cores = matmul_rate.pin_cores(args.threads)           # the children inherit it
    env = thread_env(args.threads)
    with tempfile.TemporaryDirectory() as tmp, baseline_checkout(args, tmp):
        model_dir = prepare_model(args, tmp)
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        n_nonembed = inputs.non_embedding_parameters(model_dir)
        cases = make_cases(args, model_dir, tmp, config, n_nonembed)
        hidden = ("child", "batch_file", "case", "precision")
        setup = {"settings": {k: v for k, v in vars(args).items() if k not in hidden},
                 "machine": dict(machine(), cores_used=cores), "model": {"shape": args.shape, "non_embedding_parameters": n_nonembed,
                                                 "layers": config["num_hidden_layers"],
                                                 "hidden": config["hidden_size"]},
                 "flop_formula": "6 N sum_i n_i + 12 L H sum_i n_i^2 (forward + backward, real tokens only)"}
        record = (profile if args.profile else compare)(args, model_dir, cases, env, setup)
    if args.json:
        write_json(args.json, record)
        print(f"wrote {args.json}")


def machine():
    """This machine in words: CPU model and core count."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count()}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                       # the children got the same signal and stopped
        print("train_step.py: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
