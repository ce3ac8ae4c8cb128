"""The golden bundle of one training step: its tensor names, their order, their tolerances, and
reading and writing it. `export` writes a bundle, `step` compares another implementation's
tensors with one (docs/check-your-implementation.md).

A bundle is a folder:

    manifest.json          format, versions, model and its sha256, dtype, every setting, the
                           tensors in comparison order with their families, the tolerances
    batch.jsonl            the batch: one triplet a line (query, positive, negatives, languages)
    forward.safetensors    token ids and masks, hidden states, embeddings, scores, loss
    backward.safetensors   gradients: of the scores, the embeddings, each block's output, and
                           every trained parameter (under its Hugging Face name)
    update.safetensors     the gradient norm and every trained parameter after one clipped AdamW step

Names (S is `query` or `passage`; P a Hugging Face parameter name):

    S/input_ids, S/attention_mask       [n, T] the padded tokens of a side (passage: every
                                        positive, then every triplet's negatives)
    rows/embeddings.word_embeddings.weight   [R] the word-table rows the batch uses (sorted ids)
    S/embeddings                        [n, T, H] after the embeddings' LayerNorm
    S/encoder.layer.i.output            [n, T, H] after block i
    S/pooled, S/normalized              [n, H] pooled; L2-normalised
    scores [B, M] = q c^T / temperature (before masking); mask [B, M] 1 where a candidate
    counts; loss []
    grad/scores, grad/S/normalized, grad/S/pooled, grad/S/encoder.layer.i.output, grad/S/embeddings
    grad/P                              the loss's gradient (before clipping)
    grad_norm []                        the global L2 norm clipping saw
    updated/P                           P after the step

The word table's gradient and update are stored as the rows named by
`rows/embeddings.word_embeddings.weight` only; every other row has a zero gradient, so AdamW
only decays it: p * (1 - lr * weight_decay).

Comparison order: forward (inputs, each side's layers, pooling, scores, loss), then backward
as it runs: the scores' gradient, the embeddings', then block L-1 (the gradient at its output,
then its parameters' gradients) down to block 0, the embeddings' LayerNorm and tables; then
the update. The first tensor out of tolerance is where an implementation diverges.
"""
import glob
import json
import os

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .. import cli
from ..encoder import WORD_TABLE
from ..files import atomic_path, write_json

FORMAT, FORMAT_VERSION = "minihbt-step-bundle", 1
MANIFEST, BATCH = "manifest.json", "batch.jsonl"
FILES = {"forward": "forward.safetensors", "backward": "backward.safetensors", "update": "update.safetensors"}
SIDES = ("query", "passage")
WORD_ROWS = "rows/" + WORD_TABLE
ROW_STORED = ("grad/" + WORD_TABLE, "updated/" + WORD_TABLE)
RULE = "max|theirs - ours| <= tol * max(1, max|ours|)"

# Each block's parameters in the order block_backward computes their gradients.
BLOCK_BACKWARD = ("output.LayerNorm.weight", "output.LayerNorm.bias", "output.dense.weight", "output.dense.bias",
                  "intermediate.dense.weight", "intermediate.dense.bias", "attention.output.LayerNorm.weight",
                  "attention.output.LayerNorm.bias", "attention.output.dense.weight", "attention.output.dense.bias",
                  "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight",
                  "attention.self.key.bias", "attention.self.value.weight", "attention.self.value.bias")
EMBEDDINGS_BACKWARD = ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", WORD_TABLE,
                       "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight")

# family -> (float32 tolerance, float64 tolerance, why); None: 2 lr. PyTorch's step against minihbt's
# (examples/torch_reference.py) stays 10-60x below them in float32 on multilingual-e5-small and
# 600x or more below in float64 on the tiny fixtures; see docs/check-your-implementation.md.
TOLERANCES = {
    "tokens": (0.0, 0.0, "integers: the same texts, prefixes, truncation and candidate order give the same ids and "
                         "masks exactly; any difference is a different batch layout, tokenizer or candidate mask"),
    "hidden": (1e-4, 1e-10, "hidden states: rounding (float32 6e-8, float64 1e-16 per operation) grows through the "
                            "blocks and each LayerNorm's division by the standard deviation; torch and minihbt differ "
                            "by 1.7e-6 (float32, multilingual-e5-small) and ~1e-15 (float64, tiny models) of the "
                            "largest value"),
    "embedding": (1e-5, 1e-12, "pooled and L2-normalised embeddings: a mean of the last hidden states, so no larger "
                               "than their error; normalised vectors have entries below 1"),
    "scores": (1e-4, 1e-10, "scores and loss: cosines times 1/temperature (20 by default) amplify the embeddings' "
                            "error 20-fold; at a temperature below 0.05 this is multiplied by 0.05 / temperature"),
    "grad": (1e-5, 1e-11, "activation gradients: backward repeats the forward's rounding in reverse; their values "
                          "are small (1/B of a softmax), so this is nearly an absolute bound; at a temperature below "
                          "0.05 it is multiplied by (0.05 / temperature)^2 (the scores' error, then d_q = d_scores c "
                          "/ temperature)"),
    "param_grad": (1e-4, 1e-9, "parameter gradients: sums over every token of the batch (thousands of terms), each "
                               "with the activations' error; the key bias's exact 0 against torch's ~1e-9 float noise "
                               "passes because the bound is relative to max(1, max|ours|)"),
    "updated": (None, 1e-9, "parameters after AdamW: the first step moves each entry by about lr * g / (|g| + eps), "
                            "i.e. +-lr; where |g| is at the level of float32 rounding its sign is noise, so float32 "
                            "allows up to the size of one step (2 lr); float64 rounding stays far below the smallest "
                            "real difference (no bias correction: ~2 lr; weight decay on a LayerNorm weight: "
                            "lr * weight_decay * |p|)"),
}


