"""The ViT classifier: hand gradients (whole model, class token and cross-entropy included) vs
finite differences and autograd in float64, checkpoints, and the training pieces."""
import json

import numpy as np
import pytest

from tinyuvit import gradcheck as gc
from tinyuvit.backend import Backend
from tinyuvit.layers import Module
from tinyuvit.optim import lr_at
from tinyuvit.tools.vit import (SoftmaxCrossEntropy, ViT, ViTConfig, fit, predict_logits,
                          random_shift)

FD_TOL, AG_TOL = 1e-6, 1e-10
TINY = ViTConfig(img_size=8, patch_size=4, dim=8, depth=2, num_heads=2, mlp_ratio=2, num_classes=3)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


class ViTLoss(Module):
    """L = cross_entropy(vit(x), y): the whole training objective as one layer for gradcheck."""

    def __init__(self, cfg, seed):
        super().__init__()
        self.vit, self.ce = ViT(cfg, seed=seed), SoftmaxCrossEntropy()

    def forward(self, x, y):
        return self.ce(self.vit(x), y)

    def backward(self, dloss):
        return self.vit.backward(self.ce.backward(dloss))


def assert_grads_ok(rows):
    pytest.importorskip("autograd")
    names = {r.tensor for r in rows}
    assert any(n.endswith("cls") for n in names), "the class token must be among the checked tensors"
    for r in rows:
        assert r.fd <= FD_TOL, f"{r.layer} {r.tensor}: rel err vs finite differences {r.fd:.2e}"
        assert r.ag is not None and r.ag <= AG_TOL, f"{r.layer} {r.tensor}: rel err vs autograd {r.ag}"


def test_grad_vit_logits():
    """Random cotangent on the logits; every entry of every tensor vs finite differences."""
    rows = gc.check_layer("ViT", lambda g: ViT(TINY, seed=1), (randn(3, 1, 8, 8),), max_entries=10**6)
    assert len(rows) == 1 + len(list(ViT(TINY).named_parameters()))     # input + every tensor
    assert_grads_ok(rows)


def test_grad_vit_with_cross_entropy():
    """The scalar loss, times a random cotangent, through the cross-entropy into the class token."""
    cfg = ViTConfig(img_size=8, patch_size=2, dim=8, depth=1, num_heads=4, mlp_ratio=1, num_classes=4)
    x, y = randn(4, 1, 8, 8, seed=3), np.array([0, 3, 1, 3])
    rows = gc.check_layer("ViT + CE", lambda g: ViTLoss(cfg, seed=2), (x, y), max_entries=10**6, seed=5)
    assert_grads_ok(rows)


def test_cross_entropy_values_and_stability():
    z = randn(5, 7, seed=1) * 3
    y = np.array([0, 6, 2, 2, 5])
    ce = SoftmaxCrossEntropy()
    ref = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(5), y])
    assert abs(ce(z, y) - ref) < 1e-12
    big = np.array([[1000.0, 0.0, -1000.0]])            # no overflow: loss 0, gradient 0
    assert ce(big, np.array([0])) == 0.0 and np.abs(ce.backward()).max() == 0.0
    assert abs(ce(big, np.array([1])) - 1000.0) < 1e-9


def test_features_and_logits():
    m = ViT(TINY, seed=0)
    x = randn(5, 1, 8, 8)
    feats = m.features(x)
    assert feats.shape == (5, TINY.dim)
    np.testing.assert_allclose(m(x), feats @ m.head.params["W"] + m.head.params["b"], atol=1e-12)
    # the final LayerNorm output, with g = 1 and b = 0 at init: zero mean, unit variance per row
    np.testing.assert_allclose(feats.mean(1), 0, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        m(randn(2, 1, 9, 9))


def test_float32_matches_float64():
    x = randn(4, 1, 28, 28, seed=2).clip(-1, 1)
    m64 = ViT(ViTConfig(depth=2), seed=3)
    ref = m64(x)
    m32 = ViT(ViTConfig(depth=2), seed=3).to(Backend("cpu", "float32"))
    out = m32(x.astype(np.float32))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_save_load_round_trip(tmp_path):
    cfg = ViTConfig(img_size=8, patch_size=4, dim=8, depth=2, num_heads=2, num_classes=3)
    m = ViT(cfg, seed=4)
    path = tmp_path / "sub" / "vit.npz"
    m.save(path, meta={"test_accuracy": 0.5})
    with np.load(path, allow_pickle=False) as z:                        # no pickles inside
        assert json.loads(str(z["config"])) == cfg.to_dict()
        assert all(z[k].dtype == np.float32 for k in z.files if k not in ("config", "meta"))
    back = ViT.load(path, Backend("cpu", "float64"))
    assert back.cfg == cfg and back.meta == {"test_accuracy": 0.5}
    for name, a in m.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], a.astype(np.float32))
    x = randn(3, 1, 8, 8)
    np.testing.assert_allclose(back(x), m(x), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        ViTConfig(patch_size=5)
    with pytest.raises(ValueError):
        ViTConfig(dim=10, num_heads=4)
    with pytest.raises(ValueError):
        ViTConfig.from_dict({"dim": 8, "nonsense": 1})


def test_random_shift():
    rng = np.random.default_rng(0)
    x = -np.ones((6, 1, 12, 12), np.float32)
    x[:, :, 4:8, 4:8] = rng.random((6, 1, 4, 4))                      # content away from the border
    out = random_shift(x, 2, rng)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose((out + 1).sum((1, 2, 3)), (x + 1).sum((1, 2, 3)), rtol=1e-6)
    assert any(not np.array_equal(o, i) for o, i in zip(out, x))
    np.testing.assert_array_equal(random_shift(x, 0, rng), x)


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 10, 100, "cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_fit_learns_and_is_deterministic():
    """A few AdamW steps on a separable toy problem: the loss falls, and a seed repeats a run."""
    cfg = ViTConfig(img_size=8, patch_size=4, dim=16, depth=1, num_heads=2, num_classes=2)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 256)
    x = np.where(y[:, None, None, None] == 1, 0.5, -0.5) + 0.3 * rng.standard_normal((256, 1, 8, 8))
    x = x.astype(np.float32)
    results = []
    for _ in range(2):
        m = ViT(cfg, seed=0).to(Backend("cpu", "float32"))
        loss0 = SoftmaxCrossEntropy()(predict_logits(m, x), y)
        fit(m, x, y, steps=40, batch_size=32, lr=3e-3, max_shift=1, seed=0, progress=False)
        results.append(predict_logits(m, x))
    assert SoftmaxCrossEntropy()(results[0], y) < 0.5 * loss0
    assert (results[0].argmax(1) == y).mean() > 0.9
    np.testing.assert_array_equal(results[0], results[1])


def test_vit_backend_and_inference_forward():
    m = ViT(TINY, seed=0).to(Backend("cpu", "float32"))
    assert m.dtype == np.float32 and m.xp is np
    x = randn(3, 1, 8, 8).astype(np.float32)
    want = m(x)
    np.testing.assert_array_equal(m(x, train=False), want)
    assert all(mod.cache is None for _, mod in m.modules())
    np.testing.assert_array_equal(predict_logits(m, x), want.astype(np.float64))
