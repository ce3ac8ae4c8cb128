"""AdamW, the learning-rate schedule and gradient clipping, as in PyTorch / Hugging Face.

AdamW (Loshchilov & Hutter) with the update of `torch.optim.AdamW`, step t = 1, 2, ...:
    p <- p * (1 - lr * wd)                      decoupled weight decay
    m <- m + (1 - b1) (g - m)                   (torch's lerp form of b1 m + (1 - b1) g)
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Weight decay is not applied to biases and LayerNorm weights, as Hugging Face's Trainer
does (`no_decay(name)` below): decaying a LayerNorm gain towards 0 or a bias towards 0 is
not a sensible prior.

Schedule: linear warm-up from 0 to lr over `warmup` steps, then linear decay to 0 at
`total` steps (transformers' get_linear_schedule_with_warmup; the first step has lr 0).
Vocabulary-sized tables (at least TABLE_ROWS rows) take a row-wise path with the same bits:
weight decay on every row, the rest of the update only on rows that have had a gradient (see
AdamW._table_step).
Clipping: the global L2 norm over all gradients, scaled by max_norm / (norm + 1e-6) when
above max_norm (torch.nn.utils.clip_grad_norm_).
A training step's word-table gradient is 0 but on the batch's few thousand rows (of 250,037
in XLM-R's vocabulary); told those rows (`rows=`, from loss_and_grads' stats["table_rows"]),
clipping and AdamW read only them, with the same bits as reading the whole table.
"""
import math

import numpy as np

from . import kernels
from .backend import TABLE_ROWS, Backend, to_numpy


def no_decay(name):
    """Biases and LayerNorm weights get no weight decay."""
    return name.endswith(".bias") or "LayerNorm" in name


SCHEDULES = ("constant", "linear")


def linear_schedule(step, lr, warmup, total):
    """Learning rate for optimiser step `step` (0-based)."""
    if step < warmup:
        return lr * step / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def scheduled_lr(step, lr, warmup=0, schedule="constant", total=None):
    """Learning rate of optimiser step `step` (0-based): linear warm-up from 0 over `warmup`
    steps, then `constant` (lr from then on, so a run can be extended) or `linear` (decay to
    0 at step `total`, as transformers' get_linear_schedule_with_warmup)."""
    if schedule == "linear":
        return linear_schedule(step, lr, warmup, total)
    if schedule != "constant":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return lr * min(1.0, step / warmup) if warmup else lr


def clip_grad_norm(grads, max_norm, backend=None, rows=None):
    """Scale all gradients in place so that their global L2 norm is at most max_norm.
    Returns the norm before clipping (a float).

    sum(g^2) is accumulated in float64 over float32 chunks of SUM_CHUNK elements: accurate, no
    full-size temporary, and each chunk's sum a float64 scalar on g's device (0-d on CuPy), so
    that adding them costs no transfer. Not a BLAS dot: NumPy's pairwise sum gives the same bits
    on any number of BLAS threads. With a CPU `backend`, the chunks (of the sum and of the
    scaling) run across its thread pool, and their sums are added in one fixed order (per
    tensor, then over tensors): the same bits on any number of threads.

    rows: {name: row indices} for 2-D NumPy gradients that are exactly 0 outside those rows (a
    vocabulary table's: loss_and_grads' stats["table_rows"]). Those are read and scaled only on
    these rows, with the same result bit for bit (see _table_chunk_sums); ignored on CuPy."""
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
    tables = _row_tables(grads, rows, backend)
    by_rows = tables if _pairwise_emulated() else {}        # else summed whole (scaled row-wise all the same)
    parts = [(g, s) for name, g in grads.items() if name not in by_rows for s in range(0, g.size, SUM_CHUNK)]
    sums = [None] * len(parts)

    def chunk_sum(i):
        g, s = parts[i]
        sums[i] = _sum_of_squares(g.reshape(-1)[s:s + SUM_CHUNK])
    _run(backend, chunk_sum, range(len(parts)))
    chunk_sums, i = {}, 0
    for name, g in grads.items():
        if name in by_rows:
            chunk_sums[name] = _table_chunk_sums(g, by_rows[name])
        else:
            n = len(range(0, g.size, SUM_CHUNK))
            chunk_sums[name], i = sums[i:i + n], i + n
    total = math.sqrt(float(sum(sum(chunk_sums[name]) for name in grads)))   # per tensor, then over tensors
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        parts = [(g, s) for name, g in grads.items() if name not in tables for s in range(0, g.size, SUM_CHUNK)]

        def scale(i):
            g, s = parts[i]
            if g.flags.c_contiguous:                        # a view: scaled in place chunk by chunk
                flat = g.reshape(-1)
                flat[s:s + SUM_CHUNK] *= g.dtype.type(coef)
            elif s == 0:                                    # reshape would copy: the whole tensor at once
                g *= g.dtype.type(coef)
        _run(backend, scale, range(len(parts)))
        for name, r in tables.items():                      # 0 * coef = 0: the other rows stay as they are
            g = grads[name]
            g[r] *= g.dtype.type(coef)
    return total


