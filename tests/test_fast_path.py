"""The fast path (fast_step.py, length_groups.py, rowgrad.py, packing.py, the thread pool) against
the plain path (step.py, encoder.py): the same loss, gradients, optimiser steps and embeddings,
to rounding; and, at one commit, the same bits on any number of threads.

Tolerance: per tensor, max|fast - plain| <= tol * max(1, max|plain|), tol 1e-10 in float64 and
1e-5 in float32 (as tests/test_grad_parity.py compares with PyTorch).
"""
import numpy as np
import pytest

import minihbt
from minihbt import fast_step, length_groups, rowgrad, step
from minihbt.parallel import pool_for
from minihbt.encoder import WORD_TABLE
from conftest import TINY
from fixtures.spec import TRIPLETS

ARGS = ([t[0] for t in TRIPLETS], [t[1] for t in TRIPLETS], [t[2] for t in TRIPLETS])
TOL = {"float64": 1e-10, "float32": 1e-5}

# texts of very different lengths, so that groups are padded very differently from one batch
LONG = " ".join(["ein sehr langer satz mit vielen woertern"] * 4)
MIXED = (["kurz?", "what is " + LONG, "wer?", "a b c d e f g h", "warum " + LONG[:60]],
         ["p" + LONG, "p2 short", "p3 " + LONG[:40], "p4", "p5 mittel lang text hier"],
         [["n1 " + LONG[:80]], [], ["n3"], ["n4 " + LONG], ["n5 x"]])


def a_dtype(g):
    return g.values.dtype.name


def assert_close(fast, plain, tol, what=""):
    for name in plain:
        b = np.asarray(plain[name], np.float64)
        a = np.asarray(rowgrad.dense(minihbt.Backend("cpu", a_dtype(fast[name])), fast[name]) if isinstance(fast[name], rowgrad.RowGrad) else fast[name])
        assert a.shape == b.shape, (what, name)
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), (what, name)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("group_tokens,chunk", [(16, None), (40, None), (1, None), (None, None), (24, 2), (None, 3)])
def test_fast_step_equals_the_plain_step(kind, dtype, dropout, group_tokens, chunk):
    """Length groups (each padded only to its longest text), GradCache chunks, the word table's
    gradient as rows: the loss and every gradient of step.loss_and_grads (one padded batch a side)."""
    model = minihbt.load_model(TINY[kind], dtype=dtype)
    kw = dict(temperature=0.05, dropout=dropout, seed=5, candidates="paper" if chunk else "inbatch",
              symmetric=bool(chunk))
    loss, grads = step.loss_and_grads(model, *MIXED, **kw)
    loss_f, grads_f = fast_step.loss_and_grads(model, *MIXED, group_tokens=group_tokens, chunk_size=chunk,
                                            table_rows=True, **kw)
    tol = TOL[dtype]
    assert abs(loss - loss_f) <= tol * max(1.0, abs(loss))
    assert isinstance(grads_f[WORD_TABLE], rowgrad.RowGrad) and sorted(grads_f) == sorted(grads)
    assert_close(grads_f, grads, tol)
    if dropout:       # dropout is really on: another seed changes the loss
        assert abs(step.loss_and_grads(model, *MIXED, **{**kw, "seed": 6})[0] - loss) > 1e-6


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_ten_clipped_adamw_steps_fast_and_plain(kind):
    """Ten steps of the fast path (length groups, RowGrad, rowgrad.AdamW on the thread pool) and of
    step.train_step from the same weights, in float64: every parameter within 1e-10."""
    runs = []
    for fast in (False, True):
        model = minihbt.load_model(TINY[kind], dtype="float64", pooling="mean")
        params = {k: model.params[k] for k in model.trainable_names()}
        kw = dict(lr=1e-3, weight_decay=0.1, backend=model.backend)
        opt = rowgrad.AdamW(params, pool=pool_for(model.backend), **kw) if fast else step.AdamW(params, **kw)
        for i in range(10):
            batch = [x[i % 3:] for x in MIXED]
            if fast:
                _, grads = fast_step.loss_and_grads(model, *batch, dropout=True, seed=i, group_tokens=24, table_rows=True)
                norm = rowgrad.clip_grad_norm(grads, 0.5)
                opt.step(model.params, grads, lr=1e-3 * (10 - i) / 10)
            else:
                _, norm = step.train_step(model, opt, *batch, lr=1e-3 * (10 - i) / 10, max_grad_norm=0.5,
                                          dropout=True, seed=i)
            assert norm > 0.5                                                      # clipping was exercised
        runs.append({k: np.array(v) for k, v in model.params.items()})
    assert_close(runs[1], runs[0], 1e-10)
    assert not np.array_equal(runs[0][WORD_TABLE], minihbt.load_model(TINY[kind], dtype="float64").params[WORD_TABLE])


