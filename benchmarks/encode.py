"""Encoding throughput on CPU: minihbt vs sentence-transformers, same model, texts and threads.

    python benchmarks/encode.py [--model DIR] [--texts 2000] [--batch-size 64] [--threads N]
                                [--matmul-size 4096] [--baseline REV[,REV...]]

Encodes the first N XQuAD-R sentences (all 11 languages, round-robin) as passages with
multilingual-e5-small (built from ../shared when --model is not given) and prints texts/s
for both and the ratio. Both runs are single processes with the same BLAS/torch thread
count (with --threads below the core count, both pinned to the same cores); each is warmed
up on one batch first. Needs torch + sentence-transformers for
the peer (a separate venv is fine: it only needs minihbt importable, e.g. PYTHONPATH=.).

Beside texts/s it prints each library's real-token FLOP rate and its fraction of a float32
matmul rate measured in the same run with the same threads (NumPy (S x S) @ (S x S),
S = --matmul-size, best of 3, before and after the two runs; the higher is the reference).
Real-token FLOPs of encoding (forward only) = 2 N sum_i n_i + 4 L H sum_i n_i^2 over the
texts, n_i the real tokens of text i (prefix and special tokens included), N the
non-embedding parameters, L layers, H hidden size: padding is not counted.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # this checkout's minihbt first
import matmul_rate                                  # noqa: E402  (benchmarks/ is the script's directory)
from train_step import baseline_checkout            # noqa: E402
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared"))
LANGS = "ar de el en es hi ru th tr vi zh".split()


def fail(message):
    """A bad setting: one line naming it and what is accepted, exit status 2."""
    print(f"encode.py: {message}", file=sys.stderr)
    sys.exit(2)


def forward_flops(model_dir, texts):
    """Real-token FLOPs of one forward pass over `texts` as passages: 2 N sum n + 4 L H sum n^2."""
    from train_step_inputs import non_embedding_parameters
    from minihbt.tokenizer import Tokenizer
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    ids, _ = Tokenizer(os.path.join(model_dir, "tokenizer.json")).encode(["passage: " + t for t in texts],
                                                                          max_length=512)
    lengths = [len(x) for x in ids]
    L, H = config["num_hidden_layers"], config["hidden_size"]
    return 2 * non_embedding_parameters(model_dir) * sum(lengths) + 4 * L * H * sum(n * n for n in lengths)


def xquad_sentences(n, data_dir):
    per_lang = []
    for lang in LANGS:
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            d = json.load(f)
        per_lang.append([s for art in d["data"] for p in art["paragraphs"] for s in p["sentences"]])
    out, i = [], 0
    while len(out) < n:
        for sents in per_lang:
            if i < len(sents) and len(out) < n:
                out.append(sents[i])
        i += 1
    return out


def run_one(which, model_dir, texts, batch_size, threads):
    """Time one library in this process; returns seconds for all texts."""
    if which == "minihbt":
        import minihbt
        model = minihbt.load_model(model_dir)
        fn = lambda t: minihbt.encode(model, t, kind="passage", batch_size=batch_size)
    else:
        import torch
        from sentence_transformers import SentenceTransformer
        torch.set_num_threads(threads)
        st = SentenceTransformer(model_dir, device="cpu")
        fn = lambda t: st.encode(["passage: " + x for x in t], batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True)
    fn(texts[:batch_size])  # warm-up
    t0 = time.perf_counter()
    emb = fn(texts)
    return time.perf_counter() - t0, emb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory of multilingual-e5-small (default: built from ../shared)")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "xquad-r"), help="XQuAD-R directory")
    ap.add_argument("--texts", type=int, default=2000, help="number of sentences (default 2000)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size for both (default 64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--matmul-size", type=int, default=4096, help="side of the reference float32 matmul "
                                                                   "(default 4096; 0: skip)")
    ap.add_argument("--baseline", metavar="REV[,REV...]", help="also time minihbt at these git revisions (each "
                    "checked out in a temporary worktree) in the same run, and say whether their embeddings are "
                    "bit for bit this checkout's")
    ap.add_argument("--child", choices=["minihbt", "st"], help=argparse.SUPPRESS)
    ap.add_argument("--minihbt-src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for bad, message in ((args.texts < 1, "--texts takes an integer >= 1"),
                         (args.batch_size < 1, "--batch-size takes an integer >= 1"),
                         (args.threads < 1, "--threads takes an integer >= 1"),
                         (not 0 <= args.matmul_size <= 32768, "--matmul-size takes an integer in 0..32768 (0: skip)"),
                         (args.model is not None and not os.path.isdir(args.model), "--model: not a directory"),
                         (not os.path.isdir(args.data), "--data: not a directory")):
        if bad:
            fail(message)
    for rev in (r for r in (args.baseline or "").split(",") if r and not args.child):
        if subprocess.run(["git", "-C", os.path.dirname(HERE), "rev-parse", "--verify", "--quiet", rev + "^{commit}"],
                          capture_output=True).returncode != 0:
            fail(f"--baseline {rev}: not a commit of this checkout (give REV[,REV...], e.g. a commit hash)")
    if args.child:  # one measurement in a fresh process, thread count fixed by the parent's env
        import numpy as np
        if args.minihbt_src:                                # a --baseline revision's minihbt instead of this one
            sys.path.insert(0, args.minihbt_src)
        secs, emb = run_one(args.child, args.model, xquad_sentences(args.texts, args.data), args.batch_size,
                            args.threads)
        np.save(args.out, np.asarray(emb, dtype=np.float32))
        print(json.dumps({"seconds": secs}))
        return
    cores = matmul_rate.pin_cores(args.threads)           # both children inherit it
    tmp = tempfile.mkdtemp()
    model = args.model
    if model is None:
        model = os.path.join(tmp, "me5")
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "build_me5_small.py"), model], check=True,
                       capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    res, rates = {}, []
    if args.matmul_size:
        rates.append(matmul_rate.measure_in_child(args.matmul_size, 3, env))
    with baseline_checkout(args, tmp):
        sides = [("minihbt", "minihbt", None), ("st", "st", None)] + [
            (key, "minihbt", path) for key, path in args.baseline_dirs.items()]
        for key, which, src in sides:
            res[key] = run_child(args, model, key, which, src, tmp, env)
    if args.matmul_size:
        rates.append(matmul_rate.measure_in_child(args.matmul_size, 3, env))
    report(args, res, rates, forward_flops(model, xquad_sentences(args.texts, args.data)), tmp, cores)


def run_child(args, model, key, which, src, tmp, env):
    """Seconds for one side, timed in its own process (its embeddings saved as <key>.npy in tmp)."""
    cmd = [sys.executable, __file__, "--child", which, "--model", model, "--data", args.data, "--texts", str(args.texts),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--out", os.path.join(tmp, _file_name(key))] + (["--minihbt-src", src] if src else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        sys.exit(f"encode.py: the {key} run failed (its error is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def _file_name(key):
    """The embeddings file of a side: its key with anything but letters, digits, '.', '_' as '-'."""
    return "".join(c if c.isalnum() or c in "._" else "-" for c in key) + ".npy"


def report(args, res, rates, flop, tmp, cores):
    """texts/s of both, the ratio, the FLOP rates against the matmul reference, and the agreement."""
    import numpy as np
    a, b = np.load(os.path.join(tmp, "minihbt.npy")), np.load(os.path.join(tmp, "st.npy"))
    n = args.texts
    print(f"texts={n} batch={args.batch_size} threads={args.threads} on cores {cores} machine={os.cpu_count()} cores")
    ref = max(r["flops"] for r in rates) if rates else None
    if rates:
        print(f"matmul reference: {matmul_rate.describe(rates[0])}; after the runs {rates[1]['flops'] / 1e9:.1f} "
              f"GFLOP/s; the reference is the higher: {ref / 1e9:.1f} GFLOP/s")
    print(f"real-token work (forward, 2 N sum n + 4 L H sum n^2): {flop / 1e9:.1f} GFLOP")
    for name, key in (("minihbt              ", "minihbt"), ("sentence-transformers", "st")):
        rate = flop / res[key]
        share = f", {rate / ref:.1%} of the matmul rate" if ref else ""
        print(f"{name} {n / res[key]:8.1f} texts/s  ({res[key]:.2f} s; {rate / 1e9:.1f} GFLOP/s{share})")
    print(f"ratio minihbt / sentence-transformers: {res['st'] / res['minihbt']:.2f}x")
    for key in (k for k in res if k.startswith("baseline ")):
        same = np.array_equal(a, np.load(os.path.join(tmp, _file_name(key))))
        print(f"minihbt at {key[9:]:<12} {n / res[key]:8.1f} texts/s  ({res[key]:.2f} s); this checkout / it: "
              f"{res[key] / res['minihbt']:.2f}x; embeddings {'bit for bit the same' if same else 'DIFFER'}")
    print(f"agreement: min cosine {float((a * b).sum(1).min()):.6f}, max abs diff {float(np.abs(a - b).max()):.2e}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                       # the children got the same signal and stopped
        print("encode.py: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
