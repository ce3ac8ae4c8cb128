"""GradCache and length-sorted groups give the gradients of the plain padded computation
(dropout on and off)."""
import numpy as np
import pytest

import minihbt
from minihbt.optim import clip_grad_norm
from minihbt.step import loss_and_grads
from conftest import TINY
from fixtures.spec import TRIPLETS

ARGS = ([t[0] for t in TRIPLETS], [t[1] for t in TRIPLETS], [t[2] for t in TRIPLETS])


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("candidates,symmetric", [("inbatch", False), ("paper", True)])
def test_gradcache_equals_plain(kind, chunk, candidates, symmetric):
    model = minihbt.load_model(TINY[kind], dtype="float64")
    kw = dict(temperature=0.05, candidates=candidates, symmetric=symmetric, dropout=True, seed=11)
    loss, grads = loss_and_grads(model, *ARGS, **kw)
    loss_c, grads_c = loss_and_grads(model, *ARGS, chunk_size=chunk, **kw)
    assert abs(loss - loss_c) <= 1e-12
    for name in model.params:
        scale = max(1.0, np.abs(grads[name]).max())
        assert np.abs(grads[name] - grads_c[name]).max() <= 1e-6 * scale, name
    # dropout is really on: another seed changes the loss
    assert abs(loss_and_grads(model, *ARGS, **{**kw, "seed": 12})[0] - loss) > 1e-6


# texts of very different lengths, so that groups are padded very differently from one batch
LONG = " ".join(["ein sehr langer satz mit vielen woertern"] * 4)
MIXED = (["kurz?", "what is " + LONG, "wer?", "a b c d e f g h", "warum " + LONG[:60]],
         ["p" + LONG, "p2 short", "p3 " + LONG[:40], "p4", "p5 mittel lang text hier"],
         [["n1 " + LONG[:80]], [], ["n3"], ["n4 " + LONG], ["n5 x"]])


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("group_tokens,chunk", [(16, None), (40, None), (1, None), (24, 2)])
def test_grouped_step_equals_the_padded_step(kind, dtype, tol, dropout, group_tokens, chunk):
    """Length-sorted groups (each padded only to its longest text) and the same batch run as one
    padded batch per side: the same loss and gradients, to float64 / float32 rounding."""
    model = minihbt.load_model(TINY[kind], dtype=dtype)
    kw = dict(temperature=0.05, dropout=dropout, seed=5)
    loss, grads = loss_and_grads(model, *MIXED, group_tokens=None, **kw)            # one padded batch per side
    loss_g, grads_g = loss_and_grads(model, *MIXED, group_tokens=group_tokens, chunk_size=chunk, **kw)
    assert abs(loss - loss_g) <= tol * max(1.0, abs(loss))
    for name in model.params:
        scale = max(1.0, np.abs(grads[name]).max())
        assert np.abs(grads[name] - grads_g[name]).max() <= tol * scale, name
    if dropout:       # dropout is really on: another seed changes the loss
        assert abs(loss_and_grads(model, *MIXED, group_tokens=None, **{**kw, "seed": 6})[0] - loss) > 1e-6


def test_length_groups_respect_the_token_budget():
    from minihbt.model import length_groups
    lengths = [5, 17, 3, 17, 9, 1, 12]
    groups = length_groups(lengths, max_tokens=34)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 34 or len(g) == 1
        assert lengths[g[0]] == max(lengths[i] for i in g)                # padded to its first text
    assert [list(g) for g in groups] == [[1, 3], [6, 4], [0, 2, 5]]
    assert [list(g) for g in length_groups(lengths, max_texts=3)] == [[1, 3, 6], [4, 0, 2], [5]]
    assert [list(g) for g in length_groups(lengths)] == [[1, 3, 6, 4, 0, 2, 5]]


def _step_and_encode(model, threads, blas_threads):
    """A training step's loss and gradients and an encode, on `threads` minihbt threads with
    NumPy's BLAS on `blas_threads` outside minihbt's own limits."""
    from threadpoolctl import threadpool_limits
    model.backend.threads = threads
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        loss, grads = loss_and_grads(model, *REAL, dropout=True, seed=3, group_tokens=96)
        total = clip_grad_norm(grads, 1e9)
        loss_c, grads_c = loss_and_grads(model, *REAL, dropout=True, seed=3, group_tokens=96, chunk_size=5)
        emb = minihbt.encode(model, REAL[1] + REAL[0], batch_size=5)
    return loss, grads, total, emb, loss_c, grads_c