def test_row_adamw_is_the_dense_adamw_on_a_table(rng=np.random.default_rng(0)):
    """rowgrad.AdamW on a RowGrad (weight decay on every row, moments and step on the rows with
    state) is torch's dense AdamW update of the same table, across steps with new rows, a row
    whose moments are nonzero but whose gradient is 0, and after loading another optimiser's
    state. Element-wise, so exactly equal."""
    V, H = 300, 8
    p0 = rng.standard_normal((V, H))
    dense, rows, other = {"t": p0.copy()}, {"t": p0.copy()}, {"t": p0.copy()}
    o_dense, o_rows, o_other = (step.AdamW(dense, lr=0.01, weight_decay=0.1), rowgrad.AdamW(rows, lr=0.01, weight_decay=0.1),
                                step.AdamW(other, lr=0.01, weight_decay=0.1))
    be = minihbt.Backend("cpu", "float64")
    for i in range(6):
        ids = np.sort(rng.choice(V, 20, replace=False))
        g = rowgrad.RowGrad(ids, rng.standard_normal((20, H)), (V, H))
        if i == 3:                                              # both take the state of an optimiser with other rows
            o_other.step(other, {"t": rowgrad.dense(be, rowgrad.RowGrad(ids[::-1][:5][::-1] + 0, np.ones((5, H)), (V, H)))})
            o_dense.load_state_dict(o_other.state_dict())
            o_rows.load_state_dict(o_other.state_dict())
        o_dense.step(dense, {"t": rowgrad.dense(be, g)})
        o_rows.step(rows, {"t": g})
    assert 20 < o_rows.live["t"].sum() < V
    assert np.array_equal(dense["t"], rows["t"]) and not np.array_equal(rows["t"], p0)
    assert np.array_equal(o_dense.m["t"], o_rows.m["t"]) and np.array_equal(o_dense.v["t"], o_rows.v["t"])


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_the_row_gradient_names_the_batch_tokens_but_the_padding_row(kind):
    """The word table's RowGrad holds exactly the batch's token ids, less the pad_token_id row,
    which torch never trains (nn.Embedding(padding_idx=...)); a second backward is refused."""
    model = minihbt.load_model(TINY[kind])
    _, grads = fast_step.loss_and_grads(model, *ARGS, dropout=True, seed=4, group_tokens=16, table_rows=True)
    texts = ["query: " + q for q in ARGS[0]] + ["passage: " + p for p in ARGS[1] + [n for ns in ARGS[2] for n in ns]]
    ids, _ = model.tokenizer.encode(texts, max_length=512)
    used = {i for x in ids for i in x} - {model.config.pad_token_id}
    assert grads[WORD_TABLE].ids.tolist() == sorted(used) and np.abs(grads[WORD_TABLE].values).min(axis=1).all() >= 0
    _, backward, _ = length_groups.embed_sides(model, [length_groups.Side(ARGS[0], 32)], keep_activations=True)
    backward(np.zeros((len(ARGS[0]), model.config.hidden_size), np.float32), {}, [])
    with pytest.raises(RuntimeError, match="backward was already called"):
        backward(np.zeros((len(ARGS[0]), model.config.hidden_size), np.float32), {}, [])


def test_length_groups_respect_the_token_budget():
    lengths = [5, 17, 3, 17, 9, 1, 12]
    groups = length_groups.length_groups(lengths, max_tokens=34)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 34 or len(g) == 1
        assert lengths[g[0]] == max(lengths[i] for i in g)                # padded to its first text
    assert [list(g) for g in groups] == [[1, 3], [6, 4], [0, 2, 5]]
    assert [list(g) for g in length_groups.length_groups(lengths, max_texts=3)] == [[1, 3, 6], [4, 0, 2], [5]]
    assert [list(g) for g in length_groups.length_groups(lengths)] == [[1, 3, 6, 4, 0, 2, 5]]



