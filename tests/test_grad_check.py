"""Finite differences in float64 for every operation's backward and for the loss.

For an op y = f(x) we take the scalar L = sum(y * R) with a fixed random R, so dL/dy = R;
the analytic gradient is backward(R) and the numeric one is the central difference
(L(x + h e_i) - L(x - h e_i)) / 2h for every element i. The check is the norm-wise
relative error ||analytic - numeric|| / max(||analytic||, ||numeric||) <= 1e-6.
"""
import numpy as np
import pytest

import minihbt
from minihbt import layers as L
from minihbt.backend import Backend
from minihbt.dropout import DropoutStreams
from minihbt.step import candidate_mask, contrastive_loss, info_nce_forward, loss_and_grads
from conftest import TINY

be = Backend("cpu", "float64")
H_STEP = 1e-5
TOL = 1e-6


def central_difference(f, x, i, h=H_STEP):
    """(f(x + h e_i) - f(x - h e_i)) / 2h, perturbing element i of x in place and restoring it."""
    flat = x.reshape(-1)
    old = flat[i]
    flat[i] = old + h
    fp = f()
    flat[i] = old - h
    fm = f()
    flat[i] = old
    return (fp - fm) / (2 * h)


def numeric_grad(f, x, h=H_STEP):
    """Central differences of the scalar f() with respect to every element of x."""
    return np.array([central_difference(f, x, i, h) for i in range(x.size)]).reshape(x.shape)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30)


def check(analytic, f, x):
    err = rel_err(analytic, numeric_grad(f, x))
    assert err <= TOL, err
    assert np.abs(analytic).max() > 0   # a check against an all-zero gradient proves nothing


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear(rng):
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    R = rng.standard_normal((2, 3, 4))
    f = lambda: (L.linear_forward(be, x, w, b)[0] * R).sum()
    _, cache = L.linear_forward(be, x, w, b)
    dx, dw, db = L.linear_backward(be, R, cache)
    check(dx, f, x), check(dw, f, w), check(db, f, b)


def test_layernorm(rng):
    x, g, b = rng.standard_normal((2, 3, 6)), rng.standard_normal(6), rng.standard_normal(6)
    R = rng.standard_normal((2, 3, 6))
    f = lambda: (L.layernorm_forward(be, x.copy(), g, b, 1e-5)[0] * R).sum()
    _, cache = L.layernorm_forward(be, x.copy(), g, b, 1e-5)
    dx, dg, db = L.layernorm_backward(be, R, cache)
    check(dx, f, x), check(dg, f, g), check(db, f, b)


def test_gelu(rng):
    x = rng.standard_normal((3, 7)) * 2
    R = rng.standard_normal((3, 7))
    f = lambda: (L.gelu_forward(be, x)[0] * R).sum()
    check(L.gelu_backward(be, R, L.gelu_forward(be, x)[1]), f, x)


def test_dropout_replays_with_the_same_streams(rng):
    x = rng.standard_normal((4, 1, 5))                          # [B, T, H]: four one-token texts
    R = rng.standard_normal((4, 1, 5))
    streams = lambda: DropoutStreams([[7, 0, i] for i in range(4)], [1, 1, 1, 1])
    f = lambda: (L.dropout_forward(be, x, 0.3, streams(), 2)[0] * R).sum()
    y, scale = L.dropout_forward(be, x, 0.3, streams(), 2)
    assert (y == 0).any() and (y != 0).any()
    check(L.dropout_backward(be, R, scale), f, x)


def test_softmax_with_mask(rng):
    s = rng.standard_normal((2, 3, 5))
    bias = np.zeros((2, 1, 5))
    bias[0, :, 3:] = np.finfo(np.float64).min                    # padded keys
    R = rng.standard_normal((2, 3, 5))
    f = lambda: (L.softmax_forward(be, s, bias) * R).sum()
    p = L.softmax_forward(be, s, bias)
    assert (p[0, :, 3:] == 0).all()
    d = L.softmax_backward(be, R, p)
    assert (d[0, :, 3:] == 0).all()
    check(d, f, s)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_attention_with_padding(rng, dropout):
    B, T, N, D = 2, 5, 2, 3
    q, k, v = (rng.standard_normal((B, T, N * D)) for _ in range(3))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    bias = L.mask_bias_from(be, mask, np.float64)
    R = rng.standard_normal((B, T, N * D))

    def f():
        return (L.attention_forward(be, q, k, v, bias, N, dropout, streams, 1)[0] * R).sum()
    streams = DropoutStreams([[3, 0, 0], [3, 0, 1]], mask.sum(axis=1))
    _, cache = L.attention_forward(be, q, k, v, bias, N, dropout, streams, 1)
    dq, dk, dv = L.attention_backward(be, R, cache)
    check(dq, f, q), check(dk, f, k), check(dv, f, v)
    # padded keys receive no gradient
    assert np.abs(dk[1, 3:]).max() == 0 and np.abs(dv[1, 3:]).max() == 0


def test_embedding(rng):
    table = rng.standard_normal((6, 4))
    ids = np.array([[0, 2, 2], [5, 1, 2]])
    R = rng.standard_normal((2, 3, 4))
    f = lambda: (table[ids] * R).sum()                          # the encoder's row gather
    d = L.embedding_backward(be, R, (ids, table.shape))
    assert (d[[3, 4]] == 0).all()                               # unused rows get nothing
    check(d, f, table)


