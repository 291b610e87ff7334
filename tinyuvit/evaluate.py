"""Score a diffusion model: sample N digits of each class, then class accuracy and FID
(tinyuvit.metrics, with tinyuvit's own MNIST classifier: no download needed), and the pixels
of the samples beside as many real digits."""
import numpy as np

from .backend import to_numpy
from .diffusion import SampleConfig
from .errors import ConfigError
from .parallel import on_cpu_threads

# Samples per digit of `tinyuvit evaluate` (and Run.evaluate): 3,000 digits in all on a CPU,
# 10,000 on a GPU (FID falls with the number of samples: compare runs at equal n).
PER_DIGIT = {"cpu": 300, "gpu": 1000}
BATCH_SIZE = 250   # images sampled at once (x2 with guidance)


def check_count(name, value, least):
    """ConfigError unless `value` is a whole number >= least; `name` is the option's spelling."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def sample_digits(model, diffusion, per_digit, how=None, seed=0, batch_size=BATCH_SIZE, progress=None):
    """per_digit samples of each digit 0..9 -> (images float32 [10 n, 1, 28, 28] on the host, labels)."""
    check_count("samples per digit (--per-digit)", per_digit, 1)
    check_count("batch size (--batch-size)", batch_size, 1)
    xp = model.backend.xp
    model = on_cpu_threads(model)  # every CPU core samples its share of each batch
    labels = np.repeat(np.arange(10), per_digit)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(labels), batch_size):
        y = xp.asarray(labels[i:i + batch_size])
        out.append(to_numpy(diffusion.sample(model, y, rng, how)).astype(np.float32))
        if progress is not None:
            progress.update(len(y))
    return np.concatenate(out), labels


def check_picture(path):
    """The path (a str) where the pixel picture may be written, or ConfigError, before any work; None stays None."""
    from .files import check_output_path
    return None if path is None else check_output_path(path, suffixes=(".png",), what="picture (--picture)")


def evaluate_model(model, diffusion, per_digit=100, how=None, seed=0, batch_size=BATCH_SIZE, classifier=None,
                   reference=None, data_dir=None, progress=None, picture=None):
    """dict(class_accuracy, per_digit_accuracy, fid, fid_floor, n, pixels, sampler, steps, guidance,
    guidance_interval);
    `picture`: also draw the pixels of the samples beside real digits there (a PNG, images.plot_pixels)."""
    from .images import from_model_range, plot_pixels
    from .metrics import evaluate_images, real_digits
    how = how or SampleConfig()
    check_count("samples per digit (--per-digit)", per_digit, 2)   # a covariance needs several
    picture = check_picture(picture)
    images, labels = sample_digits(model, diffusion, per_digit, how, seed, batch_size, progress)
    real = real_digits(labels, data_dir=data_dir)
    res = evaluate_images(images, labels, model=classifier, reference=reference, data_dir=data_dir, real=real)
    lo, hi = how.guidance_interval
    res.update(sampler=how.sampler, steps=how.steps, guidance=how.guidance,
               guidance_interval=[lo, hi if hi != float("inf") else None])   # JSON has no inf
    if picture is not None:
        plot_pixels(picture, res["pixels"], from_model_range(images), labels, *real,
                    title=f"{len(labels)} samples ({how.sampler}, {how.steps} steps, {how.guidance_text()}) "
                          f"beside as many real digits")
    return res
