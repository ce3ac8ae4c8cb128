"""One training step with FlagEmbedding's own fine-tuning code, for `python -m minihbt.check step`
to compare with a golden bundle.

    python -m minihbt.check export --model weights/multilingual-e5-small --batch batch.jsonl \\
        --pooling cls --temperature 0.02 --max-query-len 32 --max-passage-len 128 --out golden
    python examples/flagembedding_step.py --bundle golden --out theirs-flag
    python -m minihbt.check step golden theirs-flag

Needs torch and FlagEmbedding (`pip install FlagEmbedding` beside torch); never imports minihbt.

FlagEmbedding's EncoderOnlyEmbedderRunner is built from the bundle (the runner loads the
tokenizer and its BiEncoderOnlyEmbedderModel, reads the batch through its train dataset and
collator, and makes its trainer). The bundle's settings become FlagEmbedding's arguments, under
the names its command line uses:

    model_name_or_path                  the bundle's model folder
    train_data                          batch.jsonl as FlagEmbedding's {"query", "pos": [positive], "neg": [...]}
    train_group_size                    1 + the number of negatives (every triplet must have the same)
    query_max_len, passage_max_len      the bundle's max lengths
    query_instruction_for_retrieval,    the bundle's prefixes ("query: ", "passage: "), with the
    passage_instruction_for_retrieval   default formats "{}{}": prefix + text
    sentence_pooling_method             cls or mean, the bundle's pooling
    normalize_embeddings, temperature   True (cosine scores), the bundle's temperature
    learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm

Left to itself FlagEmbedding differs from minihbt's defaults: temperature 0.02 (minihbt 0.05),
CLS pooling (mean), no prefixes, 32/128 tokens (64/256), and the Hugging Face Trainer's lr 5e-5
and weight decay 0 (3e-5, 0.01).

The step is the one HF Trainer's training_step takes, written out so that the tensors in
between can be kept: the batch's items from the runner's dataset in batch.jsonl's order (the
trainer's sampler would shuffle them) through its collator; dropout set to 0 (the bundle has
none; FlagEmbedding computes its loss only in train mode, so eval() cannot turn it off); the
trainer's compute_loss (the model's forward: encode both sides, compute_score, cross-entropy
with target i * train_group_size); backward; torch.nn.utils.clip_grad_norm_ (as the trainer
does through accelerate); and the optimizer the trainer makes (create_optimizer: AdamW, no
weight decay on biases and LayerNorm weights) stepped once at the full learning rate, as the
first step of its linear schedule without warmup is.

What FlagEmbedding's layout means for the comparison:
- its passages come in groups, triplet by triplet (the positive, then the negatives in the order
  its dataset samples them); they are put into the bundle's order here (every positive, then
  every triplet's negatives) before writing;
- it masks nothing: a negative whose text is another triplet's positive stays in the softmax.
  The mask written is all ones, so `step` names `mask` on such a batch;
- it has no `paper` candidates, no symmetric loss and no pooler pooling: such bundles are refused.

--cross-device N: N processes on the CPU (torch.distributed with gloo) and FlagEmbedding's
negatives_cross_device. Rank r takes triplets r*B/N to (r+1)*B/N - 1; the model gathers every
rank's embeddings (torch.distributed.all_gather, which carries no gradient: each rank's loss
reaches only its own rows), each rank computes the whole batch's loss, and the trainer's DDP
wrapper averages the ranks' gradients. Rank 0 writes the tokens (re-padded to one batch), the
pooled and normalised embeddings and their gradients (gathered), the scores, mask, loss, every
parameter gradient and the update; not the hidden states (each rank pads only its own triplets).
"""
import argparse
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import warnings

try:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from safetensors.numpy import save_file
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments, EncoderOnlyEmbedderModelArguments, EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments)
    MISSING = None
except ImportError as e:                # said in one line by main()
    MISSING = e

WORD = "embeddings.word_embeddings.weight"


class Refused(Exception):
    """A bundle this example cannot represent with FlagEmbedding."""


