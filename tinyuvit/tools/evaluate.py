"""Score a diffusion model: sample N digits of each class, then class accuracy and FID
(tinyuvit.tools.metrics, with tinyuvit's own MNIST classifier: no download needed), and the pixels
of the samples beside as many real digits."""
import numpy as np

from ..backend import to_numpy
from ..sampling import SampleConfig
from ..errors import ConfigError
from .parallel import on_cpu_threads

# Samples per digit of `tinyuvit evaluate` (and Run.evaluate): 3,000 digits in all on a CPU,
# 10,000 on a GPU (FID falls with the number of samples: compare runs at equal n).
PER_DIGIT = {"cpu": 300, "gpu": 1000}
BATCH_SIZE = 250   # images sampled at once (x2 with guidance)
# Which digits to ask for: "balanced", the same number of each; "data", as many of each as the
# training set holds in proportion (1s 11.2%, 5s 9.0%). FID compares with the test set, whose
# digits are not equally common either, so only "data" can reach the floor of real digits drawn
# at random; "balanced" scores every digit on equal terms (the same-digits floor is its bound).
LABELS = ("balanced", "data")


def check_count(name, value, least):
    """ConfigError unless `value` is a whole number >= least; `name` is the option's spelling."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def digit_labels(per_digit, labels="balanced", data_dir=None):
    """The digits to draw, 10 * per_digit of them in order: `per_digit` of each ("balanced"), or
    in the training set's proportions ("data"; counts rounded by largest remainder) -> int [10 n]."""
    if labels not in LABELS:
        raise ConfigError(f"labels (--labels) must be one of {', '.join(LABELS)}, got {labels!r}")
    n = 10 * per_digit
    if labels == "balanced":
        return np.repeat(np.arange(10), per_digit)
    from .data import load_mnist
    _, train_labels, _ = load_mnist("train", data_dir=data_dir, quiet=True)
    share = np.bincount(train_labels, minlength=10)[:10] / len(train_labels) * n     # [10], sums to n
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[:n - counts.sum()]] += 1        # the largest remainders
    return np.repeat(np.arange(10), counts)


def sample_digits(model, diffusion, per_digit, how=None, seed=0, batch_size=BATCH_SIZE, progress=None,
                  labels="balanced", data_dir=None, weak=None):
    """10 * per_digit samples, digit by digit as `digit_labels(per_digit, labels)` asks
    (`weak`: the run's early network, for autoguidance) -> (images float32 [10 n, 1, 28, 28]
    on the host, labels)."""
    check_count("samples per digit (--per-digit)", per_digit, 1)
    check_count("batch size (--batch-size)", batch_size, 1)
    xp = model.backend.xp
    model = on_cpu_threads(model)  # every CPU core samples its share of each batch
    weak = None if weak is None else on_cpu_threads(weak)
    labels = digit_labels(per_digit, labels, data_dir)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(labels), batch_size):
        y = xp.asarray(labels[i:i + batch_size])
        out.append(to_numpy(diffusion.sample(model, y, rng, how, weak=weak)).astype(np.float32))
        if progress is not None:
            progress.update(len(y))
    return np.concatenate(out), labels


def check_picture(path):
    """The path (a str) where the pixel picture may be written, or ConfigError, before any work; None stays None."""
    from .files import check_output_path
    return None if path is None else check_output_path(path, suffixes=(".png",), what="picture (--picture)")


def evaluate_model(model, diffusion, per_digit=100, how=None, seed=0, batch_size=BATCH_SIZE, classifier=None,
                   reference=None, data_dir=None, progress=None, picture=None, labels="balanced", weak=None):
    """dict(class_accuracy, per_digit_accuracy, fid, fid_floor, n, pixels, sampler, steps, guidance,
    guidance_interval, autoguidance, final_sigma, ink_percentile, labels); `labels`: which digits to draw
    (LABELS); `weak`: the run's early network, for autoguidance (None: none, and autoguidance is reported as
    0); `picture`: also draw the pixels of the samples beside real digits there (a PNG, images.plot_pixels)."""
    from .images import from_model_range, plot_pixels
    from .metrics import evaluate_images, real_digits
    how = how or SampleConfig()
    check_count("samples per digit (--per-digit)", per_digit, 2)   # a covariance needs several
    picture = check_picture(picture)
    images, drawn = sample_digits(model, diffusion, per_digit, how, seed, batch_size, progress, labels, data_dir,
                                  weak)
    real = real_digits(drawn, data_dir=data_dir)
    res = evaluate_images(images, drawn, model=classifier, reference=reference, data_dir=data_dir, real=real)
    lo, hi = how.guidance_interval
    res.update(labels=labels, sampler=how.sampler, steps=how.steps, guidance=how.guidance,
               guidance_interval=[lo, hi if hi != float("inf") else None],   # JSON has no inf
               autoguidance=how.autoguidance_with(weak is not None), final_sigma=how.final_sigma,
               ink_percentile=how.ink_percentile)
    if picture is not None:
        plot_pixels(picture, res["pixels"], from_model_range(images), drawn, *real,
                    title=f"{len(drawn)} samples ({how.sampler}, {how.steps} steps, {how.guidance_text(weak is not None)}) "
                          f"beside as many real digits")
    return res
