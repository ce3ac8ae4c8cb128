"""GradCache and length-sorted groups give the gradients of the plain padded computation
(dropout on and off)."""
import numpy as np
import pytest

import minihbt
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
