"""Dropout masks: one counter-based hash (minihbt/dropout.py), checked against a pure-Python
reference of its formula, with the per-text properties training relies on; on a GPU the CuPy
masks (plain and fused kernel) equal the NumPy ones bit for bit."""
import math

import numpy as np
import pytest

from conftest import CUDA_SKIP
from minihbt.backend import Backend
from minihbt.dropout import DropoutStreams, layer_site

M32 = 0xFFFFFFFF


def ref_fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def ref_keep(seed, site, elem, p):
    """The formula of the dropout.py docstring, in Python integers."""
    text_key = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    site_key = ref_fmix32(text_key ^ ref_fmix32((site * 0x9E3779B9) & M32))
    u = (ref_fmix32(((elem * 0x9E3779B9) & M32) ^ site_key) >> 8) / 2 ** 24
    return u >= p


def test_fmix32_matches_murmurhash3_reference_values():
    from minihbt.dropout import fmix32
    xs = np.array([0, 1, 2, 0x9E3779B9, M32, 123456789], dtype=np.uint32)
    assert [int(v) for v in fmix32(xs)] == [ref_fmix32(int(x)) for x in xs]
    assert ref_fmix32(0) == 0 and ref_fmix32(1) == 0x514E28B7          # MurmurHash3 fmix32 known values


def test_numpy_masks_equal_the_reference_formula():
    cpu = Backend("cpu")
    seeds, lengths, p = [[3, 0, 0], [3, 1, 7]], [4, 2], 0.3
    streams = DropoutStreams(seeds, lengths)
    hidden = streams.keep_mask(cpu, layer_site(1, 2), (2, 5, 3), p)              # [B, T, H]
    attn = streams.keep_mask(cpu, layer_site(0, 0), (2, 2, 5, 5), p)              # [B, N, T, T]
    for b, (seed, n) in enumerate(zip(seeds, lengths)):
        for t in range(5):
            for h in range(3):
                want = ref_keep(seed, 6, t * 3 + h, p) if t < n else True
                assert hidden[b, t, h] == want
        for head in range(2):
            for i in range(5):
                for j in range(5):
                    want = ref_keep(seed, 1, (head * 2048 + i) * 2048 + j, p) if i < n and j < n else True
                    assert attn[b, head, i, j] == want


def test_masks_ignore_padding_batch_and_grouping():
    cpu = Backend("cpu")
    a = DropoutStreams([[1, 0, 0], [1, 0, 1]], [3, 5])
    b = DropoutStreams([[1, 0, 1]], [5])
    m_a, m_b = a.keep_mask(cpu, 4, (2, 7, 4), 0.5), b.keep_mask(cpu, 4, (1, 5, 4), 0.5)
    np.testing.assert_array_equal(m_a[1, :5], m_b[0])                  # same text, other batch and padding
    assert m_a[0, 3:].all() and not m_a[0, :3].all()                   # padding kept, real tokens dropped
    p_a = DropoutStreams([[2], [3]], [4, 6]).keep_mask(cpu, 1, (2, 2, 6, 6), 0.5)
    p_b = DropoutStreams([[2]], [4]).keep_mask(cpu, 1, (1, 2, 4, 4), 0.5)
    np.testing.assert_array_equal(p_a[:1, :, :4, :4], p_b)
    assert p_a[0, :, 4:, :].all() and p_a[0, :, :, 4:].all()           # padded rows and columns kept


def test_keep_rate_and_independence_across_sites_and_texts():
    cpu = Backend("cpu")
    big = DropoutStreams([[7]], [256])
    first = big.keep_mask(cpu, 1, (1, 12, 256, 256), 0.1)
    second = big.keep_mask(cpu, 4, (1, 12, 256, 256), 0.1)
    assert abs(first.mean() - 0.9) < 0.002 and abs(second.mean() - 0.9) < 0.002   # 786k draws: sd 0.0003
    assert 0.17 < (first != second).mean() < 0.19                      # independent: 2 * 0.9 * 0.1 = 0.18
    other = DropoutStreams([[8]], [256]).keep_mask(cpu, 1, (1, 12, 256, 256), 0.1)
    assert 0.17 < (first != other).mean() < 0.19
    np.testing.assert_array_equal(first, big.keep_mask(cpu, 1, (1, 12, 256, 256), 0.1))   # a pure function


def test_threshold_is_exact_at_the_24_bit_grid():
    from minihbt.dropout import keep_threshold
    assert keep_threshold(0.0) == 0 and keep_threshold(0.5) == 1 << 23 and keep_threshold(1.0) == 1 << 24
    assert keep_threshold(0.1) == math.ceil(0.1 * 2 ** 24)


@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_masks_equal_numpy_masks(fused):
    cpu, gpu = Backend("cpu"), Backend("cuda", fused=fused)
    for shape, lengths in (((3, 9, 5), [9, 4, 1]), ((3, 2, 9, 9), [9, 4, 1])):
        streams = DropoutStreams([[1], [2, 3], [4]], lengths)
        got = gpu.xp.asnumpy(streams.keep_mask(gpu, 5, shape, 0.3))
        np.testing.assert_array_equal(got, streams.keep_mask(cpu, 5, shape, 0.3))
