"""The DDPM schedule, forward process, loss and samplers, checked on cases with known answers."""
import math

import numpy as np
import pytest

from tinyuvit.diffusion import PREDICTIONS, Diffusion, Schedule
from tinyuvit.sampling import SampleConfig, guided_output, scale_ink
from tinyuvit.errors import ConfigError
from tinyuvit.model import UViTConfig


def test_schedule_is_the_linear_ddpm_schedule():
    s = Schedule()
    assert s.betas[0] == 1e-4 and math.isclose(s.betas[-1], 0.02) and len(s.betas) == 1000
    assert math.isclose(s.alphas_cumprod[0], 1 - 1e-4)
    assert math.isclose(s.alphas_cumprod[2], (1 - s.betas[0]) * (1 - s.betas[1]) * (1 - s.betas[2]))
    assert s.abar(-1) == 1.0 and s.alphas_cumprod.dtype == np.float64
    for spacing in ("time", "logsnr"):
        for n in (2, 10, 50, 1000):
            ts = s.timesteps(n, spacing)
            assert ts[0] == 999 and ts[-1] == 0 and len(ts) == n and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        s.timesteps(0)


def test_q_sample_has_the_closed_form_mean_and_variance():
    s = Schedule()
    rng = np.random.default_rng(0)
    x0 = np.full((20000, 1, 2, 2), 0.5)
    t = np.full(20000, 300)
    xt = s.q_sample(x0, t, rng.standard_normal(x0.shape))
    a = s.alphas_cumprod[300]
    assert abs(xt.mean() - math.sqrt(a) * 0.5) < 0.01
    assert abs(xt.var() - (1 - a)) < 0.01


