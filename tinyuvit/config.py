"""The training run's configuration, and how saved runs' configurations are read back.

`TrainConfig` holds every default of `tinyuvit train-mnist` (the recipe: see docs/recipe.md).
`SAVED_BEFORE` is the one compatibility table: the fields added after runs were saved, with
what those runs did before each field existed. `from_saved` fills them in, and every reader
of a saved config goes through it (loading a checkpoint, resuming a run, `tinyuvit.load`, the
ablation study), so an old run is read one way wherever it is read.
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .diffusion import Diffusion
from .errors import ConfigError
from .model import PRESETS, UViTConfig, get_config
from .sampling import SampleConfig

# ----------------------------------------------------------------------------------------
# The configuration: every default of `tinyuvit train-mnist` lives here
# ----------------------------------------------------------------------------------------

# What `--device gpu` changes in the defaults (the CPU run is TrainConfig's own defaults).
# The GPU run keeps 5,000 steps (of 256): the CPU run's 6,500 spend the time that a faster
# CPU step saved (docs/recipe.md#model-size-and-training-length).
GPU_DEFAULTS = dict(batch_size=256, steps=5000)


@dataclass
class TrainConfig:
    """A training run. The defaults are the CPU run: 6,500 steps of 64 images on 2 cores.
    Where the recipe departs from U-ViT's, the comment says U-ViT's choice; docs/recipe.md has
    each departure's measurement."""
    preset: str = "tiny"
    steps: int = 6500
    batch_size: int = 64
    lr: float = 2e-3                   # U-ViT: 2e-4
    weight_decay: float = 0.03
    beta1: float = 0.9                 # U-ViT: 0.99
    beta2: float = 0.999
    warmup: int = 200
    lr_schedule: str = "cosine"        # after warmup, U-ViT: "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True            # decay min(ema_decay, (1+k)/(10+k)) at step k
    # keep the EMA weights after this fraction of the steps as the weak network that guides the
    # final one (autoguidance, SampleConfig.autoguidance); 0 = keep none. 0.3: step 1,950 of 6,500
    weak_at: float = 0.3
    # the diffusion: what the network predicts (U-ViT: eps), the loss weight (min(SNR + 1, 5) on
    # the x0 error), the schedule (U-ViT: linear) and the clip loss on black pixels (U-ViT: none);
    # Diffusion's defaults are the recipe's, and its docstrings say why
    prediction: str = Diffusion.prediction
    weighting: str = Diffusion.weighting
    snr_gamma: float = Diffusion.snr_gamma
    clip_loss: str = Diffusion.clip_loss
    noise_schedule: str = Diffusion.noise_schedule
    pos_init: str = "sincos2d"         # learned positions start as the 2-D sinusoidal table (U-ViT: normal)
    conv_init: str = "identity"        # the final conv starts as the identity (U-ViT: "uniform"; model.INITS)
    p_uncond: float = 0.1              # label dropout to the null label (classifier-free guidance)
    T: int = Diffusion.T
    seed: int = 0
    dtype: str = "float32"
    # previews and saving (may change on resume)
    sample_every: int = 1000
    save_every: int = 250
    sampler: str = SampleConfig.sampler
    sample_steps: int = SampleConfig.steps
    guidance: float = SampleConfig.guidance
    eval_every: int = 0                # class accuracy and FID every N steps (0 = never)
    eval_per_digit: int = 100
    model_overrides: dict = dataclasses.field(default_factory=dict)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("steps", "weak_at", "sample_every", "save_every", "sampler", "sample_steps", "guidance",
                 "eval_every", "eval_per_digit")

    @classmethod
    def for_device(cls, device="cpu", **settings):
        """The defaults for `device` ("cpu" or "gpu"), with `settings` (None = default) on top."""
        if device not in ("cpu", "gpu"):
            raise ConfigError(f"device (--device) must be 'cpu' or 'gpu', got {device!r}")
        base = dict(GPU_DEFAULTS) if device == "gpu" else {}
        base.update({k: v for k, v in settings.items() if v is not None})
        return cls(**base)

    def validate(self):
        """ConfigError naming the first invalid field (and its command-line option)."""
        whole = lambda v, lo: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo
        real = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
            and math.isfinite(v)
        checks = [
            (self.preset in PRESETS, f"preset (--preset) must be one of {sorted(PRESETS)}, got {self.preset!r}"),
            (whole(self.steps, 1), f"steps (--steps) must be a whole number >= 1, got {self.steps!r}"),
            (whole(self.batch_size, 1), f"batch size (--batch-size) must be a whole number >= 1, got {self.batch_size!r}"),
            (real(self.lr) and self.lr > 0, f"learning rate (--lr) must be a finite number > 0, got {self.lr!r}"),
            (real(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay (--weight-decay) must be a finite number >= 0, got {self.weight_decay!r}"),
            (real(self.beta1) and real(self.beta2) and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"AdamW betas must lie in [0, 1), got {self.beta1!r}, {self.beta2!r}"),
            (whole(self.warmup, 0), f"warmup (--warmup) must be a whole number >= 0, got {self.warmup!r}"),
            (self.lr_schedule in ("constant", "cosine"),
             f"lr schedule (--lr-schedule) must be 'constant' or 'cosine', got {self.lr_schedule!r}"),
            (real(self.grad_clip) and self.grad_clip >= 0,
             f"gradient clip (--grad-clip) must be a finite number >= 0 (0 = off), got {self.grad_clip!r}"),
            (real(self.ema_decay) and 0 <= self.ema_decay < 1,
             f"EMA decay (--ema-decay) must lie in [0, 1), got {self.ema_decay!r}"),
            (real(self.weak_at) and 0 <= self.weak_at < 1,
             f"--weak-at must lie in [0, 1) (a fraction of the steps; 0 = no autoguidance), got {self.weak_at!r}"),
            (real(self.p_uncond) and 0 <= self.p_uncond < 1,
             f"label dropout (--p-uncond) must lie in [0, 1), got {self.p_uncond!r}"),
            (whole(self.seed, 0), f"seed (--seed) must be a whole number >= 0, got {self.seed!r}"),
            (self.dtype in ("float32", "float64"), f"dtype (--dtype) must be float32 or float64, got {self.dtype!r}"),
            (whole(self.sample_every, 0), f"--sample-every must be a whole number >= 0 (0 = only at the end), got {self.sample_every!r}"),
            (whole(self.save_every, 0), f"--save-every must be a whole number >= 0 (0 = only at the end), got {self.save_every!r}"),
            (whole(self.eval_every, 0), f"--eval-every must be a whole number >= 0 (0 = never), got {self.eval_every!r}"),
            (whole(self.eval_per_digit, 2), f"--eval-per-digit must be a whole number >= 2, got {self.eval_per_digit!r}"),
            (whole(self.sample_steps, 1) and self.sample_steps <= (self.T if whole(self.T, 2) else 1000),
             f"sampler steps (--sample-steps) must lie in 1..{self.T}, got {self.sample_steps!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        self.diffusion()       # each raises ConfigError on a bad field
        self.sample_config()
        self.model_config()

    def model_config(self) -> UViTConfig:
        inits = dict(pos_init=self.pos_init, conv_init=self.conv_init)
        return get_config(self.preset, **{**inits, **self.model_overrides})

    def diffusion(self) -> Diffusion:
        return Diffusion(T=self.T, prediction=self.prediction, weighting=self.weighting, snr_gamma=self.snr_gamma,
                         noise_schedule=self.noise_schedule, clip_loss=self.clip_loss)

    def weak_step(self):
        """The step after which the EMA weights are kept for autoguidance (None: never)."""
        return max(1, round(self.weak_at * self.steps)) if self.weak_at else None

    def sample_config(self) -> SampleConfig:
        """How the run's sample grids are drawn."""
        return SampleConfig(sampler=self.sampler, steps=self.sample_steps, guidance=self.guidance)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["model"] = self.model_config().to_dict()
        return d


# ----------------------------------------------------------------------------------------
# Saved configurations: the one compatibility table
# ----------------------------------------------------------------------------------------

# TrainConfig fields added after runs were saved, with what those runs did before each existed.
# A saved config without the field trained that way; change a default above and old runs still
# load as they trained, because their values come from here, not from the defaults.
SAVED_BEFORE = dict(
    prediction="eps",          # before --prediction: U-ViT's eps network
    weighting="min-snr",       # before min-snr+1: Min-SNR
    clip_loss="none",          # before --clip-loss: every error counted
    noise_schedule="linear",   # before --noise-schedule: DDPM's linear betas
    pos_init="normal",         # before --pos-init: U-ViT's N(0, 0.02) positions
    conv_init="uniform",       # before --conv-init: PyTorch's uniform init of the final conv
    weak_at=0.0,               # before autoguidance: no early weights kept
)


def from_saved(saved):
    """A saved run config (dict) with the fields added since it was saved filled in from
    SAVED_BEFORE, and its model config completed (UViTConfig's defaults are U-ViT's own, which
    is what an old model entry meant): the config as that run trained."""
    saved = {**SAVED_BEFORE, **saved}
    if isinstance(saved.get("model"), dict):
        saved["model"] = UViTConfig.from_dict(saved["model"]).to_dict()
    return saved