SUM_CHUNK = 1 << 20


def _run(backend, fn, items):
    if backend is None:
        for it in items:
            fn(it)
    else:
        backend.map_tasks(fn, items)


def _squares(x):
    x *= x
    return x


def _sum_of_squares(chunk):
    """sum(chunk^2) in float64 by NumPy's pairwise sum: clipping's dense pass over one chunk."""
    return _squares(chunk.astype(np.float64)).sum()


LEAF = 128                  # NumPy's pairwise sum adds blocks of up to 128 elements with 8 accumulators


def _row_tables(grads, rows, backend):
    """{name: sorted unique row indices} of the gradients in `rows` that clip_grad_norm reads row-wise."""
    if not rows or (backend is not None and backend.is_cuda):
        return {}
    out = {}
    for name, r in rows.items():
        g = grads.get(name)
        if isinstance(g, np.ndarray) and g.ndim == 2 and g.flags.c_contiguous:
            out[name] = table_rows(r, g.shape[0], name)
    return out


def table_rows(r, n_rows, name):
    """Row indices given for a table of n_rows rows, sorted and unique; a ValueError if not in range."""
    r = np.unique(np.asarray(r).reshape(-1))
    if r.size and (r.dtype.kind not in "iu" or r[0] < 0 or r[-1] >= n_rows):
        raise ValueError(f"rows of {name}: integers in [0, {n_rows}) expected")
    return r.astype(np.int64)


