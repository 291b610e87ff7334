"""DDPM: the forward (noising) process, the training target and loss, and the samplers.

Read top to bottom, the process:

    Schedule                  abar_t for t = 0 .. T-1 (linear betas, or cosine)
    Diffusion.noisy_batch     x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, and the training target
    Diffusion.loss            the weighted MSE of the network's output, and its gradient
    Diffusion.x0_and_eps      x0 and eps back from the network's output (eps, v or x0)
    Diffusion.sample          the reverse process: DDPM, DDIM or DPM-Solver++(2M) steps

`Diffusion` owns what belongs together: the schedule, what the network predicts, how its loss is
weighted, and the samplers that turn its predictions back into images. A checkpoint records it
(`to_dict`), loading gives it back (`from_dict`), and no caller passes the prediction type
around. `Diffusion()` is the recipe's (docs/recipe.md): v-prediction, min(SNR + 1, 5) on the
x0 error, the cosine schedule, the clip loss on black pixels. U-ViT's own (as DDPM) would be
`Diffusion(prediction="eps", snr_gamma=0, noise_schedule="linear", clip_loss="none")`.
How to sample (guidance, autoguidance, the final sigma, the ink scaling) is sampling.py's.

Ho, Jain, Abbeel 2020 (DDPM); Song, Meng, Ermon 2021 (DDIM); Lu et al. 2022 (DPM-Solver++).

Timesteps are 0-indexed: t = 0 .. T-1, where t carries noise level beta_{t+1} of the paper.
Training draws t uniformly from all T of them, so every timestep any sampler visits was trained.

What the network predicts: the noise eps (U-ViT, DDPM; `prediction="eps"`), the velocity
v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022; `prediction="v"`), or the clean
image x0 itself (`prediction="x0"`). All give the same x0 and eps (`Diffusion.x0_and_eps`); v
is better conditioned at high noise, where an eps network must be very precise because
x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) magnifies its errors by 1/sqrt(abar) (about 6x at
t = 700, 150x at t = 999 of the linear schedule). At the clean end it is the other way round:
x0 = sqrt(abar) x_t - sqrt(1 - abar) v, so to remove the last of the noise a v (or eps) network
must give back that noise itself, and whatever it misses stays in the image; an x0 network only
has to draw the image, and a black background is a constant.

Clipping: samplers clip the predicted x0 to [-1, 1] and then recompute the noise from the
clipped x0, so the update stays consistent with the x0 it uses.
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from typing import NamedTuple

from .backend import xp_of
from .errors import ConfigError
from .sampling import SampleConfig, finite, guided_output, scale_ink


class Schedule:
    """The noise schedule, computed once in float64 NumPy: "linear" betas from 1e-4 to 0.02
    (DDPM, U-ViT), or "cosine" (Nichol & Dhariwal 2021: abar follows cos^2 of the time, with
    s = 0.008 and each beta capped at 0.999), which destroys the image more slowly early on and
    spends fewer steps where x_t is already nearly pure noise."""

    KINDS = ("linear", "cosine")
    LAMBDA_MIN = -5.5   # the noisiest log-SNR that "logsnr" spacing spreads its steps from

    def __init__(self, T=1000, kind="linear", beta_start=1e-4, beta_end=0.02):
        self.T, self.kind = T, kind
        if kind == "linear":
            self.betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)        # [T]
        elif kind == "cosine":
            f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2     # [T+1] abar ~ f/f(0)
            self.betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)                         # [T]
        else:
            raise ConfigError(f"noise schedule (--noise-schedule) must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)                             # [T]  abar_t
        assert self.betas.shape == self.alphas_cumprod.shape == (T,)
        assert np.all(np.diff(self.alphas_cumprod) < 0) and 0 < self.alphas_cumprod[-1] < 1

    def abar(self, t):
        """abar at integer timesteps t (a NumPy array or int); abar(-1) = 1 means "clean"."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alphas_cumprod[np.clip(t, 0, self.T - 1)], 1.0)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (q(x_t | x0) in closed form)."""
        xp = xp_of(x0)
        a = self.abar(t)
        sa = xp.asarray(np.sqrt(a), dtype=x0.dtype)[:, None, None, None]       # [B, 1, 1, 1]
        s1 = xp.asarray(np.sqrt(1.0 - a), dtype=x0.dtype)[:, None, None, None]
        return sa * x0 + s1 * noise

    def log_snr(self):
        """lambda_t = log(alpha_t / sigma_t) = -log(noise level sigma_t), [T], decreasing in t."""
        return 0.5 * np.log(self.alphas_cumprod / (1.0 - self.alphas_cumprod))

    def t_at_sigma(self, sigma):
        """The timestep whose noise level sqrt((1 - abar)/abar) is nearest to `sigma` (in log);
        0 for sigma = 0."""
        if sigma <= 0:
            return 0
        return int(np.argmin(np.abs(self.log_snr() + math.log(sigma))))

    def timesteps(self, steps, spacing="time", last=0):
        """`steps` integer timesteps from T-1 down to `last` (0: the cleanest), strictly
        decreasing: evenly spaced in t ("time"), or in lambda = log(alpha / sigma) ("logsnr", as
        DPM-Solver's authors advise, so that consecutive steps are of similar size for the
        multistep formula). The samplers go from the last one straight to the clean image."""
        if not 0 <= last < self.T - 1:
            raise ConfigError(f"the last sampler step must lie in 0..{self.T - 2}, got timestep {last}")
        if not 1 <= steps <= self.T - last:
            raise ConfigError(f"sampler steps (--steps) must be between 1 and {self.T - last}, got {steps}")
        if steps == 1:                                 # one step: from pure noise to x0 at once
            return np.array([self.T - 1], dtype=np.int64)
        if spacing == "time" or steps < 3:
            ts = np.round(np.linspace(self.T - 1, last, steps)).astype(np.int64)
        else:
            lam = self.log_snr()                                                       # [T]
            # below lambda = -5.5 (SNR 2e-5) x_t holds nothing of the image: the cosine schedule
            # goes down to -10 there, and even spacing would spend a third of the steps on it
            targets = np.linspace(max(lam[-1], self.LAMBDA_MIN), lam[last], steps)
            ts = np.array([int(np.argmin(np.abs(lam - v))) for v in targets], dtype=np.int64)
            ts[0] = self.T - 1                         # every sampler starts from pure noise
            ts = np.unique(ts)[::-1]                   # nearest timesteps, duplicates merged
            if len(ts) < steps:                        # refill with the largest gaps' midpoints
                ts = self._fill(ts, steps)
        assert np.all(np.diff(ts) < 0) and ts[0] == self.T - 1 and ts[-1] == last
        return ts

    def _fill(self, ts, steps):
        ts = list(ts)
        while len(ts) < steps:
            gaps = [ts[i] - ts[i + 1] for i in range(len(ts) - 1)]
            i = int(np.argmax(gaps))
            ts.insert(i + 1, (ts[i] + ts[i + 1]) // 2)
        return np.array(ts, dtype=np.int64)


PREDICTIONS = ("v", "eps", "x0")
WEIGHTINGS = ("min-snr+1", "min-snr")
CLIP_LOSSES = ("none", "black", "both")


class NoisyBatch(NamedTuple):
    """A training batch: what the network sees (xt, t, y) and what its loss needs (target,
    weight, and `side`, the clip loss's bound per pixel: `clip_side`, None without it)."""
    xt: object        # [B, C, H, W] noisy images
    t: object         # [B] timesteps
    y: object         # [B] labels, some dropped to the null label
    target: object    # [B, C, H, W] eps, v or x0
    weight: object    # [B, 1, 1, 1] the loss weight of each image (`loss_weight`)
    side: object      # [B, C, H, W] or None


# ----------------------------------------------------------------------------------------
# The diffusion object
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diffusion:
    """The schedule (T steps), what the network predicts ("v", "eps" or "x0"), how the loss is
    weighted ("min-snr+1" or "min-snr", capped at snr_gamma; 0 = the plain MSE) and which errors
    beyond the data's bounds it forgives (clip_loss); its methods make training batches, the
    loss and its gradient, and samples. The defaults are the recipe's (docs/recipe.md); a saved
    run's values come from its config (`config.from_saved` fills in what old runs did)."""
    T: int = 1000
    prediction: str = "v"          # v = sqrt(abar) eps - sqrt(1 - abar) x0, the noise eps (U-ViT), or x0
    weighting: str = "min-snr+1"   # x0 weight min(SNR + 1, gamma), or "min-snr": min(SNR, gamma)
    snr_gamma: float = 5.0         # the cap gamma of the weighting (`loss_weight`); 0 = plain MSE
    noise_schedule: str = "cosine" # abar_t: "cosine" (`Schedule`) or "linear" betas (DDPM, U-ViT)
    # count no error where the true pixel is black (-1; "both": or full ink, 1) and the predicted
    # x0 lies beyond it, as the samplers clip x0 there (`loss`); "none": every error counts (U-ViT)
    clip_loss: str = "black"

    def __post_init__(self):
        if not isinstance(self.T, (int, np.integer)) or isinstance(self.T, bool) or self.T < 2:
            raise ConfigError(f"T must be a whole number >= 2, got {self.T!r}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.clip_loss not in CLIP_LOSSES:
            raise ConfigError(f"clip loss (--clip-loss) must be one of {', '.join(CLIP_LOSSES)}, got {self.clip_loss!r}")
        if not finite(self.snr_gamma) or self.snr_gamma < 0:
            raise ConfigError(f"snr_gamma (--snr-gamma) must be a finite number >= 0, got {self.snr_gamma!r}")
        object.__setattr__(self, "schedule", Schedule(int(self.T), self.noise_schedule))

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The diffusion of a run config (its T, prediction, weighting, snr_gamma, noise_schedule,
        clip_loss; other keys ignored). A saved config goes through `config.from_saved` first."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    # --- training: a noisy batch and its target, then the weighted loss and its gradient --

    def noisy_batch(self, x0, y, rng, p_uncond=0.0, null_label=None):
        """A NoisyBatch (x_t, t, y, target, weight, side) for clean images x0 [B, C, H, W] and
        labels y [B]; `loss` reads its target, weight and side.

        Draws t uniformly from all T steps, the noise, and which labels are dropped to the
        null label (probability p_uncond, for classifier-free guidance), in that order, from
        `rng` (a NumPy Generator: host randomness, so runs repeat on any backend)."""
        xp = xp_of(x0)
        B = x0.shape[0]
        t = rng.integers(0, self.T, size=B)                                         # [B]
        noise = xp.asarray(rng.standard_normal(x0.shape, dtype=np.float32), dtype=x0.dtype)
        drop = rng.random(B) < p_uncond                                             # label dropout
        y = np.where(drop, null_label, np.asarray(y)) if p_uncond else np.asarray(y)
        xt = self.schedule.q_sample(x0, t, noise)                                   # [B, C, H, W]
        a = self.schedule.abar(t)                                                   # [B] float64
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x0
        else:
            sa, s1 = (xp.asarray(c, dtype=x0.dtype)[:, None, None, None] for c in (np.sqrt(a), np.sqrt(1 - a)))
            target = sa * noise - s1 * x0                                           # v
        w = loss_weight(a / (1.0 - a), self.snr_gamma, self.prediction, self.weighting)
        weight = xp.asarray(w, dtype=x0.dtype)[:, None, None, None]                 # [B, 1, 1, 1]
        side = clip_side(x0, self.clip_loss, self.prediction)                         # [B, C, H, W] or None
        if side is not None:
            side = side.astype(x0.dtype, copy=False)         # bool * 1.0 is float64 on NumPy
        return NoisyBatch(xt, xp.asarray(t), xp.asarray(y), target, weight, side)

    @staticmethod
    def loss(pred, batch):
        """(L, dL/dpred) for L = mean(w (pred - target)^2), the mean over every pixel, with the
        target and weight w of `batch` (a NoisyBatch).

        With `side` (clip_loss): no error where side * (pred - target) < 0, i.e. where the
        target is black (or full ink) and the predicted x0 is blacker still. The samplers clip
        such an x0 to the bound, so it costs nothing; the network may put a black background
        anywhere below -1 instead of exactly at it, which it can only do to within its precision
        (a grey haze of 1..4 levels otherwise). Where the true x0 is not black, or where x0_pred
        is above it, the error counts as before, so the optimum is still the mean E[x0 | x_t]
        wherever that lies inside (-1, 1)."""
        diff = forgiven(pred - batch.target, batch.side)
        loss = float((batch.weight * diff * diff).mean())
        dpred = (batch.weight * diff) * (2.0 / diff.size)
        return loss, dpred

    # --- x0 and eps from the network's output -------------------------------------------

    def x0_and_eps(self, x, out, abar):
        """The predicted x0 and eps from x_t and the network's output (eps, v or x0) at abar."""
        sa, s1 = math.sqrt(abar), math.sqrt(1.0 - abar)
        if self.prediction == "v":   # x_t = sa x0 + s1 eps and v = sa eps - s1 x0, sa^2 + s1^2 = 1
            x0, eps = sa * x - s1 * out, s1 * x + sa * out
        elif self.prediction == "x0":
            x0 = out
            eps = (x - sa * x0) * (1.0 / s1)
        else:
            eps = out
            x0 = (x - s1 * eps) * (1.0 / sa)
        return x0, eps

    @staticmethod
    def clipped(x, x0, abar):
        """x0 clipped to [-1, 1], and the noise consistent with it at x_t = x."""
        x0 = xp_of(x0).clip(x0, -1.0, 1.0)
        return x0, (x - math.sqrt(abar) * x0) * (1.0 / math.sqrt(1.0 - abar))

    def clipped_output(self, x, abar):
        """out -> the output whose x0 is clipped to [-1, 1], at x_t = x: for a network trained
        with clip_loss, whose x0 beyond a bound is free (any value below -1 means black), so
        each prediction is clipped before guidance combines them (`guided_output`)."""
        def bound(out):
            if self.prediction == "x0":
                return xp_of(out).clip(out, -1.0, 1.0)
            x0, eps = self.clipped(x, self.x0_and_eps(x, out, abar)[0], abar)
            if self.prediction == "eps":
                return eps
            return math.sqrt(abar) * eps - math.sqrt(1.0 - abar) * x0        # v
        return bound

    # --- the samplers: the reverse process ------------------------------------------------

    def sampler_timesteps(self, how):
        """The timesteps a sampler visits, from T - 1 down to the one at how.final_sigma: all of
        them for "ddpm", how.steps of them spaced in log-SNR for "dpm++" and in t for "ddim"."""
        last = self.schedule.t_at_sigma(how.final_sigma)
        if last >= self.schedule.T - 1:
            top = math.exp(-self.schedule.log_snr()[-1])
            raise ConfigError(f"final sigma (--final-sigma) must be below the noise level of pure noise ({top:.3g}) "
                              f"to leave a step to take, got {how.final_sigma:g}")
        if how.sampler == "ddpm":
            return np.arange(self.schedule.T - 1, last - 1, -1)
        return self.schedule.timesteps(how.steps, "logsnr" if how.sampler == "dpm++" else "time", last)

    def sample(self, model, labels, rng, how=None, callback=None, progress=None, weak=None):
        """Draw images for `labels` ([B] ints on the model's backend) -> x0 [B, C, H, W].

        `how` is a SampleConfig (default: SampleConfig()): "ddpm" (ancestral, all T steps),
        "ddim" (any number of steps, eta = 0 deterministic) or "dpm++" (DPM-Solver++(2M)).
        `weak`: the same network with the run's early weights, for autoguidance (None: none).
        `callback(i, x_t, x0_pred)` sees every step (for GIFs); `progress` gets `.update(1)`.
        """
        how = how or SampleConfig()
        sched, cfg = self.schedule, model.cfg
        xp = xp_of(labels)
        B = labels.shape[0]
        shape = (B, cfg.in_chans, cfg.img_size, cfg.img_size)
        x = xp.asarray(rng.standard_normal(shape), dtype=model.dtype)               # x_T ~ N(0, I)
        ts = self.sampler_timesteps(how)
        x0_prev, h_prev = None, None
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else -1        # -1: the clean image, abar = 1
            a, a_next = float(sched.abar(t)), float(sched.abar(t_next))
            bound = self.clipped_output(x, a) if self.clip_loss != "none" else None
            out = guided_output(model, x, t, labels, how.guidance_at(a), weak=weak,
                                autoguidance=how.autoguidance, bound=bound)
            x0, eps = self.x0_and_eps(x, out, a)
            if how.clip:
                if t_next < 0 and how.ink_percentile:           # the last step: the image itself
                    x0 = scale_ink(x0, how.ink_percentile)
                x0, eps = self.clipped(x, x0, a)
            if how.sampler == "ddpm":
                x = x0 if t_next < 0 else _ddpm_step(x, x0, t, sched, rng, xp, model.dtype)
            elif how.sampler == "ddim":
                x = _ddim_step(x0, eps, a, a_next, how.eta, rng, xp, model.dtype)
            else:
                x, h_prev = _dpmpp_2m_step(x, x0, x0_prev, a, a_next, h_prev)
                x0_prev = x0
            if callback is not None:
                callback(i, x, x0)
            if progress is not None:
                progress.update(1)
        return x


def clip_side(x0, clip_loss, prediction):
    """For `Diffusion.loss`: +-1 where the true pixel x0 is at a bound that clip_loss forgives, 0
    elsewhere (None for "none"), signed so that side * (pred - target) < 0 means "the predicted
    x0 lies beyond that bound". x0_pred - x0 is +(pred - target) for an x0 network, and
    -sqrt(1 - abar) (v - v_true) or -sqrt((1 - abar)/abar) (eps - eps_true) for the others.
    Only comparisons and arithmetic: NumPy, CuPy and PyTorch arrays alike."""
    if clip_loss == "none":
        return None
    below = (x0 <= -1.0) * 1.0                                 # black: x0_pred below it is clipped
    above = (x0 >= 1.0) * 1.0 if clip_loss == "both" else 0.0  # full ink: x0_pred above it
    return (below - above) if prediction == "x0" else (above - below)


def forgiven(diff, side):
    """The error pred - target with the clip loss's forgiven pixels (side * diff < 0, see
    `clip_side`) set to 0; unchanged for side None. NumPy, CuPy and PyTorch alike."""
    return diff if side is None else diff * (side * diff >= 0)


def loss_weight(snr, snr_gamma, prediction="v", weighting="min-snr+1"):
    """The weight of each image's MSE of eps, v or x0 at signal-to-noise ratio SNR = abar/(1 - abar).

    Any such loss is a weighted error of the predicted clean image x0: the plain eps MSE is
    SNR |x0_pred - x0|^2 and the plain v MSE is (SNR + 1) |x0_pred - x0|^2. Both count nearly
    clean timesteps (SNR up to 10^4 here), whose noise is hard to guess and matters little for
    the samples, far more than the rest. The weightings cap the x0 weight at gamma:
      "min-snr"    min(SNR, gamma)       Min-SNR (Hang et al. 2023): for the eps loss
                                         min(SNR, gamma)/SNR, for v min(SNR, gamma)/(SNR + 1).
                                         Noisy timesteps (SNR << 1) get almost no weight.
      "min-snr+1"  min(SNR + 1, gamma)   the v loss with its weight capped: min(1, gamma/(SNR + 1)).
                                         Noisy timesteps, where the digit's shape is decided,
                                         keep weight 1. Meant for v: on the eps loss it is
                                         min(SNR + 1, gamma)/SNR, ~1/SNR at high noise.
    An x0 network's MSE is the x0 error itself, so its weight is the x0 weight: the same
    weighting costs every prediction type the same for the same x0.
    snr_gamma = 0: no weighting, the plain mean (Ho et al.) of whatever the network predicts.
    """
    if not snr_gamma:
        return np.ones_like(snr)
    x0_weight = np.minimum(snr + (1.0 if weighting == "min-snr+1" else 0.0), snr_gamma)
    return x0_weight / {"eps": snr, "v": snr + 1.0, "x0": 1.0}[prediction]


def _ddpm_step(x, x0, t, schedule, rng, xp, dtype):
    """x_{t-1} ~ q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta~_t): the posterior of DDPM, for
    t >= 1 (the last step, from whichever timestep, is x0 itself: `Diffusion.sample`)."""
    beta = float(schedule.betas[t])
    a, a_prev = float(schedule.abar(t)), float(schedule.abar(t - 1))
    c0 = math.sqrt(a_prev) * beta / (1.0 - a)
    ct = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a)
    mean = c0 * x0 + ct * x
    var = beta * (1.0 - a_prev) / (1.0 - a)
    z = xp.asarray(rng.standard_normal(x.shape), dtype=dtype)
    return mean + math.sqrt(var) * z


def _ddim_step(x0, eps, a, a_next, eta, rng, xp, dtype):
    """x_next = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, sigma from eta (DDIM eq. 16)."""
    sigma = eta * math.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))
    x = math.sqrt(a_next) * x0 + math.sqrt(max(1.0 - a_next - sigma * sigma, 0.0)) * eps
    if sigma > 0:
        x = x + sigma * xp.asarray(rng.standard_normal(x0.shape), dtype=dtype)
    return x


def _dpmpp_2m_step(x, x0, x0_prev, a, a_next, h_prev):
    """One DPM-Solver++(2M) step in lambda = log(alpha / sigma), with data prediction x0.

    x_next = (sigma'/sigma) x - alpha' (e^{-h} - 1) D, h = lambda' - lambda, where D = x0 on the
    first step (first order) and D = (1 + 1/2r) x0 - (1/2r) x0_prev after it, r = h_prev / h.
    The last step (to the clean image, sigma' = 0) is x_next = x0.
    """
    if a_next >= 1.0:
        return x0, None
    alpha, sigma = math.sqrt(a), math.sqrt(1.0 - a)
    alpha_n, sigma_n = math.sqrt(a_next), math.sqrt(1.0 - a_next)
    h = math.log(alpha_n / sigma_n) - math.log(alpha / sigma)
    if x0_prev is None:
        D = x0
    else:
        r = h_prev / h
        D = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    return (sigma_n / sigma) * x - alpha_n * math.expm1(-h) * D, h
