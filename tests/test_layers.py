"""Layers: hand gradients vs finite differences and autograd, forward values vs independent
references, and CuPy/float32 parity with float64 NumPy. Seeds are fixed; tolerances explicit."""
import copy
import math

import numpy as np
import pytest
from scipy.signal import correlate2d

from tinyuvit import gradcheck as gc
from tinyuvit.backend import Backend, BackendError, cupy_status, to_numpy
from tinyuvit.layers import (GELU, MLP, AdaLN, Attention, Block, Conv3x3, ConvPatchEmbed, LabelEmbedding,
                             LayerNorm, Linear, PatchEmbed, PosEmbed, SinCosPosEmbed, Softmax, patchify,
                             sincos_2d, softmax, timestep_embedding, unpatchify)

FD_TOL, AG_TOL = 1e-6, 1e-10        # gradients: vs finite differences, vs autograd (float64)
F64_TOL, F32_TOL = 1e-10, 1e-4      # parity of another backend/dtype with float64 NumPy


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------------------
# Gradients: gradcheck's table of cases, shared with `tinyuvit gradcheck`
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", gc.layer_cases(), ids=lambda case: case.name)
def test_grad(case):
    """Every case of gradcheck's table (every layer, the model and its ablation variants): each
    gradient tensor within FD_TOL of finite differences and AG_TOL of autograd."""
    rows = gc.check_case(case)
    assert rows and len(rows) == len(case.diff if case.diff is not None else
                                     [a for a in case.inputs if a is not None and np.asarray(a).dtype.kind == "f"]) \
        + len(list(case.make(np.random.default_rng(0)).named_parameters()))
    for r in rows:
        assert r.fd <= FD_TOL, f"{case.name} {r.tensor}: rel err vs finite differences {r.fd:.2e}"
        assert r.ag is None or r.ag <= AG_TOL, f"{case.name} {r.tensor}: rel err vs autograd {r.ag:.2e}"


def test_the_table_covers_every_layer_and_every_ablation_variant():
    """No layer class of layers.py and no variant of the ablation study is left unchecked."""
    import inspect

    import tinyuvit.layers as L
    from tinyuvit.model import ablations
    names = " ".join(c.name for c in gc.layer_cases())
    layers = {n for n, obj in vars(L).items() if inspect.isclass(obj) and issubclass(obj, L.Module)
              and obj is not L.Module and obj.__module__ == L.__name__}
    assert all(n in names for n in layers), sorted(n for n in layers if n not in names)
    assert all(f"UViT {v}" in names for v, choice, _ in ablations() if choice)


def test_conv_stride2_equals_every_other_pixel_of_stride1():
    """A stride-2 conv is the stride-1 conv read at even rows and columns."""
    rng = np.random.default_rng(0)
    c1, x = Conv3x3(2, 3, rng), randn(2, 2, 6, 8)
    c2 = Conv3x3(2, 3, np.random.default_rng(1), stride=2)
    c2.params = dict(c1.params)
    np.testing.assert_allclose(c2(x), c1(x)[:, :, ::2, ::2], rtol=1e-12, atol=1e-12)
    assert c2(x).shape == (2, 3, 3, 4)


def test_conv_patch_embed_gives_the_linear_token_grid():
    x = randn(3, 1, 28, 28)
    assert ConvPatchEmbed(4, 1, 16, np.random.default_rng(0))(x).shape == PatchEmbed(4, 1, 16, np.random.default_rng(0))(x).shape == (3, 49, 16)
    with pytest.raises(ValueError, match="power of 2"):
        ConvPatchEmbed(3, 1, 16, np.random.default_rng(0))


def test_adaln_starts_as_layernorm_and_uses_the_time():
    rng = np.random.default_rng(0)
    ada, x = AdaLN(6, rng), randn(2, 3, 6)
    e = randn(2, 6, seed=1)
    ada.emb.params["W"][:] = 0                       # no time dependence: scale 1, shift 0
    np.testing.assert_allclose(ada(x, e), LayerNorm(6)(x), atol=1e-12)
    ada.emb.params["W"] = randn(6, 12, seed=2)
    y = ada(x, e)
    ys, yb = (e @ ada.emb.params["W"] + ada.emb.params["b"])[:, None, :6], (e @ ada.emb.params["W"])[:, None, 6:]
    np.testing.assert_allclose(y, ys * LayerNorm(6)(x) + yb, atol=1e-12)