class GaussianOracle:
    """The exact noise prediction for data x0 ~ N(mu, s^2) per pixel, whatever the label:
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def __init__(self, schedule, mu, s, size=4):
        self.schedule, self.mu, self.s = schedule, mu, s
        self.cfg = UViTConfig(img_size=size, patch_size=1, dim=2, num_heads=1, depth=1, num_classes=3)
        self.dtype = np.float64

    def forward(self, x, t, y, train=True):
        a = self.schedule.abar(np.asarray(t))[:, None, None, None]
        return np.sqrt(1 - a) * (x - np.sqrt(a) * self.mu) / (a * self.s ** 2 + 1 - a)


class VelocityOracle(GaussianOracle):
    """The same exact model, answering with v = sqrt(a) eps - sqrt(1 - a) x0 instead of eps."""

    def forward(self, x, t, y, train=True):
        a = self.schedule.abar(np.asarray(t))[:, None, None, None]
        eps = super().forward(x, t, y, train)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        return np.sqrt(a) * eps - np.sqrt(1 - a) * x0


class CleanOracle(GaussianOracle):
    """The same exact model, answering with the clean image x0 it implies."""

    def forward(self, x, t, y, train=True):
        a = self.schedule.abar(np.asarray(t))[:, None, None, None]
        return (x - np.sqrt(1 - a) * super().forward(x, t, y, train)) / np.sqrt(a)


def _draw(oracle, sampler, steps, n=256, clip=False, seed=1, prediction="eps", final_sigma=0.0):
    labels = np.zeros(n, dtype=np.int64)
    how = SampleConfig(sampler=sampler, steps=steps, guidance=0.0, clip=clip, final_sigma=final_sigma)
    d = Diffusion(prediction=prediction, noise_schedule=oracle.schedule.kind, clip_loss="none")
    return d.sample(oracle, labels, np.random.default_rng(seed), how)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_v_and_x0_prediction_sample_the_same_as_eps_prediction(sampler):
    """An eps, a v and an x0 network that agree on x0 must give the same samples."""
    eps_model, v_model = GaussianOracle(Schedule(), 0.3, 0.2), VelocityOracle(Schedule(), 0.3, 0.2)
    x0_model = CleanOracle(Schedule(), 0.3, 0.2)
    for clip in (False, True):
        a = _draw(eps_model, sampler, 20, n=64, clip=clip)
        b = _draw(v_model, sampler, 20, n=64, clip=clip, prediction="v")
        c = _draw(x0_model, sampler, 20, n=64, clip=clip, prediction="x0")
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match="prediction must be"):
        _draw(v_model, sampler, 20, prediction="x")


@pytest.mark.parametrize("weighting", ["min-snr", "min-snr+1"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_targets_and_weights(prediction, weighting):
    """A network that outputs the exact target has loss 0; one that is off by 1 everywhere pays
    the weight: Min-SNR min(SNR, g)/SNR for eps, min(SNR, g)/(SNR + 1) for v, min(SNR, g) for
    x0; min-snr+1 puts SNR + 1 in place of SNR in the numerator."""
    sched = Schedule()
    x0 = np.random.default_rng(0).uniform(-1, 1, (64, 1, 4, 4))
    y = np.zeros(64, dtype=np.int64)

    class Exact:  # replays the loss's own draws (same seed) to know t and the noise
        offset = 0.0

        def forward(self, xt, t, labels):
            r = np.random.default_rng(7)
            t_ = r.integers(0, sched.T, size=64)
            noise = r.standard_normal(x0.shape, dtype=np.float32).astype(np.float64)
            assert np.array_equal(t_, t)
            a = sched.abar(t)[:, None, None, None]
            target = {"eps": noise, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x0, "x0": x0}[prediction]
            return target + self.offset

    m = Exact()
    diffusion = Diffusion(prediction=prediction, weighting=weighting, snr_gamma=5.0, noise_schedule="linear",
                          clip_loss="none")

    def loss_of(model):
        batch = diffusion.noisy_batch(x0, y, np.random.default_rng(7), 0.1, 3)
        return diffusion.loss(model.forward(batch.xt, batch.t, batch.y), batch)

    loss, d = loss_of(m)
    assert loss < 1e-12 and np.abs(d).max() < 1e-12
    m.offset = 1.0
    loss, _ = loss_of(m)
    a = sched.abar(np.random.default_rng(7).integers(0, sched.T, size=64))
    snr = a / (1 - a)
    w = np.minimum(snr + (weighting == "min-snr+1"), 5.0) / {"eps": snr, "v": snr + 1, "x0": 1}[prediction]
    assert math.isclose(loss, w.mean(), rel_tol=1e-9)
    if prediction == "v" and weighting == "min-snr+1":       # the capped v loss: min(1, g/(SNR + 1))
        assert math.isclose(loss, np.minimum(1.0, 5.0 / (snr + 1)).mean(), rel_tol=1e-9)


@pytest.mark.parametrize("weighting", ["min-snr", "min-snr+1"])
def test_every_prediction_pays_the_same_for_the_same_x0_error(weighting):
    """The weightings are defined on the x0 error: three networks whose outputs imply the same
    wrong x0 (each in its own terms: eps, v or x0) have the same loss."""
    sched = Schedule(1000, "cosine")
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-1, 1, (32, 1, 4, 4))
    y = np.zeros(32, dtype=np.int64)
    error = 0.1 * rng.standard_normal(x0.shape)          # the x0 every network gets wrong by
    losses = []
    for prediction in PREDICTIONS:
        d = Diffusion(prediction=prediction, weighting=weighting, snr_gamma=5.0, noise_schedule="cosine",
                      clip_loss="none")
        batch = d.noisy_batch(x0, y, np.random.default_rng(7))
        xt, t = batch.xt, batch.t
        a = sched.abar(t)[:, None, None, None]
        x0_pred = x0 + error
        eps_pred = (xt - np.sqrt(a) * x0_pred) / np.sqrt(1 - a)
        out = {"eps": eps_pred, "v": np.sqrt(a) * eps_pred - np.sqrt(1 - a) * x0_pred, "x0": x0_pred}[prediction]
        losses.append(d.loss(out, batch)[0])
    np.testing.assert_allclose(losses, losses[0], rtol=1e-9)


@pytest.mark.parametrize("clip_loss", ["black", "both"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_clip_loss_forgives_only_an_x0_beyond_a_bound_that_the_target_sits_on(prediction, clip_loss):
    """With clip_loss, the loss is the weighted x0 error except where the true pixel is -1 (or,
    with "both", 1) and the predicted x0 lies below (above) it; the gradient vanishes exactly there."""
    rng = np.random.default_rng(4)
    x0 = rng.choice([-1.0, -0.5, 0.3, 1.0], size=(32, 1, 4, 4))   # black, grey and full-ink pixels
    y = np.zeros(32, dtype=np.int64)
    x0_pred = x0 + 0.2 * rng.standard_normal(x0.shape)
    d = Diffusion(prediction=prediction, snr_gamma=5.0, noise_schedule="cosine", clip_loss=clip_loss)
    batch = d.noisy_batch(x0, y, np.random.default_rng(7))
    xt, t = batch.xt, batch.t
    a = d.schedule.abar(t)[:, None, None, None]
    eps_pred = (xt - np.sqrt(a) * x0_pred) / np.sqrt(1 - a)
    out = {"eps": eps_pred, "v": np.sqrt(a) * eps_pred - np.sqrt(1 - a) * x0_pred, "x0": x0_pred}[prediction]
    loss, dout = d.loss(out, batch)
    beyond = ((x0 == -1) & (x0_pred < -1)) | ((x0 == 1) & (x0_pred > 1) & (clip_loss == "both"))
    assert 0.05 < beyond.mean() < 0.4                                # the case occurs, not everywhere
    x0_weight = np.minimum(a / (1 - a) + 1, 5.0)
    expected = (x0_weight * (x0_pred - x0) ** 2 * ~beyond).mean()
    assert math.isclose(loss, expected, rel_tol=1e-9)
    assert np.all(dout[beyond] == 0) and np.all(dout[~beyond] != 0)
    plain = Diffusion(prediction=prediction, snr_gamma=5.0, noise_schedule="cosine", clip_loss="none")
    plain_batch = plain.noisy_batch(x0, y, np.random.default_rng(7))
    assert plain_batch.side is None and np.array_equal(plain_batch.xt, xt)
    assert plain.loss(out, plain_batch)[0] > loss                   # without it every error counts
    side32 = d.noisy_batch(x0.astype(np.float32), y, np.random.default_rng(7)).side
    assert side32.dtype == np.float32 and np.array_equal(side32, batch.side)   # no float64 batch per step


def test_cosine_schedule():
    """abar follows cos^2((t/T + s)/(1 + s) pi/2) / cos^2(s/(1 + s) pi/2) (paper steps t = 1..T)
    until a beta reaches its cap 0.999; the logsnr spacing starts at pure noise and spreads the
    rest from lambda = -5.5, so a linear-schedule run samples as it did."""
    s = Schedule(kind="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 100, 500, 900, 990):
        assert math.isclose(s.alphas_cumprod[t - 1], f(t) / f(0), rel_tol=1e-9)
    assert s.betas.max() == 0.999 and np.all(np.diff(s.alphas_cumprod) < 0) and s.alphas_cumprod[-1] > 0
    lam = 0.5 * np.log(s.alphas_cumprod / (1 - s.alphas_cumprod))
    ts = s.timesteps(20, "logsnr")
    assert ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    assert abs(lam[ts[1]] - (-5.5 + (lam[0] + 5.5) / 19)) < 0.1     # evenly spaced from -5.5 on
    linear = Schedule()
    assert linear.kind == "linear" and 0.5 * np.log(linear.alphas_cumprod[-1] / (1 - linear.alphas_cumprod[-1])) > -5.5
    with pytest.raises(ConfigError, match="--noise-schedule"):
        Diffusion(noise_schedule="quadratic")
    d = Diffusion(noise_schedule="cosine")
    assert Diffusion.from_dict(d.to_dict()) == d and Diffusion.from_dict({}) == Diffusion()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 250), ("dpm++", 20), ("ddpm", None)])
def test_samplers_reproduce_a_gaussian_data_distribution(sampler, steps, kind):
    oracle = GaussianOracle(Schedule(kind=kind), mu=0.3, s=0.2)
    x = _draw(oracle, sampler, steps or 1000, n=2000)
    assert abs(x.mean() - 0.3) < 0.01 and abs(x.std() - 0.2) < 0.01


@pytest.mark.parametrize("sampler,steps", [("ddim", 250), ("dpm++", 20), ("ddpm", None)])
def test_the_last_step_from_a_final_sigma_gives_the_mean_clean_image_there(sampler, steps):
    """With final_sigma the sampler stops at the timestep t of that noise level and returns the
    network's x0 there, E[x0 | x_t]. For data N(mu, s^2) and x_t ~ N(sqrt(a) mu, a s^2 + 1 - a)
    that is mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / (a s^2 + 1 - a): mean mu, spread
    sqrt(a) s^2 / sqrt(a s^2 + 1 - a), narrower than s (0.074 against 0.2 at sigma 0.5)."""
    sched = Schedule(kind="cosine")
    oracle = GaussianOracle(sched, mu=0.3, s=0.2)
    t = sched.t_at_sigma(0.5)
    a = sched.alphas_cumprod[t]
    assert abs(math.sqrt((1 - a) / a) - 0.5) < 0.01 and sched.t_at_sigma(0) == 0
    x = _draw(oracle, sampler, steps or 1000, n=4000, final_sigma=0.5)
    spread = math.sqrt(a) * 0.2 ** 2 / math.sqrt(a * 0.2 ** 2 + 1 - a)
    assert abs(x.mean() - 0.3) < 0.005 and abs(x.std() - spread) < 0.004, (x.std(), spread)
    how = SampleConfig(sampler=sampler, steps=steps or 20, final_sigma=0.5)
    ts = Diffusion(noise_schedule="cosine", clip_loss="none").sampler_timesteps(how)
    assert ts[0] == 999 and ts[-1] == t and np.all(np.diff(ts) < 0) and len(ts) == (steps or 1000 - t)
    # any sigma at or below the cleanest step's (0.0064) ends at t = 0, as 0 does
    assert sched.t_at_sigma(0.001) == sched.t_at_sigma(0.0064) == 0 and sched.t_at_sigma(0.01) > 0
    np.testing.assert_array_equal(_draw(oracle, sampler, steps or 1000, n=8, final_sigma=0.001),
                                  _draw(oracle, sampler, steps or 1000, n=8, final_sigma=0.0))


def test_scale_ink_puts_each_images_percentile_at_full_ink_and_keeps_black():
    """Image by image: the p-th percentile pixel s lands on 1 where s > 1; -1 stays -1; the
    order of the pixels is kept; an image whose percentile is at or below 1 is left alone."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1.3, 1.2, (6, 1, 28, 28))
    x0[0] = np.minimum(x0[0], 0.9)          # no overshoot: unchanged
    x0[:, 0, 0, :3] = -1.0                  # black pixels
    out = scale_ink(x0, 99.7)
    np.testing.assert_array_equal(out[0], x0[0])
    for img, new in zip(x0[1:], out[1:]):
        s = np.sort(img.ravel())
        pos = 0.997 * (s.size - 1)           # the percentile, interpolated between neighbours
        lo = int(pos)
        at = s[lo] + (pos - lo) * (s[lo + 1] - s[lo])
        assert at > 1
        k = 2.0 / (at + 1.0)
        np.testing.assert_allclose(new, -1 + (img + 1) * k, atol=1e-12)
        assert np.all(new[0, 0, :3] == -1.0)
        assert (new > 1).sum() == (img > at).sum() == s.size - 1 - lo       # 2 of 784 pixels above it
    assert np.array_equal(np.argsort(out[1].ravel(), kind="stable"), np.argsort(x0[1].ravel(), kind="stable"))
    assert scale_ink(x0.astype(np.float32), 99.7).dtype == np.float32