def read_bundle(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, manifest["batch"]["file"]), encoding="utf-8") as f:
        triplets = [json.loads(line) for line in f if line.strip()]
    return manifest, triplets


def group_size(manifest, triplets, world):
    """FlagEmbedding's train_group_size for the batch; Refused if FlagEmbedding cannot express it."""
    s = manifest["settings"]
    if s["candidates"] != "inbatch" or s["symmetric"] or s["pooling"] not in ("cls", "mean"):
        raise Refused(f"FlagEmbedding has in-batch candidates, one direction and cls/mean pooling; the bundle has "
                      f"{s['candidates']}, symmetric {s['symmetric']}, pooling {s['pooling']}")
    k = {len(t["negatives"]) for t in triplets}
    if len(k) != 1:
        raise Refused(f"FlagEmbedding needs every triplet to have the same number of negatives (train_group_size), "
                      f"the batch has {sorted(k)}")
    if len(triplets) % world:
        raise Refused(f"--cross-device {world}: the batch's {len(triplets)} triplets do not split evenly")
    return 1 + k.pop()


def make_runner(manifest, triplets, group, world, tmp):
    """FlagEmbedding's runner for the bundle: the settings as its arguments (see the docstring)."""
    s = manifest["settings"]
    os.makedirs(tmp, exist_ok=True)
    data = os.path.join(tmp, "batch.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for t in triplets:
            f.write(json.dumps({"query": t["query"], "pos": [t["positive"]], "neg": t["negatives"]},
                               ensure_ascii=False) + "\n")
    model_args = EncoderOnlyEmbedderModelArguments(model_name_or_path=manifest["model"]["path"])
    data_args = EncoderOnlyEmbedderDataArguments(
        train_data=[data], cache_path=os.path.join(tmp, "cache"), train_group_size=group,
        query_max_len=s["max_query_length"], passage_max_len=s["max_passage_length"],
        query_instruction_for_retrieval=s["query_prefix"], passage_instruction_for_retrieval=s["passage_prefix"])
    training_args = EncoderOnlyEmbedderTrainingArguments(
        output_dir=os.path.join(tmp, "out"), use_cpu=True, report_to="none", seed=0,
        per_device_train_batch_size=len(triplets) // world, negatives_cross_device=world > 1,
        sentence_pooling_method=s["pooling"], normalize_embeddings=True, temperature=s["temperature"],
        learning_rate=s["lr"], weight_decay=s["weight_decay"], adam_beta1=s["betas"][0], adam_beta2=s["betas"][1],
        adam_epsilon=s["eps"], max_grad_norm=s["max_grad_norm"])
    return EncoderOnlyEmbedderRunner(model_args=model_args, data_args=data_args, training_args=training_args)


class Capture:
    """Keeps, with retain_grad, what FlagEmbedding's model computes: per encode call (the queries,
    then the passages) the hidden states (the embeddings' output, then each block's), the pooled
    and the normalised embeddings; and the scores compute_score returns."""

    def __init__(self, model):
        self.sides, self.scores = [], None
        model.model.embeddings.register_forward_hook(self.keep_hidden)
        for block in model.model.encoder.layer:
            block.register_forward_hook(self.keep_hidden)
        encode, pool, score = model.encode, model._sentence_embedding, model.compute_score

        def encode_and_keep(features):
            self.sides.append({"hidden": []})
            self.sides[-1]["normalized"] = self.keep(encode(features))
            return self.sides[-1]["normalized"]

        def pool_and_keep(last_hidden_state, attention_mask):
            self.sides[-1]["pooled"] = self.keep(pool(last_hidden_state, attention_mask))
            return self.sides[-1]["pooled"]

        def score_and_keep(q_reps, p_reps):
            self.scores = self.keep(score(q_reps, p_reps))
            return self.scores

        model.encode, model._sentence_embedding, model.compute_score = encode_and_keep, pool_and_keep, score_and_keep

    @staticmethod
    def keep(t):
        t.retain_grad()
        return t

    def keep_hidden(self, module, inputs, out):
        self.sides[-1]["hidden"].append(self.keep(out[0] if isinstance(out, tuple) else out))  # transformers 4: tuples


def bundle_order(groups, triplets, s):
    """order[c]: where the bundle's candidate c is among FlagEmbedding's passages. groups[i] is
    triplet i's passages as its dataset laid them out: the positive, then the negatives in the
    order it sampled them (found here by their text)."""
    G = len(groups[0])
    order = [i * G for i in range(len(groups))]                       # the positives
    for i, t in enumerate(triplets):
        assert groups[i][0] == s["passage_prefix"] + t["positive"]
        free = list(range(1, G))
        for negative in t["negatives"]:
            j = next(j for j in free if groups[i][j] == s["passage_prefix"] + negative)
            free.remove(j)
            order.append(i * G + j)
    return order


def numpy(t):
    return t.detach().cpu().numpy().copy(order="C")


def repad(arrays, value):
    """[n_r, T_r] arrays, one per rank -> one [sum n_r, max T_r] array padded with `value`."""
    T = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=value) for a in arrays])


