"""The stand-in's kernels: each launch checked against the kernel's signature, then computed by
the NumPy reference of that kernel (KERNELS, by kernel name: minihbt's plain operations).

ElementwiseKernel(in_params, out_params, operation, name): "T x, float32 y": every argument a
device array or a NumPy scalar (a Python scalar, whose type CuPy would guess, is refused), one
dtype for all T, outputs (given or allocated) of the arguments' broadcast shape.
RawModule(code=...).get_function(name) / RawKernel(code, name): the parameter list is read from
the `extern "C" __global__ void name(...)` of the source; a launch kernel(grid, block, args)
takes exactly those arguments: pointers as C-contiguous device arrays of the pointee's dtype,
`int` as numpy.int32, `float` as numpy.float32, `double` as numpy.float64 (a Python float would
reach the kernel as a double, a Python int as a 64-bit integer: both refused). The reference
checks the grid reads and writes inside every array and computes only the rows it covers."""
import re

import numpy as np

from . import ndarray, not_in_stand_in

_C_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "unsigned int": np.uint32,
            "long long": np.int64, "size_t": np.uint64, "bool": np.bool_}
_NAMED = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64, "uint32": np.uint32,
          "bool": np.bool_}


class LaunchError(TypeError):
    """A launch that would be wrong on a GPU (arguments, dtypes, grid)."""


def _cpu():
    from minihbt.backend import Backend          # the references run on minihbt's CPU backend
    return Backend("cpu", "float32")


# ----------------------------------------------------------------------------- references

def _rows(grid, block, width, name, arrays, per_row=None):
    """The rows a row kernel's grid covers (one block a row, blockDim.x a multiple of 32 for its
    warp shuffles), after checking that every array holds them: {name: array} of `width` per row
    (per_row: those with one value a row)."""
    if len(grid) != 1 or len(block) != 1:
        raise LaunchError(f"{name}: a row kernel takes a 1-D grid and block, got grid {grid}, block {block}")
    rows, threads = grid[0], block[0]
    if threads % 32 or not 32 <= threads <= 1024:
        raise LaunchError(f"{name}: blockDim.x {threads} is not a multiple of 32 in 32..1024 (full-warp shuffles)")
    for arg, a in arrays.items():
        need = rows * (1 if arg in (per_row or ()) else width)
        if need > a.size:
            raise LaunchError(f"{name}: the grid of {rows} rows reaches element {need - 1} of {arg}, "
                              f"which has {a.size}: an out-of-bounds access")
    return rows


def _flat(a, rows, width):
    return a.reshape(-1)[:rows * width].reshape(rows, width)


def add_layernorm_fwd(grid, block, x, r, gamma, beta, y, xhat, rstd, H, eps):
    rows = _rows(grid, block, int(H), "add_layernorm_fwd", dict(x=x, r=r, y=y, xhat=xhat, rstd=rstd), ["rstd"])
    from minihbt import layers
    out, (xh, rs, _) = layers.add_layernorm_forward(_cpu(), _flat(x, rows, H), _flat(r, rows, H), gamma[:H],
                                                    beta[:H], eps)
    _flat(y, rows, H)[...], _flat(xhat, rows, H)[...], rstd.reshape(-1)[:rows] = out, xh, rs[:, 0]


def layernorm_bwd(grid, block, dy, xhat, rstd, gamma, dx, H):
    rows = _rows(grid, block, int(H), "layernorm_bwd", dict(dy=dy, xhat=xhat, rstd=rstd, dx=dx), ["rstd"])
    from minihbt import layers
    cache = (_flat(xhat, rows, H), rstd.reshape(-1)[:rows, None], gamma[:H])
    _flat(dx, rows, H)[...] = layers.layernorm_backward(_cpu(), _flat(dy, rows, H), cache)[0]


