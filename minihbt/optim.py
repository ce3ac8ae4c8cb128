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
Clipping: the global L2 norm over all gradients, scaled by max_norm / (norm + 1e-6) when
above max_norm (torch.nn.utils.clip_grad_norm_).
"""
import math

import numpy as np

from . import kernels
from .backend import Backend, to_numpy


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


def clip_grad_norm(grads, max_norm, backend=None):
    """Scale all gradients in place so that their global L2 norm is at most max_norm.
    Returns the norm before clipping (a float).

    sum(g^2) is accumulated in float64 over float32 chunks of SUM_CHUNK elements: accurate, no
    full-size temporary, and each chunk's sum a float64 scalar on g's device (0-d on CuPy), so
    that adding them costs no transfer. Not a BLAS dot: NumPy's pairwise sum gives the same bits
    on any number of BLAS threads. With a CPU `backend`, the chunks (of the sum and of the
    scaling) run across its thread pool, and their sums are added in one fixed order (per
    tensor, then over tensors): the same bits on any number of threads."""
    parts = [(g, s) for g in grads.values() for s in range(0, g.size, SUM_CHUNK)]
    sums = [None] * len(parts)

    def chunk_sum(i):
        g, s = parts[i]
        sums[i] = _squares(g.reshape(-1)[s:s + SUM_CHUNK].astype(np.float64)).sum()
    _run(backend, chunk_sum, range(len(parts)))
    per_tensor, i = [], 0
    for g in grads.values():                                # Python's sum per tensor, then over tensors
        n = len(range(0, g.size, SUM_CHUNK))
        per_tensor.append(sum(sums[i:i + n]))
        i += n
    total = math.sqrt(float(sum(per_tensor)))                # one device->host transfer
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        def scale(i):
            g, s = parts[i]
            if g.flags.c_contiguous:                        # a view: scaled in place chunk by chunk
                flat = g.reshape(-1)
                flat[s:s + SUM_CHUNK] *= g.dtype.type(coef)
            elif s == 0:                                    # reshape would copy: the whole tensor at once
                g *= g.dtype.type(coef)
        _run(backend, scale, range(len(parts)))
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

    def step(self, params, grads, lr=None):
        """One in-place update of the tensors this optimiser was built over (names as in
        `params` and `grads`; extra entries are left alone)."""
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
            pf, gf, mf, vf = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)
            be.map_chunks(lambda s, e: _adamw_update(pf[s:e], gf[s:e], mf[s:e], vf[s:e], *consts), p.size)

    def state_dict(self):
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "m": {k: to_numpy(a) for k, a in self.m.items()}, "v": {k: to_numpy(a) for k, a in self.v.items()}}

    def load_state_dict(self, state):
        self.t = int(state["t"])
        for k in self.m:
            self.m[k][...] = self.backend.asarray(state["m"][k])
            self.v[k][...] = self.backend.asarray(state["v"][k])


def _adamw_update(p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size):
    """In-place AdamW on one (chunk of a) tensor; see the module docstring."""
    p *= decay
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