def test_sincos_2d_rows_and_columns():
    """Row r's tokens share the first half of their code, column c's the second; sin(0) = 0, cos(0) = 1."""
    t = sincos_2d(3, 8).reshape(3, 3, 8)
    np.testing.assert_allclose(t[:, 0, :4], t[:, 2, :4])          # same row: same row code
    np.testing.assert_allclose(t[0, :, 4:], t[2, :, 4:])          # same column: same column code
    np.testing.assert_allclose(t[0, 0], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_allclose(t[1, 2, 0], math.sin(1.0)); np.testing.assert_allclose(t[1, 2, 4], math.sin(2.0))
    x = randn(2, 11, 8)
    np.testing.assert_allclose(SinCosPosEmbed(2, 3, 8)(x)[:, :2], x[:, :2])  # no position for the extras


def test_gradcheck_catches_a_wrong_backward(monkeypatch):
    """The checker itself: drop a term of LayerNorm's input gradient and both references object."""
    right = LayerNorm.backward

    def wrong(self, dy):  # forgets the path through the variance
        right(self, dy)   # (still fills the parameter gradients)
        h = dy * self.params["g"]
        return self.saved("rstd") * (h - h.mean(axis=-1, keepdims=True))

    monkeypatch.setattr(LayerNorm, "backward", wrong)
    rows = gc.check_layer("LayerNorm", lambda g: LayerNorm(6), (randn(2, 3, 6),))
    bad = {r.tensor for r in rows if not r.ok}
    assert bad == {"input"}
    assert all(r.fd > 1e-2 and (r.ag is None or r.ag > 1e-2) for r in rows if r.tensor == "input")


def test_rel_err_definition():
    assert gc.rel_err([1.0, 2.0], [1.0, 4.0]) == pytest.approx(0.5)   # max|diff| / max|ref|
    assert gc.rel_err([0.0], [0.0]) == 0.0


# ----------------------------------------------------------------------------------------
# Forward values against independent references
# ----------------------------------------------------------------------------------------

def test_linear_hand_computed():
    lin = Linear(3, 2, np.random.default_rng(0))
    lin.params["W"] = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lin.params["b"] = np.array([0.5, -1.0])
    y = lin(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    np.testing.assert_allclose(y, [[4.5, 4.0], [10.5, 10.0]], rtol=0, atol=1e-15)


def test_layernorm_hand_computed():
    ln = LayerNorm(3)
    ln.params["g"], ln.params["b"] = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0])
    # each row has mean 5 +- 1 and variance 2/3: xhat = [-1, 0, 1] / sqrt(2/3 + 1e-5)
    r = 1.0 / math.sqrt(2.0 / 3.0 + 1e-5)
    y = ln(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    np.testing.assert_allclose(y, [[-r, 0.0, 3 * r + 1], [-r, 0.0, 3 * r + 1]], rtol=1e-14, atol=1e-14)


def test_layernorm_normalizes_rows():
    x = 10 * randn(4, 5, 32) + 3
    y = LayerNorm(32)(x)  # g = 1, b = 0 at init
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, atol=1e-6)  # var / (var + 1e-5), var ~ 100


def test_softmax_hand_computed():
    np.testing.assert_allclose(softmax(np.log([[1.0, 2.0, 3.0]])), [[1 / 6, 2 / 6, 3 / 6]], rtol=1e-14)
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0], [-1000.0, 0.0]])),
                               [[0.5, 0.5], [0.0, 1.0]], rtol=0, atol=1e-15)  # no overflow


def test_gelu_matches_math_erf():
    x = np.concatenate([np.linspace(-6, 6, 49), 3 * randn(20)])
    want = [v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x]
    np.testing.assert_allclose(GELU()(x), want, rtol=1e-14, atol=1e-15)