# 12 triplets of real-length texts: several length groups per side at a 96-token budget
REAL = ([f"query: what happened in the year {1900 + 7 * i} in the city number {i}?" + " and why" * (i % 4)
         for i in range(12)],
        [f"passage: in {1900 + 7 * i} the city number {i} " + "grew and changed a great deal " * (1 + i % 5)
         for i in range(12)],
        [[f"passage: nothing happened in {1800 + i} " + "really " * (i % 6)] for i in range(12)])


def test_a_step_has_the_same_bits_on_any_number_of_threads(me5_dir):
    """The length groups run side by side on the thread pool, each on one thread with BLAS on one
    thread, and their gradients are added in a fixed order: loss, every gradient, the gradient
    norm and encode's embeddings are bit for bit those of a one-thread run."""
    model = minihbt.load_model(me5_dir)
    one = _step_and_encode(model, threads=1, blas_threads=1)
    two = _step_and_encode(model, threads=2, blas_threads=2)
    assert one[0] == two[0] and one[2] == two[2] and one[4] == two[4]
    for name in model.params:
        assert np.array_equal(one[1][name], two[1][name]), name
        assert np.array_equal(one[5][name], two[5][name]), name                     # GradCache chunks of 5
    assert np.array_equal(one[3], two[3])                                          # encode, groups of 5 texts


