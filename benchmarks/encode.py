"""Encoding throughput on CPU: minihbt vs sentence-transformers, same model, texts and threads.

    python benchmarks/encode.py [--model DIR] [--texts 2000] [--batch-size 64] [--threads N]

Encodes the first N XQuAD-R sentences (all 11 languages, round-robin) as passages with
multilingual-e5-small (built from ../shared when --model is not given) and prints texts/s
for both and the ratio. Both runs are single processes with the same BLAS/torch thread
count; each is warmed up on one batch first. Needs torch + sentence-transformers for
the peer (a separate venv is fine: it only needs minihbt importable, e.g. PYTHONPATH=.).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared"))
LANGS = "ar de el en es hi ru th tr vi zh".split()


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
    ap.add_argument("--child", choices=["minihbt", "st"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one measurement in a fresh process, thread count fixed by the parent's env
        import numpy as np
        secs, emb = run_one(args.child, args.model, xquad_sentences(args.texts, args.data), args.batch_size,
                            args.threads)
        np.save(args.out, np.asarray(emb, dtype=np.float32))
        print(json.dumps({"seconds": secs}))
        return
    tmp = tempfile.mkdtemp()
    model = args.model
    if model is None:
        model = os.path.join(tmp, "me5")
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "build_me5_small.py"), model], check=True,
                       capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    res = {}
    for which in ("minihbt", "st"):
        out = subprocess.run([sys.executable, __file__, "--child", which, "--model", model, "--data", args.data,
                              "--texts", str(args.texts), "--batch-size", str(args.batch_size),
                              "--threads", str(args.threads), "--out", os.path.join(tmp, which + ".npy")],
                             env=env, check=True, capture_output=True, text=True)
        res[which] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    import numpy as np
    a, b = np.load(os.path.join(tmp, "minihbt.npy")), np.load(os.path.join(tmp, "st.npy"))
    n = args.texts
    print(f"texts={n} batch={args.batch_size} threads={args.threads} machine={os.cpu_count()} cores")
    print(f"minihbt              {n / res['minihbt']:8.1f} texts/s  ({res['minihbt']:.2f} s)")
    print(f"sentence-transformers {n / res['st']:8.1f} texts/s  ({res['st']:.2f} s)")
    print(f"ratio minihbt / sentence-transformers: {res['st'] / res['minihbt']:.2f}x")
    print(f"agreement: min cosine {float((a * b).sum(1).min()):.6f}, max abs diff {float(np.abs(a - b).max()):.2e}")


if __name__ == "__main__":
    main()
