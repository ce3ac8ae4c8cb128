"""The fused CuPy kernels (minihbt.kernels) against the plain array expressions of layers.py /
step.py that they replace.

Everywhere: fused kernels never apply to NumPy or float64 (the Backend refuses the switch),
and every CUDA source compiles with NVRTC (no GPU needed). Under CuPy with a GPU: each op
with fused kernels on against the same op with them off (float32), a whole training gradient
fused against unfused, and the GPU modes (fused, TF32) against PyTorch within their stated
tolerances. GPU tests are skipped with the reason where CuPy sees no GPU.
"""

import numpy as np
import pytest

from conftest import CUDA_SKIP, TINY
from minihbt import kernels as K
from minihbt import layers as L
from minihbt.backend import Backend
from minihbt.step import adamw_update

cuda_only = pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")


def test_fused_kernels_never_apply_to_numpy_or_float64():
    assert not Backend("cpu", "float32", fused=True).fused
    assert not Backend("cpu", "float64", fused=True).fused


def _inputs(xp, rng, rows=6, H=100, F=130):
    f32 = lambda *s: xp.asarray(rng.standard_normal(s).astype(np.float32))
    mask = np.ones((2, 7), np.float32)
    mask[1, 4:] = 0                                                   # a padded text
    return dict(y=f32(rows, F), b=f32(F), x=f32(rows, H), r=f32(rows, H), g=f32(H), beta=f32(H),
                dy=f32(rows, H), s=f32(2, 3, 7, 7), dp=f32(2, 3, 7, 7), mask=mask)


@cuda_only
@pytest.mark.parametrize("H", [100, 768])
def test_fused_kernels_match_the_plain_ops_on_gpu(H):
    import cupy as cp
    fused, plain = Backend("cuda", fused=True), Backend("cuda")
    assert fused.fused and not plain.fused
    a = _inputs(cp, np.random.default_rng(1), rows=37, H=H, F=3 * H + 1)
    mask_bias = L.mask_bias_from(plain, a["mask"], np.float32)
    tol = dict(rtol=2e-6, atol=2e-6)
    get = cp.asnumpy

    F = K.FUSED                                                       # layers' ops, some served by kernels
    out, (x, cdf) = F.gelu_forward(fused, a["y"])
    ref, (x_ref, cdf_ref) = L.gelu_forward(plain, a["y"])
    for u, w in ((out, ref), (x, x_ref), (cdf, cdf_ref)):
        np.testing.assert_allclose(get(u), get(w), **tol)
    dy = cp.asarray(np.random.default_rng(2).standard_normal(out.shape).astype(np.float32))
    np.testing.assert_allclose(get(F.gelu_backward(fused, dy, (x, cdf))), get(L.gelu_backward(plain, dy, (x_ref, cdf_ref))),
                               **tol)

    y, cache = F.add_layernorm_forward(fused, a["x"], a["r"], a["g"], a["beta"], 1e-12)
    y_ref, cache_ref = L.add_layernorm_forward(plain, a["x"], a["r"], a["g"], a["beta"], 1e-12)
    for u, w in zip((y,) + cache[:2], (y_ref,) + cache_ref[:2]):
        np.testing.assert_allclose(get(u), get(w), rtol=1e-5, atol=1e-5)
    for u, w in zip(F.layernorm_backward(fused, a["dy"], cache), L.layernorm_backward(plain, a["dy"], cache_ref)):
        np.testing.assert_allclose(get(u), get(w), rtol=1e-5, atol=1e-5)

    p = K.masked_softmax(a["s"].copy(), mask_bias)
    p_ref = L.softmax_forward(plain, a["s"], mask_bias)
    np.testing.assert_allclose(get(p), get(p_ref), **tol)
    assert (get(p)[1, :, :, 4:] == 0).all()                           # padded keys get exactly 0
    np.testing.assert_allclose(get(K.softmax_grad(a["dp"].copy(), p)), get(L.softmax_backward(plain, a["dp"], p_ref)),
                               **tol)

    lr, wd, betas, eps, t = 0.01, 1.0, (0.9, 0.999), 1e-8, 3
    consts = tuple(np.float32(c) for c in (1 - lr * wd, 1 - betas[0], betas[1], 1 - betas[1],
                                          1 / (1 - betas[1] ** t) ** 0.5, eps, lr / (1 - betas[0] ** t)))
    p1, m1, v1 = a["x"].copy(), a["r"].copy(), cp.abs(a["dy"])
    p2, m2, v2 = p1.copy(), m1.copy(), v1.copy()
    grad = a["x"] * 0.5
    K.adamw(p1, grad, m1, v1, *consts)
    adamw_update(p2, grad, m2, v2, lr, wd, betas, eps, t)
    for u, w in ((p1, p2), (m1, m2), (v1, v2)):
        np.testing.assert_allclose(get(u), get(w), rtol=1e-6, atol=1e-7)