@pytest.mark.parametrize("threads", [1, 2])
def test_both_sides_in_one_pass_have_the_bits_of_the_sides_one_at_a_time(me5_dir, threads):
    """embed_sides runs the queries' and the passages' length groups in one pass, the costliest
    first; its embeddings and every gradient equal, bit for bit, those of embedding each side
    on its own and backpropagating the passages first, then the queries (the step before)."""
    from minihbt.model import Side, embed_sides, embed_texts
    model = minihbt.load_model(me5_dir)
    model.backend.threads = threads
    queries, passages = REAL[0], REAL[1] + [n[0] for n in REAL[2]]
    seeds = lambda role, texts: [[5, role, i] for i in range(len(texts))]
    rng = np.random.default_rng(0)
    d_q = rng.standard_normal((len(queries), 384)).astype(np.float32)
    d_p = rng.standard_normal((len(passages), 384)).astype(np.float32)

    emb, backward, n = embed_sides(model, [Side(queries, 32, seeds=seeds(0, queries)),
                                           Side(passages, 48, seeds=seeds(1, passages))], keep=True, max_tokens=96)
    together = {}
    backward(np.concatenate([d_q, d_p]), together)

    q_emb, q_back, n_q = embed_texts(model, queries, 32, seeds=seeds(0, queries), keep=True, max_tokens=96)
    p_emb, p_back, n_p = embed_texts(model, passages, 48, seeds=seeds(1, passages), keep=True, max_tokens=96)
    apart = {}
    p_back(d_p, apart)
    q_back(d_q, apart)
    assert n == n_q + n_p
    assert np.array_equal(emb, np.concatenate([q_emb, p_emb]))
    assert sorted(together) == sorted(apart)
    for name in apart:
        assert np.array_equal(together[name], apart[name]), name


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_table_rows_name_every_nonzero_row_of_the_word_table_gradient(kind, chunk):
    """stats["table_rows"]: the word table's gradient is exactly 0 outside the rows it names, and
    those are the batch's token ids and the padding id (grouped step and GradCache chunks)."""
    from minihbt.encoder import WORD_TABLE
    model = minihbt.load_model(TINY[kind])
    stats = {}
    _, grads = loss_and_grads(model, *ARGS, dropout=True, seed=4, chunk_size=chunk, group_tokens=16, stats=stats)
    rows = stats["table_rows"][WORD_TABLE]
    g = grads[WORD_TABLE]
    outside = np.ones(g.shape[0], bool)
    outside[rows] = False
    assert np.all(g[outside] == 0) and np.any(g[rows] != 0)
    if chunk is None:                                                           # and a second backward is refused
        from minihbt.model import Side, embed_sides
        _, backward, _ = embed_sides(model, [Side(ARGS[0], 32)], keep=True)
        backward(np.zeros((len(ARGS[0]), model.config.hidden_size), np.float32), {})
        with pytest.raises(RuntimeError, match="backward was already called"):
            backward(np.zeros((len(ARGS[0]), model.config.hidden_size), np.float32), {})
    texts = ["query: " + q for q in ARGS[0]] + ["passage: " + p for p in ARGS[1] + [n for ns in ARGS[2] for n in ns]]
    ids, _ = model.tokenizer.encode(texts, max_length=512)
    assert set(rows.tolist()) == {i for x in ids for i in x} | {model.tokenizer.pad_token_id}


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_step_with_table_rows_has_the_bits_of_the_dense_step(me5_dir, chunk):
    """Clipping and AdamW told the word table's rows (stats["table_rows"]) read and update only
    those; the norm, every clipped gradient, the parameters and the moments after two steps
    are bit for bit those of the same steps reading the whole table."""
    from minihbt.encoder import WORD_TABLE
    from minihbt.optim import AdamW
    model = minihbt.load_model(me5_dir)
    start, runs = {k: v.copy() for k, v in model.params.items()}, []
    for use_rows in (False, True):
        params = {k: v.copy() for k, v in start.items()}
        opt, out = AdamW(params, lr=1e-3, weight_decay=0.01), []
        for step in range(2):
            model.params.update(params)
            stats = {}
            _, grads = loss_and_grads(model, *REAL, dropout=True, seed=step, group_tokens=96, chunk_size=chunk,
                                      stats=stats)
            assert stats["table_rows"][WORD_TABLE].size < 2000                      # a few of 250,037 rows
            rows = stats["table_rows"] if use_rows else None
            out.append((clip_grad_norm(grads, 0.5, model.backend, rows=rows), grads))
            opt.step(params, grads, rows=rows)
        runs.append((out, params, opt))
    (dense, p_dense, o_dense), (sparse, p_sparse, o_sparse) = runs
    for (n_d, g_d), (n_s, g_s) in zip(dense, sparse):
        assert n_d == n_s and n_d > 0.5                                              # clipping scaled them
        assert all(np.array_equal(g_d[k], g_s[k]) for k in g_d)
    for k in p_dense:
        assert np.array_equal(p_dense[k], p_sparse[k]), k
        assert np.array_equal(o_dense.m[k], o_sparse.m[k]) and np.array_equal(o_dense.v[k], o_sparse.v[k]), k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inference_on_the_real_tokens_only_has_their_bits(me5_dir, dtype, monkeypatch):
    """forward(skip_padding=True) runs the projections, FFN and LayerNorms on the real tokens
    only (attention on the padded layout, zeros at the padding) where this BLAS computes rows
    independently of their count (encoder.rows_independent; otherwise the padded path): every
    real token's hidden state, and encode's embeddings, are bit for bit those of the padded
    forward. A batch with too few real tokens or no padding, a forward with caches or with
    dropout, and a model narrower than PACK_WIDTH (tiny XLM-R) take the padded path."""
    from minihbt import encoder
    from minihbt.dropout import DropoutStreams
    from minihbt.encoder import PACK_TOKENS
    model = minihbt.load_model(me5_dir, dtype=dtype)
    packs = encoder.rows_independent(model.backend, dtype, 384, 1536)
    ids, types = model.tokenizer.encode(REAL[1] + [n[0] for n in REAL[2]], max_length=64)
    ids, mask, _ = model.tokenizer.pad(ids, types)
    real = mask.astype(bool)
    assert real.sum() >= PACK_TOKENS and not real.all()
    padded, skipped = model.forward(ids, mask), model.forward(ids, mask, skip_padding=True)
    assert np.array_equal(skipped[real], padded[real]) and padded[~real].any()
    assert not skipped[~real].any() if packs else np.array_equal(skipped, padded)
    few = slice(0, 3)
    assert 0 < real[few].sum() < PACK_TOKENS and not real[few].all()
    assert np.array_equal(model.forward(ids[few], mask[few], skip_padding=True), model.forward(ids[few], mask[few]))
    assert np.array_equal(model.forward(ids, np.ones_like(mask), skip_padding=True), model.forward(ids, np.ones_like(mask)))
    assert np.array_equal(model.forward(ids, mask, caches=[], skip_padding=True), padded)
    streams = DropoutStreams([[1, 0, i] for i in range(len(ids))], real.sum(axis=1).tolist())
    assert np.array_equal(model.forward(ids, mask, streams=streams, skip_padding=True),
                          model.forward(ids, mask, streams=streams))
    texts = REAL[1] + REAL[0]
    emb = minihbt.encode(model, texts, batch_size=12)
    monkeypatch.setattr(encoder, "real_tokens", lambda *a: None)                   # the padded path throughout
    assert np.array_equal(minihbt.encode(model, texts, batch_size=12), emb)
    tiny = minihbt.load_model(TINY["xlmr"], dtype=dtype)
    t_ids = np.where(real, ids % 90 + 5, 1)
    assert np.array_equal(tiny.forward(t_ids, mask, skip_padding=True), tiny.forward(t_ids, mask))


def test_rows_agree_tells_a_product_whose_rows_depend_on_their_neighbours():
    """The check that decides whether inference may skip the padding: a product that computes
    each row alone passes; one whose row bits depend on how many rows it has fails."""
    from minihbt.encoder import rows_agree
    assert rows_agree(lambda a, b: np.einsum("ik,kn->in", a, b), np.float64, 24, 8)
    assert not rows_agree(lambda a, b: (a @ b) * (1 + 1e-15 * len(a)), np.float64, 24, 8)
