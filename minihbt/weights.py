"""Checkpoint I/O: Hugging Face safetensors <-> one flat dict keyed by HF tensor names.

The parameter names are exactly those of `transformers`' `BertModel` / `XLMRobertaModel`
without the `bert.` / `roberta.` prefix (e.g. `encoder.layer.0.attention.self.query.weight`),
so loading is a dict copy and a saved model opens in `transformers`.

Reading goes through the `safetensors` library; before that the header is checked here
so that a damaged file gives an error naming the file and the problem. BF16 has no NumPy
dtype, so BF16 tensors are widened from their raw bytes (bf16 is the top half of fp32).
"""
import json
import os
import struct

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .backend import to_numpy
from .config import ModelConfig
from .files import atomic_path, copy_file, write_json

ENCODER_ROOTS = ("embeddings.", "encoder.", "pooler.")
PREFIXES = ("roberta.", "bert.", "model.")
# Buffers some checkpoints carry that are not parameters.
IGNORED_BUFFERS = ("embeddings.position_ids",)
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not fit the model's config."""


def expected_shapes(cfg: ModelConfig, pooler=False):
    """name -> shape of every encoder parameter the config implies (HF names, no prefix)."""
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "embeddings.word_embeddings.weight": (V, H),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, H),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (H, H)
            shapes[p + name + ".bias"] = (H,)
        shapes[p + "attention.output.LayerNorm.weight"] = (H,)
        shapes[p + "attention.output.LayerNorm.bias"] = (H,)
        shapes[p + "intermediate.dense.weight"] = (F, H)
        shapes[p + "intermediate.dense.bias"] = (F,)
        shapes[p + "output.dense.weight"] = (H, F)
        shapes[p + "output.dense.bias"] = (H,)
        shapes[p + "output.LayerNorm.weight"] = (H,)
        shapes[p + "output.LayerNorm.bias"] = (H,)
    if pooler:
        shapes["pooler.dense.weight"] = (H, H)
        shapes["pooler.dense.bias"] = (H,)
    return shapes


def read_safetensors_header(path):
    """Parse and validate a safetensors header: {name: (dtype, shape, (begin, end))}, metadata.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header says {n} bytes of JSON, "
                                  f"file has {size - 8} after the length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is damaged "
                              "or not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if end > data_len:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data "
                                  f"but the file holds only {data_len} data bytes")
        tensors[name] = (dtype, shape, (begin, end))
    return tensors, metadata


def _read_tensor(path, handle, name, dtype, shape, offsets):
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16, F64")
    if dtype == "BF16":  # widen bf16 -> fp32: the 16 bits are the high half of a float32
        begin, end = offsets
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header_len + begin)
            bits = np.frombuffer(f.read(end - begin), dtype="<u2")
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return handle.get_tensor(name)


def checkpoint_files(model_dir):
    """The safetensors file(s) of a model directory; refuses pickled checkpoints."""
    if os.path.isfile(model_dir):
        files = [model_dir]
    else:
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid sharded-checkpoint index ({e!r})") from None
            files = [os.path.join(model_dir, s) for s in dict.fromkeys(weight_map.values())]
            for s in files:
                if not os.path.exists(s):
                    raise CheckpointError(f"{index}: names shard {os.path.basename(s)} which does not exist")
        else:
            pickled = [p for p in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")
                       if os.path.exists(os.path.join(model_dir, p))]
            if pickled:
                raise CheckpointError(
                    f"{os.path.join(model_dir, pickled[0])}: refusing to load a pickled checkpoint: unpickling can "
                    "run arbitrary code. Convert it once, in an environment you trust, with\n"
                    "  python -c \"from transformers import AutoModel; "
                    f"AutoModel.from_pretrained('{model_dir}').save_pretrained('{model_dir}', safe_serialization=True)\"\n"
                    "which writes model.safetensors beside it.")
            raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")
    for p in files:
        if p.endswith((".bin", ".pt", ".pth")):
            raise CheckpointError(f"{p}: refusing to load a pickled checkpoint (unpickling can run arbitrary code); "
                                  "convert it to safetensors first")
    return files


def _canonical_name(key):
    """Strip a `roberta.`/`bert.` prefix and map old LayerNorm names (gamma/beta) to HF's."""
    for p in PREFIXES:
        if key.startswith(p) and key[len(p):].startswith(ENCODER_ROOTS):
            key = key[len(p):]
            break
    if key.endswith("LayerNorm.gamma"):
        key = key[:-len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[:-len("beta")] + "bias"
    return key


def load_weights(model_dir, cfg: ModelConfig, dtype=np.float32):
    """Read every encoder tensor of a checkpoint into {HF name: numpy array of `dtype`}.

    Heads (`lm_head.*`, `cls.*`, `classifier.*`, ...) are ignored; `pooler.*` is kept when
    present. A missing tensor, a wrong shape, or an unknown encoder tensor is an error.
    """
    # 1. headers only: which encoder tensors are where, with their dtypes and shapes
    entries = {}  # HF name -> (file, key in file, safetensors dtype, shape, data offsets)
    for path in checkpoint_files(model_dir):
        tensors, _ = read_safetensors_header(path)
        for key, (st_dtype, shape, offsets) in tensors.items():
            name = _canonical_name(key)
            if not name.startswith(ENCODER_ROOTS) or name in IGNORED_BUFFERS:
                continue  # a task head or a buffer: not part of the encoder
            if name in entries:
                raise CheckpointError(f"{path}: tensor {key!r} appears twice in the checkpoint")
            entries[name] = (path, key, st_dtype, shape, offsets)
    # 2. check names and shapes against what config.json implies
    want = expected_shapes(cfg, pooler=any(n.startswith("pooler.") for n in entries))
    for name, (path, key, _, shape, _) in entries.items():
        if name not in want:
            raise CheckpointError(f"{path}: unknown encoder tensor {key!r} {list(shape)} "
                                  f"(not in a {cfg.model_type} model with {cfg.num_hidden_layers} layers)")
        if tuple(shape) != want[name]:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(shape)}, "
                                  f"but config.json implies {list(want[name])}")
    missing = [n for n in want if n not in entries]
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]!r} (expected shape {list(want[missing[0]])})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    # 3. read, one open handle per file, converting to the compute dtype
    params = {}
    for path in dict.fromkeys(e[0] for e in entries.values()):
        try:
            handle = safe_open(path, framework="numpy")
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        with handle:
            for name, (p, key, st_dtype, shape, offsets) in entries.items():
                if p == path:
                    params[name] = np.ascontiguousarray(_read_tensor(path, handle, key, st_dtype, shape, offsets),
                                                        dtype=dtype)
    return {n: params[n] for n in want}