def _table_chunk_sums(g, rows, chunk=SUM_CHUNK):
    """For a 2-D float g that is 0 outside `rows`: the float64 sum of squares of each of its
    `chunk`-element chunks, bit for bit what clip_grad_norm's dense pass computes, reading only
    the 128-element blocks that hold a listed row. NumPy sums a chunk of 2^k elements pairwise:
    halves down to blocks of 128, each added by 8 strided accumulators then combined as
    ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)); a block of zeros sums to exactly 0, and x + 0 = x, so
    the tree over all blocks, most of them 0, is that sum. A last, shorter chunk is summed as is."""
    flat, width = g.reshape(-1), g.shape[1]
    full, per = flat.size // chunk, chunk // LEAF
    first, last = rows * width // LEAF, (rows * width + width - 1) // LEAF
    span = np.arange(int((last - first).max()) + 1 if rows.size else 0)
    blocks = np.unique(np.minimum(first[:, None] + span, last[:, None]))
    blocks = blocks[blocks < full * per]
    tree = np.zeros((full, per))
    x = flat[:full * chunk].reshape(-1, LEAF)[blocks].astype(np.float64)
    x = _squares(x).reshape(len(blocks), LEAF // 8, 8)
    r = x[:, 0].copy()
    for i in range(1, LEAF // 8):                  # each accumulator adds its 16 elements in order
        r += x[:, i]
    tree.reshape(-1)[blocks] = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    while tree.shape[1] > 1:                       # the pairwise halves, bottom up
        tree = tree[:, 0::2] + tree[:, 1::2]
    sums = list(tree[:, 0])
    if flat.size > full * chunk:
        sums.append(_sum_of_squares(flat[full * chunk:]))
    return sums


_EMULATED = []


def _pairwise_emulated():
    """Whether _table_chunk_sums reproduces this NumPy's sum (checked once, on a sparse table of
    one whole SUM_CHUNK and a shorter chunk); if not, clip_grad_norm sums every gradient whole."""
    if not _EMULATED:
        rng = np.random.default_rng(0)
        g = np.zeros((SUM_CHUNK // 360 + 50, 360), np.float32)
        rows = np.array([0, 7, 8, 1500, SUM_CHUNK // 360, g.shape[0] - 1])      # one across the chunks' border
        g[rows] = rng.standard_normal((len(rows), 360)) * np.exp(3 * rng.standard_normal((len(rows), 360)))
        dense = [_sum_of_squares(g.reshape(-1)[s:s + SUM_CHUNK]) for s in range(0, g.size, SUM_CHUNK)]
        _EMULATED.append(dense == _table_chunk_sums(g, rows))
    return _EMULATED[0]


class AdamW:
    """AdamW over the tensors of `params` (name -> array); `backend` defaults to the CPU."""

    def __init__(self, params, lr=3e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, xp=None, backend=None):
        """backend: the model's (`model.backend`). xp, the array module, is the older way to say
        it (numpy: the CPU, cupy: the GPU); with neither, the CPU."""
        if backend is None:
            dtype = "float64" if any(p.dtype == np.float64 for p in params.values()) else "float32"
            backend = Backend("cpu" if xp is None or xp is np else "cuda", dtype, tf32=None)   # TF32 left as set
        self.backend = backend
        xp = self.backend.xp
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}
        self.live = {}          # table name -> bool [rows]: rows whose m or v may be nonzero (see _table_step)

    def step(self, params, grads, lr=None, rows=None):
        """One in-place update of the tensors this optimiser was built over (names as in
        `params` and `grads`; extra entries are left alone). rows: as for clip_grad_norm
        ({name: rows outside which the gradient is exactly 0}): a vocabulary table's gradient
        is then not scanned for its nonzero rows; the same bits."""
        be = self.backend
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        step_size = lr / (1 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1 - b2 ** self.t)
        for name in self.m:
            p, g = params[name], self.backend.xp.ascontiguousarray(grads[name])
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name} has shape {g.shape}, parameter {p.shape}")
            wd = 0.0 if no_decay(name) else self.weight_decay
            m, v = self.m[name], self.v[name]
            dt = p.dtype.type
            consts = (dt(1 - lr * wd), dt(1 - b1), dt(b2), dt(1 - b2), dt(1 / bc2_sqrt), dt(self.eps), dt(step_size))
            if be.fused:
                kernels.adamw(p, g, m, v, *consts)                 # one kernel launch for the whole update
                continue
            if not p.flags.c_contiguous:
                raise ValueError(f"parameter {name} is not C-contiguous: AdamW updates it in place through a flat view")
            if not be.is_cuda and p.ndim == 2 and p.shape[0] >= TABLE_ROWS and consts[5] > 0:   # eps in p's dtype
                self._table_step(name, p, g, m, v, consts, (rows or {}).get(name))
                continue
            pf, gf, mf, vf = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)
            be.map_chunks(lambda s, e: _adamw_update(pf[s:e], gf[s:e], mf[s:e], vf[s:e], *consts), p.size)

    def _table_step(self, name, p, g, m, v, consts, g_rows=None):
        """AdamW on a large table (a vocabulary's embeddings), most of whose rows no batch has used yet.
        A row whose m, v and gradient are all 0 gets exactly p * (1 - lr wd) from the full update
        (m and v stay 0, and the step is 0 / eps = 0 for eps > 0), so such rows get only that
        multiplication; the others ("live": some gradient so far) are gathered and get the rest of the update. The
        same bits as the full update, reading the table's m and v only where they can be nonzero."""
        be = self.backend
        live = self.live.get(name)
        if live is None:                                            # first step, or after load_state_dict
            live = self.live[name] = _nonzero_rows(be, m) | _nonzero_rows(be, v)
        if g_rows is None:
            live |= _nonzero_rows(be, g)
        else:                                                       # a listed row that is 0 gets the same bits either way
            live[table_rows(g_rows, p.shape[0], name)] = True
        pf = p.reshape(-1)
        be.map_chunks(lambda s, e: _scale(pf[s:e], consts[0]), p.size)
        rows = np.flatnonzero(live)

        def piece(s, e):
            r = rows[s:e]
            pr, mr, vr = p[r], m[r], v[r]
            _adam_update(pr, g[r], mr, vr, *consts[1:])
            p[r], m[r], v[r] = pr, mr, vr
        be.map_rows(piece, len(rows), p.shape[1])

    def state_dict(self):
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "m": {k: to_numpy(a) for k, a in self.m.items()}, "v": {k: to_numpy(a) for k, a in self.v.items()}}

    def load_state_dict(self, state):
        self.t = int(state["t"])
        self.live = {}
        for k in self.m:
            self.m[k][...] = self.backend.asarray(state["m"][k])
            self.v[k][...] = self.backend.asarray(state["v"][k])


def _nonzero_rows(be, a):
    """bool [rows]: which rows of a 2-D array hold a nonzero (-0.0 counts as 0), across the thread pool."""
    out = np.empty(a.shape[0], dtype=bool)
    be.map_rows(lambda s, e: np.any(a[s:e], axis=1, out=out[s:e]), a.shape[0], a.shape[1])
    return out


def _scale(x, c):
    x *= c


def _adamw_update(p, g, m, v, decay, *rest):
    """In-place AdamW on one (chunk of a) tensor; see the module docstring."""
    p *= decay
    _adam_update(p, g, m, v, *rest)


def _adam_update(p, g, m, v, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size):
    """AdamW after its weight decay: the moments and the step, in place."""
    tmp = g - m
    tmp *= one_minus_b1
    m += tmp                                     # m = m + (1 - b1)(g - m)
    v *= b2
    tmp = g * g
    tmp *= one_minus_b2
    v += tmp                                     # v = b2 v + (1 - b2) g^2
    denom = v ** 0.5
    denom *= inv_bc2_sqrt
    denom += eps
    tmp = m / denom
    tmp *= step_size
    p -= tmp
