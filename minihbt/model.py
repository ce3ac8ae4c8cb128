"""A loaded encoder (config, parameters, tokenizer, backend) and `encode`, the one way texts
become embeddings at inference (through length_groups.embed_sides, the fast path).
"""
import json
import os

import numpy as np

from .backend import Backend, to_numpy
from .config import ConfigError, ModelConfig
from .length_groups import Side, embed_sides
from .step import check_texts
from .tokenizer import Tokenizer
from .weights import default_pooling, load_weights, save_model

POOLINGS = ("mean", "cls", "pooler")
DEFAULT_PREFIXES = {"query": "query: ", "passage": "passage: "}


class Model:
    """A loaded encoder. `params` maps HF tensor names to arrays of the backend's module."""

    def __init__(self, config, params, tokenizer, backend, pooling="mean", raw_config=None, path=None):
        self.config, self.params, self.tokenizer, self.backend = config, params, tokenizer, backend
        self.pooling = pooling
        self.prefixes = dict(DEFAULT_PREFIXES)
        self.raw_config = raw_config or config.to_dict()
        self.path = path

    xp = property(lambda self: self.backend.xp)
    dtype = property(lambda self: self.backend.dtype)
    device = property(lambda self: self.backend.device)

    def __repr__(self):
        c = self.config
        n = sum(int(np.prod(p.shape)) for p in self.params.values())
        return (f"Model({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, params={n:,}, pooling={self.pooling!r}, {self.backend})")

    @property
    def max_length(self):
        """Longest sequence the position table allows (config.ModelConfig.max_length)."""
        return self.config.max_length

    def trainable_names(self):
        """Parameters a training step updates: all but the pooler, unless pooling uses it
        (an unused pooler gets no gradient, and PyTorch's optimisers skip such tensors)."""
        return [k for k in self.params if self.pooling == "pooler" or not k.startswith("pooler.")]

    def save(self, out_dir):
        """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files and
        sentence-transformers modules) that opens in `transformers`; files written atomically."""
        save_model(self, out_dir)


def load_model(path, device="cpu", dtype="float32", pooling=None, tf32=False, fused_kernels=False):
    """Load a Hugging Face encoder directory (config.json, safetensors weights, tokenizer.json).

    device: "cpu" (NumPy) or "cuda" (CuPy; an error if no GPU is usable).
    dtype: compute dtype, "float32" (default) or "float64".
    pooling: "mean", "cls" or "pooler"; None reads the checkpoint's sentence-transformers
        pooling config and otherwise uses "mean" (right for multilingual-E5 and XLM-R).
    tf32, fused_kernels: GPU switches (see backend.Backend); ignored on the CPU.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")
    backend = Backend(device, dtype, tf32=tf32, fused=fused_kernels)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory not found")
    cfg_path = os.path.join(path, "config.json")
    config = ModelConfig.from_file(cfg_path)
    with open(cfg_path, encoding="utf-8") as f:
        raw_config = json.load(f)
    params = load_weights(path, config, dtype=backend.dtype)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer.json"), fallback_pad_id=config.pad_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
                          f"vocab_size is {config.vocab_size}: ids would index past the embedding table")
    pooling = pooling or default_pooling(path, params)
    if pooling == "pooler" and "pooler.dense.weight" not in params:
        raise ValueError(f"{path}: pooling='pooler' needs pooler.dense.* weights, which this checkpoint lacks")
    params = {k: backend.asarray(v) for k, v in params.items()}
    return Model(config, params, tokenizer, backend, pooling=pooling, raw_config=raw_config, path=path)


def resolve_prefix(model, kind, prefix):
    """prefix True -> the model's default for `kind` ('query: ' / 'passage: '); a string ->
    itself; False/None -> no prefix."""
    if kind not in DEFAULT_PREFIXES:
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    if prefix is True:
        return model.prefixes[kind]
    if not prefix:
        return ""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be True, False/None or a string, got {type(prefix).__name__}")
    return prefix


def encode(model, texts, kind="query", batch_size=64, max_length=None, prefix=True, progress=False, pairs=None):
    """Embed `texts` -> numpy float32 array [len(texts), H], L2-normalised, in input order.

    kind: "query" or "passage" chooses the E5/HBT prefix ("query: " / "passage: ").
    prefix: True (the default prefix of `kind`), a string to use instead, or False/None.
    max_length: truncation in tokens, special tokens included; None (default) or at most what
        the model's position table allows (512 for XLM-R and BERT checkpoints).
    pairs: optional second segments (e.g. the paragraph of each sentence, as LAReQA).
    Texts are sorted by token length and run `batch_size` at a time, on their real tokens only.
    progress: a bar counting tokens (so its ETA holds although batches shrink).
    """
    texts = check_texts(texts)
    if pairs is not None:
        pairs = check_texts(pairs, "pairs")
        if len(pairs) != len(texts):
            raise ValueError(f"pairs has {len(pairs)} items for {len(texts)} texts")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    max_length = model.max_length if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= model.max_length:
        raise ValueError(f"max_length must be an integer in [2, {model.max_length}] for this model, got {max_length!r}")
    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    pre = resolve_prefix(model, kind, prefix)
    texts = [pre + t for t in texts]
    emb, _, _ = embed_sides(model, [Side(texts, max_length, pairs)], max_texts=batch_size,
                            progress=f"encode {kind}" if progress else None)
    return to_numpy(emb).astype(np.float32, copy=False)