TOLERANCE_TEMPERATURE = 0.05      # the temperature TOLERANCES hold at (train.py's default)


class BundleError(ValueError):
    """A bundle or THEIRS that cannot be read or compared; the message names the file or tensor."""


def tolerances(lr, temperature=0.05):
    """{dtype: {family: tol}} for a bundle of learning rate `lr` (float32 updates: 2 lr) and
    `temperature`: below TOLERANCE_TEMPERATURE, where TOLERANCES were set, the scores' rounding
    grows by t = TOLERANCE_TEMPERATURE / temperature and the activation gradients' by t^2 (d_scores
    and then d_q = d_scores c / temperature), and their tolerances with them."""
    t = max(1.0, TOLERANCE_TEMPERATURE / temperature)
    growth = {"scores": t, "grad": t * t}
    return {dtype: {family: (2.0 * lr if tols[i] is None else tols[i] * growth.get(family, 1.0))
                    for family, tols in TOLERANCES.items()}
            for i, dtype in enumerate(("float32", "float64"))}


def forward_names(n_layers):
    names = [f"{s}/{k}" for s in SIDES for k in ("input_ids", "attention_mask")] + [WORD_ROWS]
    for s in SIDES:
        names += [f"{s}/embeddings"] + [f"{s}/encoder.layer.{i}.output" for i in range(n_layers)]
        names += [f"{s}/pooled", f"{s}/normalized"]
    return names + ["scores", "mask", "loss"]


def backward_names(n_layers, trainable):
    """Gradients in the order the backward pass produces them; parameters not in `trainable`
    (the pooler, unless pooling uses it) have none."""
    names = ["grad/scores"] + [f"grad/{s}/{k}" for k in ("normalized", "pooled") for s in SIDES]
    names += ["grad/" + n for n in ("pooler.dense.weight", "pooler.dense.bias") if n in trainable]
    for i in reversed(range(n_layers)):
        names += [f"grad/{s}/encoder.layer.{i}.output" for s in SIDES]
        names += [f"grad/encoder.layer.{i}.{n}" for n in BLOCK_BACKWARD]
    names += [f"grad/{s}/embeddings" for s in SIDES] + ["grad/" + n for n in EMBEDDINGS_BACKWARD]
    missing = {n for n in trainable} - {n[len("grad/"):] for n in names}
    if missing:
        raise ValueError(f"no place in the backward order for {sorted(missing)[0]}")
    return names + ["grad_norm"]


def tensor_order(n_layers, trainable):
    """Every tensor name of a bundle, in comparison order: forward, backward, the update."""
    return forward_names(n_layers) + backward_names(n_layers, trainable) + ["updated/" + n for n in trainable]


def family(name):
    if name.endswith(("/input_ids", "/attention_mask")) or name in (WORD_ROWS, "mask"):
        return "tokens"
    if name in ("scores", "loss"):
        return "scores"
    if name.startswith("updated/"):
        return "updated"
    if name.startswith("grad/"):
        return "grad" if name.split("/")[1] in SIDES + ("scores",) else "param_grad"
    if name == "grad_norm":
        return "param_grad"
    return "embedding" if name.endswith(("/pooled", "/normalized")) else "hidden"


def phase(name):
    if name.startswith("updated/") or name == "grad_norm":
        return "update"
    return "backward" if name.startswith("grad/") else "forward"


# ----------------------------------------------------------------------------- writing and reading

def write_bundle(out, manifest, triplets, tensors, order):
    """Write the bundle folder `out`: the manifest (with the tensor list, in comparison `order`,
    added), the batch, the three tensor files."""
    os.makedirs(out, exist_ok=True)
    manifest["tensors"] = [{"name": n, "phase": phase(n), "family": family(n), "shape": list(tensors[n].shape),
                            "dtype": str(tensors[n].dtype)} for n in order]
    for ph, file in FILES.items():
        with atomic_path(os.path.join(out, file)) as tmp:
            save_file({n: tensors[n] for n in order if phase(n) == ph}, tmp,
                      metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    with open(os.path.join(out, BATCH), "w", encoding="utf-8") as f:
        for t in triplets:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    write_json(os.path.join(out, MANIFEST), manifest)


def read_manifest(bundle):
    """The manifest of a bundle folder; BundleError if it is not a bundle of this format version."""
    path = os.path.join(bundle, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError(f"{bundle}: not a bundle (no {MANIFEST}); write one with `python -m minihbt.check export`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot be read as JSON ({cli.one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format version {manifest.get('format_version')!r}; this minihbt reads version "
                          f"{FORMAT_VERSION}: export the bundle again with this minihbt")
    return manifest


def read_tensors(paths, names=None):
    """{name: numpy array} from safetensors files (only `names`, if given); a name twice is an error."""
    found, where = {}, {}
    for path in paths:
        try:
            with safe_open(path, framework="numpy") as handle:
                for name in handle.keys():
                    if names is not None and name not in names:
                        continue
                    if name in where:
                        raise BundleError(f"tensor {name} is in both {where[name]} and {path}")
                    found[name], where[name] = handle.get_tensor(name), path
        except (SafetensorError, OSError, TypeError) as e:
            raise BundleError(f"{path}: cannot be read as safetensors ({cli.one_line(e)})") from None
    return found


def theirs_files(path):
    """The safetensors files of THEIRS: a folder's *.safetensors, or one file."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise BundleError(f"{path}: no .safetensors file in this folder")
        return files
    if not os.path.isfile(path):
        raise BundleError(f"{path}: no such file or folder; expected a folder of .safetensors files or one file")
    return [path]
