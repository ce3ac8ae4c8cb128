"""`python -m minihbt.check export --model DIR --out BUNDLE (--batch FILE.jsonl | --data PATH --sampler S
[--seed N --batch-size N --step N]) [--dtype float32|float64] [settings]`

Writes a golden bundle of ONE training step of minihbt's plain path on one batch (dropout
off): the batch, its tokens, the hidden states after the embeddings and every block, the
pooled and normalised embeddings, the scores, the loss, the gradients of all of them and of
every trained parameter, the gradient norm, and the parameters after one clipped AdamW step.
`python -m minihbt.check step BUNDLE THEIRS` then compares another implementation's tensors
with it and names the first that is out of tolerance. Layout and names: minihbt/check/bundle.py.

The batch: --batch FILE.jsonl (one triplet a line: {"query": ..., "positive": ..., "negatives":
[...], "query_lang": ..., "passage_lang": ...}; the languages are optional), or the batch of
training step --step of train.py with these --data, --sampler, --seed and --batch-size.
The other settings are train.py's, with its defaults; the AdamW constants are torch's.
Exit status 2 for a bad setting (one line naming the flag), 1 for an error while working.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Optional

from .. import __version__, cli
from ..batchlog import sampler_batches
from ..cli import AT_LEAST_0, AT_LEAST_1, POSITIVE, Range, setting
from ..config import ConfigError, ModelConfig
from ..encoder import WORD_TABLE
from ..files import git_info, sha256_file
from ..model import POOLINGS, load_model
from ..sampler import SAMPLERS
from ..step import CANDIDATES
from ..weights import checkpoint_files
from . import bundle
from .common import SamplerSettings, build_sampler, check_sampler_flags
from .golden import StepSettings, record_step

PROG = "python -m minihbt.check export"
DTYPES = ("float32", "float64")
SEMANTICS = [
    "tokens: each side one padded batch, tokenizer.json's special tokens, truncation to the side's max length",
    "candidates: every positive in triplet order, then every triplet's negatives in triplet order",
    "pooling mean: the mean of the last hidden states over the attention mask (special tokens included)",
    "scores: cosine / temperature; inbatch: row i's candidates are all positives and negatives, target column i; "
    "paper: the own positive and all negatives; in both a candidate with the target's text or an earlier "
    "candidate's text is masked",
    "loss: the mean over queries of -log softmax(row)[target]; symmetric: the mean of it and the passage -> query "
    "loss (positive i against the queries, target query i)",
    "dropout: off",
    "embeddings: the word table's pad_token_id row gets no gradient (torch nn.Embedding padding_idx), nor "
    "RoBERTa's position row pad_token_id",
    "attention key bias: its gradient is exactly 0 (a constant per softmax row); minihbt stores 0",
    "clipping: torch.nn.utils.clip_grad_norm_ over the trained parameters' gradients (0 disables it)",
    "AdamW: torch.optim.AdamW's update; no weight decay on biases and LayerNorm weights (Hugging Face Trainer)",
    "trained: every parameter but the pooler, unless pooling is 'pooler'",
]


@dataclass
class ExportSettings(SamplerSettings):
    """The bundle's settings: train.py's, with its defaults; the AdamW constants are torch's."""
    model: str = setting(None, "Hugging Face model folder (config.json, model.safetensors, tokenizer.json)",
                         metavar="DIR", required=True)
    out: str = setting(None, "the bundle folder to write", metavar="BUNDLE", required=True)
    overwrite: bool = setting(False, "write into --out even if it holds files")
    batch: Optional[str] = setting(None, "the batch: a .jsonl file, one triplet a line", metavar="FILE")
    data: Optional[List[str]] = setting(None, "training data as train.py's --train, repeatable; with --sampler",
                                        repeat=True, metavar="PATH")
    sampler: Optional[str] = setting(None, "with --data: xx, xy or hybrid", choices=SAMPLERS)
    seed: int = setting(0, "seed of the batches", accepted=AT_LEAST_0)
    batch_size: int = setting(8, "triplets per batch", accepted=AT_LEAST_1)
    max_negatives: int = setting(1, "hard negatives per triplet", accepted=AT_LEAST_0)
    step: int = setting(1, "take the batch of train.py's step N (from 1)", accepted=AT_LEAST_1)
    max_query_len: Optional[int] = setting(None, "query truncation in tokens, at most the model's positions",
                                           accepted=Range(2), default_text="64")
    max_passage_len: Optional[int] = setting(None, "passage truncation in tokens, at most the model's positions",
                                             accepted=Range(2), default_text="256")
    temperature: float = setting(0.05, "InfoNCE temperature", accepted=POSITIVE)
    lr: float = setting(3e-5, "AdamW learning rate", accepted=POSITIVE)
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorm weights)", accepted=AT_LEAST_0)
    beta1: float = setting(0.9, "AdamW beta1, in [0, 1)")           # [0, 1), a Range is closed: checked by hand
    beta2: float = setting(0.999, "AdamW beta2, in [0, 1)")
    adam_eps: float = setting(1e-8, "AdamW eps", accepted=AT_LEAST_0)
    max_grad_norm: float = setting(1.0, "clipping; 0 disables", accepted=AT_LEAST_0)
    candidates: str = setting("inbatch", "as train.py", choices=CANDIDATES)
    symmetric: bool = setting(False, "add the passage -> query loss term")
    pooling: Optional[str] = setting(None, "pooling", choices=POOLINGS, default_text="the checkpoint's own, else mean")
    dtype: str = setting("float32", "compute dtype (float64 shows differences float32 rounding hides)", choices=DTYPES)


