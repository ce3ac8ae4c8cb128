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


def test_device_side_dropout_masks_ignore_padding_and_batch():
    """The counter-based masks CuPy uses (computed here with NumPy, the same integer formula):
    the same per-text properties as the NumPy streams, the requested keep rate, and a new
    mask at every call."""
    a = L.RowDropout([[1, 0, 0], [1, 0, 1]], [3, 5])
    b = L.RowDropout([[1, 0, 1]], [5])
    m_a = a.hash_keep_mask(np, (2, 7, 4), 0.5)
    m_b = b.hash_keep_mask(np, (1, 5, 4), 0.5)
    np.testing.assert_array_equal(m_a[1, :5], m_b[0])
    assert m_a[0, 3:].all() and not m_a[0, :3].all()
    p_a = L.RowDropout([[2], [3]], [4, 6]).hash_keep_mask(np, (2, 2, 6, 6), 0.5)
    p_b = L.RowDropout([[2]], [4]).hash_keep_mask(np, (1, 2, 4, 4), 0.5)
    np.testing.assert_array_equal(p_a[:1, :, :4, :4], p_b)
    assert p_a[0, :, 4:, :].all() and p_a[0, :, :, 4:].all()     # padded rows and columns kept
    big = L.RowDropout([[7]], [256])
    first = big.hash_keep_mask(np, (1, 12, 256, 256), 0.1)
    second = big.hash_keep_mask(np, (1, 12, 256, 256), 0.1)
    assert abs(first.mean() - 0.9) < 0.002 and abs(second.mean() - 0.9) < 0.002   # 786k draws: sd 0.0003
    assert 0.17 < (first != second).mean() < 0.19                  # independent masks: 2 * 0.9 * 0.1 = 0.18
    other = L.RowDropout([[8]], [256]).hash_keep_mask(np, (1, 12, 256, 256), 0.1)
    assert 0.17 < (first != other).mean() < 0.19


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_masks_equal_the_numpy_form_of_the_formula(device, dtype):
    xp = np if device == "cpu" else __import__("cupy")
    for shape, lengths in (((3, 9, 5), [9, 4, 1]), ((3, 2, 9, 9), [9, 4, 1])):
        on_device = L.RowDropout([[1], [2, 3], [4]], lengths)
        if xp is np:
            got = on_device.hash_keep_mask(np, shape, 0.3)
        else:
            got = xp.asnumpy(on_device.keep_mask(xp, shape, 0.3, dtype))
        want = L.RowDropout([[1], [2, 3], [4]], lengths).hash_keep_mask(np, shape, 0.3)
        np.testing.assert_array_equal(got, want)
