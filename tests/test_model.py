"""The whole U-ViT: gradients, parameter counts, token order, long skips, bad input, parity."""
import copy
import math
import re

import numpy as np
import pytest
from scipy.signal import correlate2d
from scipy.special import erf

from tinyuvit import gradcheck as gc
from tinyuvit.backend import Backend, to_numpy
from tinyuvit.model import CHOICES, UViT, UViTConfig, ablations, get_config

FD_TOL, AG_TOL = 1e-6, 1e-10
F64_TOL, F32_TOL = 1e-10, 1e-4

SMALL = dict(img_size=8, patch_size=2, dim=16, num_heads=2, num_classes=3)


def cfg(**kw):
    return UViTConfig(**{**SMALL, "depth": 4, **kw})


def inputs(c, B=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, c.in_chans, c.img_size, c.img_size))
    return x, np.array([3.0, 641.0, 20.0, 999.0])[:B], np.array([1, c.num_classes, 0, 2])[:B]


def random_model(c, seed=0, scale=0.3):
    """A model whose parameters are all away from their init (attention not uniform, g != 1)."""
    return gc.randomize(UViT(c, seed=seed), np.random.default_rng(seed + 100), scale)


# The whole model's gradients, in every configuration and ablation variant, are cases of
# gradcheck's table: tests/test_layers.py::test_grad.


def test_ablations_are_one_change_each():
    rows = ablations()
    assert len(rows) == 11 and rows[0] == ("uvit", None, {})
    base = UViTConfig()
    for name, choice, overrides in rows[1:]:
        assert list(overrides) == [choice] and overrides[choice] != getattr(base, choice)
        assert name == f"{choice}={overrides[choice]}"
    assert {c: getattr(base, c) for c in CHOICES} == {c: v[0] for c, v in CHOICES.items()}


def test_adaln_variant_has_no_time_token():
    c = cfg(time_cond="adaln")
    m = UViT(c)
    assert m.extras == 1 and m.pos_embed.params["pos"].shape[1] == 1 + c.num_patches
    x, t, y = inputs(c)
    a, b = m(x, t, y), m(x, t + 100.0, y)
    assert not np.allclose(a, b)                       # the time still reaches the output


# ----------------------------------------------------------------------------------------
# Presets and shapes
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,count", [("tiny", 1_496_346), ("small", 7_682_574)])
def test_preset_parameter_count(preset, count):
    assert UViT(get_config(preset)).num_params() == count


def test_every_layer_draws_from_a_generator_keyed_by_the_seed_and_its_name():
    """Each Linear's W is N(0, 0.02) drawn first from KeyedRng(seed, its dotted name), so its start
    depends on nothing else in the model; no two layers draw the same numbers."""
    from tinyuvit.layers import KeyedRng, Linear
    model = UViT(get_config("tiny", skip="add_linear", time_cond="adaln"), seed=5)
    linears = [(name, m) for name, m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 2 + 7 * 6 + 3 and "out_blocks.1.skip_linear" in dict(linears)
    for name, m in linears:
        assert np.array_equal(m.params["W"], KeyedRng(5, name).normal(0.0, 0.02, m.params["W"].shape)), name
    firsts = {float(m.params["W"].flat[0]) for _, m in linears}
    assert len(firsts) == len(linears)
    rng = np.random.default_rng(0)          # a plain Generator: layers draw from it in order, as before
    a, b = Linear(4, 4, rng), Linear(4, 4, rng)
    assert not np.array_equal(a.params["W"], b.params["W"])


def test_output_shape_and_dtype():
    c = cfg(in_chans=3)
    x, t, y = inputs(c, B=3)
    out = UViT(c)(x, t, y)
    assert out.shape == (3, 3, 8, 8) and out.dtype == np.float64
    out32 = UViT(c).to(Backend("cpu", "float32"))(x.astype(np.float32), t, y)
    assert out32.shape == (3, 3, 8, 8) and out32.dtype == np.float32


# ----------------------------------------------------------------------------------------
# An independent forward, in plain NumPy from the model's parameters: it fixes the token
# order [label, time, patches] and the last-in-first-out long skips
# ----------------------------------------------------------------------------------------

def ref_ln(x, P, pre):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * P[pre + ".g"] + P[pre + ".b"]


def ref_attention(x, P, pre, H):
    B, L, D = x.shape
    hd = D // H
    qkv = x @ P[pre + ".qkv.W"]
    out = np.zeros_like(x)
    for h in range(H):
        q, k, v = (qkv[..., s * D + h * hd: s * D + (h + 1) * hd] for s in range(3))
        s = np.einsum("bid,bjd->bij", q, k) / math.sqrt(hd)
        a = np.exp(s - s.max(-1, keepdims=True))
        out[..., h * hd:(h + 1) * hd] = (a / a.sum(-1, keepdims=True)) @ v
    return out @ P[pre + ".proj.W"] + P[pre + ".proj.b"]


def ref_block(x, P, pre, H, skip=None):
    if skip is not None:
        x = np.concatenate([x, skip], -1) @ P[pre + ".skip_linear.W"] + P[pre + ".skip_linear.b"]
    x = x + ref_attention(ref_ln(x, P, pre + ".norm1"), P, pre + ".attn", H)
    u = ref_ln(x, P, pre + ".norm2") @ P[pre + ".mlp.fc1.W"] + P[pre + ".mlp.fc1.b"]
    u = u * 0.5 * (1 + erf(u / math.sqrt(2)))
    return x + u @ P[pre + ".mlp.fc2.W"] + P[pre + ".mlp.fc2.b"]


def ref_forward(m, x, t, y, label_first=True, lifo=True):
    c, P = m.cfg, m.state_dict()
    B, C, S, _ = x.shape
    p, n = c.patch_size, c.img_size // c.patch_size
    # patches, row by row; inside a patch (u, v, channel) with the channel fastest
    patches = np.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].transpose(0, 2, 3, 1).reshape(B, -1)
                        for i in range(n) for j in range(n)], axis=1)
    tokens = patches @ P["patch_embed.proj.W"] + P["patch_embed.proj.b"]
    half = c.dim // 2
    f = np.array([10000.0 ** (-i / half) for i in range(half)])
    time = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], -1)
    label = P["label_embed.W"][y]
    first = [label, time] if label_first else [time, label]
    h = np.concatenate([a[:, None] for a in first] + [tokens], axis=1) + P["pos_embed.pos"]
    outs = []
    k = c.depth // 2
    for i in range(k):
        h = ref_block(h, P, f"in_blocks.{i}", c.num_heads)
        outs.append(h)
    h = ref_block(h, P, "mid_block", c.num_heads)
    for i in range(k):
        skip = outs[k - 1 - i] if lifo else outs[i]
        h = ref_block(h, P, f"out_blocks.{i}", c.num_heads, skip)
    h = ref_ln(h, P, "norm") @ P["decoder_pred.W"] + P["decoder_pred.b"]
    img = np.zeros((B, C, S, S))
    for i in range(n):
        for j in range(n):
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = \
                h[:, 2 + i * n + j].reshape(B, p, p, C).transpose(0, 3, 1, 2)
    W, b = P["final_layer.W"], P["final_layer.b"]
    return np.array([[sum(correlate2d(img[s, ci], W[o, ci], mode="same") for ci in range(C)) + b[o]
                      for o in range(C)] for s in range(B)])


