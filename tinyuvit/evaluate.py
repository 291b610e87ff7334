"""Score a diffusion model: sample N digits of each class, then class accuracy and FID
(tinyuvit.metrics, with tinyuvit's own MNIST classifier: no download needed)."""
import numpy as np

from .backend import to_numpy, xp_of
from .diffusion import sample
from .parallel import on_cpu_threads


def sample_digits(model, schedule, per_digit, sampler="ddim", steps=50, guidance=1.0, seed=0,
                  batch_size=250, progress=None, prediction="eps"):
    """per_digit samples of each digit 0..9 -> (images float32 [10 n, 1, 28, 28] on the host, labels)."""
    xp = xp_of(model.decoder_pred.params["W"])
    model = on_cpu_threads(model)  # every CPU core samples its share of each batch
    labels = np.repeat(np.arange(10), per_digit)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(labels), batch_size):
        y = xp.asarray(labels[i:i + batch_size])
        out.append(to_numpy(sample(model, schedule, y, rng, sampler=sampler, steps=steps,
                                   guidance=guidance, prediction=prediction)).astype(np.float32))
        if progress is not None:
            progress.update(len(y))
    return np.concatenate(out), labels


def evaluate_model(model, schedule, per_digit=100, sampler="ddim", steps=50, guidance=1.0, seed=0,
                   batch_size=250, classifier=None, reference=None, data_dir=None, progress=None,
                   prediction="eps"):
    """dict(class_accuracy, fid, fid_floor, n, sampler, steps, guidance) for `model`'s samples."""
    from .metrics import evaluate_images
    images, labels = sample_digits(model, schedule, per_digit, sampler, steps, guidance, seed,
                                   batch_size, progress, prediction)
    res = evaluate_images(images, labels, model=classifier, reference=reference, data_dir=data_dir)
    res.update(sampler=sampler, steps=steps, guidance=guidance)
    return res
