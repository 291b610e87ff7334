"""The fused CUDA kernels (tinyuvit/kernels.py) against the plain array code they replace.

Each GPU test runs the same function twice on the same CuPy float32 arrays, once with the
kernels (`kernels.use(True)`) and once without (the reference: the code NumPy runs), and
compares; a float64 NumPy run pins the reference itself. They skip without CuPy and a GPU.
"""
import numpy as np
import pytest

from tinyuvit import kernels
from tinyuvit.backend import cupy_status, sum_rows
from tinyuvit.layers import GELU, LayerNorm, softmax, softmax_backward
from tinyuvit.optim import EMA, AdamW, FlatParams

gpu = pytest.mark.skipif(not cupy_status()[0], reason="needs CuPy and a GPU")


def rel_err(a, b):
    a, b = (np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float64) for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_kernels_only_for_float32_cupy_arrays():
    x = np.ones((4, 8), np.float32)
    assert not kernels.fits(x)                 # NumPy always runs the reference code
    before = kernels.enabled()
    with kernels.use(not before):
        assert kernels.enabled() == (not before)
    assert kernels.enabled() == before         # restored after the block


def test_sum_rows_is_the_sum_over_axis_0_on_numpy():
    a = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    assert np.array_equal(sum_rows(a), a.sum(axis=0))


# ----------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------

def _cp():
    import cupy
    return cupy


def _both(fn):
    """fn() with the fused kernels and with the reference code: (fused, reference)."""
    with kernels.use(True):
        fused = fn()
    with kernels.use(False):
        ref = fn()
    return fused, ref


SHAPES = [(3, 51, 128), (2, 198, 256), (5, 7, 33), (1, 1, 3), (4, 9, 1000)]


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_fused_equals_reference(shape, affine):
    cp = _cp()
    rng = np.random.default_rng(1)
    ln = LayerNorm(shape[-1], affine=affine)
    if affine:
        ln.params["g"] = rng.normal(1.0, 0.3, shape[-1])
        ln.params["b"] = rng.normal(0.0, 0.3, shape[-1])
    for k in list(ln.params):
        ln.params[k] = cp.asarray(ln.params[k], dtype=np.float32)
    x = cp.asarray(rng.normal(0.5, 2.0, shape), dtype=np.float32)
    dy = cp.asarray(rng.standard_normal(shape), dtype=np.float32)

    def run():
        y = ln.forward(x)
        dx = ln.backward(dy)
        grads = {k: v.copy() for k, v in ln.grads.items()}
        y_inf = ln.forward(x, train=False)
        return y, dx, grads, y_inf
    (y, dx, g, yi), (y0, dx0, g0, yi0) = _both(run)
    assert rel_err(y, y0) < 1e-5 and rel_err(yi, yi0) < 1e-5
    assert rel_err(dx, dx0) < 1e-4
    for k in g0:
        assert rel_err(g[k], g0[k]) < 1e-4
    # the reference itself against float64 on the host
    x64, dy64 = x.get().astype(np.float64), dy.get().astype(np.float64)
    ln64 = LayerNorm(shape[-1], affine=affine)
    if affine:
        ln64.params = {k: v.get().astype(np.float64) for k, v in ln.params.items()}
    assert rel_err(y, ln64.forward(x64)) < 1e-5
    assert rel_err(dx, ln64.backward(dy64)) < 1e-4


@gpu
@pytest.mark.parametrize("shape", [(2, 4, 51, 51), (1, 8, 198, 198), (3, 5), (2, 1), (4, 1000)])
def test_softmax_fused_equals_reference(shape):
    cp = _cp()
    rng = np.random.default_rng(2)
    s = cp.asarray(rng.normal(0, 30, shape), dtype=np.float32)     # large scores: exp would overflow unshifted
    dp = cp.asarray(rng.standard_normal(shape), dtype=np.float32)
    (p, ds), (p0, ds0) = _both(lambda: (softmax(s), softmax_backward(softmax(s), dp)))
    assert rel_err(p, p0) < 1e-5
    assert rel_err(ds, ds0) < 1e-4
    assert float(cp.abs(p.sum(axis=-1) - 1).max()) < 1e-5


