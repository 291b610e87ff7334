"""How to sample: the options of the samplers in diffusion.py, and the tricks they apply.

`SampleConfig` is the one place that holds the sampling defaults (the command line, the
training run's grids, `tinyuvit.load(...).sample`, `evaluate`). The samplers themselves, the
DDPM process's reverse, are `Diffusion.sample`; what they ask of this module:

    guided_output   the network's output with classifier-free guidance (only inside the
                    guidance interval of noise levels) and autoguidance by the run's early weights
    scale_ink       the last step's x0 scaled so that it does not overshoot full ink
    final_sigma     (a SampleConfig field) the noise level of the sampler's last step

Guidance convention (as U-ViT's code): eps = eps_c + s * (eps_c - eps_u), with eps_u the
prediction for the null label. s = 0 is the plain conditional model; s = 1 doubles the step
away from the unconditional prediction. (In the other common convention, w = 1 + s.)
docs/recipe.md has the measurement behind each default.
"""
import math
from dataclasses import dataclass

import numpy as np

from .backend import xp_of
from .errors import ConfigError

SAMPLERS = ("dpm++", "ddim", "ddpm")


def finite(v):
    """Whether v is a real, finite number (not a bool): the options' checks use it."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SampleConfig:
    """How to draw images: the sampler, its steps, the guidance scale s, DDIM's eta, x0 clipping,
    the autoguidance scale a (used where the run has weak weights) and the
    noise level of the last step."""
    sampler: str = "dpm++"     # DPM-Solver++(2M): as good at 20 steps as DDIM at 100
    steps: int = 20            # ddpm takes every timestep down to final_sigma
    # eps = eps_c + s (eps_c - eps_u); 0 = none. 0.6 with autoguidance and the clip loss (runs
    # without the clip loss: 0.7; docs/recipe.md#guidance-scale-and-interval)
    guidance: float = 0.6
    eta: float = 0.0           # DDIM noise: 0 = deterministic
    clip: bool = True          # clip the predicted x0 to [-1, 1]
    # guide only at noise levels sigma = sqrt((1 - abar) / abar) in [lo, hi]: not the noisiest
    # steps (sigma > 6: t > 893 of the cosine schedule), where guidance made the digits thicker
    # and less varied (docs/recipe.md#guidance-scale-and-interval); (0, inf) = every step
    guidance_interval: tuple = (0.0, 6.0)
    # autoguidance (Karras et al. 2024): + a (out_c - weak_c) at every step, where weak is the
    # same run's EMA early in training (config.TrainConfig.weak_at); 0 = none. A run saved
    # without weak weights samples as if a = 0.
    autoguidance: float = 1.0
    # the noise level sigma of the last step, from which the sampler jumps to the clean image
    # (the x0 the network predicts there); the steps are spread down to it. 0 = timestep 0
    # (sigma 0.0064 with the cosine schedule, 0.01 with the linear one). 0.2: the network's x0
    # of the last, least noisy steps is imprecise by a grey level or two, and left the background
    # speckled with faint pixels (docs/recipe.md#last-step)
    final_sigma: float = 0.2
    # the last step's x0, image by image: where its ink_percentile-th percentile pixel s lies
    # above full ink (1), [-1, s] is scaled onto [-1, 1] before the clip (`scale_ink`); 0 = clip
    # only, as runs were sampled before. Every real digit has its brightest pixel at 254-255, and
    # 0.65% of all their pixels are 255; the network's x0 overshoots full ink by 2-12% and the
    # clip alone put 3.7% of the pixels at 255. 99.7 leaves about as many at 255 as real digits
    # (docs/recipe.md#ink-scaling)
    ink_percentile: float = 99.7

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler (--sampler) must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not isinstance(self.steps, (int, np.integer)) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"sampler steps (--steps) must be a whole number >= 1, got {self.steps!r}")
        if not finite(self.guidance) or self.guidance < 0:
            raise ConfigError(f"guidance (--guidance) must be a finite number >= 0 (0 = none), got {self.guidance!r}")
        if not finite(self.autoguidance) or self.autoguidance < 0:
            raise ConfigError(f"autoguidance (--autoguidance) must be a finite number >= 0 (0 = none), "
                              f"got {self.autoguidance!r}")
        if not finite(self.eta) or not 0 <= self.eta <= 1:
            raise ConfigError(f"eta (--eta) must lie in [0, 1], got {self.eta!r}")
        if not finite(self.final_sigma) or self.final_sigma < 0:
            raise ConfigError(f"final sigma (--final-sigma) must be a finite number >= 0 (0 = the cleanest step), "
                              f"got {self.final_sigma!r}")
        if not finite(self.ink_percentile) or not 0 <= self.ink_percentile <= 100:
            raise ConfigError(f"ink percentile (--ink-percentile) must lie in [0, 100] (0 = clip only), "
                              f"got {self.ink_percentile!r}")
        lo_hi = self.guidance_interval
        number = lambda v: finite(v) or v == math.inf
        if not (isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2 and all(number(v) for v in lo_hi)
                and 0 <= lo_hi[0] <= lo_hi[1]):
            raise ConfigError(f"guidance interval (--guidance-interval) must be two noise levels 0 <= LO <= HI "
                              f"(sigma; HI may be inf), e.g. 0,6, got {lo_hi!r}")
        object.__setattr__(self, "guidance_interval", (float(lo_hi[0]), float(lo_hi[1])))

    def autoguidance_with(self, has_weak):
        """The autoguidance scale that applies: a for a run with early weights, 0 for one saved
        without them (it samples as if a = 0)."""
        return self.autoguidance if has_weak else 0.0

    def guidance_text(self, weak=False):
        """'guidance s at noise levels lo..hi' (and the autoguidance, if the run has weak
        weights, and the final sigma, if not 0), as the commands print it."""
        lo, hi = self.guidance_interval
        text = f"guidance {self.guidance:g} at noise levels {lo:g}..{hi:g}"
        a = self.autoguidance_with(weak)
        return (text + (f", autoguidance {a:g}" if a else "")
                + (f", last step from sigma {self.final_sigma:g}" if self.final_sigma else "")
                + (f", ink to its {self.ink_percentile:g}th percentile" if self.ink_percentile else ""))

    def guidance_at(self, abar):
        """The guidance scale at a step whose x_t has signal level abar: s where the noise level
        sigma = sqrt((1 - abar) / abar) lies in the interval, 0 outside it. Guiding only the
        middle of the trajectory keeps the variety that guidance at high noise takes away, and
        costs no second forward outside it (Kynkaanniemi et al. 2024, who measure sigma the same
        way). The noise level, unlike the step number, means the same under every schedule."""
        lo, hi = self.guidance_interval
        sigma = math.sqrt((1.0 - abar) / abar) if abar > 0 else math.inf
        return self.guidance if lo <= sigma <= hi else 0.0


def guided_output(model, x, t, y, guidance, *, weak=None, autoguidance=0.0, bound=None):
    """out = out_c + s (out_c - out_u) + a (out_c - weak_c); one forward on the doubled batch
    when s != 0, and one of the weak network when a != 0 (and there is one).

    Classifier-free guidance (s) moves away from the null label's prediction, towards the digit
    asked for; autoguidance (a; Karras et al. 2024) moves away from what a worse network of the
    same run predicts for the same digit, towards better drawn digits, without the loss of
    variety that guidance toward the label brings. (For a v network both are the same guidance
    as on eps: eps is affine in v at fixed x_t.)

    `bound(out)`, if given, is applied to every network's output before they are combined
    (`Diffusion.clipped_output`): where a network may put x0 anywhere beyond a bound, two such
    values differ by chance, and guidance would amplify that difference into grey."""
    xp = xp_of(x)
    null_label = model.cfg.num_classes              # the label table's extra row
    bound = bound or (lambda out: out)
    B = x.shape[0]
    tt = xp.full((B,), int(t), dtype=np.int64)
    if guidance == 0:
        out = out_c = bound(model.forward(x, tt, y, train=False))    # no backward: keep no caches
    else:
        both = model.forward(xp.concatenate([x, x]), xp.concatenate([tt, tt]),
                             xp.concatenate([y, xp.full_like(y, null_label)]), train=False)
        out_c, out_u = bound(both[:B]), bound(both[B:])
        out = out_c + guidance * (out_c - out_u)
    if weak is not None and autoguidance:
        out = out + autoguidance * (out_c - bound(weak.forward(x, tt, y, train=False)))
    return out


def scale_ink(x0, percentile):
    """x0 [B, C, H, W] with each image's ink scaled so that its `percentile`-th percentile pixel s
    lies at full ink, where s > 1: x0 -> -1 + (x0 + 1) 2 / (s + 1), which keeps black (-1) black
    and the pixels' order, and leaves only those above s beyond 1 for the clip. Images whose
    percentile lies at or below 1 are left as they are. (A one-sided cousin of Imagen's dynamic
    thresholding, Saharia et al. 2022, for the last step only: a background below black is the
    clip loss's, not an overshoot to scale away.)"""
    xp = xp_of(x0)
    s = xp.percentile(x0.reshape(len(x0), -1), percentile, axis=1)[:, None, None, None]   # [B, 1, 1, 1]
    scale = (2.0 / (xp.maximum(s, 1.0) + 1.0)).astype(x0.dtype)
    return xp.where(s > 1.0, (x0 + 1.0) * scale - 1.0, x0)
