"""AdamW, clipping, the learning-rate schedule and the EMA, against hand-computed values; over
FlatParams, bit for bit against the per-parameter updates."""
import math

import numpy as np
import pytest

from tinyuvit import kernels
from tinyuvit.backend import Backend, to_numpy, xp_of
from tinyuvit.tools.checkpoint import load_checkpoint, save_checkpoint
from tinyuvit.model import UViT, UViTConfig
from tinyuvit.optim import EMA, AdamW, FlatParams, clip_grad_norm, lr_at


def test_adamw_two_steps_match_the_formula():
    p0 = np.array([1.0, -2.0, 0.5])
    g1, g2 = np.array([0.1, 0.2, -0.3]), np.array([-0.4, 0.1, 0.0])
    params = {"w": p0.copy()}
    opt = AdamW(params, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    opt.step({"w": g1})
    opt.step({"w": g2})
    # by hand, as torch.optim.AdamW: decay first, then the bias-corrected Adam step
    p, m, v = p0.copy(), 0.0, 0.0
    for k, g in enumerate((g1, g2), start=1):
        p = p * (1 - 0.1 * 0.01)
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        p = p - 0.1 * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.99 ** k)) + 1e-8)
    np.testing.assert_allclose(params["w"], p, rtol=1e-12)


def test_weight_decay_only_where_asked():
    params = {"W": np.ones((2, 2)), "b": np.ones(2)}
    opt = AdamW(params, lr=0.5, weight_decay=0.1, decay=lambda name, p: p.ndim == 2)
    opt.step({"W": np.zeros((2, 2)), "b": np.zeros(2)})
    np.testing.assert_allclose(params["W"], 0.95)
    np.testing.assert_allclose(params["b"], 1.0)