def test_forward_matches_independent_reference():
    c = cfg(depth=4, in_chans=2)
    m = random_model(c)
    x, t, y = inputs(c)
    out = m(x, t, y)
    np.testing.assert_allclose(out, ref_forward(m, x, t, y), rtol=1e-11, atol=1e-11)
    # the reference is sharp: the other token order, or first-in-first-out skips, differ
    assert gc.rel_err(out, ref_forward(m, x, t, y, label_first=False)) > 1e-3
    assert gc.rel_err(out, ref_forward(m, x, t, y, lifo=False)) > 1e-3


def test_label_changes_output():
    c = cfg()
    m = UViT(c)
    x, t, y = inputs(c)
    out = m(x, t, y)
    assert gc.rel_err(m(x, t, (y + 1) % c.num_classes), out) > 1e-3
    np.testing.assert_array_equal(m(x, t, y), out)  # deterministic


def test_token_positions_seen_by_gradients():
    """pos_embed's gradient row 0 is exactly what the label table gets (all labels equal),
    and the patch bias gets the sum of rows 2.. (row 1, the time token, has no parameters)."""
    c = cfg()
    m = random_model(c)
    x, t, _ = inputs(c)
    m(x, t, np.array([2, 2]))
    m.backward(np.random.default_rng(5).standard_normal(x.shape))
    dpos = m.pos_embed.grads["pos"][0]
    np.testing.assert_allclose(m.label_embed.grads["W"][2], dpos[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m.patch_embed.proj.grads["b"], dpos[2:].sum(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(np.delete(m.label_embed.grads["W"], 2, axis=0), 0.0)


# ----------------------------------------------------------------------------------------
# Bad input: a ValueError naming what was expected, before any computation
# ----------------------------------------------------------------------------------------

def model_that_must_not_compute():
    m = UViT(cfg())
    m.patch_embed.forward = lambda *a: pytest.fail("computed before validating the input")
    return m


@pytest.mark.parametrize("change,message", [
    (dict(x=np.zeros((2, 1, 8, 9))), "x must have shape [B, 1, 8, 8], got [2, 1, 8, 9]"),
    (dict(x=np.zeros((2, 3, 8, 8))), "x must have shape [B, 1, 8, 8]"),
    (dict(x=np.zeros((1, 8, 8))), "x must have shape [B, 1, 8, 8]"),
    (dict(t=np.zeros((2, 1))), "t must have shape [2]"),
    (dict(t=np.zeros(3)), "t must have shape [2]"),
    (dict(y=np.zeros((2, 1), int)), "y must have shape [2]"),
    (dict(y=np.array([0.0, 1.0])), "y must hold integer labels"),
    (dict(y=np.array([-1, 0])), "labels must lie in 0..3"),
    (dict(y=np.array([0, 4])), "labels must lie in 0..3"),
])
def test_bad_input(change, message):
    args = dict(zip("xty", inputs(cfg())))
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        model_that_must_not_compute()(args["x"], args["t"], args["y"])


@pytest.mark.parametrize("change,message", [
    (dict(patch_size=3), "patch_size 3 must divide img_size 8 (divisors: [1, 2, 4, 8])"),
    (dict(dim=10, num_heads=4), "dim 10 must be divisible by num_heads 4"),
    (dict(depth=0), "depth must be a positive integer, got 0"),
    (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
    (dict(skip="mul"), "skip must be one of ('concat', 'add', 'add_linear', 'linear_add', 'none'), got 'mul'"),
    (dict(patch_size=1, patch_embed="conv"), "patch_size must be a power of 2 (2, 4, ...), got 1"),
    (dict(dim=18, num_heads=2, pos_embed="sincos2d"), "2-D sinusoidal positions need dim divisible by 4, got 18"),
    (dict(dim=18, num_heads=2, pos_init="sincos2d"), "2-D sinusoidal positions need dim divisible by 4, got 18"),
    (dict(pos_init="zeros"), "pos_init must be one of ('normal', 'sincos2d'), got 'zeros'"),
    (dict(pos_embed="none", pos_init="sincos2d"), "pos_init 'sincos2d' initialises learned positions"),
    (dict(conv="none", conv_init="identity"), "conv_init 'identity' initialises the final conv"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg(**change)


def test_init_choices_change_only_their_layer():
    """pos_init and conv_init overwrite U-ViT's init of one layer each: every other parameter is
    the same, the patch rows of the positions are the 2-D table, the final conv passes its
    input through (a config saved before these fields: tests/test_compat.py)."""
    from tinyuvit.layers import sincos_2d
    plain = UViT(cfg()).state_dict()
    new = UViT(cfg(pos_init="sincos2d", conv_init="identity"))
    changed = [k for k, v in new.state_dict().items() if not np.array_equal(v, plain[k])]
    assert sorted(changed) == ["final_layer.W", "final_layer.b", "pos_embed.pos"]
    pos = new.pos_embed.params["pos"]                                   # [1, 2 + 16, 16]
    np.testing.assert_array_equal(pos[0, :2], plain["pos_embed.pos"][0, :2])
    np.testing.assert_allclose(pos[0, 2:], sincos_2d(4, 16))
    img = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    np.testing.assert_allclose(new.final_layer(img), img, atol=1e-15)


def test_unknown_preset():
    with pytest.raises(ValueError, match=re.escape("choose one of ['small', 'tiny']")):
        get_config("huge")


# ----------------------------------------------------------------------------------------
# Backend parity: the tiny preset's forward and backward on CuPy / float32 vs float64 NumPy
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_parity(backend, dtype):
    c = get_config("tiny")
    m = random_model(c, scale=0.1)  # 0.3 makes the D = 128 net ill-conditioned for float32
    x, t, y = inputs(c)
    be = Backend(backend, dtype)
    other = copy.deepcopy(m).to(be)
    out = m(x, t, y)
    cot = np.random.default_rng(3).standard_normal(out.shape)
    dx = m.backward(cot)
    out_b = other(be.asarray(x), be.asarray(t), be.xp.asarray(y))
    dx_b = other.backward(be.asarray(cot))
    tol = F64_TOL if dtype == "float64" else F32_TOL
    grads, grads_b = m.grad_dict(), other.grad_dict()
    pairs = [("output", out, out_b), ("d x", dx, dx_b)] + [(f"d {k}", grads[k], grads_b[k]) for k in grads]
    for what, a, b in pairs:
        assert isinstance(b, be.xp.ndarray) and b.dtype == be.dtype, f"{what}: {type(b)} {b.dtype}"
        err = gc.rel_err(to_numpy(b), a)
        assert err <= tol, f"{what}: rel err {err:.2e} on {be} > {tol:g}"


# ----------------------------------------------------------------------------------------
# The backend: recorded by Module.to, read from the model (not probed from a parameter)
# ----------------------------------------------------------------------------------------

def test_backend_property():
    m = UViT(cfg())
    assert (m.backend.device, m.dtype, m.xp) == ("cpu", np.float64, np)   # the float64 host init
    be = Backend("cpu", "float32")
    m.to(be)
    assert m.backend.device == "cpu" and m.dtype == np.float32 and m.xp is np
    assert all(mod.backend is m.backend for _, mod in m.modules())        # every layer agrees
    assert all(p.dtype == np.float32 for p in m.state_dict().values())
    assert copy.deepcopy(m).dtype == np.float32                           # copies keep it


def test_backend_property_gpu(backend):
    be = Backend(backend, "float32")
    m = UViT(cfg()).to(be)
    assert m.xp is be.xp and m.dtype == np.float32 and m.backend.device == backend
    assert all(isinstance(p, be.xp.ndarray) for p in m.state_dict().values())
