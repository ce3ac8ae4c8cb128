"""The encoder: a Hugging Face checkpoint as a flat parameter dict plus the forward pass.

    embeddings:  word[ids] + position[pos_ids] + token_type[type_ids] -> LayerNorm -> dropout
    each layer:  h = LN(h + dropout(Wo · attention(Wq h, Wk h, Wv h) + bo))
                 h = LN(h + dropout(W2 · gelu(W1 h + b1) + b2))          (post-LayerNorm)
    pooling:     mean over the attention mask | first token | tanh(pooler(first token))
    then L2 normalisation.
"""
import glob
import json
import os
import shutil

import numpy as np

from . import kernels as K
from . import layers as L
from .backend import get_xp, get_dtype, to_numpy
from .config import ModelConfig, ConfigError
from .tokenizer import Tokenizer
from .weights import load_weights, save_weights

POOLINGS = ("mean", "cls", "pooler")
DEFAULT_PREFIXES = {"query": "query: ", "passage": "passage: "}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "sentencepiece.bpe.model", "vocab.txt")


class Model:
    """A loaded encoder. `params` maps HF tensor names to arrays of `xp` (numpy or cupy)."""

    def __init__(self, config, params, tokenizer, xp, dtype, device="cpu", pooling="mean",
                 raw_config=None, path=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.xp = xp
        self.dtype = dtype
        self.device = device
        self.pooling = pooling
        self.prefixes = dict(DEFAULT_PREFIXES)
        self.raw_config = raw_config or config.to_dict()
        self.path = path

    def __repr__(self):
        c = self.config
        n = sum(int(np.prod(p.shape)) for p in self.params.values())
        return (f"Model({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, params={n:,}, pooling={self.pooling!r}, "
                f"device={self.device!r}, dtype={np.dtype(self.dtype).name})")

    @property
    def max_length(self):
        """Longest sequence the position table allows (RoBERTa positions start at pad_id + 1)."""
        c = self.config
        offset = c.pad_token_id + 1 if c.family == "roberta" else 0
        return c.max_position_embeddings - offset

    def trainable_names(self):
        """Parameters a training step updates: all but the pooler, unless pooling uses it
        (an unused pooler gets no gradient, and PyTorch's optimisers skip such tensors)."""
        return [k for k in self.params if self.pooling == "pooler" or not k.startswith("pooler.")]

    def position_ids(self, input_ids):
        """RoBERTa: cumsum(ids != pad) * (ids != pad) + pad, so real tokens start at pad + 1
        and padding sits on the pad row; BERT: 0 .. T-1."""
        xp = self.xp
        B, T = input_ids.shape
        if self.config.family == "roberta":
            pad = self.config.pad_token_id
            real = (input_ids != pad).astype(np.int64)              # [B, T]
            return xp.cumsum(real, axis=1) * real + pad            # [B, T]
        return xp.broadcast_to(xp.arange(T, dtype=np.int64), (B, T))

    def forward(self, input_ids, attention_mask, token_type_ids=None, caches=None, rng=None, dropout=False):
        """Last hidden states [B, T, H] for padded token ids [B, T].

        With `caches` (a list) each operation appends what its backward needs; with
        `dropout` True and an explicit `rng`, dropout is applied as in training.
        """
        xp, P, c = self.xp, self.params, self.config
        input_ids = xp.asarray(input_ids)
        attention_mask = xp.asarray(attention_mask)
        token_type_ids = xp.zeros_like(input_ids) if token_type_ids is None else xp.asarray(token_type_ids)
        p_hidden = c.hidden_dropout_prob if dropout else 0.0
        p_attn = c.attention_probs_dropout_prob if dropout else 0.0
        keep = caches is not None

        def linear(x, name):
            y, cache = L.linear_forward(xp, x, P[name + ".weight"], P[name + ".bias"])
            return y, cache

        def layernorm(x, name):
            return L.layernorm_forward(xp, x, P[name + ".weight"], P[name + ".bias"], c.layer_norm_eps)

        def add_layernorm(x, residual, name):                                   # LN(x + residual), x owned
            return K.add_layernorm(xp, x, residual, P[name + ".weight"], P[name + ".bias"], c.layer_norm_eps)

        # embeddings
        pos_ids = self.position_ids(input_ids)
        h, _ = L.embedding_forward(xp, P["embeddings.word_embeddings.weight"], input_ids)       # [B, T, H]
        h += P["embeddings.position_embeddings.weight"][pos_ids]
        h += P["embeddings.token_type_embeddings.weight"][token_type_ids]
        h, ln_cache = layernorm(h, "embeddings.LayerNorm")
        h, drop_cache = L.dropout_forward(xp, h, p_hidden, rng)
        if keep:
            caches.append(("embeddings", (input_ids, pos_ids, token_type_ids, ln_cache, drop_cache)))
        mask_bias = L.mask_bias_from(xp, attention_mask, self.dtype)                          # [B, 1, 1, T]

        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            q, q_cache = linear(h, p + "attention.self.query")                                # [B, T, H]
            k, k_cache = linear(h, p + "attention.self.key")                                  # [B, T, H]
            v, v_cache = linear(h, p + "attention.self.value")                                # [B, T, H]
            ctx, attn_cache = L.attention_forward(xp, q, k, v, mask_bias, c.num_attention_heads, p_attn, rng)
            a, ao_cache = linear(ctx, p + "attention.output.dense")                           # [B, T, H]
            a, ad_cache = L.dropout_forward(xp, a, p_hidden, rng)
            h1, ln1_cache = add_layernorm(a, h, p + "attention.output.LayerNorm")             # LN(a + h) [B, T, H]
            f, fi_cache = L.linear_forward(xp, h1, P[p + "intermediate.dense.weight"], None)  # [B, T, F], no bias yet
            g, gelu_cache = K.bias_gelu(xp, f, P[p + "intermediate.dense.bias"])              # gelu(f + b) [B, T, F]
            o, fo_cache = linear(g, p + "output.dense")                                       # [B, T, H]
            o, od_cache = L.dropout_forward(xp, o, p_hidden, rng)
            h, ln2_cache = add_layernorm(o, h1, p + "output.LayerNorm")                       # LN(o + h1) [B, T, H]
            if keep:
                caches.append((p, (q_cache, k_cache, v_cache, attn_cache, ao_cache, ad_cache, ln1_cache,
                                   fi_cache, gelu_cache, fo_cache, od_cache, ln2_cache)))
        return h

    def pool(self, hidden, attention_mask, pooling=None, caches=None):
        """[B, T, H] -> [B, H] by the model's pooling mode (not yet normalised)."""
        xp, mode = self.xp, pooling or self.pooling
        if mode == "mean":
            out, cache = L.mean_pool_forward(xp, hidden, xp.asarray(attention_mask))
        elif mode == "cls":
            out, cache = L.cls_pool_forward(xp, hidden)
        elif mode == "pooler":
            if "pooler.dense.weight" not in self.params:
                raise ValueError("pooling='pooler' needs pooler.dense.* weights, which this checkpoint lacks")
            first, cls_cache = L.cls_pool_forward(xp, hidden)
            z, lin_cache = L.linear_forward(xp, first, self.params["pooler.dense.weight"],
                                            self.params["pooler.dense.bias"])
            out = xp.tanh(z)
            cache = (cls_cache, lin_cache, out)
        else:
            raise ValueError(f"unknown pooling {mode!r}: use one of {POOLINGS}")
        if caches is not None:
            caches.append(("pool:" + mode, cache))
        return out

    def pool_backward(self, d_pooled, hidden_shape, caches, grads):
        """Back through pool(): d_pooled [B, H] -> d_hidden [B, T, H]; pops pool's cache."""
        xp = self.xp
        tag, cache = caches.pop()
        mode = tag.split(":", 1)[1]
        if mode == "mean":
            return L.mean_pool_backward(xp, d_pooled, cache, hidden_shape)
        if mode == "cls":
            return L.cls_pool_backward(xp, d_pooled, hidden_shape)
        cls_cache, lin_cache, out = cache                   # pooler: out = tanh(W h0 + b)
        d_z = d_pooled * (1.0 - out * out)                  # tanh' = 1 - tanh^2
        d_first, d_w, d_b = L.linear_backward(xp, d_z, lin_cache)
        _accumulate(grads, "pooler.dense.weight", d_w)
        _accumulate(grads, "pooler.dense.bias", d_b)
        return L.cls_pool_backward(xp, d_first, hidden_shape)

    def backward(self, d_hidden, caches, grads):
        """Back through forward(): d_hidden [B, T, H] (gradient of the last hidden states).

        Pops the caches forward() appended, newest first, so each activation is freed as
        soon as its backward has used it. Adds parameter gradients into `grads` (name -> array).
        """
        xp, c = self.xp, self.config
        d_h = d_hidden
        for i in reversed(range(c.num_hidden_layers)):
            p, (q_cache, k_cache, v_cache, attn_cache, ao_cache, ad_cache, ln1_cache,
                fi_cache, gelu_cache, fo_cache, od_cache, ln2_cache) = caches.pop()
            # h = LN2(o + h1), o = dropout(W2 gelu(W1 h1 + b1) + b2)
            d_o, d_g2, d_b2 = L.layernorm_backward(xp, d_h, ln2_cache)
            _accumulate(grads, p + "output.LayerNorm.weight", d_g2)
            _accumulate(grads, p + "output.LayerNorm.bias", d_b2)
            d_h1 = d_o                                                              # residual path
            d_o = L.dropout_backward(xp, d_o, od_cache)
            d_gelu, d_w, d_b = L.linear_backward(xp, d_o, fo_cache)                 # [B, T, F]
            _accumulate(grads, p + "output.dense.weight", d_w)
            _accumulate(grads, p + "output.dense.bias", d_b)
            d_f = K.gelu_grad(xp, d_gelu, *gelu_cache)                              # as L.gelu_backward
            del d_gelu, gelu_cache
            d_x, d_w, d_b = L.linear_backward(xp, d_f, fi_cache)
            _accumulate(grads, p + "intermediate.dense.weight", d_w)
            _accumulate(grads, p + "intermediate.dense.bias", d_b)
            d_h1 = d_h1 + d_x
            # h1 = LN1(a + h), a = dropout(Wo attention(q, k, v) + bo)
            d_a, d_g1, d_b1 = L.layernorm_backward(xp, d_h1, ln1_cache)
            _accumulate(grads, p + "attention.output.LayerNorm.weight", d_g1)
            _accumulate(grads, p + "attention.output.LayerNorm.bias", d_b1)
            d_prev = d_a                                                            # residual path
            d_a = L.dropout_backward(xp, d_a, ad_cache)
            d_ctx, d_w, d_b = L.linear_backward(xp, d_a, ao_cache)
            _accumulate(grads, p + "attention.output.dense.weight", d_w)
            _accumulate(grads, p + "attention.output.dense.bias", d_b)
            d_q, d_k, d_v = L.attention_backward(xp, d_ctx, attn_cache)
            del attn_cache
            for name, d, cache in (("query", d_q, q_cache), ("key", d_k, k_cache), ("value", d_v, v_cache)):
                d_x, d_w, d_b = L.linear_backward(xp, d, cache)
                if name == "key":
                    # The key bias adds q_i . b_k to every score of row i: a constant per row,
                    # which softmax ignores. Its gradient is exactly 0; computed, it is float
                    # noise (~1e-9) that AdamW's normalisation would blow up to lr-sized steps.
                    d_b = xp.zeros_like(d_b)
                _accumulate(grads, p + f"attention.self.{name}.weight", d_w)
                _accumulate(grads, p + f"attention.self.{name}.bias", d_b)
                d_prev = d_prev + d_x
            d_h = d_prev
        # embeddings: h = dropout(LN(word[ids] + position[pos] + type[tt]))
        _, (input_ids, pos_ids, token_type_ids, ln_cache, drop_cache) = caches.pop()
        d_e = L.dropout_backward(xp, d_h, drop_cache)
        d_e, d_g, d_b = L.layernorm_backward(xp, d_e, ln_cache)
        _accumulate(grads, "embeddings.LayerNorm.weight", d_g)
        _accumulate(grads, "embeddings.LayerNorm.bias", d_b)
        P = self.params
        for name, ids in (("word_embeddings", input_ids), ("position_embeddings", pos_ids),
                          ("token_type_embeddings", token_type_ids)):
            key = f"embeddings.{name}.weight"
            grads[key] = L.embedding_backward(xp, d_e, (ids, P[key].shape), grads.get(key))
        return grads

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        """Token ids -> L2-normalised embeddings [B, H] (xp array). No caches, no dropout."""
        hidden = self.forward(input_ids, attention_mask, token_type_ids)
        pooled = self.pool(hidden, attention_mask)
        out, _ = L.l2_normalize_forward(self.xp, pooled)
        return out

    def save(self, out_dir):
        """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files)
        that opens in `transformers`. Files are written atomically."""
        os.makedirs(out_dir, exist_ok=True)
        host = {k: to_numpy(v) for k, v in self.params.items()}
        save_weights(host, os.path.join(out_dir, "model.safetensors"))
        cfg = dict(self.raw_config)
        cfg["architectures"] = ["XLMRobertaModel" if cfg["model_type"] == "xlm-roberta" else
                                "RobertaModel" if cfg["model_type"] == "roberta" else "BertModel"]
        cfg["torch_dtype"] = np.dtype(self.dtype).name
        _write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
        if self.path and os.path.abspath(self.path) != os.path.abspath(out_dir):
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(self.path, name)):
                    _copy_atomic(os.path.join(self.path, name), os.path.join(out_dir, name))
        self._save_sentence_transformers_files(out_dir)

    def _save_sentence_transformers_files(self, out_dir):
        """modules.json and the module folders so that sentence-transformers loads the
        directory with this model's pooling: mean or CLS pooling then Normalize; for
        'pooler', CLS pooling, a Dense layer holding the pooler weights with tanh, then
        Normalize (the layout of LaBSE)."""
        H = self.config.hidden_size
        modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
        if self.pooling == "pooler":
            modules.append(("2_Dense", "sentence_transformers.models.Dense"))
        modules.append((f"{len(modules)}_Normalize", "sentence_transformers.models.Normalize"))
        _write_json_atomic(os.path.join(out_dir, "modules.json"), [
            {"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)])
        _write_json_atomic(os.path.join(out_dir, "sentence_bert_config.json"),
                           {"max_seq_length": self.max_length, "do_lower_case": False})
        for path, _ in modules[1:]:
            os.makedirs(os.path.join(out_dir, path), exist_ok=True)
        _write_json_atomic(os.path.join(out_dir, "1_Pooling", "config.json"), {
            "word_embedding_dimension": H, "pooling_mode_cls_token": self.pooling != "mean",
            "pooling_mode_mean_tokens": self.pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False})
        if self.pooling == "pooler":
            _write_json_atomic(os.path.join(out_dir, "2_Dense", "config.json"), {
                "in_features": H, "out_features": H, "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh"})
            save_weights({"linear.weight": to_numpy(self.params["pooler.dense.weight"]),
                          "linear.bias": to_numpy(self.params["pooler.dense.bias"])},
                         os.path.join(out_dir, "2_Dense", "model.safetensors"))


def _accumulate(grads, name, g):
    """grads[name] += g, creating the entry on first use."""
    if name in grads:
        grads[name] += g
    else:
        grads[name] = g


def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def _copy_atomic(src, dst):
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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
        has_dense = bool(glob.glob(os.path.join(model_dir, "2_Dense")))
        return "pooler" if has_dense and "pooler.dense.weight" in params else "cls"
    return "mean"


def load_model(path, device="cpu", dtype="float32", pooling=None):
    """Load a Hugging Face encoder directory (config.json, safetensors weights, tokenizer.json).

    device: "cpu" (NumPy) or "cuda" (CuPy; an error if no GPU is usable).
    dtype: compute dtype, "float32" (default) or "float64".
    pooling: "mean", "cls" or "pooler"; None reads the checkpoint's sentence-transformers
        pooling config and otherwise uses "mean" (right for multilingual-E5 and XLM-R).
    """
    xp = get_xp(device)
    dt = get_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory not found")
    cfg_path = os.path.join(path, "config.json")
    config = ModelConfig.from_file(cfg_path)
    with open(cfg_path, encoding="utf-8") as f:
        raw_config = json.load(f)
    params = load_weights(path, config, dtype=dt)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer.json"), fallback_pad_id=config.pad_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
                          f"vocab_size is {config.vocab_size}: ids would index past the embedding table")
    pooling = pooling or default_pooling(path, params)
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")
    if pooling == "pooler" and "pooler.dense.weight" not in params:
        raise ValueError(f"{path}: pooling='pooler' needs pooler.dense.* weights, which this checkpoint lacks")
    params = {k: xp.asarray(v) for k, v in params.items()}
    return Model(config, params, tokenizer, xp, dt, device=device, pooling=pooling,
                 raw_config=raw_config, path=path)


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


def encode(model, texts, kind="query", batch_size=64, max_length=512, prefix=True, progress=False, pairs=None):
    """Embed `texts` -> numpy float32 array [len(texts), H], L2-normalised, in input order.

    kind: "query" or "passage" chooses the E5/HBT prefix ("query: " / "passage: ").
    prefix: True (the default prefix of `kind`), a string to use instead, or False/None.
    max_length: truncation in tokens, special tokens included; capped at what the model's
        position table allows (512 for XLM-R and BERT checkpoints).
    pairs: optional second segments (e.g. the paragraph of each sentence, as LAReQA).
    Texts are sorted by token length and batched, so little compute goes to padding.
    """
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, not a single string")
    texts = list(texts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = min(max_length, model.max_length)
    H = model.config.hidden_size
    if not texts:
        return np.zeros((0, H), dtype=np.float32)
    pre = resolve_prefix(model, kind, prefix)
    ids, type_ids = model.tokenizer.encode([pre + t for t in texts], max_length=max_length, pairs=pairs)
    order = np.argsort([-len(x) for x in ids], kind="stable")        # longest first
    out = np.empty((len(texts), H), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"encode {kind}", unit="batch")
    for s in starts:
        idx = order[s:s + batch_size]
        input_ids, mask, tt = model.tokenizer.pad([ids[i] for i in idx], [type_ids[i] for i in idx])
        emb = model.embed(input_ids, mask, tt)                          # [b, H]
        out[idx] = to_numpy(emb)
    return out
