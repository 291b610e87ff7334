"""The inference path, forward(..., train=False): the same outputs as the training forward,
nothing kept for backward (and backward refuses), on both backends; and float32 stays float32."""
import copy
from dataclasses import replace

import numpy as np
import pytest

from tinyuvit import gradcheck as gc
from tinyuvit.backend import Backend, to_numpy
from tinyuvit.layers import Module
from tinyuvit.model import UViT, UViTConfig, ablations, get_config
from tinyuvit.tools.parallel import DataParallel

from test_layers import LAYERS, move

CFG = UViTConfig(img_size=8, patch_size=2, dim=16, depth=4, num_heads=2, num_classes=3)
INFERENCE_LAYERS = LAYERS


def model_inputs(c, B=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, c.in_chans, c.img_size, c.img_size))
    return x, rng.integers(0, 1000, B).astype(np.float64), np.array([0, c.num_classes, 2, 1, 0][:B])


def is_array(a):
    return isinstance(a, np.ndarray) or type(a).__module__.startswith("cupy")


def kept_arrays(module):
    """(module name, attribute path) of every array a module holds outside params and grads."""
    found = []

    def walk(name, value, path):
        if is_array(value):
            found.append((name, path))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(name, v, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if not isinstance(v, Module):
                    walk(name, v, f"{path}[{i}]")

    for name, m in module.modules():
        for attr, value in vars(m).items():
            if attr not in ("params", "grads") and not isinstance(value, Module):
                walk(name or "(root)", value, attr)
    return found


# ----------------------------------------------------------------------------------------
# The same outputs: every layer and the whole model, both backends, float64 and float32
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(INFERENCE_LAYERS))
def test_layer_inference_equals_training_forward(backend, dtype, name):
    """Exactly equal: the inference forward does the same arithmetic, in the same order; it only
    skips what backward would need (and may write over its own temporaries)."""
    make, inputs = INFERENCE_LAYERS[name]
    be = Backend(backend, dtype)
    rng = np.random.default_rng(0)
    layer = gc.randomize(make(rng), rng).to(be)
    args = [move(be, a) for a in inputs]
    want = layer(*args)
    got = layer(*args, train=False)
    assert type(got) is type(want) and got.dtype == want.dtype == be.dtype
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("variant", [name for name, _, _ in ablations()])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_inference_equals_training_forward(backend, dtype, variant):
    be = Backend(backend, dtype)
    overrides = {n: o for n, _, o in ablations()}[variant]
    m = gc.randomize(UViT(replace(CFG, **overrides), seed=1), np.random.default_rng(2)).to(be)
    x, t, y = model_inputs(CFG)
    args = (be.asarray(x), be.asarray(t), be.xp.asarray(y))
    want = m.forward(*args)
    got = m.forward(*args, train=False)
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


# ----------------------------------------------------------------------------------------
# Nothing kept: no activations on any module, and backward refuses
# ----------------------------------------------------------------------------------------

def test_inference_forward_keeps_no_arrays(backend):
    """A training forward and backward first (every cache full), then an inference forward:
    afterwards no module holds an array other than its parameters and their gradients."""
    be = Backend(backend, "float32")
    m = UViT(CFG).to(be)
    x, t, y = model_inputs(CFG)
    args = (be.asarray(x), be.asarray(t), be.xp.asarray(y))
    out = m.forward(*args)
    m.backward(be.asarray(np.ones(out.shape)))
    assert len(kept_arrays(m)) > 20                       # the check sees the training caches
    m.forward(*args, train=False)
    assert kept_arrays(m) == []
    assert all(mod.cache is None for _, mod in m.modules())


@pytest.mark.parametrize("name", list(INFERENCE_LAYERS))
def test_layer_backward_after_inference_raises(name):
    make, inputs = INFERENCE_LAYERS[name]
    layer = make(np.random.default_rng(0))
    out = layer(*inputs)
    layer.backward(np.ones(out.shape))                    # fine after a training forward
    layer(*inputs, train=False)
    assert kept_arrays(layer) == []
    if name in ("PosEmbed", "SinCosPosEmbed", "unpatchify"):  # their backward needs nothing kept
        return
    with pytest.raises(RuntimeError, match=r"backward needs a training forward first"):
        layer.backward(np.ones(out.shape))


def test_model_backward_after_inference_raises():
    m = UViT(CFG)
    x, t, y = model_inputs(CFG)
    with pytest.raises(RuntimeError, match="backward needs a training forward first"):
        m.backward(np.ones(x.shape))                      # no forward at all
    m.forward(x, t, y, train=False)
    with pytest.raises(RuntimeError, match="forward\\(\\.\\.\\., train=False\\)"):
        m.backward(np.ones(x.shape))


