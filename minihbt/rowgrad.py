"""The word table's gradient as rows: a speed mechanism of training, apart from the mathematics.

A batch uses a few thousand of the word table's rows (250,002 in XLM-R's vocabulary), and the
table's gradient is 0 everywhere else. step.py computes it dense ([V, H], 384 MB for
multilingual-e5-small); here it is a `RowGrad` (the rows' ids and values), summed in a fixed
order, and clipping and AdamW take it as it is, with torch's AdamW semantics kept exactly:
weight decay on every row, the moments and the step on every row that has AdamW state (a
gradient at some step so far), nothing else. A row without state would get m = v = 0 and a
step of 0 / (0 + eps) = 0 from the dense update: only its decay. tests/test_fast_path.py checks
all of it against step.py's dense computation.
"""
from typing import NamedTuple

import numpy as np

from . import kernels
from . import step
from .backend import to_numpy


class RowGrad(NamedTuple):
    """The gradient of a table of `shape` [V, H], 0 outside rows `ids` (sorted, unique, int64
    numpy) whose values are `values` [n, H] (the backend's arrays)."""
    ids: np.ndarray
    values: object
    shape: tuple


def embedding_backward(be, ids, d_rows, shape, padding_idx=None):
    """The table gradient of out[k] = table[ids[k]]: d_table[v] = the sum of d_rows[k] over
    the k with ids[k] == v, added in the order of k; the row `padding_idx` gets none (as
    torch.nn.Embedding(padding_idx=...)). ids [K] (numpy), d_rows [K, H] -> RowGrad."""
    ids = ids.reshape(-1)
    used = np.flatnonzero(ids != padding_idx) if padding_idx is not None else np.arange(len(ids))   # [k]
    rows, inverse = np.unique(ids[used], return_inverse=True)                                      # [n], [k]
    values = sum_rows_in_order(be, inverse.reshape(-1), used, d_rows.reshape(-1, shape[1]), len(rows))
    return RowGrad(rows.astype(np.int64), values, tuple(shape))


def sum_rows_in_order(be, inverse, at, d_rows, n):
    """out[r] = the sum of d_rows[at[j]] over the j with inverse[j] == r, added from 0 in the
    order of j: np.add.at's sums, bit for bit, without its atomic adds (whose order a GPU does
    not fix). The j of each r, in order, are its 0th, 1st, ... occurrence; step k adds the k-th
    occurrence of every r at once (each r at most once a step, so no two adds meet).
    inverse [k], at [k] (numpy ints), d_rows [K, H] -> [n, H]."""
    order = np.argsort(inverse, kind="stable")                     # [k] the j grouped by r, in order within r
    row = inverse[order]                                           # [k] their r, ascending
    counts = np.bincount(inverse, minlength=n)                     # [n] occurrences of each r
    occurrence = np.arange(len(order)) - (np.cumsum(counts) - counts)[row]     # [k] k of each j
    by_step = np.argsort(occurrence, kind="stable")                # [k] every 0th occurrence, every 1st, ...
    source, target = be.asarray(at[order[by_step]]), be.asarray(row[by_step])
    out = be.xp.zeros((n, d_rows.shape[1]), dtype=d_rows.dtype)                # [n, H]
    start = 0
    for size in np.bincount(occurrence):                           # the r that have a k-th occurrence
        out[target[start:start + size]] += d_rows[source[start:start + size]]
        start += size
    return out


def dense(be, g):
    """A RowGrad as the [V, H] array it stands for (other gradients as they are)."""
    if not isinstance(g, RowGrad):
        return g
    out = be.xp.zeros(g.shape, dtype=g.values.dtype)
    out[be.asarray(g.ids)] = g.values
    return out


def clip_grad_norm(grads, max_norm):
    """step.clip_grad_norm over gradients of which some are RowGrads (their values are all of
    their nonzero entries, so the norm is the same; scaled in place)."""
    return step.clip_grad_norm({name: g.values if isinstance(g, RowGrad) else g for name, g in grads.items()},
                               max_norm)


class AdamW(step.AdamW):
    """step.AdamW that takes a RowGrad for a table, runs the tensors' updates side by side on a
    parallel.Pool (`pool`; each tensor's update is independent of the others, so the bits do
    not depend on the threads) and, on a Backend with fused kernels, updates a dense tensor in
    one kernel launch."""

    def __init__(self, params, lr=3e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, backend=None, pool=None):
        super().__init__(params, lr, betas, eps, weight_decay, backend)
        self.pool = pool
        self.fused = backend is not None and backend.fused
        self.live = {}              # table name -> bool [V] (numpy): the rows that have AdamW state

    def step(self, params, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        names = sorted(self.m, key=lambda name: -params[name].size)           # the largest first
        update = lambda name: self.update(name, params[name], grads[name], lr)
        if self.pool is None:
            for name in names:
                update(name)
        else:
            self.pool.map(update, names)

    def update(self, name, p, g, lr):
        if isinstance(g, RowGrad):
            return self._rows_update(name, p, g, lr)
        if not self.fused:
            return super().update(name, p, g, lr)
        b1, b2 = self.betas
        wd = 0.0 if step.no_decay(name) else self.weight_decay
        consts = (1 - lr * wd, 1 - b1, b2, 1 - b2, 1 / (1 - b2 ** self.t) ** 0.5, self.eps, lr / (1 - b1 ** self.t))
        kernels.adamw(p, self.xp.ascontiguousarray(g), self.m[name], self.v[name], *(np.float32(c) for c in consts))

    def _rows_update(self, name, p, g, lr):
        """Every row decays; the rows with state get the rest of the update, their gradient 0
        outside g.ids (see the module docstring)."""
        if g.shape != p.shape:
            raise ValueError(f"gradient of {name} has shape {g.shape}, parameter {p.shape}")
        m, v = self.m[name], self.v[name]
        live = self.live.get(name)
        if live is None:                                       # the first step, or after load_state_dict
            live = self.live[name] = to_numpy((m != 0).any(axis=1) | (v != 0).any(axis=1))
        live[g.ids] = True
        wd = 0.0 if step.no_decay(name) else self.weight_decay
        p *= p.dtype.type(1 - lr * wd)                                           # [V, H]
        rows = np.flatnonzero(live)                                              # [r]
        at = self.xp.asarray(rows)
        g_rows = self.xp.zeros((len(rows), p.shape[1]), dtype=p.dtype)           # [r, H]
        g_rows[self.xp.asarray(np.searchsorted(rows, g.ids))] = g.values
        p_rows, m_rows, v_rows = p[at], m[at], v[at]
        step.adamw_update(p_rows, g_rows, m_rows, v_rows, lr, 0.0, self.betas, self.eps, self.t)
        p[at], m[at], v[at] = p_rows, m_rows, v_rows

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.live = {}