@cuda_only
@pytest.mark.parametrize("arch", ["xlmr", "bert"])
def test_training_gradients_with_fused_kernels_match_unfused_on_gpu(arch):
    import minihbt
    q = ["what is the capital of france", "wer schrieb faust?"]
    p = ["paris is the capital of france.", "goethe schrieb faust."]
    n = [["berlin is in germany."], ["die sonne scheint."]]
    results = [minihbt.loss_and_grads(minihbt.load_model(TINY[arch], device="cuda", fused_kernels=on), q, p, n,
                                      dropout=True, seed=3) for on in (False, True)]
    (loss0, g0), (loss1, g1) = results
    assert abs(loss0 - loss1) <= 1e-5
    for name in g0:
        scale = max(1.0, float(np.abs(g0[name]).max()))
        assert float(np.abs(g0[name] - g1[name]).max()) <= 1e-4 * scale, name


def _nvrtc():
    if getattr(K.cupy, "STAND_IN", False):      # NVRTC's loader needs the real CuPy's modules
        return None
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy with NVRTC (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12) "
                                               "is not importable, or the CuPy stand-in is in place (the run "
                                               "without MINIHBT_FAKE_CUPY compiles them): the CUDA sources are "
                                               "not compiled here")
def test_kernel_sources_compile_with_nvrtc():
    """Compiles every CUDA source of minihbt.kernels for sm_90 with NVRTC, which needs no GPU:
    the row kernels as written, and each ElementwiseKernel's operation inside a kernel that
    binds its parameters as CuPy does (inputs by value, outputs by reference), for float and
    double. This catches CUDA errors on machines without a GPU; running them is the GPU tests' job."""
    nvrtc = _nvrtc()

    def compile_ok(src, name):
        prog = nvrtc.createProgram(src, name, [], [])
        try:
            nvrtc.compileProgram(prog, ["-arch=compute_90", "-std=c++14"])
        except Exception as e:
            pytest.fail(f"{name}: {e}\n{nvrtc.getProgramLog(prog)}")
        assert len(nvrtc.getPTX(prog)) > 0

    compile_ok(K._ROW_SOURCE, "rows.cu")
    for name, (ins, outs, op) in K._ELEMENTWISE.items():
        params, bind = [], []
        ctype = {"T": "T", "uint32": "unsigned int", "bool": "bool"}
        for decl in ins.split(","):
            t, v = decl.split()
            params.append(f"const {ctype[t]}* {v}_")
            bind.append(f"const {ctype[t]} {v} = {v}_[i];")
        for decl in outs.split(","):
            t, v = decl.split()
            params.append(f"{ctype[t]}* {v}_")
            bind.append(f"{ctype[t]}& {v} = {v}_[i];")
        body = (f'extern "C" __global__ void k({", ".join(params)}, int n) {{ int i = blockIdx.x * blockDim.x '
                f'+ threadIdx.x; if (i >= n) return; {" ".join(bind)} {op} }}')
        for t in ("float", "double"):
            compile_ok(f"typedef {t} T;\n{body}\n", f"{name}_{t}.cu")


# The tolerances each GPU mode is held to against PyTorch's float32 fixtures (dropout off):
# (loss, gradients relative to max(1, max |g_torch|)). Fused kernels are float32 and keep
# the CPU tolerances; TF32 GEMMs round their inputs to 10 mantissa bits, so ~1e-3 relative.
GPU_MODE_TOLERANCES = {"fused": (1e-5, 1e-4), "tf32": (2e-3, 2e-2)}


@cuda_only
@pytest.mark.parametrize("mode", sorted(GPU_MODE_TOLERANCES))
@pytest.mark.parametrize("arch", ["xlmr", "bert"])
def test_gpu_modes_match_torch_within_their_tolerances(mode, arch):
    import minihbt
    from fixtures.spec import TEMPERATURE, TRIPLETS
    ref = np.load(TINY[arch] + "/grads.npz")
    model = minihbt.load_model(TINY[arch], pooling="mean", device="cuda", fused_kernels=mode == "fused",
                               tf32=mode == "tf32")
    try:
        loss, grads = minihbt.loss_and_grads(model, [t[0] for t in TRIPLETS], [t[1] for t in TRIPLETS],
                                             [t[2] for t in TRIPLETS], temperature=TEMPERATURE)
    finally:
        Backend("cuda", tf32=False)                   # TF32 is a process-wide cuBLAS setting: switch it back off
    tol_loss, tol_grad = GPU_MODE_TOLERANCES[mode]
    assert abs(loss - float(ref["loss"])) <= tol_loss
    for name, g in grads.items():
        g_torch = ref["grad/" + name]
        assert np.abs(g - g_torch).max() <= tol_grad * max(1.0, np.abs(g_torch).max()), name