def masked_softmax(grid, block, s, bias, S, rows_per_batch):
    rows = _rows(grid, block, int(S), "masked_softmax", dict(s=s))
    batches = -(-rows // int(rows_per_batch))
    _rows((batches,), block, int(S), "masked_softmax", dict(bias=bias))
    from minihbt import layers
    mask_bias = _flat(bias, batches, S)[np.arange(rows) // rows_per_batch]                  # [rows, S]
    _flat(s, rows, S)[...] = layers.softmax_forward(_cpu(), _flat(s, rows, S), mask_bias)


def softmax_bwd(grid, block, dp, p, S):
    rows = _rows(grid, block, int(S), "softmax_bwd", dict(dp=dp, p=p))
    from minihbt import layers
    _flat(dp, rows, S)[...] = layers.softmax_backward(_cpu(), _flat(dp, rows, S), _flat(p, rows, S))


def minihbt_gelu(x, cdf, out):
    from minihbt import layers
    out[...], (_, cdf[...]) = layers.gelu_forward(_cpu(), x)


def minihbt_gelu_grad(dy, x, cdf, dx):
    from minihbt import layers
    dx[...] = layers.gelu_backward(_cpu(), dy, (x, cdf))


def minihbt_adamw(g, decay, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size, p, m, v):
    """step.adamw_update's lines, with the constants the kernel takes in place of lr, betas and t."""
    p *= decay
    m += (g - m) * one_minus_b1
    v *= b2
    v += (g * g) * one_minus_b2
    p -= (m / (v ** 0.5 * inv_bc2_sqrt + eps)) * step_size


KERNELS = {f.__name__: f for f in (add_layernorm_fwd, layernorm_bwd, masked_softmax, softmax_bwd,
                                   minihbt_gelu, minihbt_gelu_grad, minihbt_adamw)}


def _reference(name):
    if name not in KERNELS:
        raise LaunchError(not_in_stand_in(f"a reference for kernel {name!r}"))
    return KERNELS[name]


# ----------------------------------------------------------------------------- the kernel classes

def _params(text):
    """'T x, float32 y' -> [('T', 'x'), ('float32', 'y')]."""
    return [tuple(p.split()) for p in text.split(",") if p.strip()]


class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        self.ins, self.outs, self.name = _params(in_params), _params(out_params), name

    def __call__(self, *args, size=None, **kwargs):
        n_in, n_all = len(self.ins), len(self.ins) + len(self.outs)
        if len(args) not in (n_in, n_all) or kwargs or size is not None:
            raise LaunchError(f"{self.name}: takes {n_in} inputs (and optionally {len(self.outs)} outputs), "
                              f"got {len(args)} arguments" + (f" and {sorted(kwargs)}" if kwargs else ""))
        types, values = {}, []
        for k, ((t, pname), a) in enumerate(zip(self.ins + self.outs, args)):
            if isinstance(a, ndarray):
                kind, v = a.dtype, a._a
            elif isinstance(a, np.generic) and k < n_in:                   # a scalar input
                kind, v = a.dtype, a
            else:
                raise LaunchError(f"{self.name}: parameter {t} {pname} got a {type(a).__name__}; "
                                  "a device array or a NumPy scalar is needed")
            want = _NAMED.get(t)
            if want is not None and kind != want:
                raise LaunchError(f"{self.name}: parameter {t} {pname} got {kind}")
            if want is None and types.setdefault(t, kind) != kind:
                raise LaunchError(f"{self.name}: type {t} is {types[t]} and {kind} (parameter {pname})")
            values.append(v)
        arrays = [v for v in values if isinstance(v, np.ndarray)]
        shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
        outs = list(args[n_in:])
        if not outs:
            dtypes = [_NAMED.get(t) or types[t] for t, _ in self.outs]
            outs = [ndarray(np.full(shape, np.nan, dtype=d)) for d in dtypes]
            values += [o._a for o in outs]
        for o, (t, pname) in zip(outs, self.outs):
            if o.shape != shape:
                raise LaunchError(f"{self.name}: output {pname} has shape {o.shape}, the arguments broadcast to {shape}")
        _reference(self.name)(*values)
        return outs[0] if len(outs) == 1 else tuple(outs)


_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


class RawKernel:
    def __init__(self, code, name, options=(), **kwargs):
        found = {m.group(1): m.group(2) for m in _SIGNATURE.finditer(code)}
        if name not in found:
            raise LaunchError(f"no extern \"C\" __global__ function {name!r} in the source")
        self.name, self.params = name, [self._param(p) for p in found[name].split(",") if p.strip()]

    @staticmethod
    def _param(text):
        text = " ".join(text.replace("*", " * ").split())
        name, pointer = text.split()[-1], "*" in text
        base = " ".join(w for w in text.split()[:-1] if w not in ("const", "*", "__restrict__"))
        if base not in _C_TYPES:
            raise LaunchError(not_in_stand_in(f"a kernel parameter of type {base!r}"))
        return name, np.dtype(_C_TYPES[base]), pointer

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        grid, block = tuple(grid), tuple(block)
        if not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid + block) or not grid or not block:
            raise LaunchError(f"{self.name}: grid {grid} and block {block} must be positive integers")
        if np.prod(block) > 1024 or grid[0] >= 2 ** 31 or any(g > 65535 for g in grid[1:]):
            raise LaunchError(f"{self.name}: grid {grid} / block {block} beyond CUDA's limits")
        if len(args) != len(self.params):
            raise LaunchError(f"{self.name}: takes {len(self.params)} arguments, got {len(args)}")
        values = []
        for (pname, kind, pointer), a in zip(self.params, args):
            if pointer:
                if not isinstance(a, ndarray) or a.dtype != kind or not a.flags.c_contiguous:
                    what = (f"a {a.dtype} array" + ("" if a.flags.c_contiguous else ", not C-contiguous")
                            if isinstance(a, ndarray) else f"a {type(a).__name__}")
                    raise LaunchError(f"{self.name}: parameter {kind}* {pname} got {what}; a C-contiguous "
                                      f"device array of {kind} is needed")
                values.append(a._a)
            else:
                if not isinstance(a, np.generic) or a.dtype != kind:
                    hint = {float: " (CuPy passes a Python float as a double)",
                            int: " (CuPy passes a Python int as a 64-bit integer)"}.get(type(a), "")
                    raise LaunchError(f"{self.name}: parameter {kind} {pname} got {type(a).__name__} "
                                      f"{a!r}{hint}: pass numpy.{kind.name}")
                values.append(a)
        _reference(self.name)(grid, block, *values)


class RawModule:
    def __init__(self, code=None, options=(), **kwargs):
        if code is None or kwargs:
            raise LaunchError(not_in_stand_in("RawModule without code= or with " + ", ".join(kwargs)))
        self.code = code

    def get_function(self, name):
        return RawKernel(self.code, name)
