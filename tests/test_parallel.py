"""DataParallel: the batch split across CPU threads gives the one-thread model's results."""
import numpy as np
import pytest

from tinyuvit import gradcheck as gc
from tinyuvit.backend import Backend
from tinyuvit.diffusion import Diffusion
from tinyuvit.sampling import SampleConfig
from tinyuvit.model import UViT, UViTConfig
from tinyuvit.optim import FlatParams
from tinyuvit.tools.parallel import DataParallel, on_cpu_threads

CFG = UViTConfig(img_size=8, patch_size=2, dim=16, depth=4, num_heads=2, num_classes=3)


def model_and_batch(B, seed=0):
    model = gc.randomize(UViT(CFG, seed=seed), np.random.default_rng(seed + 1), 0.3)
    rng = np.random.default_rng(seed + 2)
    x = rng.uniform(-1, 1, (B, 1, 8, 8))
    return model, x, rng.integers(0, 1000, B), rng.integers(0, 4, B)


@pytest.mark.parametrize("threads,B", [(2, 6), (3, 7), (4, 2), (2, 1)])
def test_forward_backward_and_grads_equal_one_thread(threads, B):
    model, x, t, y = model_and_batch(B)
    dout = np.random.default_rng(5).standard_normal((B, 1, 8, 8))   # a random cotangent
    want = model.forward(x, t, y)
    want_dx = model.backward(dout)
    want_grads = {k: g.copy() for k, g in model.grad_dict().items()}

    dp = DataParallel(model, threads)
    got = dp.forward(x, t, y)
    assert len(dp.shards) == min(threads, B)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(dp.backward(dout), want_dx, rtol=0, atol=1e-13)
    grads = dp.grad_dict()
    assert grads.keys() == want_grads.keys()
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k], g, rtol=1e-12, atol=1e-14, err_msg=k)


def test_replicas_share_the_parameters():
    model, x, t, y = model_and_batch(4)
    dp = DataParallel(model, 2)
    for name, p in model.state_dict().items():
        assert dp.replicas[1].state_dict()[name] is p
    model.state_dict()["decoder_pred.b"][...] += 1.0        # an in-place update (AdamW, EMA)
    np.testing.assert_allclose(dp.forward(x, t, y), model.forward(x, t, y), rtol=0, atol=1e-13)


def test_training_loss_and_sampling_equal_one_thread():
    model, x, _, y = model_and_batch(5)
    diffusion = Diffusion(noise_schedule="linear", clip_loss="none")
    dp = DataParallel(model, 2)

    def loss_of(net):
        batch = diffusion.noisy_batch(x, y, np.random.default_rng(3), 0.1, 3)
        return diffusion.loss(net.forward(batch.xt, batch.t, batch.y), batch)

    loss1, d1 = loss_of(model)
    loss2, d2 = loss_of(dp)
    assert loss1 == pytest.approx(loss2, rel=1e-12)
    np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-15)
    labels = np.array([0, 1, 2, 0, 1])
    how = SampleConfig(sampler="dpm++", steps=5, guidance=1.0)
    a = diffusion.sample(model, labels, np.random.default_rng(0), how)
    b = diffusion.sample(dp, labels, np.random.default_rng(0), how)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_on_cpu_threads():
    model = UViT(CFG).to(Backend("cpu", "float32"))
    dp = on_cpu_threads(model, 3)
    assert isinstance(dp, DataParallel) and len(dp.replicas) == 3
    assert on_cpu_threads(dp) is dp                        # not wrapped twice
    assert dp.cfg is model.cfg and dp.dtype == np.float32  # everything else: the model's
    with pytest.raises(ValueError, match="threads must be >= 1"):
        DataParallel(model, 0)


@pytest.mark.parametrize("flatten_first", [True, False], ids=["flatten-then-wrap", "wrap-then-flatten"])
def test_replicas_share_flattened_parameters(flatten_first):
    """FlatParams and DataParallel in either order: every replica reads the flat buffer."""
    model, x, t, y = model_and_batch(4)
    if flatten_first:
        flat = FlatParams(model)
        dp = DataParallel(model, 2)
    else:
        dp = DataParallel(model, 2)
        flat = FlatParams(dp)
    assert all(flat.shares(r) for r in dp.replicas)
    flat.data[:] *= 0.5                                        # an in-place update of the buffer
    np.testing.assert_allclose(dp.forward(x, t, y), model.forward(x, t, y), rtol=0, atol=1e-13)


def test_flat_grad_equals_one_thread():
    model, x, t, y = model_and_batch(5)
    flat = FlatParams(model)
    dout = np.random.default_rng(7).standard_normal((5, 1, 8, 8))
    model.forward(x, t, y)
    model.backward(dout)
    want = flat.grad(model).copy()
    dp = DataParallel(model, 3)
    dp.forward(x, t, y)
    dp.backward(dout)
    got = flat.grad(dp)                                        # DataParallel.flat_grad: summed flat
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for name, g in dp.grad_dict().items():
        np.testing.assert_array_equal(g, flat.views(got)[name])