def test_float32_erf_matches_scipy():
    # float32 erf is a rational approximation (backend.py); float64 stays scipy's.
    import scipy.special
    from tinyuvit import backend
    x = np.concatenate([np.linspace(-12, 12, 300001), [0.0, -0.0, 4.0, -4.0]]).astype(np.float32)
    got = backend.erf(x)
    assert got.dtype == np.float32
    want = scipy.special.erf(x.astype(np.float64))
    assert np.abs(got - want).max() < 5e-7
    assert np.all(np.sign(got) == np.sign(x))                 # odd, erf(0) = 0
    assert np.all(np.diff(got[:300001]) >= -1e-6)             # increasing, up to the error above
    assert np.isnan(backend.erf(np.float32([np.nan]))).all()


def test_elementwise_in_pieces_equals_one_piece():
    from tinyuvit.backend import _PIECE, elementwise
    f = lambda x: (np.exp(-x * x), x.astype(np.float64) + 1.0)   # two outputs, two dtypes
    x = randn(7, 5 * _PIECE // 7 + 3).astype(np.float32)[:, ::2]  # not contiguous, ragged last piece
    a, b = elementwise(f, x)
    assert a.shape == b.shape == x.shape and (a.dtype, b.dtype) == (np.float32, np.float64)
    np.testing.assert_array_equal(a, f(x)[0])
    np.testing.assert_array_equal(b, f(x)[1])
    np.testing.assert_array_equal(elementwise(np.tanh, x), np.tanh(x))  # one output


def test_gelu_big_float32_equals_the_formula_in_one_piece():
    from tinyuvit.layers import gelu_and_slope
    x = (3 * randn(64, 51, 512)).astype(np.float32)           # many pieces
    dy = randn(*x.shape).astype(np.float32)
    gelu = GELU()
    y, slope = gelu_and_slope(x)
    np.testing.assert_array_equal(gelu(x), y)
    np.testing.assert_array_equal(gelu.backward(dy), dy * slope)
    assert gelu(x).dtype == np.float32


@pytest.mark.parametrize("c_in,c_out", [(1, 1), (2, 3)])
def test_conv3x3_matches_scipy_correlate2d(c_in, c_out):
    conv = gc.randomize(Conv3x3(c_in, c_out, np.random.default_rng(0)), np.random.default_rng(1))
    x = randn(2, c_in, 5, 6)
    W, b = conv.params["W"], conv.params["b"]
    want = np.array([[sum(correlate2d(x[n, c], W[o, c], mode="same") for c in range(c_in)) + b[o]
                      for o in range(c_out)] for n in range(2)])
    np.testing.assert_allclose(conv(x), want, rtol=1e-13, atol=1e-13)


def attention_loop(x, Wqkv, Wproj, bproj, H):
    """Plain per-batch, per-head attention; qkv columns laid out as [q | k | v], heads inside each."""
    B, L, D = x.shape
    hd = D // H
    out = np.zeros((B, L, D))
    for b in range(B):
        qkv = x[b] @ Wqkv
        for h in range(H):
            q, k, v = (qkv[:, s * D + h * hd: s * D + (h + 1) * hd] for s in range(3))
            s = q @ k.T / math.sqrt(hd)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, :, h * hd:(h + 1) * hd] = (a / a.sum(axis=1, keepdims=True)) @ v
    return out @ Wproj + bproj


