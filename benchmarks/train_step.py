"""One training step (forward, backward, AdamW): minihbt vs PyTorch + transformers, same run.

    python benchmarks/train_step.py [--device cpu|cuda] [--shape me5-small|xlmr-base]
                                    [--precision fp32,tf32,mixed] [--triplets N] [--query-len N]
                                    [--passage-len N] [--steps N] [--threads N] [--model DIR]

CPU (the default): multilingual-e5-small (built from ../shared when --model is not given),
float32, 32 cross-lingual triplets from XQuAD-R (English question, German gold sentence,
another German sentence of the paragraph as the negative), queries truncated to 32 tokens
and passages to 64. Peak memory is the process's ru_maxrss (model loading included).

GPU (--device cuda): an XLM-R-base-shaped model with random weights (12 layers, hidden 768,
12 heads, FFN 3072, vocabulary 250002; the XLM-R tokenizer of the me5 build), 100 triplets
(the paper's batch) whose texts are long enough that every query fills 32 tokens and every
passage 128 (question + context as the query, whole contexts as passages). Each precision
in its own pair of processes: fp32 (TF32 off on both sides), tf32 (cuBLAS TF32 on both),
mixed (PyTorch: bf16 autocast; minihbt: not implemented, reported as such). Printed: ms per
step, tokens/s, MFU (FLOPs per token = 6 N_non-embedding + 12 layers hidden seq, against the
datasheet peak of the card for that precision, named), peak GPU memory (CuPy's memory pool
vs torch.cuda.max_memory_reserved: what each allocator held), the pool size after every step
(it must not grow after the first steps), and the ratios.

Both sides: mean pooling, InfoNCE over in-batch candidates at temperature 0.05, dropout on,
gradient clipping at 1.0, AdamW over all parameters that get a gradient (the unused pooler
excluded on both). After one warm-up step the mean of --steps steps is reported. Needs torch
+ transformers for the peer (and CuPy for minihbt on cuda).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared"))


def xquad_triplets(n, data_dir, q_lang="en", p_lang="de"):
    """(question in q_lang, gold sentence in p_lang, another sentence of that paragraph),
    no passage text used twice (as minihbt's samplers guarantee, so both losses see the same
    candidates: minihbt masks duplicated passages, the plain PyTorch loss would not)."""
    def load(lang):
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            return json.load(f)["data"]

    def gold(p, qa):
        start = qa["answers"][0]["answer_start"]
        for i, (b, e) in enumerate(p["sentence_breaks"]):
            if b <= start <= e:
                return i
        return None
    qd, pd = load(q_lang), load(p_lang)
    out, used = [], set()
    for qa_art, p_art in zip(qd, pd):
        for qp, pp in zip(qa_art["paragraphs"], p_art["paragraphs"]):
            qa_by_id = {qa["id"]: qa for qa in pp["qas"]}
            for qa in qp["qas"]:
                if qa["id"] not in qa_by_id or len(pp["sentences"]) < 2:
                    continue
                g = gold(pp, qa_by_id[qa["id"]])
                if g is None:
                    continue
                pos, neg = pp["sentences"][g], pp["sentences"][(g + 1) % len(pp["sentences"])]
                if pos in used or neg in used:
                    continue
                used.update((pos, neg))
                out.append((qa["question"], pos, neg))
                if len(out) == n:
                    return out
    return out


def long_triplets(n, data_dir, q_lang="en", p_lang="de"):
    """n triplets whose texts fill the token limits: (question + its context in q_lang, the
    contexts of paragraphs i and i + 1 in p_lang, the same two in the other order); no text twice."""
    def load(lang):
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            return [p for art in json.load(f)["data"] for p in art["paragraphs"]]
    qp, pp = load(q_lang), load(p_lang)
    out = []
    for i in range(0, len(qp) - 1, 2):                      # paragraphs i and i + 1: no context used twice
        a, b = pp[i]["context"], pp[i + 1]["context"]             # two contexts each: > 128 tokens
        out.append((qp[i]["qas"][0]["question"] + " " + qp[i]["context"], a + " " + b, b + " " + a))
        if len(out) == n:
            break
    return out


XLMR_BASE = {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "vocab_size": 250002,
             "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
             "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
             "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute", "initializer_range": 0.02}


def build_xlmr_base(out_dir, tokenizer_dir, seed=0):
    """A random-weight XLM-R-base checkpoint (HF layout) with the XLM-R tokenizer of tokenizer_dir."""
    import shutil
    import numpy as np
    from safetensors.numpy import save_file
    c = XLMR_BASE
    H, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    t = {"embeddings.word_embeddings.weight": normal(V, H),
         "embeddings.position_embeddings.weight": normal(c["max_position_embeddings"], H),
         "embeddings.token_type_embeddings.weight": normal(1, H),
         "embeddings.LayerNorm.weight": np.ones(H, np.float32), "embeddings.LayerNorm.bias": np.zeros(H, np.float32),
         "pooler.dense.weight": normal(H, H), "pooler.dense.bias": np.zeros(H, np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                             "attention.self.value": (H, H), "attention.output.dense": (H, H),
                             "intermediate.dense": (F, H), "output.dense": (H, F)}.items():
            t[p + name + ".weight"] = normal(o, n)
            t[p + name + ".bias"] = np.zeros(o, np.float32)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = np.ones(H, np.float32)
            t[p + ln + ".bias"] = np.zeros(H, np.float32)
    os.makedirs(out_dir, exist_ok=True)
    save_file(t, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), out_dir)


# Datasheet peaks, dense (no sparsity), FLOP/s: (fp32, tf32 tensor core, bf16 tensor core).
PEAKS = [("H100 PCIe", (51e12, 378e12, 756e12)), ("H100 NVL", (60e12, 417.5e12, 835e12)),
         ("H100", (67e12, 494.7e12, 989.4e12)), ("H200", (67e12, 494.7e12, 989.4e12)),
         ("A100", (19.5e12, 156e12, 312e12)), ("L4", (30.3e12, 60e12, 121e12))]


def peak_flops(device_name, precision):
    for key, peaks in PEAKS:
        if key in device_name:
            return peaks[{"fp32": 0, "tf32": 1, "mixed": 2}[precision]], key
    return None, None


def flops_per_step(config, n_nonembed, tokens_q, tokens_p, Tq, Tp):
    """6 N_non-embedding per token (forward + backward), plus attention 12 L H T per token."""
    L, H = config["num_hidden_layers"], config["hidden_size"]
    return tokens_q * (6 * n_nonembed + 12 * L * H * Tq) + tokens_p * (6 * n_nonembed + 12 * L * H * Tp)


def run_minihbt(model_dir, triplets, args):
    import numpy as np
    import minihbt
    from minihbt.backend import set_tf32
    from minihbt.loss import loss_and_grads
    from minihbt.optim import AdamW, clip_grad_norm

    if args.precision == "mixed":
        return None, "mixed precision is not implemented in minihbt"
    model = minihbt.load_model(model_dir, device=args.device)
    xp = model.xp
    set_tf32(xp, args.precision == "tf32")
    opt = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=3e-5, weight_decay=0.01, xp=xp)
    seeds = iter(range(1000))
    q, p, n = [t[0] for t in triplets], [t[1] for t in triplets], [[t[2]] for t in triplets]
    stats = {}

    def step():
        loss, grads = loss_and_grads(model, q, p, n, temperature=0.05, dropout=True, seed=next(seeds),
                                     max_query_length=args.query_len, max_passage_length=args.passage_len,
                                     return_numpy=False, stats=stats)
        clip_grad_norm(xp, grads, 1.0)
        opt.step(model.params, grads)
        if xp is not np:
            xp.cuda.runtime.deviceSynchronize()
        return loss

    def memory():
        if xp is np:
            return None
        return xp.get_default_memory_pool().total_bytes() / 2 ** 20
    return (step, memory, lambda: xp.cuda.runtime.getDeviceProperties(0)["name"].decode() if xp is not np else None), None


def run_torch(model_dir, triplets, args):
    import contextlib
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(dev).train()     # dropout on; default attention (sdpa)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("pooler.")]
    params = [p for _, p in named]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-5)
    norm = torch.nn.functional.normalize
    q = ["query: " + t[0] for t in triplets]
    c = ["passage: " + t[1] for t in triplets] + ["passage: " + t[2] for t in triplets]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.precision == "mixed" else \
        contextlib.nullcontext

    def embed(texts, max_len):
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(dev)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return norm((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            scores = embed(q, args.query_len) @ embed(c, args.passage_len).T / 0.05
            loss = torch.nn.functional.cross_entropy(scores.float(), torch.arange(len(q), device=dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return float(loss)

    def memory():
        return torch.cuda.max_memory_reserved() / 2 ** 20 if cuda else None
    return (step, memory, lambda: torch.cuda.get_device_name(0) if cuda else None), None


def child(args):
    import resource
    triplets = (long_triplets if args.shape == "xlmr-base" else xquad_triplets)(args.triplets, args.data)
    made, why = (run_minihbt if args.child == "minihbt" else run_torch)(args.model, triplets, args)
    if made is None:
        print(json.dumps({"skipped": why}))
        return
    step, memory, device_name = made
    step()                                                          # warm-up
    times, losses, pool = [], [], [memory()]
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        pool.append(memory())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": sum(times) / len(times), "peak_mb": peak_mb, "gpu_mb": pool, "losses": losses,
                      "device": device_name()}))


def count_tokens(model_dir, triplets, args):
    """Real tokens of one batch (queries, passages) and the padded lengths, as minihbt tokenizes."""
    from minihbt.tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.json"))
    _, qm, _ = tok(["query: " + t[0] for t in triplets], max_length=args.query_len)
    _, pm, _ = tok(["passage: " + t[i] for i in (1, 2) for t in triplets], max_length=args.passage_len)
    return int(qm.sum()), int(pm.sum()), qm.shape[1], pm.shape[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--shape", choices=["me5-small", "xlmr-base"],
                    help="me5-small (real weights; default on cpu) or xlmr-base (random weights; default on cuda)")
    ap.add_argument("--precision", help="comma-separated, of fp32, tf32, mixed (default: fp32 on cpu, all three "
                                        "on cuda)")
    ap.add_argument("--model", help="HF directory of multilingual-e5-small (default: built from ../shared)")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "xquad-r"), help="XQuAD-R directory")
    ap.add_argument("--triplets", type=int, help="triplets per batch (default 32 on cpu, 100 on cuda)")
    ap.add_argument("--query-len", type=int, default=32, help="max query tokens (default 32)")
    ap.add_argument("--passage-len", type=int, help="max passage tokens (default 64 on cpu, 128 on cuda)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both (default: all cores)")
    ap.add_argument("--child", choices=["minihbt", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.shape = args.shape or ("xlmr-base" if gpu else "me5-small")
    args.triplets = args.triplets or (100 if gpu else 32)
    args.passage_len = args.passage_len or (128 if gpu else 64)
    if args.child:
        return child(args)
    precisions = (args.precision or ("fp32,tf32,mixed" if gpu else "fp32")).split(",")
    if any(p not in ("fp32", "tf32", "mixed") for p in precisions) or (not gpu and precisions != ["fp32"]):
        sys.exit("train_step.py: --precision takes fp32, tf32, mixed (tf32 and mixed only with --device cuda)")
    tmp = tempfile.mkdtemp()
    me5 = args.model if (args.model and args.shape == "me5-small") else os.path.join(tmp, "me5")
    if not (args.model and args.shape == "me5-small"):
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "build_me5_small.py"), me5], check=True,
                       capture_output=True)
    model_dir = me5
    if args.shape == "xlmr-base":
        model_dir = args.model or os.path.join(tmp, "xlmr-base-random")
        if not args.model:
            build_xlmr_base(model_dir, me5)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    from safetensors import safe_open
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        n_nonembed = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                         if ".embeddings." not in "." + k and "pooler" not in k)
    triplets = (long_triplets if args.shape == "xlmr-base" else xquad_triplets)(args.triplets, args.data)
    tq, tp, Tq, Tp = count_tokens(model_dir, triplets, args)
    flops = flops_per_step(config, n_nonembed, tq, tp, Tq, Tp)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    print(f"{args.shape}{' (random weights)' if args.shape == 'xlmr-base' else ''}, {args.device}, "
          f"{args.triplets} triplets, query {args.query_len} / passage {args.passage_len} tokens "
          f"({tq} + {tp} real tokens a step, {n_nonembed / 1e6:.1f}M non-embedding parameters, "
          f"{flops / 1e12:.2f} TFLOP a step), threads={args.threads}, {args.steps} timed steps")
    for precision in precisions:
        res = {}
        for which in ("minihbt", "torch"):
            cmd = [sys.executable, __file__, "--child", which, "--model", model_dir, "--shape", args.shape,
                   "--device", args.device, "--precision", precision, "--data", args.data,
                   "--triplets", str(args.triplets), "--query-len", str(args.query_len),
                   "--passage-len", str(args.passage_len), "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                res[which] = {"skipped": "failed: " + out.stderr.strip().splitlines()[-1] if out.stderr.strip()
                              else f"failed with exit code {out.returncode}"}
                print(out.stderr[-3000:], file=sys.stderr)
            else:
                res[which] = json.loads(out.stdout.strip().splitlines()[-1])
        report(precision, res, flops, tq + tp, gpu)


def report(precision, res, flops, tokens, gpu):
    print(f"\n[{precision}]")
    print(f"{'':22s}{'ms/step':>10s}{'tokens/s':>11s}{'MFU':>8s}{'peak GPU MB' if gpu else 'peak RSS MB':>13s}   losses")
    rows = {}
    for name, key in (("minihbt", "minihbt"), ("pytorch+transformers", "torch")):
        r = res[key]
        if "skipped" in r:
            print(f"{name:22s}  {r['skipped']}")
            continue
        peak, card = peak_flops(r.get("device") or "", precision) if gpu else (None, None)
        mfu = f"{flops / r['seconds'] / peak:.1%}" if peak else "n/a"
        mem = max(m for m in r["gpu_mb"] if m is not None) if gpu else r["peak_mb"]
        rows[key] = (r["seconds"], mem)
        print(f"{name:22s}{r['seconds'] * 1e3:10.1f}{tokens / r['seconds']:11.0f}{mfu:>8s}{mem:13.0f}   "
              f"{[round(x, 4) for x in r['losses']]}")
        if gpu:
            print(f"{'':22s}device: {r.get('device')}; MFU against the {card or 'unknown card'} datasheet peak "
                  f"for {precision}; allocator size after each step (MB): {[round(m) for m in r['gpu_mb']]}")
    if len(rows) == 2:
        (tm, mm), (tt, mt) = rows["minihbt"], rows["torch"]
        print(f"throughput ratio minihbt/pytorch: {tt / tm:.2f}x   time ratio: {tm / tt:.2f}   "
              f"memory ratio minihbt/pytorch: {mm / mt:.2f}")


if __name__ == "__main__":
    main()