@gpu
@pytest.mark.parametrize("n", [1, 1000, (1 << 16) * 256 + 7])   # the last needs the grid-stride loop
def test_gelu_fused_equals_reference(n):
    cp = _cp()
    x = cp.asarray(np.random.default_rng(3).normal(0, 3, n), dtype=np.float32)
    dy = cp.ones_like(x)

    def run():
        act = GELU()
        y = act.forward(x)
        return y, act.backward(dy), act.forward(x, train=False)
    (y, dx, yi), (y0, dx0, yi0) = _both(run)
    assert rel_err(y, y0) < 1e-6 and rel_err(yi, yi0) < 1e-6
    assert rel_err(dx, dx0) < 1e-5


@gpu
@pytest.mark.parametrize("decay", ["all", "mask", "none"])
def test_adamw_and_ema_fused_equal_reference(decay):
    cp = _cp()
    from tinyuvit.backend import Backend
    from tinyuvit.model import UViT, get_config
    cfg = get_config("tiny", dim=32, depth=2, num_heads=2)
    pick = {"all": None, "mask": lambda name, p: p.ndim >= 2, "none": lambda name, p: False}[decay]

    def run():
        model = UViT(cfg, seed=0).to(Backend("gpu", "float32"))
        flat = FlatParams(model)
        opt = AdamW(flat, lr=1e-2, weight_decay=0.1, decay=pick)
        ema = EMA(flat, 0.99)
        for k in range(5):
            g = cp.asarray(np.random.default_rng(k).standard_normal(flat.size), dtype=np.float32)
            opt.step(g, 1e-2)
            ema.update(flat, k)
        return flat.data.copy(), opt.m[flat.names[0]].copy(), ema.data.copy()
    (p, m, e), (p0, m0, e0) = _both(run)
    assert rel_err(p, p0) < 1e-5 and rel_err(m, m0) < 1e-5 and rel_err(e, e0) < 1e-5


@gpu
def test_sum_rows_on_the_gpu():
    cp = _cp()
    a = cp.asarray(np.random.default_rng(5).standard_normal((1000, 37)), dtype=np.float32)
    assert rel_err(sum_rows(a), a.sum(axis=0)) < 1e-5


@gpu
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_model_step_fused_equals_reference(preset):
    """A whole forward and backward of the model: outputs and every gradient."""
    cp = _cp()
    from tinyuvit.backend import Backend
    from tinyuvit.model import UViT, get_config
    cfg = get_config(preset, depth=2)
    model = UViT(cfg, seed=0).to(Backend("gpu", "float32"))
    rng = np.random.default_rng(6)
    B = 4
    x = cp.asarray(rng.standard_normal((B, 1, 28, 28)), dtype=np.float32)
    t = cp.asarray(rng.integers(0, 1000, B))
    y = cp.asarray(rng.integers(0, 11, B))
    dout = cp.asarray(rng.standard_normal((B, 1, 28, 28)), dtype=np.float32)

    def run():
        out = model.forward(x, t, y)
        model.backward(dout)
        return out, {k: v.copy() for k, v in model.grad_dict().items()}
    (out, g), (out0, g0) = _both(run)
    assert rel_err(out, out0) < 1e-4
    for k in g0:
        assert rel_err(g[k], g0[k]) < 1e-3, k


def test_cuda_source_compiles_without_a_gpu():
    """NVRTC (CuPy's compiler library) builds every kernel for a GPU that need not be here, so
    a session without one still catches a kernel that does not compile. Skips without CuPy or
    NVRTC (`pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12` brings both)."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    try:
        prog = nvrtc.createProgram(kernels.source(), "kernels.cu", [], [])
    except Exception as e:   # the NVRTC library itself is missing
        pytest.skip(f"NVRTC unavailable: {e}")
    try:
        nvrtc.compileProgram(prog, ["-arch=compute_75"])    # Turing: the oldest CUDA 13 builds for
    except Exception:
        pytest.fail("the CUDA source does not compile:\n" + nvrtc.getProgramLog(prog))
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name in kernels._NAMES:
        assert f".entry {name}(" in ptx, name