@pytest.mark.parametrize("D,H", [(8, 2), (12, 3), (6, 1)])
def test_attention_matches_per_head_loop(D, H):
    attn = gc.randomize(Attention(D, H, np.random.default_rng(0)), np.random.default_rng(1), scale=0.5)
    x = randn(2, 5, D)
    y = attn(x)
    A = attn.softmax.saved("p")
    np.testing.assert_allclose(A.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    assert A.std() > 0.01  # not uniform: the comparison below means something
    want = attention_loop(x, attn.qkv.params["W"], attn.proj.params["W"], attn.proj.params["b"], H)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_patch_layout():
    """Token n = i*w + j holds the patch at row i, column j; inside it, channels vary fastest."""
    B, C, p, Hh, Ww = 2, 3, 2, 4, 6
    x = randn(B, C, Hh, Ww)
    tok = patchify(x, p)
    assert tok.shape == (B, (Hh // p) * (Ww // p), p * p * C)
    for i, j, u, v, c in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (0, 1, 0, 1, 1), (1, 0, 1, 1, 0)]:
        assert tok[1, i * (Ww // p) + j, (u * p + v) * C + c] == x[1, c, i * p + u, j * p + v]


def test_unpatchify_inverts_patchify():
    x = randn(2, 3, 8, 8)
    np.testing.assert_array_equal(unpatchify(patchify(x, 4), 4, 3), x)
    t = randn(2, 16, 12)
    np.testing.assert_array_equal(patchify(unpatchify(t, 2, 3), 2), t)


def test_timestep_embedding():
    e = timestep_embedding(np.array([0.0, 1.0, 250.0]), 6, np.float64)
    np.testing.assert_array_equal(e[0], [1, 1, 1, 0, 0, 0])               # t = 0: cos 0, sin 0
    f = [1.0, 10000.0 ** (-1 / 3), 10000.0 ** (-2 / 3)]                   # max period 10000
    np.testing.assert_allclose(e[1], [math.cos(f[0]), math.cos(f[1]), math.cos(f[2]),
                                      math.sin(f[0]), math.sin(f[1]), math.sin(f[2])], rtol=1e-14)
    np.testing.assert_allclose(e[2, 1], math.cos(250 * 10000.0 ** (-1 / 3)), rtol=1e-12)  # cos half first
    np.testing.assert_allclose(e[2, 4], math.sin(250 * 10000.0 ** (-1 / 3)), rtol=1e-12)
    odd = timestep_embedding(np.array([7.0]), 5, np.float32)
    assert odd.shape == (1, 5) and odd.dtype == np.float32 and odd[0, 4] == 0.0


def test_label_and_pos_embed_forward():
    emb = LabelEmbedding(3, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(emb(np.array([2, 0, 3])), emb.params["W"][[2, 0, 3]])
    assert emb.params["W"].shape == (4, 4)  # one extra row: the null label
    pos = PosEmbed(5, 4, np.random.default_rng(0))
    x = randn(2, 5, 4)
    np.testing.assert_array_equal(pos(x), x + pos.params["pos"])


def test_attention_refuses_indivisible_heads():
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by num_heads \(4\)"):
        Attention(10, 4, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------
# Backend parity: every layer on CuPy (float64, float32) and NumPy float32 vs NumPy float64
# ----------------------------------------------------------------------------------------

LAYERS = {
    "Linear": (lambda g: Linear(5, 4, g), (randn(2, 3, 5),)),
    "LayerNorm": (lambda g: LayerNorm(6), (randn(2, 3, 6),)),
    "GELU": (lambda g: GELU(), (3 * randn(4, 9),)),
    "Softmax": (lambda g: Softmax(), (3 * randn(2, 3, 7),)),
    "Attention": (lambda g: Attention(8, 2, g), (randn(2, 5, 8),)),
    "MLP": (lambda g: MLP(8, 32, g), (randn(2, 3, 8),)),
    "PatchEmbed": (lambda g: PatchEmbed(2, 3, 8, g), (randn(2, 3, 4, 4),)),
    "Conv3x3 1->1": (lambda g: Conv3x3(1, 1, g), (randn(2, 1, 5, 5),)),
    "Conv3x3 2->3": (lambda g: Conv3x3(2, 3, g), (randn(2, 2, 4, 5),)),
    "LabelEmbedding": (lambda g: LabelEmbedding(4, 8, g), (np.array([0, 4, 2, 0]),)),
    "PosEmbed": (lambda g: PosEmbed(5, 8, g), (randn(2, 5, 8),)),
    "unpatchify": (lambda g: gc.Unpatchify(2, 3), (randn(2, 4, 12),)),
    "Block in": (lambda g: Block(8, 2, 2, g), (randn(2, 4, 8),)),
    "Block concat": (lambda g: Block(8, 2, 2, g, skip="concat"), (randn(2, 4, 8), randn(2, 4, 8, seed=1))),
    "Block add": (lambda g: Block(8, 2, 2, g, skip="add"), (randn(2, 4, 8), randn(2, 4, 8, seed=1))),
    "Block add_linear": (lambda g: Block(8, 2, 2, g, skip="add_linear"), (randn(2, 4, 8), randn(2, 4, 8, seed=1))),
    "Block linear_add": (lambda g: Block(8, 2, 2, g, skip="linear_add"), (randn(2, 4, 8), randn(2, 4, 8, seed=1))),
    "AdaLN": (lambda g: AdaLN(6, g), (randn(2, 3, 6), randn(2, 6, seed=1))),
    "Block adaln": (lambda g: Block(8, 2, 2, g, skip="concat", adaln=True),
                    (randn(2, 4, 8), randn(2, 4, 8, seed=1), randn(2, 8, seed=2))),
    "Conv3x3 stride 2": (lambda g: Conv3x3(2, 3, g, stride=2), (randn(2, 2, 6, 4),)),
    "ConvPatchEmbed": (lambda g: ConvPatchEmbed(4, 1, 8, g), (randn(2, 1, 8, 8),)),
    "SinCosPosEmbed": (lambda g: SinCosPosEmbed(2, 2, 8), (randn(2, 6, 8),)),
}


def move(be, a):
    """Floats to the backend's compute dtype; integer labels to its array module, still ints."""
    a = np.asarray(a)
    return be.asarray(a) if np.issubdtype(a.dtype, np.floating) else be.xp.asarray(a)


def helper_test_parity(device, dtype, module, *inputs, seed=0):
    """Run `module` (float64 NumPy params) and a copy moved to Backend(device, dtype) on the same
    inputs and cotangent; outputs, input gradients and parameter gradients must agree."""
    tol = F64_TOL if dtype == "float64" else F32_TOL
    be = Backend(device, dtype)
    other = copy.deepcopy(module).to(be)
    out = module(*inputs)
    cot = np.random.default_rng(seed).standard_normal(out.shape)
    dx = module.backward(cot)

    out_b = other(*[move(be, a) for a in inputs])
    assert isinstance(out_b, be.xp.ndarray) and out_b.dtype == be.dtype
    dx_b = other.backward(be.asarray(cot))
    pairs = [("output", out, out_b)]
    if dx is not None:
        dx, dx_b = (dx, dx_b) if isinstance(dx, tuple) else ((dx,), (dx_b,))
        pairs += [(f"d input{i}", a, b) for i, (a, b) in enumerate(zip(dx, dx_b))]
    grads, grads_b = module.grad_dict(), other.grad_dict()
    pairs += [(f"d {name}", grads[name], grads_b[name]) for name in grads]
    for what, a, b in pairs:
        assert isinstance(b, be.xp.ndarray) and b.dtype == be.dtype, f"{what}: {type(b)} {b.dtype}"
        err = gc.rel_err(to_numpy(b), a)
        assert err <= tol, f"{what}: rel err {err:.2e} on {be} > {tol:g}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_parity(backend, dtype, name):
    make, inputs = LAYERS[name]
    rng = np.random.default_rng(0)
    helper_test_parity(backend, dtype, gc.randomize(make(rng), rng), *inputs)


def test_backend_gpu_without_cupy_is_a_clear_error():
    if cupy_status()[0]:
        pytest.skip("a GPU is usable here: Backend('gpu') is expected to work")
    with pytest.raises(BackendError) as e:
        Backend("gpu")
    msg = str(e.value)
    assert "\n" not in msg and ("CuPy is not installed" in msg or "no usable GPU" in msg)


def test_backend_rejects_unknown_names():
    with pytest.raises(BackendError, match="device must be 'cpu' or 'gpu'"):
        Backend("tpu")
    with pytest.raises(BackendError, match="dtype must be one of"):
        Backend("cpu", "float16")
