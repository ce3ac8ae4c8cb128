"""One training step with sentence-transformers' MultipleNegativesRankingLoss (MNRL), for
`python -m minihbt.check step` to compare with a golden bundle.

    python examples/sentence_transformers_mnrl.py --bundle golden --out theirs-mnrl
    python -m minihbt.check step golden theirs-mnrl

The model is the bundle's folder as a SentenceTransformer (Transformer, Pooling, Normalize),
in eval mode (dropout off); the loss is MNRL with scale = 1 / temperature and its default
cos_sim (MNRL's symmetric form, directions query_to_doc + doc_to_query averaged per direction,
when the bundle is symmetric); then torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW
with Hugging Face Trainer's no-decay groups. Never imports minihbt.

What MNRL's layout means for the comparison:
- its input is columns (anchor, positive, negative_1, ..., negative_k): every triplet must have
  the same number of negatives k, and its candidates are ordered column by column (all
  positives, all first negatives, all second negatives, ...), while the bundle orders the
  negatives triplet by triplet. With k = 1 the two agree; otherwise the columns are permuted
  into the bundle's order here before writing;
- it masks nothing: a batch with a repeated text (which minihbt masks) is refused, as is the
  bundle's `paper` denominator and a pooler pooling;
- the columns are tokenized one by one (each padded to its own longest text), so the passage
  side's hidden states are not those of one padded batch: written are the tokens (re-padded),
  the pooled and normalised embeddings, the gradient of the pooled ones, the scores and their
  gradient, the loss, every parameter's gradient, the gradient norm and the parameters after
  the step. Not the gradient of the normalised embeddings: cos_sim normalises again, so its
  gradient there is the bundle's minus its radial part (the pooled one is the same);
- the word table's gradient and update are written as the rows the batch uses, as the bundle.
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

try:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from sentence_transformers.util import cos_sim
except ImportError as e:
    print("examples/sentence_transformers_mnrl.py needs torch and sentence-transformers (pip install torch "
          f"sentence-transformers): {e}", file=sys.stderr)
    sys.exit(2)

WORD = "embeddings.word_embeddings.weight"


class Refused(Exception):
    """A bundle this example cannot represent with MNRL."""


def read_bundle(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, manifest["batch"]["file"]), encoding="utf-8") as f:
        triplets = [json.loads(line) for line in f if line.strip()]
    return manifest, triplets


def columns_of(manifest, triplets):
    """MNRL's columns: anchors, positives, negatives 1..k; Refused if MNRL cannot express the batch."""
    s = manifest["settings"]
    if s["candidates"] != "inbatch" or s["pooling"] == "pooler":
        raise Refused(f"MNRL has in-batch candidates and mean/cls pooling, the bundle {s['candidates']} and "
                      f"{s['pooling']}")
    k = {len(t["negatives"]) for t in triplets}
    if len(k) != 1:
        raise Refused(f"MNRL needs every triplet to have the same number of negatives, the batch has {sorted(k)}")
    k = k.pop()
    anchors = [s["query_prefix"] + t["query"] for t in triplets]
    columns = [anchors, [s["passage_prefix"] + t["positive"] for t in triplets]]
    columns += [[s["passage_prefix"] + t["negatives"][j] for t in triplets] for j in range(k)]
    candidates = [x for col in columns[1:] for x in col]
    if len(set(candidates)) < len(candidates) or len(set(anchors)) < len(anchors):
        raise Refused("the batch repeats a text, which minihbt masks and MNRL does not")
    return columns, k


def build(manifest, dtype):
    path, s = manifest["model"]["path"], manifest["settings"]
    transformer = Transformer(path, model_kwargs={"attn_implementation": "eager"})
    dim = transformer.auto_model.config.hidden_size
    model = SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode=s["pooling"]), Normalize()],
                                device="cpu").to(dtype)
    model.eval()                                                      # dropout off
    for name, p in transformer.auto_model.named_parameters():
        p.requires_grad_(name in manifest["trained"])
    return model


class Capture:
    """Keeps (with retain_grad) the pooled and normalised embeddings of every forward call, and
    the cosine matrices MNRL's similarity function returns."""

    def __init__(self, model):
        self.pooled, self.normalized, self.cosines = [], [], []
        model[1].register_forward_hook(lambda m, i, out: self.keep(self.pooled, out["sentence_embedding"]))
        model[2].register_forward_hook(lambda m, i, out: self.keep(self.normalized, out["sentence_embedding"]))

    @staticmethod
    def keep(where, t):
        t.retain_grad()
        where.append(t)

    def similarity(self, a, b):
        cos = cos_sim(a, b)
        self.keep(self.cosines, cos)
        return cos


def repad(ids_list, masks, pad_id):
    """Column-wise padded [B, T_j] tokens -> one batch padded to the longest."""
    T = max(x.shape[1] for x in ids_list)
    ids = torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_id) for x in ids_list])
    mask = torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=0) for x in masks])
    return ids, mask


