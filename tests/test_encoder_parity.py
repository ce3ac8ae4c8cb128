"""The forward pass equals transformers' on the committed tiny random checkpoints
(fixtures written by tests/fixtures/make_fixtures.py; torch is not needed here)."""
import os

import numpy as np
import pytest

import minihbt
from minihbt import encoder, layers as L
from minihbt.encoder import position_ids
from minihbt.backend import to_numpy
from conftest import TINY


def expected(kind):
    return np.load(os.path.join(TINY[kind], "expected.npz"))


def last_hidden(model, input_ids, attention_mask, token_type_ids=None):
    """The encoder's last hidden states [B, T, H] of padded ids (inference: no dropout)."""
    types = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    xp = model.backend.xp
    return encoder.hidden_forward(model.backend, model.params, model.config, xp.asarray(input_ids),
                                  xp.asarray(attention_mask), xp.asarray(types))[0]


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_token_ids_match_transformers(kind):
    ref = expected(kind)
    model = minihbt.load_model(TINY[kind])
    ids, mask, tt = model.tokenizer(list(ref["texts"]))
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    np.testing.assert_array_equal(tt, ref["token_type_ids"])
    # a (text, pair) input and a truncated one
    pids, ptt = model.tokenizer.encode(["query: Where is Paris?"], pairs=["Paris is the capital of France."])
    assert pids[0] == ref["pair_ids"].tolist() and ptt[0] == ref["pair_type_ids"].tolist()
    tids, _ = model.tokenizer.encode([str(ref["truncated_text"])], max_length=20)
    assert tids[0] == ref["truncated_ids"].tolist()


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_hidden_states_match_transformers(kind, device):
    ref = expected(kind)
    model = minihbt.load_model(TINY[kind], device=device)
    hidden = to_numpy(last_hidden(model, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"]))
    assert hidden.shape == ref["last_hidden_state"].shape and hidden.dtype == np.float32
    # every position, padding included: transformers computes those too
    assert np.abs(hidden - ref["last_hidden_state"]).max() <= 1e-5


@pytest.mark.parametrize("kind,pooling", [("xlmr", "mean"), ("xlmr", "cls"),
                                          ("bert", "mean"), ("bert", "cls"), ("bert", "pooler")])
def test_pooled_embeddings_match_transformers(kind, pooling, device):
    ref = expected(kind)
    model = minihbt.load_model(TINY[kind], pooling=pooling, device=device)
    hidden = last_hidden(model, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    pooled = encoder.pool_forward(model.backend, model.params, pooling, hidden, model.xp.asarray(ref["attention_mask"]))[0]
    emb = to_numpy(L.l2_normalize_forward(model.backend, pooled)[0])
    assert np.abs(emb - ref[pooling]).max() <= 1e-5
    # the public encode() gives the same, in input order, whatever the batching
    texts = [str(t) for t in ref["texts"]]
    enc = minihbt.encode(model, texts, prefix=False, batch_size=4)
    assert enc.dtype == np.float32 and enc.shape == ref[pooling].shape
    assert np.abs(enc - ref[pooling]).max() <= 1e-5


def test_texts_are_told_apart():
    """The fixtures are only a meaningful check if different texts embed differently."""
    for kind in TINY:
        mean = expected(kind)["mean"]
        cos = mean @ mean.T
        assert cos[~np.eye(len(cos), dtype=bool)].max() < 0.95


def test_float64_matches_float32():
    ref = expected("xlmr")
    m64 = minihbt.load_model(TINY["xlmr"], dtype="float64")
    hidden = last_hidden(m64, ref["input_ids"], ref["attention_mask"])
    assert hidden.dtype == np.float64
    assert np.abs(hidden - ref["last_hidden_state"]).max() <= 1e-5


def test_roberta_position_ids_start_after_pad():
    model = minihbt.load_model(TINY["xlmr"])
    ids = np.array([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids(np, model.config, ids), [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]])
    bert = minihbt.load_model(TINY["bert"])
    np.testing.assert_array_equal(position_ids(np, bert.config, ids), [[0, 1, 2, 3, 4, 5]] * 2)


def test_encode_prefixes_and_order():
    model = minihbt.load_model(TINY["xlmr"])
    texts = ["Where is the nearest train station?", "Кошка", "猫坐在垫子上。"]
    q = minihbt.encode(model, texts, kind="query")
    q_manual = minihbt.encode(model, ["query: " + t for t in texts], prefix=False)
    np.testing.assert_allclose(q, q_manual, atol=1e-6)
    p = minihbt.encode(model, texts, kind="passage")
    p_custom = minihbt.encode(model, texts, kind="query", prefix="passage: ")
    np.testing.assert_allclose(p, p_custom, atol=1e-6)
    assert not np.allclose(q, p)
    # input order is kept although batches are sorted by length
    one_by_one = np.stack([minihbt.encode(model, [t])[0] for t in texts])
    np.testing.assert_allclose(q, one_by_one, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    assert minihbt.encode(model, []).shape == (0, 32)
    with pytest.raises(TypeError):
        minihbt.encode(model, "a single string")
    with pytest.raises(ValueError, match="kind"):
        minihbt.encode(model, texts, kind="document")
    with pytest.raises(ValueError, match="max_length"):
        minihbt.encode(model, texts, max_length=1)
