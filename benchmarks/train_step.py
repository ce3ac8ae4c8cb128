"""One training step (forward, backward, AdamW) on CPU: minihbt vs PyTorch + transformers.

    python benchmarks/train_step.py [--model DIR] [--triplets 32] [--query-len 32] [--passage-len 64]
                                    [--steps 3] [--threads N]

multilingual-e5-small (built from ../shared when --model is not given), float32, a batch
of cross-lingual triplets from XQuAD-R (English question, German gold sentence, another
German sentence of the paragraph as the negative), queries truncated to 32 tokens and
passages to 64. Both sides: mean pooling, InfoNCE over in-batch candidates at temperature
0.05, dropout on, gradient clipping at 1.0, AdamW over all parameters that get a gradient.
Each library runs in its own process with the same thread count; after one warm-up step
the mean of --steps steps is reported, with the process's peak resident memory
(ru_maxrss, model loading included). Needs torch + transformers for the peer.
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


def run_minihbt(model_dir, triplets, args):
    import numpy as np
    import minihbt
    from minihbt.loss import loss_and_grads
    from minihbt.optim import AdamW, clip_grad_norm

    model = minihbt.load_model(model_dir)
    opt = AdamW({k: model.params[k] for k in model.trainable_names()}, lr=3e-5, weight_decay=0.01)
    seeds = iter(range(1000))
    q, p, n = [t[0] for t in triplets], [t[1] for t in triplets], [[t[2]] for t in triplets]

    def step():
        loss, grads = loss_and_grads(model, q, p, n, temperature=0.05, dropout=True, seed=next(seeds),
                                     max_query_length=args.query_len, max_passage_length=args.passage_len)
        clip_grad_norm(np, grads, 1.0)
        opt.step(model.params, grads)
        return loss
    return step


def run_torch(model_dir, triplets, args):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).train()            # dropout on
    params = [p for n, p in model.named_parameters() if not n.startswith("pooler.")]
    decay = [p for n, p in model.named_parameters() if not n.startswith("pooler.")
             and not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if not n.startswith("pooler.")
                and (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-5)
    norm = torch.nn.functional.normalize
    q = ["query: " + t[0] for t in triplets]
    c = ["passage: " + t[1] for t in triplets] + ["passage: " + t[2] for t in triplets]

    def embed(texts, max_len):
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return norm((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def step():
        opt.zero_grad(set_to_none=True)
        scores = embed(q, args.query_len) @ embed(c, args.passage_len).T / 0.05
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(q)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)
    return step


def child(args):
    import resource
    triplets = xquad_triplets(args.triplets, args.data)
    step = (run_minihbt if args.child == "minihbt" else run_torch)(args.model, triplets, args)
    step()                                                          # warm-up
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": sum(times) / len(times), "peak_mb": peak_mb, "losses": losses}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory of multilingual-e5-small (default: built from ../shared)")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "xquad-r"), help="XQuAD-R directory")
    ap.add_argument("--triplets", type=int, default=32, help="triplets per batch (default 32)")
    ap.add_argument("--query-len", type=int, default=32, help="max query tokens (default 32)")
    ap.add_argument("--passage-len", type=int, default=64, help="max passage tokens (default 64)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--child", choices=["minihbt", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.model is None:
        args.model = os.path.join(tempfile.mkdtemp(), "me5")
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "build_me5_small.py"), args.model], check=True,
                       capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    res = {}
    for which in ("minihbt", "torch"):
        cmd = [sys.executable, __file__, "--child", which] + [a for a in sys.argv[1:]]
        if "--model" not in sys.argv:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        res[which] = json.loads(out.stdout.strip().splitlines()[-1])
    m, t = res["minihbt"], res["torch"]
    print(f"multilingual-e5-small, {args.triplets} triplets, query {args.query_len} / passage {args.passage_len} "
          f"tokens, float32, threads={args.threads}, {args.steps} timed steps")
    print(f"{'':22s}{'s/step':>10s}{'peak RSS MB':>14s}   losses")
    for name, r in (("minihbt", m), ("pytorch+transformers", t)):
        print(f"{name:22s}{r['seconds']:10.3f}{r['peak_mb']:14.0f}   {[round(x, 4) for x in r['losses']]}")
    print(f"time ratio minihbt/pytorch: {m['seconds'] / t['seconds']:.2f}   "
          f"memory ratio minihbt/pytorch: {m['peak_mb'] / t['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