def numpy(t):
    return t.detach().cpu().numpy().copy(order="C")


def step_tensors(manifest, columns, k, model, capture):
    """The forward and the loss through MNRL; the bundle's forward tensors and the loss."""
    s, B = manifest["settings"], len(columns[0])
    features = []
    for j, col in enumerate(columns):
        model.max_seq_length = s["max_query_length"] if j == 0 else s["max_passage_length"]
        features.append(model.preprocess(col))
    directions = ("query_to_doc", "doc_to_query") if s["symmetric"] else ("query_to_doc",)
    mnrl = MultipleNegativesRankingLoss(model, scale=1.0 / s["temperature"], similarity_fct=capture.similarity,
                                        directions=directions, partition_mode="per_direction")
    loss = mnrl(features, None)
    order = list(range(B)) + [B + j * B + i for i in range(B) for j in range(k)]     # bundle column -> MNRL's
    pad = model.tokenizer.pad_token_id
    rec = {"loss": loss}
    rec["query/input_ids"], rec["query/attention_mask"] = features[0]["input_ids"], features[0]["attention_mask"]
    ids, mask = repad([f["input_ids"] for f in features[1:]], [f["attention_mask"] for f in features[1:]], pad)
    rec["passage/input_ids"], rec["passage/attention_mask"] = ids[order], mask[order]
    rec["rows/" + WORD] = torch.unique(torch.cat([rec["query/input_ids"].ravel(), ids.ravel()]))
    return loss, rec, order


def run(manifest, triplets, dtype):
    """Every tensor MNRL's step exposes, as numpy arrays by bundle name."""
    columns, k = columns_of(manifest, triplets)
    s, B = manifest["settings"], len(triplets)
    model = build(manifest, dtype)
    capture = Capture(model)
    loss, rec, order = step_tensors(manifest, columns, k, model, capture)
    loss.backward()
    out = {name: numpy(t) for name, t in rec.items()}
    for what, kept in (("pooled", capture.pooled), ("normalized", capture.normalized)):
        rows = torch.cat(kept)                                    # anchors, positives, negatives by column
        out[f"query/{what}"], out[f"passage/{what}"] = numpy(rows[:B]), numpy(rows[B:][order])
        if what == "pooled":
            grads = torch.cat([t.grad for t in kept])
            out["grad/query/pooled"], out["grad/passage/pooled"] = numpy(grads[:B]), numpy(grads[B:][order])
    cos = capture.cosines[0]
    d_cos = cos.grad.clone()
    if s["symmetric"]:                                            # doc_to_query: cos(q_j, d_i) is cos[j, i]
        d_cos[:, :B] += capture.cosines[1].grad
    out["scores"] = numpy(cos[:, order] / s["temperature"])
    out["grad/scores"] = numpy(d_cos[:, order] * s["temperature"])     # scores = cos / temperature
    out["mask"] = np.ones(out["scores"].shape, dtype=np.int64)   # MNRL counts every candidate
    out.update(update(manifest, model, rec["rows/" + WORD]))
    return out


def update(manifest, model, rows):
    """Parameter gradients, clipping and torch.optim.AdamW (no decay on biases and LayerNorm weights)."""
    s, trained = manifest["settings"], manifest["trained"]
    params = dict(model[0].auto_model.named_parameters())
    out = {"grad/" + n: numpy(params[n].grad[rows] if n == WORD else params[n].grad) for n in trained}
    grads = [params[n] for n in trained]
    if s["max_grad_norm"]:
        norm = torch.nn.utils.clip_grad_norm_(grads, s["max_grad_norm"])
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
    out["grad_norm"] = np.asarray(float(norm), dtype=np.float64)
    exempt = [n.endswith("bias") or "LayerNorm" in n for n in trained]
    groups = [{"params": [params[n] for n, e in zip(trained, exempt) if not e], "weight_decay": s["weight_decay"]},
              {"params": [params[n] for n, e in zip(trained, exempt) if e], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"]).step()
    for n in trained:
        out["updated/" + n] = numpy(params[n][rows] if n == WORD else params[n])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle folder written by python -m minihbt.check export")
    ap.add_argument("--out", required=True, help="the folder to write tensors.safetensors into")
    ap.add_argument("--dtype", choices=("float32", "float64"), help="default: the bundle's")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.bundle, "manifest.json")):
        ap.error(f"--bundle {args.bundle}: no manifest.json in it")
    manifest, triplets = read_bundle(args.bundle)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype or manifest["dtype"]]
    try:
        out = run(manifest, triplets, dtype)
    except Refused as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    save_file(out, os.path.join(args.out, "tensors.safetensors"),
              metadata={"written_by": "examples/sentence_transformers_mnrl.py"})
    print(f"{args.out}: {len(out)} tensors, loss {float(out['loss']):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
