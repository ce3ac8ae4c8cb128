"""GradCache gives the gradients of the plain computation (float64, dropout on), and
dropout masks do not depend on batching or padding."""
import numpy as np
import pytest

import minihbt
from minihbt import layers as L
from minihbt.loss import loss_and_grads
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


def test_row_dropout_ignores_padding_and_batch():
    a = L.RowDropout([[1, 0, 0], [1, 0, 1]], [3, 5])
    b = L.RowDropout([[1, 0, 1]], [5])
    m_a = a.keep_mask(np, (2, 7, 4), 0.5, np.float64)
    m_b = b.keep_mask(np, (1, 5, 4), 0.5, np.float64)
    np.testing.assert_array_equal(m_a[1, :5], m_b[0])          # same text, other batch and padding
    assert m_a[0, 3:].all() and not m_a[0, :3].all()           # padding kept, real tokens dropped
    p_a = L.RowDropout([[2]], [4]).keep_mask(np, (1, 2, 6, 6), 0.5, np.float64)
    p_b = L.RowDropout([[2]], [4]).keep_mask(np, (1, 2, 4, 4), 0.5, np.float64)
    np.testing.assert_array_equal(p_a[:, :, :4, :4], p_b)
