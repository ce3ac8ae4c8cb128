"""Real weights: multilingual-e5-small built from ../shared, against sentence-transformers
embeddings committed in tests/fixtures/me5_expected.npz (skipped when ../shared is absent)."""
import os

import numpy as np

import minihbt
from conftest import FIXTURES


def test_me5_matches_sentence_transformers(me5_dir):
    ref = np.load(os.path.join(FIXTURES, "me5_expected.npz"))
    kinds, texts = [str(k) for k in ref["kinds"]], [str(t) for t in ref["texts"]]
    assert len(texts) >= 16 and ref["ids_lengths"].max() > 128 and len(texts[11].split()) == 1
    model = minihbt.load_model(me5_dir)
    assert model.pooling == "mean"
    # token ids identical to the sentence-transformers tokenizer (prefixes included)
    prefixed = [("query: " if k == "query" else "passage: ") + t for k, t in zip(kinds, texts)]
    ids, _ = model.tokenizer.encode(prefixed, max_length=512)
    expected_ids = np.split(ref["ids_flat"], np.cumsum(ref["ids_lengths"])[:-1])
    for got, want in zip(ids, expected_ids):
        assert got == want.tolist()
    # embeddings: encode queries and passages with their default prefixes
    emb = np.empty_like(ref["embeddings"])
    for kind in ("query", "passage"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        emb[idx] = minihbt.encode(model, [texts[i] for i in idx], kind=kind, batch_size=8)
    cos = (emb * ref["embeddings"]).sum(axis=1)
    assert cos.min() >= 0.99999, cos
    assert np.abs(emb - ref["embeddings"]).max(axis=1).max() <= 1e-4


def test_me5_whitespace_tokenization_matches_transformers(me5_dir):
    """XQuAD-R/MLQA-R texts on which a raw tokenizer.json and transformers disagree
    (trailing and repeated whitespace), and hand-made cases: minihbt's ids equal transformers'."""
    ref = np.load(os.path.join(FIXTURES, "me5_expected.npz"))
    texts = [str(t) for t in ref["ws_texts"]]
    assert len(texts) > 700
    expected = np.split(ref["ws_ids_flat"], np.cumsum(ref["ws_ids_lengths"])[:-1])
    model = minihbt.load_model(me5_dir)
    ids, _ = model.tokenizer.encode(texts, max_length=512)
    bad = [t for t, got, want in zip(texts, ids, expected) if got != want.tolist()]
    assert not bad, bad[:5]
