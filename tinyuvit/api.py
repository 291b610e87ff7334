"""tinyuvit from Python: load a trained run, draw digits, score it. The command line uses these.

    import tinyuvit
    run = tinyuvit.load("runs/mnist-tiny/checkpoint.npz")   # the model, its diffusion, its config
    images = run.sample(digits=[3, 7], count=8)              # uint8 [16, 28, 28], as `tinyuvit sample`
    scores = run.evaluate(per_digit=100)                     # as `tinyuvit evaluate --json`
    run.explain("explain", digit=3)                          # PNGs of its insides, as `tinyuvit explain`

Defaults are those of the command line, from one place: `SampleConfig` (how to sample) and
`evaluate.PER_DIGIT` (how many samples to score).
"""
import os

import numpy as np

from .backend import Backend
from .tools.checkpoint import load_checkpoint
from .diffusion import Diffusion
from .sampling import SampleConfig
from .errors import ConfigError
from .tools.evaluate import BATCH_SIZE, PER_DIGIT, check_count, check_picture, evaluate_model
from .tools.images import from_model_range
from .model import network_with
from .tools.parallel import on_cpu_threads


class Run:
    """A trained run: `model` (UViT with the EMA or the raw weights), `diffusion` (its schedule,
    what the network predicts, its loss weighting), `config` (the run's settings as saved),
    `step` (training steps taken), `path` (the checkpoint) and `weak` (the same network with the
    EMA weights kept early in the run, which autoguidance steers away from; None if the run kept
    none, and then it samples without autoguidance)."""

    def __init__(self, model, diffusion, config, step, path=None, weak=None, weak_step=None):
        self.model, self.diffusion, self.config, self.step, self.path = model, diffusion, config, step, path
        self.weak, self.weak_step = weak, weak_step     # weak_step: the step of those weights

    def __repr__(self):
        weak = f", weak weights of step {self.weak_step}" if self.weak is not None else ""
        return (f"Run({self.path!r}, step {self.step}, {self.model.num_params():,} parameters, "
                f"{self.diffusion}, on {self.model.backend}{weak})")

    def sample(self, digits=range(10), count=10, how=None, seed=0, callback=None, progress=None, **settings):
        """`count` images of each digit in `digits` -> uint8 [len(digits) * count, 28, 28],
        digit by digit (the first `count` are digits[0], ...).

        `how` is a SampleConfig, or pass its fields: sampler="ddim", steps=50, guidance=2, eta=0,
        autoguidance=0 (none; it needs `self.weak`), final_sigma=0 (on to timestep 0, as before 0.2),
        ink_percentile=0 (the last x0 only clipped, as before 99.7).
        `callback(i, x_t, x0_pred)` sees every sampler step; `progress` gets `.update(1)` per step."""
        how = _sample_config(how, settings)
        digits = check_digits(digits)
        count = check_count("count (--count)", count, 1)
        check_count("seed (--seed)", seed, 0)
        labels = self.model.backend.xp.asarray(np.repeat(digits, count))
        weak = None if self.weak is None else on_cpu_threads(self.weak)
        x = self.diffusion.sample(on_cpu_threads(self.model), labels, np.random.default_rng(seed), how,
                                  callback=callback, progress=progress, weak=weak)
        return from_model_range(x)

    def evaluate(self, per_digit=None, how=None, seed=0, batch_size=BATCH_SIZE, classifier=None, data_dir=None,
                 progress=None, picture=None, labels="balanced", **settings):
        """Class accuracy, FID and pixel measures of `per_digit` samples of every digit (default:
        300 on a CPU, 1,000 on a GPU) -> the dict that `tinyuvit evaluate --json` writes.
        `labels="data"`: as many samples in all, but the digits in the training set's proportions
        (evaluate.LABELS), as the FID floor of real digits drawn at random assumes.

        `classifier`: a path to a classifier made by `tinyuvit train-classifier`, or a loaded
        one (default: the one shipped with tinyuvit). `data_dir`: MNIST for the FID reference and
        the real digits. `picture`: a PNG path for pixel histograms and samples beside real digits."""
        from .tools.metrics import load_classifier, reference_stats
        how = _sample_config(how, settings)
        per_digit = PER_DIGIT[self.model.backend.device] if per_digit is None else per_digit
        check_count("samples per digit (--per-digit)", per_digit, 2)
        check_count("batch size (--batch-size)", batch_size, 1)
        check_count("seed (--seed)", seed, 0)
        picture = check_picture(picture)
        if classifier is None or isinstance(classifier, (str, os.PathLike)):
            classifier = load_classifier(classifier, backend=self.model.backend)
        reference = reference_stats(classifier, data_dir=data_dir)
        res = evaluate_model(self.model, self.diffusion, per_digit, how, seed, batch_size, classifier, reference,
                             data_dir=data_dir, progress=progress, picture=picture, labels=labels, weak=self.weak)
        res["checkpoint_step"] = self.step
        # FID falls with the number of samples: the floor at the same n is the like-for-like bound
        res["fid_floor_same_n"] = float(reference_stats(classifier, data_dir=data_dir, floor_n=res["n"])["fid_floor"])
        return res

    def explain(self, out_dir, digit=3, seed=0, patch=None, how=None, progress=False, log=None, **settings):
        """Sample one `digit` as `sample(digits=[digit], count=1, seed=seed)` would and write PNGs of
        what happens inside the network into `out_dir` (tinyuvit.tools.explain): how the digit
        emerges, what the tokens attend to, what the positions learned, what the long skips carry.
        `patch` (row, col): the patch whose attention is drawn (default: the one with most ink).
        -> {"files": [PNGs, explain.json], "notes": [parts this run lacks], "measures": {the numbers
        drawn}, "patch": (row, col), "how": the SampleConfig used, "image": the digit, [28, 28] in [-1, 1]}"""
        from .tools.explain import explain
        how = _sample_config(how, settings)
        check_count("seed (--seed)", seed, 0)
        return explain(self.model, self.diffusion, how, out_dir, digit=digit, seed=seed, patch=patch,
                       weak=self.weak, progress=progress, log=log)