def test_clip_grad_norm_scales_all_gradients_together():
    grads = {"a": np.array([3.0]), "b": np.array([4.0])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    assert math.hypot(grads["a"][0], grads["b"][0]) == pytest.approx(1.0, rel=1e-5)
    assert grads["a"][0] / grads["b"][0] == pytest.approx(0.75)
    small = {"a": np.array([0.3])}
    clip_grad_norm(small, 1.0)
    assert small["a"][0] == 0.3


def test_lr_schedules():
    assert lr_at(0, 1.0, 10) == pytest.approx(0.1) and lr_at(9, 1.0, 10) == 1.0
    assert lr_at(500, 1.0, 10) == 1.0                                # constant after warmup
    assert lr_at(10, 1.0, 10, 110, "cosine") == 1.0
    assert lr_at(60, 1.0, 10, 110, "cosine") == pytest.approx(0.5)   # half way down the cosine
    assert lr_at(110, 1.0, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_ema_with_and_without_warmup():
    params = {"w": np.array([0.0])}
    ema = EMA(params, decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10 ** 6) == 0.999
    params["w"][...] = 1.0
    ema.update(params, 0)
    assert ema.shadow["w"][0] == pytest.approx(0.9)   # forgets the init fast
    plain = EMA({"w": np.array([0.0])}, decay=0.999, warmup=False)
    plain.update(params, 0)
    assert plain.shadow["w"][0] == pytest.approx(0.001)


# ----------------------------------------------------------------------------------------
# FlatParams: the same updates, bit for bit, as array by array
# ----------------------------------------------------------------------------------------

class ReferenceAdamW:
    """The per-parameter AdamW as it was before FlatParams (tinyuvit 0.x), kept as the reference."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay=None):
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decayed = {k for k, p in params.items() if decay is None or decay(k, p)}
        self.m = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
        self.v = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
        self.k = 0

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.k += 1
        c1, c2 = 1.0 - b1 ** self.k, 1.0 - b2 ** self.k
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            xp = xp_of(p)
            if self.weight_decay and name in self.decayed:
                p *= 1.0 - lr * self.weight_decay
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = xp.sqrt(v * (1.0 / c2))
            denom += self.eps
            p -= (lr / c1) * m / denom


def reference_ema_update(shadow, params, d):
    for k, p in params.items():
        shadow[k] *= d
        shadow[k] += (1.0 - d) * p


SMALL = UViTConfig(img_size=8, patch_size=2, dim=16, depth=4, num_heads=2, num_classes=3)


def small_model(device, dtype="float32", seed=0):
    return UViT(SMALL, seed=seed).to(Backend(device, dtype))


def random_grads(model, rng, scale):
    """{name: array}, random gradients shaped like the parameters (on the model's backend)."""
    xp = xp_of(model.decoder_pred.params["W"])
    return {k: xp.asarray(scale * rng.standard_normal(p.shape), dtype=p.dtype)
            for k, p in model.state_dict().items()}


def assert_same_bits(a, b, what):
    a, b = to_numpy(a), to_numpy(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{what}: not bit-identical"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("decay", [None, lambda name, p: p.ndim == 2], ids=["decay-all", "decay-matrices"])
def test_flat_adamw_and_ema_are_bit_identical_to_per_parameter(backend, dtype, decay):
    with kernels.use(False):   # the array code (a GPU's fused kernels: tests/test_kernels.py)
        _flat_adamw_and_ema_are_bit_identical_to_per_parameter(backend, dtype, decay)


def _flat_adamw_and_ema_are_bit_identical_to_per_parameter(backend, dtype, decay):
    ref_model, model = small_model(backend, dtype), small_model(backend, dtype)
    ref_params = ref_model.state_dict()
    ref_opt = ReferenceAdamW(ref_params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.03, decay=decay)
    ref_shadow = {k: p.copy() for k, p in ref_params.items()}
    flat = FlatParams(model)
    opt = AdamW(flat, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.03, decay=decay)
    ema = EMA(flat, decay=0.999)
    rng = np.random.default_rng(0)
    for step, lr in enumerate([3e-4, 1e-3, 2e-3, 7e-4, 1.3e-3]):
        grads = random_grads(model, rng, scale=10.0 ** -step)   # small and large gradients
        ref_opt.step(grads, lr)
        reference_ema_update(ref_shadow, ref_params, ema.decay_at(step))
        opt.step(flat.flatten(grads), lr)
        ema.update(flat, step)
    assert opt.k == ref_opt.k == 5
    state, ema_state = opt.state(), ema.shadow
    for name, p in model.state_dict().items():
        assert_same_bits(p, ref_params[name], name)
        assert_same_bits(ema_state[name], ref_shadow[name], f"ema {name}")
        assert_same_bits(state[f"m.{name}"], ref_opt.m[name], f"m.{name}")
        assert_same_bits(state[f"v.{name}"], ref_opt.v[name], f"v.{name}")


def test_dict_adamw_is_bit_identical_to_per_parameter():
    ref_model, model = small_model("cpu"), small_model("cpu")
    ref_opt = ReferenceAdamW(ref_model.state_dict(), lr=1e-3, weight_decay=0.05, decay=lambda n, p: p.ndim == 2)
    opt = AdamW(model.state_dict(), lr=1e-3, weight_decay=0.05, decay=lambda n, p: p.ndim == 2)
    rng = np.random.default_rng(1)
    for lr in (1e-3, 2e-3):
        grads = random_grads(model, rng, 1.0)
        ref_opt.step(grads, lr)
        opt.step(grads, lr)
    for name, p in model.state_dict().items():
        assert_same_bits(p, ref_model.state_dict()[name], name)


def test_flat_clip_grad_norm_matches_per_parameter(backend):
    model = small_model(backend)
    flat = FlatParams(model)
    grads = random_grads(model, np.random.default_rng(2), 0.1)
    g = flat.flatten(grads)
    want = clip_grad_norm(grads, 0.5)                 # the sum of the arrays' sums
    got = clip_grad_norm(g, 0.5)                      # one sum: another order, the last bits differ
    assert got == pytest.approx(want, rel=1e-6) and got > 0.5
    np.testing.assert_allclose(to_numpy(g), to_numpy(flat.flatten(grads)), rtol=1e-6)
    assert float((g * g).sum()) ** 0.5 == pytest.approx(0.5, rel=1e-5)


def test_flat_params_are_views_the_model_reads():
    model = small_model("cpu", "float64")
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8))
    t, y = np.array([5, 600]), np.array([0, 2])
    want = model.forward(x, t, y)
    before = {k: p.copy() for k, p in model.state_dict().items()}
    flat = FlatParams(model)
    assert flat.data.ndim == 1 and flat.size == model.num_params() and flat.data.flags.c_contiguous
    assert flat.shares(model) and list(flat.params) == list(model.state_dict())
    for name, p in model.state_dict().items():
        assert p is flat.params[name] and np.shares_memory(p, flat.data)
        np.testing.assert_array_equal(p, before[name])
    np.testing.assert_array_equal(model.forward(x, t, y), want)     # same values, same outputs
    i = flat.names.index("decoder_pred.b")
    flat.data[flat.offsets[i]:flat.offsets[i + 1]] += 1.0          # written through the buffer
    np.testing.assert_array_equal(model.decoder_pred.params["b"], before["decoder_pred.b"] + 1.0)
    model.to(Backend("cpu", "float32"))                             # new arrays: no longer the buffer's
    assert not flat.shares(model)


def test_flat_grad_layout_and_mistakes():
    model = small_model("cpu", "float64")
    flat = FlatParams(model)
    x = np.random.default_rng(4).standard_normal((2, 1, 8, 8))
    model.forward(x, np.array([5, 600]), np.array([0, 2]))
    model.backward(np.random.default_rng(5).standard_normal(x.shape))
    g = flat.grad(model)
    assert g is flat.grad_data and g.shape == (flat.size,)         # one buffer, refilled each call
    for name, view in flat.views(g).items():
        np.testing.assert_array_equal(view, model.grad_dict()[name])
    g *= 0.0
    assert flat.grad(model) is g and np.array_equal(flat.views(g)["decoder_pred.W"],
                                                    model.grad_dict()["decoder_pred.W"])
    with pytest.raises(TypeError, match="flat array"):
        AdamW(flat).step(model.grad_dict())                        # a dict for flat parameters
    other = UViT(UViTConfig(img_size=8, patch_size=2, dim=8, depth=2, num_heads=2, num_classes=3))
    other.forward(x, np.array([5, 600]), np.array([0, 2]))
    other.backward(np.ones_like(x))
    with pytest.raises(ValueError, match="not the model"):
        flat.grad(other)
    mixed = small_model("cpu", "float32")
    mixed.decoder_pred.params["b"] = mixed.decoder_pred.params["b"].astype(np.float64)
    with pytest.raises(ValueError, match="one dtype"):
        FlatParams(mixed)


def test_flat_weight_decay_mask():
    model = small_model("cpu")
    flat = FlatParams(model)
    assert flat.mask(lambda n, p: True) is True and flat.mask(lambda n, p: False) is False
    mask = flat.mask(lambda n, p: p.ndim == 2)
    for name, m in flat.views(mask).items():
        assert m.all() if flat.params[name].ndim == 2 else not m.any(), name
    before = flat.data.copy()
    AdamW(flat, lr=0.5, weight_decay=0.1, decay=lambda n, p: p.ndim == 2).step(np.zeros_like(flat.data))
    np.testing.assert_array_equal(flat.data, np.where(mask, before * np.float32(0.95), before))


def test_flat_state_round_trips_through_a_checkpoint(tmp_path):
    """Saved as before ({"m.name": ...}, {name: ...}); loaded in place, so the views stay."""
    model = small_model("cpu")
    flat = FlatParams(model)
    opt, ema = AdamW(flat, lr=1e-3, weight_decay=0.03), EMA(flat)
    rng = np.random.default_rng(6)
    for step in range(3):
        opt.step(flat.flatten(random_grads(model, rng, 1.0)))
        ema.update(flat, step)
    path = tmp_path / "checkpoint.npz"
    from tinyuvit.config import TrainConfig
    config = dict(TrainConfig().to_dict(), model=model.cfg.to_dict())
    save_checkpoint(path, params=flat.params, ema=ema.shadow, opt_state=opt.state(), opt_k=opt.k,
                    step=3, config=config)
    ck = load_checkpoint(path)
    assert set(ck["opt"]) == {f"{mv}.{name}" for mv in "mv" for name in flat.names}

    model2 = small_model("cpu", seed=1)
    flat2 = FlatParams(model2)
    opt2, ema2 = AdamW(flat2, lr=1e-3, weight_decay=0.03), EMA(flat2)
    ema_model = small_model("cpu", seed=2)
    ema_model.load_state_dict(ema2.shadow)                # shares the EMA's arrays
    for name, p in flat2.params.items():                  # as train.py resumes: in place
        p[...] = ck["params"][name]
        ema2.shadow[name][...] = ck["ema"][name]
    opt2.load_state(ck["opt"], ck["opt_k"])
    assert flat2.shares(model2) and opt2.k == 3
    np.testing.assert_array_equal(flat2.data, flat.data)
    np.testing.assert_array_equal(ema2.data, ema.data)
    np.testing.assert_array_equal(opt2._m[0], opt._m[0])
    np.testing.assert_array_equal(opt2._v[0], opt._v[0])
    np.testing.assert_array_equal(ema_model.decoder_pred.params["W"], ema.shadow["decoder_pred.W"])
    ema2.update(flat2, 3)                                 # the EMA model follows the average
    assert ema_model.decoder_pred.params["W"] is ema2.shadow["decoder_pred.W"]
