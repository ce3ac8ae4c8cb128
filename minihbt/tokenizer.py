"""Tokenization with the `tokenizers` library on the checkpoint's own `tokenizer.json`.

Whitespace in XLM-R (sentencepiece) tokenizers is split as sentencepiece and `transformers`
>= 5 do: trailing or repeated spaces produce no lone '▁' token (transformers 4.x's fast
tokenizer emitted one for trailing whitespace).

Special tokens come from the checkpoint (XLM-R: `<s>`=0, `<pad>`=1, `</s>`=2; BERT:
`[CLS]`, `[PAD]`, `[SEP]`): the tokenizer.json's post-processor adds them, exactly as
`transformers`' fast tokenizer does. Truncation keeps the special tokens (the text is cut,
not `</s>`), padding goes to the longest text of the batch.
"""
import json
import os

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from .weights import CheckpointError

PAD_CANDIDATES = ("<pad>", "[PAD]")


class Tokenizer:
    def __init__(self, path, fallback_pad_id=None):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: tokenizer.json not found (minihbt needs the fast-tokenizer file "
                                  "tokenizer.json; save it with transformers' tokenizer.save_pretrained)")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot be read as a tokenizer.json ({e})") from None
        self.path = path
        self._match_sentencepiece_whitespace(path)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_token_id = self._find_pad_id(path, fallback_pad_id)

    def _match_sentencepiece_whitespace(self, path):
        """XLM-R-style tokenizer.json files (a Unigram model behind a bare Metaspace
        pre-tokenizer) turn trailing or repeated whitespace into a lone '▁' token; the
        original sentencepiece model, and `transformers` >= 5, split on whitespace first and
        produce none. We do as sentencepiece: WhitespaceSplit, then Metaspace."""
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        pre = spec.get("pre_tokenizer") or {}
        if (spec.get("model") or {}).get("type") == "Unigram" and pre.get("type") == "Metaspace":
            self._tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement=pre.get("replacement", "▁"), prepend_scheme="always",
                                         split=True)])

    def _find_pad_id(self, path, fallback):
        """pad token: tokenizer_config.json / special_tokens_map.json beside it, else `<pad>`/`[PAD]`."""
        folder = os.path.dirname(path)
        for side in ("tokenizer_config.json", "special_tokens_map.json"):
            p = os.path.join(folder, side)
            if os.path.exists(p):
                try:
                    with open(p, encoding="utf-8") as f:
                        tok = json.load(f).get("pad_token")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if isinstance(tok, str) and self._tok.token_to_id(tok) is not None:
                    return self._tok.token_to_id(tok)
        for tok in PAD_CANDIDATES:
            if self._tok.token_to_id(tok) is not None:
                return self._tok.token_to_id(tok)
        if fallback is None:
            raise CheckpointError(f"{path}: cannot tell the padding token (no <pad> or [PAD], no pad_token in "
                                  "tokenizer_config.json)")
        return fallback

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts, max_length=512, pairs=None):
        """Token ids of each text (or (text, pair) when `pairs` is given), special tokens added,
        truncated to `max_length` tokens. Returns (list of id lists, list of type-id lists)."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}")
        self._tok.enable_truncation(max_length=max_length)
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            encs = self._tok.encode_batch(inputs, add_special_tokens=True)
        finally:
            self._tok.no_truncation()
        return [e.ids for e in encs], [e.type_ids for e in encs]

    def pad(self, ids, type_ids=None):
        """Pad id lists to the longest: input_ids [B, T] int64, attention_mask [B, T], token_type_ids [B, T]."""
        B, T = len(ids), max(len(x) for x in ids)
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        token_type_ids = np.zeros((B, T), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = x
            attention_mask[i, :len(x)] = 1
            if type_ids is not None:
                token_type_ids[i, :len(x)] = type_ids[i]
        return input_ids, attention_mask, token_type_ids

    def __call__(self, texts, max_length=512, pairs=None):
        ids, type_ids = self.encode(texts, max_length=max_length, pairs=pairs)
        return self.pad(ids, type_ids)