def forward_backward(runner, manifest, triplets, rank, world):
    """This rank's step up to the gradients: (its tensors as numpy arrays, its passages' texts)."""
    model, trained = runner.model, manifest["trained"]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, p in model.model.named_parameters():
        p.requires_grad_(name in trained)
    capture = Capture(model)
    b = len(triplets) // world
    items = [runner.train_dataset[i] for i in range(rank * b, (rank + 1) * b)]        # (query, passages, None)
    batch = runner.data_collator(items)
    wrapped = runner.trainer.accelerator.prepare_model(model) if world > 1 else model   # DDP when N > 1
    loss = runner.trainer.compute_loss(wrapped, batch)
    loss.backward()                                                   # DDP averages the ranks' gradients here
    mine = {"loss": numpy(loss), "scores": numpy(capture.scores), "grad/scores": numpy(capture.scores.grad)}
    for side, features, kept in zip(("query", "passage"), (batch["queries"], batch["passages"]), capture.sides):
        mine[f"{side}/input_ids"], mine[f"{side}/attention_mask"] = numpy(features["input_ids"]), \
            numpy(features["attention_mask"])
        named = {"embeddings": kept["hidden"][0], "pooled": kept["pooled"], "normalized": kept["normalized"]}
        named.update({f"encoder.layer.{i}.output": h for i, h in enumerate(kept["hidden"][1:])})
        for name, t in named.items():
            mine[f"{side}/{name}"], mine[f"grad/{side}/{name}"] = numpy(t), numpy(t.grad)
    return mine, [passages for _, passages, _ in items]


def update(runner, manifest, rows):
    """Parameter gradients, clipping and one step of the trainer's own optimizer."""
    s, trained = manifest["settings"], manifest["trained"]
    params = dict(runner.model.model.named_parameters())
    out = {"grad/" + n: numpy(params[n].grad[rows] if n == WORD else params[n].grad) for n in trained}
    grads = [params[n] for n in trained]
    if s["max_grad_norm"]:
        norm = torch.nn.utils.clip_grad_norm_(grads, s["max_grad_norm"])
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
    out["grad_norm"] = np.asarray(float(norm), dtype=np.float64)
    runner.trainer.create_optimizer().step()                          # HF Trainer's AdamW and decay groups
    for n in trained:
        out["updated/" + n] = numpy(params[n][rows] if n == WORD else params[n])
    return out