@pytest.mark.parametrize("sampler,steps", [("ddim", 20), ("dpm++", 20), ("ddpm", None)])
def test_the_ink_percentile_scales_the_last_x0_only(sampler, steps):
    """Data N(1, 0.3^2) per pixel: half of it lies beyond full ink, and the clipped samplers put
    1-9% of their pixels exactly at 1. With ink_percentile the last step maps each image's
    [-1, s] onto [-1, 1] first, so at most the pixels above its 99.7th percentile (2 of 784) and
    the one at it reach 1, and the rest are the clipped-alone pixels under one linear map per
    image that keeps -1: the same trajectory, only the last x0 scaled."""
    oracle = GaussianOracle(Schedule(kind="cosine"), mu=1.0, s=0.3, size=28)
    draw = lambda p: Diffusion(noise_schedule="cosine", clip_loss="none").sample(
        oracle, np.zeros(16, dtype=np.int64), np.random.default_rng(3),
        SampleConfig(sampler=sampler, steps=steps or 20, guidance=0.0, final_sigma=0.0, ink_percentile=p))
    clipped, scaled = draw(0.0), draw(99.7)
    assert (clipped == 1.0).mean() > 0.005
    assert np.all((scaled >= 1.0 - 1e-9).reshape(16, -1).sum(axis=1) <= 3)
    inside = clipped < 1.0
    k = (scaled + 1)[inside] / (clipped + 1)[inside]                # [pixels] one factor per image
    per_image = np.broadcast_to(np.arange(16)[:, None, None, None], clipped.shape)[inside]
    factors = []
    for i in range(16):
        ki = k[per_image == i]
        assert np.ptp(ki) < 1e-9 and 0.5 < ki[0] <= 1
        factors.append(ki[0])
    assert sum(f < 1 for f in factors) >= 8                         # most images were scaled


