"""One training step of minihbt's recipe in plain PyTorch + transformers, written as another
trainer would write it, for `python -m minihbt.check step` to compare with a golden bundle.

    python -m minihbt.check export --model weights/multilingual-e5-small --data ../shared/data/mlqa-r \\
        --sampler xy --batch-size 8 --out golden
    python examples/torch_reference.py --bundle golden --out theirs
    python -m minihbt.check step golden theirs

It reads the bundle's manifest.json (the model folder and every setting) and batch.jsonl (the
triplets) and takes one step: AutoTokenizer and AutoModel from the model folder, dropout off
(eval mode), the query/passage prefixes, mean pooling over the attention mask, InfoNCE on
cosine / temperature with in-batch candidates (every positive, then every triplet's
negatives; a candidate with the target's text, or a repeat of an earlier one, masked), autograd
with retain_grad() on every intermediate tensor, torch.nn.utils.clip_grad_norm_, and
torch.optim.AdamW with Hugging Face Trainer's groups (no weight decay on biases and LayerNorm
weights). It writes THEIRS/tensors.safetensors with the bundle's tensor names
(minihbt/check/bundle.py). It never imports minihbt.

--bug NAME injects one known mistake, so that you can see where `step` names it (BUGS below;
tests/test_check_step.py checks each is named at the right tensor).
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

try:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer
except ImportError as e:
    print(f"examples/torch_reference.py needs torch and transformers (pip install torch transformers): {e}",
          file=sys.stderr)
    sys.exit(2)

SIDES = ("query", "passage")
WORD = "embeddings.word_embeddings.weight"
BUGS = {
    "interleaved-candidates": "candidates laid out P1 N1 N1' P2 N2 ... while the targets stay columns 0..B-1",
    "temperature-multiplied": "scores = cosine * temperature instead of cosine / temperature",
    "positives-out-of-denominator": "the paper denominator (own positive + negatives) when the bundle says "
                                    "inbatch (and in-batch when it says paper)",
    "mean-over-padding": "mean pooling over every position, padding included",
    "padding-row-trained": "the word table's pad_token_id row trained (nn.Embedding without padding_idx)",
    "layernorm-eps": "LayerNorm eps 1e-5 whatever config.json says (BERT's is 1e-12)",
    "averaged-gradient": "gradients divided by 2, as averaging 2 data-parallel ranks whose loss is already global",
    "no-bias-correction": "AdamW without bias correction",
    "decay-layernorm": "weight decay on LayerNorm weights too (only biases exempt)",
}


def read_bundle(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, manifest["batch"]["file"]), encoding="utf-8") as f:
        triplets = [json.loads(line) for line in f if line.strip()]
    return manifest, triplets


def load(manifest, dtype, bug):
    path, s = manifest["model"]["path"], manifest["settings"]
    options = {"attn_implementation": "eager", "add_pooling_layer": s["pooling"] == "pooler"}
    if bug == "layernorm-eps":
        options["layer_norm_eps"] = 1e-5
    model = AutoModel.from_pretrained(path, **options).to(dtype).eval()       # eval(): dropout off
    if bug == "padding-row-trained":
        model.embeddings.word_embeddings.padding_idx = None
    for name, p in model.named_parameters():
        p.requires_grad_(name in manifest["trained"])
    return AutoTokenizer.from_pretrained(path), model


def candidate_mask(targets, candidates, paper):
    """[B, M] True where candidate j counts for row i (target: column i)."""
    B, M = len(targets), len(candidates)
    mask = torch.ones(B, M, dtype=torch.bool)
    for j in range(M):
        if candidates[j] in candidates[:j]:
            mask[:, j] = False                                  # a repeat counts once
    for i in range(B):
        for j in range(M):
            if candidates[j] == targets[i] and j != i:
                mask[i, j] = False                              # a copy of the positive is no negative
        if paper:
            mask[i, :B] = False
        mask[i, i] = True
    return mask


def embed(model, tok, texts, max_length, pooling, bug):
    """(tokens, hidden states [embeddings, block 0, ...], pooled, normalised), grads retained."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    hidden = list(out.hidden_states)
    last = hidden[-1]
    if pooling == "mean":
        m = enc["attention_mask"].unsqueeze(-1).to(last.dtype)
        pooled = last.mean(1) if bug == "mean-over-padding" else (last * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        pooled = last[:, 0] if pooling == "cls" else out.pooler_output
    normalized = F.normalize(pooled, dim=-1)
    for t in hidden + [pooled, normalized]:
        t.retain_grad()
    return enc, hidden, pooled, normalized


def loss_of(q, c, query_texts, cand_texts, s, bug):
    B, tau = q.shape[0], s["temperature"]
    scores = q @ c.T * tau if bug == "temperature-multiplied" else q @ c.T / tau
    scores.retain_grad()
    paper = (s["candidates"] == "paper") != (bug == "positives-out-of-denominator")
    mask = candidate_mask(cand_texts[:B], cand_texts, paper)
    labels = torch.arange(B)
    loss = F.cross_entropy(scores.masked_fill(~mask, float("-inf")), labels)
    if s["symmetric"]:                                          # positive i against the queries, target i
        mask_pq = candidate_mask(query_texts, query_texts, False)
        loss = 0.5 * (loss + F.cross_entropy(scores[:, :B].T.masked_fill(~mask_pq, float("-inf")), labels))
    return scores, mask, loss


def adamw_step(model, s, trained, bug):
    """torch.optim.AdamW with no decay on biases and LayerNorm weights; or the injected bug's update."""
    params = [(n, p) for n, p in model.named_parameters() if n in trained]
    exempt = (lambda n: n.endswith("bias")) if bug == "decay-layernorm" else \
        (lambda n: n.endswith("bias") or "LayerNorm" in n)
    groups = [{"params": [p for n, p in params if not exempt(n)], "weight_decay": s["weight_decay"]},
              {"params": [p for n, p in params if exempt(n)], "weight_decay": 0.0}]
    if bug != "no-bias-correction":
        torch.optim.AdamW(groups, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"]).step()
        return
    b1, b2 = s["betas"]
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                p.mul_(1 - s["lr"] * group["weight_decay"])
                p.sub_(s["lr"] * (1 - b1) * p.grad / (((1 - b2) * p.grad * p.grad).sqrt() + s["eps"]))


def numpy(t):
    return t.detach().cpu().numpy().copy(order="C")


def forward(manifest, triplets, tok, model, bug, rec):
    s = manifest["settings"]
    query_texts = [s["query_prefix"] + t["query"] for t in triplets]
    if bug == "interleaved-candidates":
        cands = [x for t in triplets for x in [t["positive"]] + t["negatives"]]
    else:
        cands = [t["positive"] for t in triplets] + [n for t in triplets for n in t["negatives"]]
    cand_texts = [s["passage_prefix"] + t for t in cands]
    sides = {}
    for side, texts, max_length in zip(SIDES, (query_texts, cand_texts),
                                       (s["max_query_length"], s["max_passage_length"])):
        sides[side] = embed(model, tok, texts, max_length, s["pooling"], bug)
        enc, hidden, pooled, normalized = sides[side]
        rec[f"{side}/input_ids"], rec[f"{side}/attention_mask"] = enc["input_ids"], enc["attention_mask"]
        rec[f"{side}/embeddings"] = hidden[0]
        for i, h in enumerate(hidden[1:]):
            rec[f"{side}/encoder.layer.{i}.output"] = h
        rec[f"{side}/pooled"], rec[f"{side}/normalized"] = pooled, normalized
    scores, mask, loss = loss_of(sides["query"][3], sides["passage"][3], query_texts, cand_texts, s, bug)
    rec["scores"], rec["mask"], rec["loss"] = scores, mask.long(), loss
    rec["rows/" + WORD] = torch.unique(torch.cat([rec["query/input_ids"].ravel(), rec["passage/input_ids"].ravel()]))
    return loss


def run(manifest, triplets, dtype, bug=None):
    """Every tensor of THEIRS, as numpy arrays by bundle name."""
    torch.manual_seed(0)
    tok, model = load(manifest, dtype, bug)
    rec = {}
    loss = forward(manifest, triplets, tok, model, bug, rec)
    loss.backward()
    out = {name: numpy(t) for name, t in rec.items()}
    for name, t in rec.items():
        if t.dtype.is_floating_point and t.retains_grad:
            out["grad/" + name] = numpy(t.grad)
    params = dict(model.named_parameters())
    trained = manifest["trained"]
    if bug == "averaged-gradient":
        for name in trained:
            params[name].grad /= 2
    rows = rec["rows/" + WORD]
    for name in trained:
        g = params[name].grad
        out["grad/" + name] = numpy(g[rows] if name == WORD else g)
    s = manifest["settings"]
    grads = [params[n] for n in trained]
    if s["max_grad_norm"]:
        norm = torch.nn.utils.clip_grad_norm_(grads, s["max_grad_norm"])
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
    out["grad_norm"] = np.asarray(float(norm), dtype=np.float64)
    adamw_step(model, s, trained, bug)
    for name in trained:
        out["updated/" + name] = numpy(params[name][rows] if name == WORD else params[name])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle folder written by python -m minihbt.check export")
    ap.add_argument("--out", required=True, help="the folder to write tensors.safetensors into")
    ap.add_argument("--dtype", choices=("float32", "float64"), help="default: the bundle's")
    ap.add_argument("--bug", choices=sorted(BUGS), help="inject a known mistake: " +
                    "; ".join(f"{k}: {v}" for k, v in BUGS.items()))
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.bundle, "manifest.json")):
        ap.error(f"--bundle {args.bundle}: no manifest.json in it")
    manifest, triplets = read_bundle(args.bundle)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype or manifest["dtype"]]
    out = run(manifest, triplets, dtype, args.bug)
    os.makedirs(args.out, exist_ok=True)
    save_file(out, os.path.join(args.out, "tensors.safetensors"), metadata={"written_by": "examples/torch_reference.py"})
    print(f"{args.out}: {len(out)} tensors, loss {float(out['loss']):.6f}" + (f" (bug: {args.bug})" if args.bug else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