def run(rank, world, manifest, triplets, dtype, tmp):
    """One rank's step; rank 0 returns every tensor FlagEmbedding's step exposes, by bundle name."""
    if world > 1:           # what torchrun sets; the runner's TrainingArguments start gloo from it
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    quiet()
    runner = make_runner(manifest, triplets, group_size(manifest, triplets, world), world,
                         os.path.join(tmp, f"rank{rank}"))
    runner.model.to(dtype)
    mine, groups = forward_backward(runner, manifest, triplets, rank, world)
    shards = [(mine, groups)]
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, (mine, groups))
    s, B = manifest["settings"], len(triplets)
    order = bundle_order([g for _, gs in shards for g in gs], triplets, s)
    out = {"loss": mine["loss"], "scores": mine["scores"][:, order], "grad/scores": mine["grad/scores"][:, order]}
    out["mask"] = np.ones(out["scores"].shape, dtype=np.int64)       # FlagEmbedding counts every candidate
    pad = runner.tokenizer.pad_token_id
    for side, rows in (("query", list(range(B))), ("passage", order)):
        out[f"{side}/input_ids"] = repad([m[f"{side}/input_ids"] for m, _ in shards], pad)[rows]
        out[f"{side}/attention_mask"] = repad([m[f"{side}/attention_mask"] for m, _ in shards], 0)[rows]
        kept = [n for n in mine if n.startswith(f"{side}/") and "input_ids" not in n and "attention_mask" not in n]
        if world > 1:                                                 # each rank padded its own triplets
            kept = [n for n in kept if n.endswith(("/pooled", "/normalized"))]
        for name in kept:
            out[name] = np.concatenate([m[name] for m, _ in shards])[rows]
            out["grad/" + name] = np.concatenate([m["grad/" + name] for m, _ in shards])[rows]
    out["rows/" + WORD] = np.unique(np.concatenate([out["query/input_ids"].ravel(), out["passage/input_ids"].ravel()]))
    out.update(update(runner, manifest, torch.from_numpy(out["rows/" + WORD])))
    if world > 1:            # the trainer's accelerator holds the DDP wrapper: freed after the process
        del runner           # group, it hangs the process at exit
        gc.collect()
        dist.destroy_process_group()
    return out if rank == 0 else None


def rank_main(rank, world, manifest, triplets, dtype, tmp, out_dir):
    """A process of --cross-device N: its rank's step; rank 0 writes."""
    out = run(rank, world, manifest, triplets, dtype, tmp)
    if rank == 0:
        write(out, out_dir, world)


def write(out, out_dir, world):
    os.makedirs(out_dir, exist_ok=True)
    out = {name: a.copy(order="C") for name, a in out.items()}        # a[:, order] may be column-major
    save_file(out, os.path.join(out_dir, "tensors.safetensors"),
              metadata={"written_by": "examples/flagembedding_step.py", "cross_device": str(world)})
    print(f"{out_dir}: {len(out)} tensors, loss {float(out['loss']):.6f}" +
          (f" ({world} ranks, negatives_cross_device)" if world > 1 else ""))


def quiet():
    """The runner logs its arguments at INFO, datasets and transformers draw progress bars, and the
    collator's padding warns on every batch that max_length is ignored; keep the rest."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
    for name in ("FlagEmbedding", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle folder written by python -m minihbt.check export")
    ap.add_argument("--out", required=True, help="the folder to write tensors.safetensors into")
    ap.add_argument("--dtype", choices=("float32", "float64"), help="default: the bundle's")
    ap.add_argument("--cross-device", type=int, default=1, dest="world", metavar="N",
                    help="N processes on the CPU (gloo) with FlagEmbedding's negatives_cross_device "
                         "(default 1: one process)")
    args = ap.parse_args(argv)
    if MISSING is not None:
        print(f"{ap.prog}: error: this example needs torch and FlagEmbedding ({MISSING}): "
              f"pip install FlagEmbedding (beside torch)", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.bundle, "manifest.json")):
        ap.error(f"--bundle {args.bundle}: no manifest.json in it")
    if args.world < 1:
        ap.error(f"--cross-device {args.world}: expected an integer >= 1")
    manifest, triplets = read_bundle(args.bundle)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype or manifest["dtype"]]
    try:
        group_size(manifest, triplets, args.world)
    except Refused as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.world == 1:
            write(run(0, 1, manifest, triplets, dtype, tmp), args.out, 1)
        else:
            with socket.socket() as free:                             # a free port for the ranks to meet on
                free.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free.getsockname()[1]))
            mp.spawn(rank_main, args=(args.world, manifest, triplets, dtype, tmp, args.out), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