def test_dpm_solver_is_closer_to_the_ode_solution_than_ddim_at_few_steps():
    """Both integrate the same probability-flow ODE from the same noise; DPM-Solver++(2M) is
    second order, DDIM first order, so at 10 steps it must land nearer the 1000-step answer."""
    oracle = GaussianOracle(Schedule(), mu=0.3, s=0.2)
    exact = _draw(oracle, "ddim", 1000)
    err = {name: np.abs(_draw(oracle, name, 10) - exact).max() for name in ("ddim", "dpm++")}
    assert err["dpm++"] < 0.5 * err["ddim"], err


def test_clipping_recomputes_the_noise_from_the_clipped_x0():
    a = 0.3
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 1, 1, 4, 4)) * 3
    d = Diffusion(prediction="eps")
    x0u, epsu = d.x0_and_eps(x, eps, a)
    np.testing.assert_array_equal(epsu, eps)
    x0, eps2 = d.clipped(x, x0u, a)
    assert x0.min() >= -1 and x0.max() <= 1 and (x0 != x0u).any()
    np.testing.assert_allclose(math.sqrt(a) * x0 + math.sqrt(1 - a) * eps2, x, atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_a_clip_loss_network_is_clipped_before_guidance(prediction):
    """A network trained with clip_loss may put a black pixel's x0 anywhere below -1. Its
    conditional and unconditional answers (x0 = -1.2 and -3 here) then differ by chance, and
    guidance on the raw outputs would turn that difference into grey (-1.2 + 0.7 * 1.8 = 0.06).
    Clipped before guidance, both are black and so is the sample."""
    sched = Schedule(1000, "cosine")

    class Free:   # x0 = -1.2 for a label, -3 for the null label, whatever x_t; in its own terms
        cfg = UViTConfig(img_size=4, patch_size=1, dim=2, num_heads=1, depth=1, num_classes=10)
        dtype = np.float64

        def forward(self, x, t, y, train=True):
            a = sched.abar(np.asarray(t))[:, None, None, None]
            x0 = np.where(y[:, None, None, None] == 10, -3.0, -1.2) * np.ones_like(x)
            eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
            return {"x0": x0, "eps": eps, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]

    how = SampleConfig(steps=5, guidance=0.7, guidance_interval=(0, math.inf))
    labels = np.zeros(3, dtype=np.int64)
    for clip_loss, black in [("black", True), ("none", False)]:
        d = Diffusion(prediction=prediction, noise_schedule="cosine", clip_loss=clip_loss)
        x = d.sample(Free(), labels, np.random.default_rng(0), how)
        assert np.allclose(x, -1.0, rtol=0, atol=1e-9) == black, (clip_loss, x.max())


def test_guidance_convention():
    class Fake:
        cfg = UViTConfig(num_classes=10)      # the null label: 10

        def forward(self, x, t, y, train=True):  # eps_c = y (the label), eps_u = 10 (null label)
            return np.broadcast_to(y[:, None, None, None].astype(float), x.shape).copy()

    x = np.zeros((2, 1, 2, 2))
    y = np.array([1, 2])
    np.testing.assert_array_equal(guided_output(Fake(), x, 5, y, 0.0)[:, 0, 0, 0], [1, 2])
    # eps = eps_c + s (eps_c - eps_u) = 1 + 2 (1 - 10) = -17
    np.testing.assert_array_equal(guided_output(Fake(), x, 5, y, 2.0)[:, 0, 0, 0], [-17, -14])


def test_guidance_interval_guides_only_the_steps_inside_it():
    """The scale is s where the noise level sigma = sqrt((1 - abar)/abar) lies in [lo, hi] and 0
    elsewhere; (0, inf) guides every step, and an interval that no sampler step falls in samples
    as guidance 0 does."""
    sigma_to_abar = lambda sigma: 1.0 / (1.0 + sigma * sigma)
    how = SampleConfig(guidance=2.0, guidance_interval=(0.5, 6.0))
    assert [how.guidance_at(sigma_to_abar(v)) for v in (0.1, 0.51, 3.0, 5.99, 7.0, 150.0)] == [0, 2, 2, 2, 0, 0]
    every = SampleConfig(guidance=2.0, guidance_interval=(0, math.inf))
    assert all(every.guidance_at(a) == 2.0 for a in (1.0, 0.5, 1e-5, 0.0))
    assert SampleConfig().guidance_interval == (0.0, 6.0)

    class Guided:   # eps_c = 0.5 x, eps_u = 0.5 x + 0.1: guidance shifts the prediction
        class cfg:
            in_chans, img_size, num_classes = 1, 2, 3
        dtype = np.float64

        def forward(self, x, t, y, train=True):
            return 0.5 * x + 0.1 * (y == 3)[:, None, None, None]

    seen = []
    model = Guided()
    forward = model.forward
    model.forward = lambda x, t, y, train=True: (seen.append(len(x)), forward(x, t, y))[1]
    d, y = Diffusion(prediction="eps", noise_schedule="linear", clip_loss="none"), np.array([0, 1])
    draw = lambda **kw: d.sample(model, y, np.random.default_rng(0), SampleConfig(steps=10, **kw))
    none, every = draw(guidance=0.0), draw(guidance=2.0, guidance_interval=(0, math.inf))
    a = d.schedule.abar(d.sampler_timesteps(SampleConfig(steps=10)))
    sigma = np.sqrt((1 - a) / a)                       # decreasing, one per step
    assert not np.allclose(none, every)
    assert not np.allclose(draw(guidance=2.0), every)   # the default leaves the noisiest steps unguided
    seen.clear()
    gap = (sigma[3] * 1.01, sigma[2] * 0.99)           # between two sampler steps: none inside
    np.testing.assert_array_equal(draw(guidance=2.0, guidance_interval=gap), none)
    assert seen == [len(y)] * len(a)                   # one forward per step, without the null-label half
    inside = draw(guidance=2.0, guidance_interval=(sigma[5], sigma[2]))
    assert not np.allclose(inside, none) and not np.allclose(inside, every)


def test_unknown_sampler_and_bad_settings_are_refused_naming_the_option():
    oracle = GaussianOracle(Schedule(), 0.0, 1.0)
    with pytest.raises(ConfigError, match="--sampler"):
        _draw(oracle, "euler", 10)
    for bad, option in [(dict(steps=0), "--steps"), (dict(guidance=float("nan")), "--guidance"),
                        (dict(guidance=-1.0), "--guidance"), (dict(eta=2.0), "--eta"), (dict(steps=2.5), "--steps"),
                        (dict(guidance_interval=(0.7, 0.1)), "--guidance-interval"),
                        (dict(guidance_interval=(-1, 1.5)), "--guidance-interval"),
                        (dict(guidance_interval=(0, float("nan"))), "--guidance-interval"),
                        (dict(guidance_interval=(0.1,)), "--guidance-interval"),
                        (dict(final_sigma=-0.1), "--final-sigma"), (dict(final_sigma=float("inf")), "--final-sigma"),
                        (dict(ink_percentile=-1), "--ink-percentile"), (dict(ink_percentile=100.5), "--ink-percentile"),
                        (dict(ink_percentile=float("nan")), "--ink-percentile")]:
        with pytest.raises(ConfigError, match=option):
            SampleConfig(**bad)
    with pytest.raises(ConfigError, match="--steps"):
        _draw(oracle, "ddim", 1001)
    with pytest.raises(ConfigError, match="--clip-loss"):
        Diffusion(clip_loss=True)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_one_sampler_step_goes_from_noise_to_the_predicted_x0(sampler):
    """steps = 1 is allowed: x0 predicted at t = T - 1 is the sample."""
    oracle = GaussianOracle(Schedule(), mu=0.3, s=0.2)
    x = _draw(oracle, sampler, 1, n=4000)
    a = Schedule().abar(999)   # E[x0 | x_T] = mu + small: nearly the data mean, a tiny spread
    assert abs(x.mean() - 0.3) < 0.01 and x.std() < 0.2 * math.sqrt(a) * 2 + 0.01


def test_diffusion_round_trips_through_a_run_config():
    d = Diffusion(T=500, prediction="eps", weighting="min-snr", snr_gamma=2.0)
    assert Diffusion.from_dict(dict(d.to_dict(), lr=0.1, model={})) == d
    assert Diffusion.from_dict({}) == Diffusion()
    with pytest.raises(ConfigError, match="T must be"):
        Diffusion(T=0)