def test_pooling_and_normalize(rng):
    h = rng.standard_normal((2, 4, 3))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    R = rng.standard_normal((2, 3))
    f = lambda: (L.mean_pool_forward(be, h, mask)[0] * R).sum()
    d = L.mean_pool_backward(be, R, L.mean_pool_forward(be, h, mask)[1])
    assert (d[1, 2:] == 0).all()                                # padding is not pooled
    check(d, f, h)
    f = lambda: (L.cls_pool_forward(be, h)[0] * R).sum()
    check(L.cls_pool_backward(be, R, h.shape), f, h)
    x = rng.standard_normal((3, 5))
    R2 = rng.standard_normal((3, 5))
    f = lambda: (L.l2_normalize_forward(be, x)[0] * R2).sum()
    check(L.l2_normalize_backward(be, R2, L.l2_normalize_forward(be, x)[1]), f, x)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("candidates", ["inbatch", "paper"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_all_modes(rng, candidates, symmetric):
    B, M, D = 4, 7, 5
    q, c = _unit(rng, B, D), _unit(rng, M, D)
    queries = ["q0", "q1", "q2", "q1"]                          # a repeated query text
    cands = ["p0", "p1", "p2", "p3", "n0", "p1", "n0"]          # a copy of p1 and a repeated negative
    f = lambda: contrastive_loss(be, q, c, queries, cands, 0.1, candidates, symmetric)[0]
    _, dq, dc = contrastive_loss(be, q, c, queries, cands, 0.1, candidates, symmetric)
    check(dq, f, q), check(dc, f, c)


def test_candidate_masks():
    cands = ["p0", "p1", "p2", "n0", "p1", "n0"]
    m = candidate_mask(cands[:3], cands)
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 0, 0],      # copy of p1 and repeat of n0 dropped
                                      [1, 1, 1, 1, 0, 0],      # p1's copy is no negative of p1
                                      [1, 1, 1, 1, 0, 0]])
    m = candidate_mask(cands[:3], cands, own_only=3)            # the paper's Eq. 1 denominator
    np.testing.assert_array_equal(m, [[1, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    # a target that repeats an earlier column keeps its own column and masks the earlier copy
    m = candidate_mask(["a", "a"], ["a", "a", "b"])
    np.testing.assert_array_equal(m, [[1, 0, 1], [0, 1, 1]])


def test_loss_value_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    loss, _ = info_nce_forward(be, q, c, np.ones((2, 3), bool), 1.0)
    l0 = -np.log(np.e / (np.e + 1 + np.exp(0.6)))
    l1 = -np.log(np.e / (1 + np.e + np.exp(0.8)))
    assert abs(float(loss) - (l0 + l1) / 2) < 1e-12
    # paper mode on the same scores drops the other positive from each denominator
    loss, _ = info_nce_forward(be, q, c, np.array([[1, 0, 1], [0, 1, 1]], bool), 1.0)
    l0 = -np.log(np.e / (np.e + np.exp(0.6)))
    l1 = -np.log(np.e / (np.e + np.exp(0.8)))
    assert abs(float(loss) - (l0 + l1) / 2) < 1e-12


TRIPLETS = [("Where is the station?", "Der Bahnhof ist dort.", ["Die Katze sitzt.", "Berlin ist groß."]),
            ("¿Dónde está la estación?", "火车站在哪里？", ["猫坐在垫子上。"]),
            ("Кошка?", "The cat sat on the mat.", []),
            ("Paris?", "Le chat est assis.", ["The cat sat on the mat."])]


@pytest.mark.parametrize("kind,pooling", [("xlmr", "mean"), ("xlmr", "cls"),
                                          ("bert", "mean"), ("bert", "cls"), ("bert", "pooler")])
def test_whole_model_float64_with_dropout(kind, pooling):
    """The assembled backward (every layer, dropout on, padding) against finite differences
    on sampled entries of every parameter tensor, in float64. (The XLM-R fixture is a masked
    LM without a pooler, hence no 'pooler' case for it.)"""
    model = minihbt.load_model(TINY[kind], dtype="float64", pooling=pooling)
    args = ([t[0] for t in TRIPLETS], [t[1] for t in TRIPLETS], [t[2] for t in TRIPLETS])

    def loss():
        return loss_and_grads(model, *args, temperature=0.1, dropout=True, seed=5)[0]
    _, grads = loss_and_grads(model, *args, temperature=0.1, dropout=True, seed=5)
    pick = np.random.default_rng(1)
    for name in model.trainable_names():
        p = model.params[name]
        g = grads[name]
        nz = np.flatnonzero(g)                                  # entries the batch reaches
        if name == "embeddings.word_embeddings.weight":         # the pad row is never trained (torch's padding_idx)
            assert not g[model.config.pad_token_id].any()
        if name.endswith("attention.self.key.bias"):
            assert nz.size == 0                                 # exactly 0 (softmax shift invariance)
            continue
        assert nz.size, name
        idx = pick.choice(nz, size=min(3, nz.size), replace=False)
        analytic = g.reshape(-1)[idx]
        numeric = [central_difference(loss, p, i) for i in idx]
        assert rel_err(analytic, numeric) <= TOL, (name, analytic, numeric)
