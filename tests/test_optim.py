"""AdamW, clipping, the learning-rate schedule and the EMA, against hand-computed values."""
import math

import numpy as np
import pytest

from tinyuvit.optim import EMA, AdamW, clip_grad_norm, lr_at


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