def save_weights(params, path, metadata=None):
    """Write {HF name: array} as one safetensors file, atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, tmp,
                  metadata={"format": "pt", **(metadata or {})})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "sentencepiece.bpe.model", "vocab.txt")
ARCHITECTURES = {"xlm-roberta": "XLMRobertaModel", "roberta": "RobertaModel", "bert": "BertModel"}


def save_model(model, out_dir):
    """Write `model` as a Hugging Face directory that opens in `transformers` and
    `sentence-transformers`: config.json, model.safetensors, the tokenizer files of the
    directory it was loaded from, and the sentence-transformers module files."""
    os.makedirs(out_dir, exist_ok=True)
    save_weights({k: to_numpy(v) for k, v in model.params.items()}, os.path.join(out_dir, "model.safetensors"))
    cfg = dict(model.raw_config)
    cfg["architectures"] = [ARCHITECTURES.get(cfg["model_type"], "BertModel")]
    cfg["torch_dtype"] = np.dtype(model.dtype).name
    write_json(os.path.join(out_dir, "config.json"), cfg)
    if model.path and os.path.abspath(model.path) != os.path.abspath(out_dir):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model.path, name)):
                copy_file(os.path.join(model.path, name), os.path.join(out_dir, name))
    save_sentence_transformers_files(model, out_dir)


def save_sentence_transformers_files(model, out_dir):
    """modules.json and the module folders, so that sentence-transformers loads the directory
    with the model's pooling: mean or CLS pooling then Normalize; for 'pooler', CLS pooling, a
    Dense layer holding the pooler weights with tanh, then Normalize (the layout of LaBSE)."""
    H, pooling = model.config.hidden_size, model.pooling
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
    if pooling == "pooler":
        modules.append(("2_Dense", "sentence_transformers.models.Dense"))
    modules.append((f"{len(modules)}_Normalize", "sentence_transformers.models.Normalize"))
    write_json(os.path.join(out_dir, "modules.json"),
               [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)])
    write_json(os.path.join(out_dir, "sentence_bert_config.json"),
               {"max_seq_length": model.max_length, "do_lower_case": False})
    for path, _ in modules[1:]:
        os.makedirs(os.path.join(out_dir, path), exist_ok=True)
    write_json(os.path.join(out_dir, "1_Pooling", "config.json"), {
        "word_embedding_dimension": H, "pooling_mode_cls_token": pooling != "mean",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    if pooling == "pooler":
        write_json(os.path.join(out_dir, "2_Dense", "config.json"), {
            "in_features": H, "out_features": H, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"})
        save_weights({"linear.weight": to_numpy(model.params["pooler.dense.weight"]),
                      "linear.bias": to_numpy(model.params["pooler.dense.bias"])},
                     os.path.join(out_dir, "2_Dense", "model.safetensors"))


def default_pooling(model_dir, params):
    """The pooling a checkpoint declares through its sentence-transformers files, else mean.

    `1_Pooling/config.json` with pooling_mode_cls_token -> 'cls' ('pooler' when the
    checkpoint has pooler weights and a Dense module follows, as LaBSE); with
    pooling_mode_mean_tokens or no such file -> 'mean' (multilingual-E5, XLM-R).
    """
    pcfg = os.path.join(model_dir, "1_Pooling", "config.json")
    if not os.path.exists(pcfg):
        return "mean"
    with open(pcfg, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("pooling_mode_cls_token"):
        has_dense = os.path.exists(os.path.join(model_dir, "2_Dense"))
        return "pooler" if has_dense and "pooler.dense.weight" in params else "cls"
    return "mean"