def load(path, device="cpu", weights="ema"):
    """The run saved at `path` (a checkpoint.npz or its run folder) on `device` ("cpu" or "gpu"),
    with its EMA weights (what samples use) or its raw trained weights (`weights="raw"`), and
    the early EMA weights for autoguidance where the checkpoint holds them."""
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights (--weights) must be 'ema' or 'raw', got {weights!r}")
    Backend(device)   # no usable GPU: say so before reading anything
    group = "ema" if weights == "ema" else "params"
    ck = load_checkpoint(path, need=(group,))
    cfg = ck["config"]
    backend = Backend(device, cfg.get("dtype", "float32"))
    model = network_with(cfg["model"], backend, ck[group])
    weak = network_with(cfg["model"], backend, ck["weak"]) if ck["weak"] else None
    return Run(model, Diffusion.from_dict(cfg), cfg, ck["step"], ck.get("path", os.fspath(path)), weak, ck["weak_step"])


def check_digits(digits):
    """A list of digits 0..9, or ConfigError naming what was wrong."""
    try:
        digits = [int(d) for d in digits]
    except (TypeError, ValueError):
        raise ConfigError(f"digits (--digits) must be digits 0..9 like 3,7, got {digits!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise ConfigError(f"digits (--digits) must be digits 0..9 like 3,7, got {digits!r}")
    return digits


def _sample_config(how, settings):
    if how is not None and settings:
        raise ConfigError("pass either a SampleConfig or its fields (sampler=..., steps=...), not both")
    try:
        return how or SampleConfig(**settings)
    except TypeError as e:   # an unknown keyword
        raise ConfigError(f"unknown sampling setting: {e}") from None