def check_args(argv):
    """(settings, lowered, triplets): every setting before anything is loaded, one line per
    problem, exit status 2; `lowered` says which default lengths the model's positions cut;
    `triplets`: the --batch file's."""
    problems = cli.Problems()
    args, given = cli.parse_settings(PROG, __doc__, ExportSettings, argv, problems)
    lowered = check_model_config(args, problems) if cli.check_input_dir("--model", args.model, problems) else []
    if (args.batch is None) == (args.data is None):
        problems.add("the batch: expected --batch FILE.jsonl, or --data PATH with --sampler (not both)")
    elif args.data is not None and args.sampler is None:
        problems.add("--data: needs --sampler xx|xy|hybrid")
    elif args.data is not None:
        check_sampler_flags(args, given, problems)
    elif not os.path.isfile(args.batch):
        problems.add(f"--batch {args.batch}: no such file; expected a .jsonl file, one triplet a line")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            problems.bad_value(f"--{name}", getattr(args, name), "a number in [0, 1)")
    if os.path.isfile(args.out):
        problems.add(f"--out {args.out}: a file; expected a folder for the bundle")
    elif os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        problems.add(f"--out {args.out}: holds files already; add --overwrite to write the bundle into it")
    problems.stop_if_any()
    return args, lowered, read_batch_file(args.batch) if args.batch is not None else None


def check_model_config(args, problems):
    """config.json readable, and the truncation lengths within its positions, as train.py: one
    given above them is refused, a default (64 for queries, 256 for passages) lowered to them
    (returns a line saying so for each)."""
    try:
        config = ModelConfig.from_file(os.path.join(args.model, "config.json"))
    except ConfigError as e:
        problems.add(f"--model {args.model}: {cli.one_line(e)}")
        return []
    positions = config.max_length
    lowered = []
    for flag, name, default in (("--max-query-len", "max_query_len", 64), ("--max-passage-len", "max_passage_len", 256)):
        value = getattr(args, name)
        if value is not None and config.length_problem(value):
            problems.bad_value(flag, value, config.length_problem(value))
        if value is None and default > positions:
            lowered.append(f"{flag}'s default {default} lowered to this model's {positions} positions")
        setattr(args, name, min(default if value is None else value, positions))
    return lowered


