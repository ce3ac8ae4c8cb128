"""Dropout masks: one counter-based hash, the same bits on CPU and GPU.

A mask element is kept or dropped by a pure function of (step seed, text, site, position):

    text_key  = first uint32 of numpy SeedSequence([step_seed, role, index]) (role 0 = query, 1 = passage,
                index = the text's place in the batch)
    site_key  = fmix32(text_key ^ fmix32(site * G))            site: which dropout of which layer
    u         = (fmix32((e * G) ^ site_key) >> 8) / 2^24       a uniform in [0, 1) with 24 random bits
    keep      = u >= p,  i.e.  (fmix32(...) >> 8) >= ceil(p * 2^24)

with G = 0x9E3779B9 (all arithmetic mod 2^32), fmix32 MurmurHash3's finaliser, and e the
element's index inside the text's own block: t * H + h for hidden states [len, H], and
(head * 2048 + i) * 2048 + j for attention probabilities [heads, len, len]. Because e counts
within the text's own block, a text (a step seed, a role and a place in the batch) gets the
same masks whatever length group or GradCache chunk it is run in and however far it is
padded; padded positions are always kept (they reach no output). NumPy computes it text by
text, CuPy for the whole batch at once (array operations); tests/test_dropout.py checks both
against a pure-Python reference.
"""
import math

import numpy as np

GOLDEN = 0x9E3779B9
MAX_ATTENTION_LEN = 2048         # the attention element index strides; longer sequences are refused
EMBEDDINGS_SITE = 0


def layer_site(layer, which):
    """Site number of a layer's dropout: which = 0 attention probabilities, 1 attention output, 2 FFN output."""
    return 1 + 3 * layer + which


def fmix32(h):
    """MurmurHash3's 32-bit finaliser on a uint32 array (any array module; products wrap mod 2^32)."""
    h = h ^ (h >> 16)
    h = h * h.dtype.type(0x85EBCA6B)
    h ^= h >> 13
    h *= h.dtype.type(0xC2B2AE35)
    return h ^ (h >> 16)


def text_key(seed):
    """The uint32 key of one text from its seed (an int or a list of ints)."""
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


def keep_threshold(p):
    """The 24-bit integer k0 with  u >= p  <=>  (hash >> 8) >= k0."""
    return math.ceil(p * (1 << 24))


def _fmix32_inplace(h, tmp):
    """fmix32 in place on a numpy uint32 array, `tmp` a same-shaped scratch array."""
    np.right_shift(h, 16, out=tmp)
    h ^= tmp
    h *= np.uint32(0x85EBCA6B)
    np.right_shift(h, 13, out=tmp)
    h ^= tmp
    h *= np.uint32(0xC2B2AE35)
    np.right_shift(h, 16, out=tmp)
    h ^= tmp
    return h


def element_index(xp, shape):
    """e * G (uint32) for a text block of `shape`: (T, H) hidden or (N, T, T) attention."""
    if len(shape) == 2:
        T, H = shape
        e = xp.arange(T * H, dtype=xp.uint32).reshape(T, H)
    else:
        N, T, _ = shape
        r = xp.arange(T, dtype=xp.uint32)
        e = (xp.arange(N, dtype=xp.uint32)[:, None, None] * xp.uint32(MAX_ATTENTION_LEN) + r[:, None]) \
            * xp.uint32(MAX_ATTENTION_LEN) + r
    return e * xp.uint32(GOLDEN)


class DropoutStreams:
    """The dropout randomness of a batch of texts: one key per text and their real lengths."""

    def __init__(self, seeds, lengths):
        self.text_keys = np.array([text_key(s) for s in seeds], dtype=np.uint32)
        self.lengths = [int(n) for n in lengths]

    def site_keys(self, site):
        return fmix32(self.text_keys ^ fmix32(np.array([site * GOLDEN & 0xFFFFFFFF], dtype=np.uint32)))

    def keep_mask(self, be, site, shape, p):
        """Boolean keep-mask of `shape` ([B, T, H] or [B, N, T, T]) for dropout probability p."""
        if len(shape) == 4 and shape[-1] > MAX_ATTENTION_LEN:
            raise ValueError(f"dropout masks support sequences up to {MAX_ATTENTION_LEN} tokens, got {shape[-1]}")
        keys, threshold = self.site_keys(site), keep_threshold(p)
        if be.is_cuda:
            return self._keep_mask_device(be, keys, shape, threshold)
        keep = np.ones(shape, dtype=bool)
        elem = element_index(np, shape[1:])                             # [T, H] or [N, T, T], times G
        for b in range(shape[0]):
            n = self.lengths[b]
            block = elem[:n] if len(shape) == 3 else elem[:, :n, :n]
            h = block ^ keys[b]
            h = _fmix32_inplace(h, np.empty_like(h))
            h >>= np.uint32(8)
            if len(shape) == 3:
                keep[b, :n] = h >= threshold
            else:
                keep[b, :, :n, :n] = h >= threshold
        return keep

    def _keep_mask_device(self, be, keys, shape, threshold):
        """The same formula for the whole batch at once (CuPy), padding kept."""
        xp = be.xp
        B, T = shape[0], shape[-2]
        lengths = xp.asarray(np.array(self.lengths))
        elem = element_index(xp, shape[1:])[None]                       # [1, T, H] or [1, N, T, T]
        keys = xp.asarray(keys).reshape((B,) + (1,) * (len(shape) - 1))
        keep = (fmix32(elem ^ keys) >> xp.uint32(8)) >= xp.uint32(threshold)
        pos = xp.arange(T)
        if len(shape) == 3:
            keep |= pos[None, :, None] >= lengths[:, None, None]
        else:
            keep |= (pos[None, :, None] >= lengths[:, None, None])[:, None]
            keep |= (pos[None, None, :] >= lengths[:, None, None])[:, None]
        return keep
