"""Stage 4 of the GPU check: encoding throughput and exact retrieval on the GPU.

Encoding: the random XLM-R base (the model of stage 3) loaded by minihbt and by
sentence-transformers, each in its own process on the same device, the same passages
(XQuAD-R en + de sentences, repeated to 4,096), batch 128, 128 tokens, mean pooling, no
prefix; fp32, then TF32 (cuBLAS TF32 on both). Texts/s after one warm-up batch (best of
2), peak memory of each allocator, and the agreement of the fp32 embeddings.

Retrieval: 13,000 queries x 13,000 candidates, random 384-d unit vectors, top-100.
minihbt.retrieval works on NumPy arrays (the host); it is timed there, and whether it
accepts CuPy arrays is recorded. Peers on the device: a torch matmul + topk and a CuPy
matmul + argpartition (the latter shows what a device path could do; it is not minihbt's
API). Best of 3 after a warm-up; the top-100 sets are compared with minihbt's.

On the tests' CuPy stand-in (no GPU) minihbt's side runs alone: sentence-transformers and the
torch matmul + topk are recorded as needing a GPU, neither passed nor failed.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from retrieval import timed          # benchmarks/retrieval.py: best of `repeat` after a warm-up call
from gpu_check_common import (HERE, ROOT, find_tokenizer, find_xquad, gpu_memory_mb, load_model_with,
                              torch_needs_gpu, xlmr_base, xquad_texts)


def sizes(args):
    """(texts, batch, tokens, retrieval rows, top k, precisions)."""
    if args.smoke:
        return 48, 16, 32, 600, 10, ["fp32"]
    return 4096, 128, 128, 13000, 100, ["fp32", "tf32"]


def encode_child(args):
    """One library's encoding times (run in its own process): prints one JSON line."""
    with open(args.texts, encoding="utf-8") as f:
        texts = json.load(f)
    out, model = {}, None
    for precision in args.precisions.split(","):
        tf32 = precision == "tf32"
        if args.lib == "minihbt":
            import minihbt
            model, why = load_model_with(args.model, args.device, tf32=tf32)
            if model is None:
                out[precision] = {"skipped": why}
                continue
            fn = lambda t: minihbt.encode(model, t, kind="passage", prefix=False, batch_size=args.batch_size,
                                          max_length=args.max_length)
            memory = lambda: gpu_memory_mb(model.xp)
        else:
            import torch
            from sentence_transformers import SentenceTransformer
            st = getattr(encode_child, "st", None) or SentenceTransformer(args.model, device=args.device)
            encode_child.st = st
            st.max_seq_length = args.max_length
            if args.device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32
            fn = lambda t: st.encode(t, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
            memory = lambda: torch.cuda.max_memory_reserved() / 2 ** 20 if args.device == "cuda" else None
        fn(texts[:args.batch_size])                                      # warm-up (kernels compiled here)
        best, emb = float("inf"), None
        for _ in range(2):
            t0 = time.perf_counter()
            emb = fn(texts)
            best = min(best, time.perf_counter() - t0)
        np.save(f"{args.emb_out}-{precision}.npy", np.asarray(emb, dtype=np.float32))
        out[precision] = {"seconds": best, "texts_per_s": len(texts) / best, "peak_mb": memory()}
        fn = model = None                                                # the next precision loads its own
        if args.lib == "minihbt" and args.device == "cuda":
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
    print(json.dumps(out))


def encoding(args, rec, model_dir, data_dir, deadline, torch_why):
    n, batch, max_len, _, _, precisions = sizes(args)
    texts_path = os.path.join(args.work, "texts.json")
    with open(texts_path, "w", encoding="utf-8") as f:
        json.dump(xquad_texts(data_dir, n), f)
    res = {}
    libs = ("minihbt",) if torch_why else ("minihbt", "sentence-transformers")
    if torch_why:
        rec.needs_gpu("encoding: sentence-transformers, and the comparisons with it", torch_why)
    for i, lib in enumerate(libs):
        limit = (deadline - time.monotonic()) / (len(libs) - i)
        emb = os.path.join(args.work, f"emb-{lib}")
        cmd = [sys.executable, os.path.join(HERE, "gpu_check.py"), "encode-child", "--lib", lib, "--model", model_dir,
               "--texts", texts_path, "--batch-size", str(batch), "--max-length", str(max_len), "--device",
               args.device, "--precisions", ",".join(precisions), "--emb-out", emb]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        print(f"  encoding with {lib} ...", flush=True)
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            res[lib] = {"skipped": f"timed out after {limit:.0f} s"}
            rec.check(f"encoding: {lib} finished", False, res[lib]["skipped"], "within the stage's time")
            continue
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            res[lib] = {"skipped": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
            rec.check(f"encoding: {lib} finished", False, res[lib]["skipped"], "exit code 0")
            continue
        res[lib] = json.loads(out.stdout.strip().splitlines()[-1])
        rec.check(f"encoding: {lib} finished", True, "exit code 0", "exit code 0")
        for p, r in res[lib].items():
            if "skipped" in r:
                print(f"  {lib:22s} {p}: not run: {r['skipped']}")
                continue
            memory = f"{r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else "n/a"
            print(f"  {lib:22s} {p}: {r['texts_per_s']:9.1f} texts/s, allocator peak {memory}")
    rec.figure("encoding", {"texts": n, "batch": batch, "max_length": max_len, "results": res})
    if len(res) == 2 and all("skipped" not in r for r in res.values()):
        a = np.load(os.path.join(args.work, "emb-minihbt-fp32.npy"))
        b = np.load(os.path.join(args.work, "emb-sentence-transformers-fp32.npy"))
        cos = float((a * b).sum(1).min())
        rec.check("encoding: minihbt vs sentence-transformers embeddings (fp32)", cos >= 0.9999,
                  f"min cosine {cos:.6f}", ">= 0.9999")
        for p in precisions:
            if any("skipped" in res[lib].get(p, {"skipped": 1}) for lib in res):
                continue
            ratio = res["minihbt"][p]["texts_per_s"] / res["sentence-transformers"][p]["texts_per_s"]
            rec.check(f"encoding {p}: throughput minihbt/sentence-transformers", ratio >= 1.0, f"{ratio:.2f}x",
                      ">= 1.0x")




def unit_vectors(rng, n, d=384):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def retrieval(args, rec, torch_why):
    from minihbt.retrieval import top_k
    _, _, _, n, k, _ = sizes(args)
    rng = np.random.default_rng(0)
    q, c = unit_vectors(rng, n), unit_vectors(rng, n)
    res = {"queries": n, "candidates": n, "dim": 384, "k": k}
    idx_ref = top_k(q, c, k)[0]
    res["minihbt top_k (NumPy, host, all cores) s"] = timed(lambda: top_k(q, c, k))
    rec.figure("retrieval", res)
    res["minihbt top_k on CuPy arrays"] = cupy_top_k_support(args, q, c, k)
    if torch_why:
        rec.needs_gpu("retrieval: torch matmul + topk, and its top-k sets against minihbt's", torch_why)
    else:
        torch_top_k(args, rec, q, c, k, idx_ref, res)
    if args.device == "cuda":
        res["cupy matmul + argpartition (device; not minihbt API) s"] = cupy_topk_time(q, c, k)
    rec.figure("retrieval", res)
    for key, value in res.items():
        print(f"  {key}: {value if isinstance(value, (str, int)) else f'{value:.4f}'}")


def torch_top_k(args, rec, q, c, k, idx_ref, res):
    """The torch matmul + topk on the device, timed into `res`; its top-k sets checked against minihbt's."""
    import torch
    dev = torch.device(args.device)
    tq, tc = torch.from_numpy(q).to(dev), torch.from_numpy(c).to(dev)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    got = {}

    def run():
        got["idx"] = torch.topk(tq @ tc.T, k, dim=1).indices
        sync()
    res[f"torch matmul + topk ({args.device}) s"] = timed(run)
    same = same_sets(got["idx"].cpu().numpy(), idx_ref)
    rec.figure("retrieval", res)
    rec.check("retrieval: torch top-k sets equal minihbt's", same >= 0.999, f"{same:.4%} of rows", ">= 99.9% "
              "(float32 GEMMs of different libraries may swap near-tied candidates at the boundary)")


def same_sets(a, b):
    """Fraction of rows whose index sets are equal."""
    return float(np.mean([set(x) == set(y) for x, y in zip(a.tolist(), b.tolist())]))


def cupy_top_k_support(args, q, c, k):
    if args.device != "cuda":
        return "not tried (cpu run)"
    import cupy
    from minihbt.retrieval import top_k
    try:
        top_k(cupy.asarray(q[:64]), cupy.asarray(c), k)
        return "accepted"
    except Exception as e:                 # NumPy-only code meeting device arrays
        return f"not supported ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


def cupy_topk_time(q, c, k):
    import cupy
    cq, cc = cupy.asarray(q), cupy.asarray(c)

    def run():
        s = cq @ cc.T
        part = cupy.argpartition(-s, k, axis=1)[:, :k]
        order = cupy.argsort(-cupy.take_along_axis(s, part, axis=1), axis=1)
        cupy.take_along_axis(part, order, axis=1)
        cupy.cuda.runtime.deviceSynchronize()
    return timed(run)


def stage4(args, rec):
    tok_dir, tok_note = find_tokenizer()
    data_dir, data_note = find_xquad(args.work)
    rec.figure("setup", {"tokenizer": tok_note, "data": data_note})
    deadline = time.monotonic() + args.limit - 10
    model_dir = xlmr_base(args.work, tok_dir, args.smoke)
    torch_why = torch_needs_gpu(args.device)
    try:
        retrieval(args, rec, torch_why)
    finally:
        encoding(args, rec, model_dir, data_dir, deadline, torch_why)