def read_batch_file(path):
    """The triplets of a --batch file as dicts; one line naming the line and field otherwise."""
    triplets = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--batch {path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise cli.Stop(cli.EXIT_USAGE, f"error: {where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise cli.Stop(cli.EXIT_USAGE, f"error: {where}: expected an object with query, positive, negatives")
            negatives = obj.get("negatives", [])
            texts_ok = all(isinstance(obj.get(k), str) and obj[k] for k in ("query", "positive"))
            if not texts_ok or not isinstance(negatives, list) or not all(isinstance(t, str) and t for t in negatives):
                raise cli.Stop(cli.EXIT_USAGE, f"error: {where}: expected non-empty strings query and positive and a "
                                               "list of non-empty strings negatives")
            triplets.append({"query": obj["query"], "positive": obj["positive"], "negatives": negatives,
                             "query_lang": obj.get("query_lang"), "passage_lang": obj.get("passage_lang")})
    if not triplets:
        raise cli.Stop(cli.EXIT_USAGE, f"error: --batch {path}: no triplets in it")
    return triplets


def sampled_batch(args):
    """(triplet dicts, batch description) of train.py's step --step on --data."""
    sampler = build_sampler(args)
    *_, batch = sampler_batches(sampler, args.step)
    triplets = [{"query": t.query, "positive": t.positive, "negatives": list(t.negatives), "query_lang": t.query_lang,
                 "passage_lang": t.passage_lang, "group": t.group} for t in batch.triplets]
    origin = {name: getattr(args, name) for name in ("data", "sampler", "alpha", "xx_weighting", "seed", "batch_size",
                                                      "max_negatives", "step")}
    return triplets, {"kind": batch.kind, "source": batch.source, "lang": batch.lang, "origin": origin}


def batch_kind(triplets):
    """xx when every triplet's languages are given and one language; xy when each triplet's two differ."""
    pairs = [(t.get("query_lang"), t.get("passage_lang")) for t in triplets]
    if any(None in p for p in pairs):
        return None
    if len({lang for p in pairs for lang in p}) == 1:
        return "xx"
    return "xy" if all(a != b for a, b in pairs) else None


def build_manifest(model, s, dtype, triplets, batch_info):
    git = git_info(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    c = model.config
    files = {os.path.relpath(p, model.path): sha256_file(p) for p in checkpoint_files(model.path)}
    n_cands = len(triplets) + sum(len(t["negatives"]) for t in triplets)
    full = list(model.params[WORD_TABLE].shape)
    return {
        "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
        "created_by": {"program": PROG, "minihbt": __version__, "git_commit": git["commit"], "git_dirty": git["dirty"]},
        "model": {"path": os.path.abspath(model.path), "sha256": files, "model_type": c.model_type,
                  "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
                  "num_attention_heads": c.num_attention_heads, "vocab_size": c.vocab_size,
                  "layer_norm_eps": c.layer_norm_eps, "pad_token_id": c.pad_token_id, "max_length": model.max_length},
        "dtype": dtype,
        "settings": {"query_prefix": model.prefixes["query"], "passage_prefix": model.prefixes["passage"],
                     "max_query_length": s.max_query_length, "max_passage_length": s.max_passage_length,
                     "pooling": model.pooling, "temperature": s.temperature, "candidates": s.candidates,
                     "symmetric": s.symmetric, "dropout": False, "lr": s.lr, "betas": list(s.betas), "eps": s.eps,
                     "weight_decay": s.weight_decay, "max_grad_norm": s.max_grad_norm},
        "semantics": SEMANTICS,
        "batch": {"file": bundle.BATCH, "triplets": len(triplets), "candidates": n_cands, **batch_info},
        "trained": model.trainable_names(),
        "row_stored": {name: {"rows": bundle.WORD_ROWS, "full_shape": full} for name in bundle.ROW_STORED},
        "other_rows": "a word-table row not in rows/...: gradient 0, after the step p * (1 - lr * weight_decay)",
        "rule": bundle.RULE, "tolerances": bundle.tolerances(s.lr, s.temperature),
        "tolerance_why": {family: why for family, (_, _, why) in bundle.TOLERANCES.items()},
    }


@cli.program(PROG)
def main(argv=None):
    args, lowered, triplets = check_args(argv)
    if args.batch is not None:
        batch_info = {"kind": batch_kind(triplets), "source": None, "origin": {"batch": os.path.abspath(args.batch)}}
    else:
        triplets, batch_info = sampled_batch(args)
    model = load_model(args.model, dtype=args.dtype, pooling=args.pooling)
    s = StepSettings(args.max_query_len, args.max_passage_len, args.temperature, args.candidates, args.symmetric, args.lr,
                     (args.beta1, args.beta2), args.adam_eps, args.weight_decay, args.max_grad_norm)
    tensors = record_step(model, [(t["query"], t["positive"], t["negatives"]) for t in triplets], s)
    order = bundle.tensor_order(model.config.num_hidden_layers, model.trainable_names())
    bundle.write_bundle(args.out, build_manifest(model, s, args.dtype, triplets, batch_info), triplets, tensors, order)
    print(f"{args.out}: one step of {len(triplets)} triplets ({batch_info['kind'] or 'unknown kind'}, {args.dtype}), "
          f"loss {float(tensors['loss']):.6f}, gradient norm {float(tensors['grad_norm']):.4g}, {len(order)} tensors")
    print(f"match manifest.json's settings, not the flags' defaults: max lengths {s.max_query_length}/"
          f"{s.max_passage_length}, prefixes {model.prefixes['query']!r}/{model.prefixes['passage']!r}, pooling "
          f"{model.pooling}, temperature {s.temperature}, candidates {s.candidates}, symmetric {s.symmetric}, lr {s.lr}, "
          f"weight decay {s.weight_decay}, max grad norm {s.max_grad_norm}"
          + "".join(f"; {note}" for note in lowered))
    return 0