def test_data_parallel_passes_train_through():
    m = gc.randomize(UViT(CFG, seed=0), np.random.default_rng(1))
    x, t, y = model_inputs(CFG, B=5)
    dp = DataParallel(m, 2)
    want = m.forward(x, t, y)
    got = dp.forward(x, t, y, train=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert all(kept_arrays(r) == [] for r in dp.replicas)
    with pytest.raises(RuntimeError, match="train=False"):
        dp.backward(np.ones(x.shape))
    dp.forward(x, t, y)                                   # the default is a training forward
    dp.backward(np.ones(x.shape))


# ----------------------------------------------------------------------------------------
# float32 stays float32: no NumPy float64 scalar or array sneaks into a training step
# ----------------------------------------------------------------------------------------

class Float32Only(np.ndarray):
    """An ndarray that records every NumPy ufunc (matmul, exp, sums, ...) whose float result is
    not float32. Parameters and input carry it, so it reaches every activation they touch."""

    promoted = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = lambda a: a.view(np.ndarray) if isinstance(a, Float32Only) else a
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        result = getattr(ufunc, method)(*(plain(a) for a in inputs), **kwargs)
        results = result if isinstance(result, tuple) else (result,)
        for r in results:
            if getattr(r, "dtype", None) is not None and r.dtype.kind == "f" and r.dtype != np.float32:
                Float32Only.promoted.append(f"{ufunc.__name__}.{method} -> {r.dtype}")
        if out is not None:
            return out if isinstance(result, tuple) else out[0]
        wrap = lambda r: r.view(Float32Only) if isinstance(r, np.ndarray) else r
        return tuple(wrap(r) for r in results) if isinstance(result, tuple) else wrap(result)


@pytest.mark.parametrize("variant", [name for name, _, _ in ablations()])
def test_float32_training_step_computes_only_float32(variant):
    c = get_config("tiny", img_size=8, patch_size=2, **{n: o for n, _, o in ablations()}[variant])
    m = UViT(c).to(Backend("cpu", "float32"))
    for _, mod, k in m.named_parameters():
        mod.params[k] = mod.params[k].view(Float32Only)
    x, t, y = model_inputs(c)
    Float32Only.promoted = []
    out = m.forward(x.astype(np.float32).view(Float32Only), t, y)
    dx = m.backward(np.ones(out.shape, np.float32).view(Float32Only))
    assert Float32Only.promoted == []
    assert out.dtype == dx.dtype == np.float32
    for name, g in m.grad_dict().items():
        assert g.dtype == np.float32, name
    for name, mod in m.modules():
        for k, a in (mod.cache or {}).items():
            assert not is_array(a) or a.dtype.kind != "f" or a.dtype == np.float32, f"{name} cache {k}: {a.dtype}"


def test_the_spy_sees_a_promotion():
    """The check above is not vacuous: a NumPy float64 scalar promotes float32 arrays (NEP 50)."""
    Float32Only.promoted = []
    a = np.ones(3, np.float32).view(Float32Only)
    a * np.sqrt(np.float64(2.0))
    assert Float32Only.promoted == ["multiply.__call__ -> float64"]


# ----------------------------------------------------------------------------------------
# Copies for other threads
# ----------------------------------------------------------------------------------------

def test_replica_shares_parameters_not_caches():
    m = gc.randomize(UViT(CFG, seed=0), np.random.default_rng(1))
    x, t, y = model_inputs(CFG)
    m.forward(x, t, y)
    r = m.replica()
    assert type(r) is UViT and r.cfg is m.cfg and len(r.in_blocks) == len(m.in_blocks)
    for (name, p), (name_r, p_r) in zip(m.state_dict().items(), r.state_dict().items()):
        assert name == name_r and p_r is p
    assert all(mod.cache is None and mod.grads == {} for _, mod in r.modules())
    assert all(a is not b for (_, a), (_, b) in zip(m.modules(), r.modules()))
    np.testing.assert_array_equal(r.forward(x, t, y), m.forward(x, t, y))
    r.backward(np.ones(x.shape))                           # its own cache and gradients
    assert m.in_blocks[0].attn.qkv.grads == {} or m.in_blocks[0].attn.qkv.grads["W"] is not \
        r.in_blocks[0].attn.qkv.grads["W"]
    assert copy.deepcopy(r).backend is r.backend