def _step_and_encode(model, threads, blas_threads):
    """A training step's loss and gradients and an encode, on `threads` minihbt threads with
    NumPy's BLAS on `blas_threads` outside minihbt's own limits."""
    from threadpoolctl import threadpool_limits
    pool_for(model.backend).threads = threads
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        loss, grads = fast_step.loss_and_grads(model, *REAL, dropout=True, seed=3, group_tokens=96, table_rows=True)
        total = rowgrad.clip_grad_norm(grads, 1e-3)
        params = {k: v.copy() for k, v in model.params.items()}
        opt = rowgrad.AdamW(params, lr=1e-3, pool=pool_for(model.backend))
        opt.step(params, grads)
        loss_c, grads_c = fast_step.loss_and_grads(model, *REAL, dropout=True, seed=3, group_tokens=96, chunk_size=5)
        emb = minihbt.encode(model, REAL[1] + REAL[0], batch_size=5)
    grads[WORD_TABLE] = rowgrad.dense(model.backend, grads[WORD_TABLE])
    return loss, grads, total, emb, loss_c, grads_c, params


# 12 triplets of real-length texts: several length groups per side at a 96-token budget
REAL = ([f"query: what happened in the year {1900 + 7 * i} in the city number {i}?" + " and why" * (i % 4)
         for i in range(12)],
        [f"passage: in {1900 + 7 * i} the city number {i} " + "grew and changed a great deal " * (1 + i % 5)
         for i in range(12)],
        [[f"passage: nothing happened in {1800 + i} " + "really " * (i % 6)] for i in range(12)])


def test_a_step_has_the_same_bits_on_any_number_of_threads(me5_dir):
    """The length groups run side by side on the thread pool, each on one thread with BLAS on one
    thread, and their gradients are added in a fixed order: loss, every gradient, the gradient
    norm, the parameters after AdamW and encode's embeddings are bit for bit those of a
    one-thread run."""
    model = minihbt.load_model(me5_dir)
    one = _step_and_encode(model, threads=1, blas_threads=1)
    two = _step_and_encode(model, threads=2, blas_threads=2)
    assert one[0] == two[0] and one[2] == two[2] and one[4] == two[4]
    for name in model.params:
        assert np.array_equal(one[1][name], two[1][name]), name
        assert np.array_equal(one[5][name], two[5][name]), name                     # GradCache chunks of 5
        assert np.array_equal(one[6][name], two[6][name]), name                     # after AdamW
    assert np.array_equal(one[3], two[3])                                          # encode, groups of 5 texts


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inference_on_the_real_tokens_only_agrees_with_the_padded_forward(me5_dir, dtype):
    """packing.embed runs the projections, FFN and LayerNorms on the real tokens only (attention
    on the padded layout, zeros at the padding): its embeddings agree with encoder.forward's
    within rounding (float32: 1e-5, float64: 1e-12), and encode uses it."""
    from minihbt import encoder, packing
    model = minihbt.load_model(me5_dir, dtype=dtype)
    ids, types = model.tokenizer.encode(REAL[1] + [n[0] for n in REAL[2]], max_length=64)
    ids, mask, types = model.tokenizer.pad(ids, types)
    assert not mask.all()
    be, args = model.backend, (model.params, model.config, model.pooling, ids, mask, types)
    padded, _ = encoder.forward(be, *args)
    packed = packing.embed(be, *args)
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert np.abs(packed - padded).max() <= tol
    emb = minihbt.encode(model, REAL[1] + [n[0] for n in REAL[2]], kind="passage", prefix=False, max_length=64,
                         batch_size=len(ids))
    assert np.abs(emb - padded.astype(np.float32)).max() <= 1e-5                   # in input order


@pytest.mark.parametrize("fused", [False, True])
def test_fast_step_equals_the_plain_step_on_cuda(fused):
    """The fast path (length groups, RowGrad, fused kernels or not) against the plain path on a GPU,
    float32 tolerances; skipped, with the reason, where CuPy sees no GPU."""
    from conftest import CUDA_SKIP
    if CUDA_SKIP is not None:
        pytest.skip(CUDA_SKIP)
    for kind in ("xlmr", "bert"):
        model = minihbt.load_model(TINY[kind], device="cuda", fused_kernels=fused)
        loss, grads = step.loss_and_grads(model, *MIXED, dropout=True, seed=5)
        loss_f, grads_f = fast_step.loss_and_grads(model, *MIXED, dropout=True, seed=5, group_tokens=24)
        assert abs(loss - loss_f) <= 1e-5 * max(1.0, abs(loss))
        assert_close(grads_f, grads, 1e-5 if not fused else 1e-4)
