"""The fused kernels of minihbt.kernels against their references.

On CPU: the dispatchers run the references, which must equal the unfused operations of
layers.py / optim.py bit for bit, with fused kernels switched on or off (they never apply
to NumPy). Under CuPy with a GPU: each fused kernel against its reference on the same
inputs (float32; skipped with the reason where CuPy sees no GPU), and a whole training
gradient with fused kernels on against the one with them off.
"""
import math

import numpy as np
import pytest

from conftest import CUDA_SKIP, TINY
from minihbt import kernels as K
from minihbt import layers as L
from minihbt.optim import _adamw_update

cuda_only = pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")


@pytest.fixture
def fused():
    """Fused kernels on for the test, off again afterwards."""
    K.set_fused(True)
    yield
    K.set_fused(False)


def _inputs(xp, rng, rows=6, H=100, F=130):
    f32 = lambda *s: xp.asarray(rng.standard_normal(s).astype(np.float32))
    mask = np.ones((2, 7), np.float32)
    mask[1, 4:] = 0                                                   # a padded text
    return dict(y=f32(rows, F), b=f32(F), x=f32(rows, H), r=f32(rows, H), g=f32(H), beta=f32(H),
                dy=f32(rows, H), s=f32(2, 3, 7, 7), dp=f32(2, 3, 7, 7),
                mask_bias=L.mask_bias_from(xp, xp.asarray(mask), np.float32))


@pytest.mark.parametrize("fused_on", [False, True])
def test_references_equal_the_unfused_operations_on_cpu(fused_on):
    K.set_fused(fused_on)
    try:
        rng = np.random.default_rng(0)
        a = _inputs(np, rng)
        out, (x, cdf) = K.bias_gelu(np, a["y"].copy(), a["b"])
        ref, ref_cache = L.gelu_forward(np, a["y"] + a["b"])
        assert np.array_equal(out, ref) and np.array_equal(x, ref_cache[0]) and np.array_equal(cdf, ref_cache[1])
        assert np.array_equal(K.gelu_grad(np, a["dy"][:, :1].repeat(130, 1), x, cdf),
                              L.gelu_backward(np, a["dy"][:, :1].repeat(130, 1), ref_cache))

        y, (xhat, rstd, g) = K.add_layernorm(np, a["x"].copy(), a["r"], a["g"], a["beta"], 1e-5)
        y_ref, (xhat_ref, rstd_ref, _) = L.layernorm_forward(np, a["x"] + a["r"], a["g"], a["beta"], 1e-5)
        assert np.array_equal(y, y_ref) and np.array_equal(xhat, xhat_ref) and np.array_equal(rstd, rstd_ref)
        d_x = K.layernorm_grad(np, a["dy"], xhat, rstd, g)
        d_xhat = a["dy"] * g                                           # the formula, written out again
        expect = (d_xhat - d_xhat.mean(-1, keepdims=True) - xhat * (d_xhat * xhat).mean(-1, keepdims=True)) * rstd
        np.testing.assert_allclose(d_x, expect, rtol=1e-5, atol=1e-6)

        p = K.scaled_masked_softmax(np, a["s"].copy(), 1 / math.sqrt(8), a["mask_bias"])
        s_ref = a["s"] * np.float32(1 / math.sqrt(8)) + a["mask_bias"]
        e = np.exp(s_ref - s_ref.max(-1, keepdims=True))
        np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-7)
        assert (p[1, :, :, 4:] == 0).all()                             # padded keys get exactly 0
        assert np.array_equal(K.softmax_grad(np, a["dp"].copy(), p), L.softmax_backward(np, a["dp"], p))

        consts = tuple(np.float32(c) for c in (0.99, 0.1, 0.999, 0.001, 1.2, 1e-8, 3e-4))
        p1, m1, v1 = a["x"].copy(), a["r"].copy(), np.abs(a["dy"]).copy()
        p2, m2, v2 = p1.copy(), m1.copy(), v1.copy()
        K.adamw(np, p1, a["g"][None].repeat(6, 0), m1, v1, *consts)
        _adamw_update(p2, a["g"][None].repeat(6, 0), m2, v2, *consts)
        assert np.array_equal(p1, p2) and np.array_equal(m1, m2) and np.array_equal(v1, v2)
    finally:
        K.set_fused(False)


def test_fused_kernels_never_apply_to_numpy_or_float64(fused):
    assert not K.fused_enabled(np, np.zeros(3, np.float32))


@cuda_only
@pytest.mark.parametrize("H", [100, 768])
def test_fused_kernels_match_references_on_gpu(fused, H):
    import cupy as cp
    rng = np.random.default_rng(1)
    a = _inputs(cp, rng, rows=37, H=H, F=3 * H + 1)
    assert K.fused_enabled(cp, a["x"])
    tol = dict(rtol=2e-6, atol=2e-6)
    get = cp.asnumpy

    out, (x, cdf) = K.bias_gelu(cp, a["y"].copy(), a["b"])
    ref, (x_ref, cdf_ref) = K.bias_gelu_reference(cp, a["y"].copy(), a["b"])
    for u, w in ((out, ref), (x, x_ref), (cdf, cdf_ref)):
        np.testing.assert_allclose(get(u), get(w), **tol)
    dy = cp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    np.testing.assert_allclose(get(K.gelu_grad(cp, dy, x, cdf)), get(K.gelu_grad_reference(cp, dy, x_ref, cdf_ref)),
                               **tol)

    y, (xhat, rstd, g) = K.add_layernorm(cp, a["x"].copy(), a["r"], a["g"], a["beta"], 1e-12)
    y_ref, (xhat_ref, rstd_ref, _) = K.add_layernorm_reference(cp, a["x"].copy(), a["r"], a["g"], a["beta"], 1e-12)
    for u, w in ((y, y_ref), (xhat, xhat_ref), (rstd, rstd_ref)):
        np.testing.assert_allclose(get(u), get(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(get(K.layernorm_grad(cp, a["dy"], xhat, rstd, g)),
                               get(K.layernorm_grad_reference(cp, a["dy"], xhat_ref, rstd_ref, g)), rtol=1e-5, atol=1e-5)

    p = K.scaled_masked_softmax(cp, a["s"].copy(), 0.125, a["mask_bias"])
    p_ref = K.scaled_masked_softmax_reference(cp, a["s"].copy(), 0.125, a["mask_bias"])
    np.testing.assert_allclose(get(p), get(p_ref), **tol)
    assert (get(p)[1, :, :, 4:] == 0).all()
    np.testing.assert_allclose(get(K.softmax_grad(cp, a["dp"].copy(), p)),
                               get(K.softmax_grad_reference(cp, a["dp"], p_ref)), **tol)

    consts = tuple(np.float32(c) for c in (0.99, 0.1, 0.999, 0.001, 1.2, 1e-8, 3e-4))
    p1, m1, v1 = a["x"].copy(), a["r"].copy(), cp.abs(a["dy"])
    p2, m2, v2 = p1.copy(), m1.copy(), v1.copy()
    grad = a["x"] * 0.5
    K.adamw(cp, p1, grad, m1, v1, *consts)
    K.adamw_reference(cp, p2, grad, m2, v2, *consts)
    for u, w in ((p1, p2), (m1, m2), (v1, v2)):
        np.testing.assert_allclose(get(u), get(w), rtol=1e-6, atol=1e-7)


@cuda_only
@pytest.mark.parametrize("arch", ["xlmr", "bert"])
def test_training_gradients_with_fused_kernels_match_unfused_on_gpu(arch):
    import minihbt
    model = minihbt.load_model(TINY[arch], device="cuda")
    q = ["what is the capital of france", "wer schrieb faust?"]
    p = ["paris is the capital of france.", "goethe schrieb faust."]
    n = [["berlin is in germany."], ["die sonne scheint."]]
    loss0, g0 = minihbt.loss_and_grads(model, q, p, n, dropout=True, seed=3)
    K.set_fused(True)
    try:
        loss1, g1 = minihbt.loss_and_grads(model, q, p, n, dropout=True, seed=3)
    finally:
        K.set_fused(False)
    assert abs(loss0 - loss1) <= 1e-5
    for name in g0:
        scale = max(1.0, float(np.abs(g0[name]).max()))
        assert float(np.abs(g0[name] - g1[name]).max()) <= 1e-4 * scale, name


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy with NVRTC (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12) "
                                               "is not importable: the CUDA sources are not compiled here")
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
        for decl in ins.split(","):
            v = decl.split()[1]
            params.append(f"const T* {v}_")
            bind.append(f"const T {v} = {v}_[i];")
        for decl in outs.split(","):
            v = decl.split()[1]
            params.append(f"T* {v}_")
            bind.append(f"T& {v} = {v}_[i];")
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
    import cupy
    import minihbt
    from minihbt.backend import set_tf32
    from fixtures.spec import TEMPERATURE, TRIPLETS
    ref = np.load(TINY[arch] + "/grads.npz")
    model = minihbt.load_model(TINY[arch], pooling="mean", device="cuda")
    K.set_fused(mode == "fused")
    set_tf32(cupy, mode == "tf32")
    try:
        loss, grads = minihbt.loss_and_grads(model, [t[0] for t in TRIPLETS], [t[1] for t in TRIPLETS],
                                             [t[2] for t in TRIPLETS], temperature=TEMPERATURE)
    finally:
        K.set_fused(False)
        set_tf32(cupy, False)
    tol_loss, tol_grad = GPU_MODE_TOLERANCES[mode]
    assert abs(loss - float(ref["loss"])) <= tol_loss
    for name, g in grads.items():
        g_torch = ref["grad/" + name]
        assert np.abs(g - g_torch).max() <= tol_grad * max(1.0, np.abs(g_torch).max()), name
