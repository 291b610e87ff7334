"""Scores for generated digits, offline: class accuracy and a FID with tinyuvit's own MNIST classifier.

- class accuracy: the fraction of samples that the shipped ViT classifier (tinyuvit/assets/
  classifier.npz, see tinyuvit.tools.vit) reads as the digit that was asked for.
- FID (Heusel et al., NeurIPS 2017): the Frechet distance between Gaussians fitted to the
  classifier's penultimate features (the final LayerNorm's class token, 128 numbers) of the
  samples and of the 10,000 MNIST test digits. It is NOT comparable with Inception-based FIDs
  of papers: only with other numbers from this module. The "floor" is the FID of 10,000 real
  training digits against the same reference: what a perfect generator would score with as
  many samples. FID is biased upwards for few samples; compare runs at equal n.
- pixels: what the classifier cannot see, on uint8 pixels 0..255 (the rounding of the sample
  PNGs), of the samples beside as many real training digits of each class (a fixed draw):
  the ink of a digit (sum of its pixels / 255, so a digit with 100 white pixels has ink 100;
  real MNIST digits average about 100), its mean and spread (standard deviation) digit by digit;
  the share of pixels that are saturated (exactly 255), faint (1..16: grey haze where real digits
  have black) and exactly 0; and the 256-bin pixel histograms with their total variation distance
  (half the L1 distance of the normalised histograms): the share of all pixels whose values would
  have to change to make the two histograms equal, 0 for the same histogram, 1 when no value is
  shared.
"""
import hashlib
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg

from ..backend import Backend, to_numpy
from ..errors import DataError
from .files import atomic_write
from .vit import ViT

DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "assets" / "classifier.npz"


# ----------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------

def load_classifier(path=None, backend=None):
    """The ViT classifier at `path` (default: the one shipped with tinyuvit) on `backend`
    (default: CPU float32). DataError, in one line, for a missing or unreadable file."""
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER
    train_one = f"train one with `tinyuvit train-classifier --out {path}`"
    if not path.is_file():
        raise DataError(f"no classifier at {path}" + (" (a folder)" if path.is_dir() else "") +
                        f"; {train_one}")
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # an .npz is a zip archive
            raise DataError(f"{path} is not a tinyuvit classifier (an .npz file); {train_one}")
    try:
        model = ViT.load(path, backend or Backend("cpu", "float32"))
    except KeyError:
        raise DataError(f"{path} is not a tinyuvit classifier (no config entry); {train_one}") from None
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        # ValueError: bad JSON, unknown or invalid config fields, missing or misshapen weights
        detail = str(e).splitlines()[0] if str(e) else "corrupt"
        raise DataError(f"{path} is not a readable tinyuvit classifier ({type(e).__name__}: "
                        f"{detail[:200]}); {train_one}") from None
    model.path = path
    return model


def _as_images(images):
    """Accept float [N, 1, 28, 28] in [-1, 1] (the convention), or uint8 [N, 28, 28] pixels."""
    images = to_numpy(images)
    if images.dtype == np.uint8:
        from .images import to_model_range
        images = to_model_range(images.reshape(-1, *images.shape[-2:]))
    if images.ndim == 3:
        images = images[:, None]
    return images


def _forward_batches(model, images, batch_size):
    """(features [N, D], logits [N, K]) as host float64 arrays."""
    images = _as_images(images)
    xp, dtype = model.xp, model.dtype
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(xp.asarray(images[i:i + batch_size], dtype=dtype), train=False)   # [b, D]
        feats.append(to_numpy(f).astype(np.float64))
        logits.append(to_numpy(model.head(f, train=False)).astype(np.float64))             # [b, K]
    if not feats:
        return np.zeros((0, model.cfg.dim)), np.zeros((0, model.cfg.num_classes))
    return np.concatenate(feats), np.concatenate(logits)


def classifier_features(model, images, batch_size=500):
    """Penultimate features [N, dim] (float64) of images [N, 1, 28, 28] in [-1, 1]."""
    return _forward_batches(model, images, batch_size)[0]


def predict(model, images, batch_size=500):
    """Predicted digits [N] (int64)."""
    return _forward_batches(model, images, batch_size)[1].argmax(axis=1)


def class_accuracy(model, images, requested_labels, batch_size=500):
    """The fraction of images classified as the digit that was requested for them."""
    requested = np.asarray(to_numpy(requested_labels))
    return float((predict(model, images, batch_size) == requested).mean())


# ----------------------------------------------------------------------------------------
# Frechet distance between Gaussians
# ----------------------------------------------------------------------------------------

def feature_stats(feats):
    """(mean [D], covariance [D, D]) of features [N, D], in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(A, check=True, tol=1e-6):
    """scipy's matrix square root without its singular-matrix warning; with `check`, None when the
    result is not finite or X @ X misses A by more than `tol` (relative, Frobenius)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        X = scipy.linalg.sqrtm(A)
    if check:
        if not np.isfinite(X).all():
            return None
        scale = np.linalg.norm(A)
        if scale > 0 and np.linalg.norm(X @ X - A) > tol * scale:
            return None
    return X


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the Frechet distance of two Gaussians.

    As the standard FID code does: if the product is singular (no finite or no accurate square
    root), retry with eps added to both diagonals; a square root with tiny imaginary parts
    (rounding) keeps its real part, large ones are refused.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if covmean is None:
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset), check=False)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------
# The reference: MNIST test digits, and the floor: real training digits
# ----------------------------------------------------------------------------------------

def _cache_dir():
    from .data import cache_dir
    return cache_dir().parent  # ~/.cache/tinyuvit (the MNIST files live in its mnist/)


def _classifier_hash(model):
    """A short hash of the classifier's weights (float32 bytes, in name order) and config."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, a in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(to_numpy(a), dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _cache_path(model, data, floor_n):
    return _cache_dir() / f"fid_ref_{_classifier_hash(model)}_{data}_floor{floor_n}.npz"


def reference_stats(model=None, data_dir=None, cache=True, floor_n=10000, batch_size=500,
                    download=True, quiet=False):
    """dict(mu, sigma, fid_floor, n_ref, source): feature statistics of the 10,000 MNIST test
    digits, and the FID of `floor_n` real training digits (a fixed random subset) against them.

    Takes about 8 s on 2 CPU cores; cached in ~/.cache/tinyuvit/ under the classifier's hash and
    the data (full MNIST, or the embedded subset when it is all there is); cache=False recomputes.
    """
    from .data import find_mnist, load_mnist
    from .images import to_model_range

    model = model or load_classifier()
    path = _cache_path(model, "full" if find_mnist(data_dir) else "subset", floor_n)
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: (z[k] if z[k].ndim else z[k].item()) for k in z.files}
        except Exception:  # a broken cache file: recompute it
            pass
    test_u8, _, source = load_mnist("test", data_dir=data_dir, download=download, quiet=quiet)
    mu, sigma = feature_stats(classifier_features(model, to_model_range(test_u8), batch_size))
    train_u8, _, _ = load_mnist("train", data_dir=data_dir, download=download, quiet=quiet)
    pick = np.random.default_rng(0).choice(len(train_u8), size=min(floor_n, len(train_u8)), replace=False)
    mu_t, sigma_t = feature_stats(classifier_features(model, to_model_range(train_u8[np.sort(pick)]), batch_size))
    stats = dict(mu=mu, sigma=sigma, fid_floor=frechet_distance(mu_t, sigma_t, mu, sigma),
                 n_ref=len(test_u8), source=source)
    path = _cache_path(model, "subset" if "subset" in source else "full", floor_n)
    if cache:
        try:
            atomic_write(path, lambda f: np.savez(f, **stats))
        except OSError:  # a read-only home: fine, just not cached
            pass
    return stats


# ----------------------------------------------------------------------------------------
# Pixels: ink, saturation, haze and the pixel histogram, against real digits
# ----------------------------------------------------------------------------------------

FAINT = (1, 16)       # pixel values counted as faint: grey haze that real digits leave black
SATURATED = 255       # the brightest value a uint8 pixel can take


def _as_pixels(images):
    """uint8 [N, 28, 28]: uint8 images as they are, model-range floats rounded as the sample PNGs are."""
    from .images import from_model_range
    images = to_numpy(images)
    if images.dtype == np.uint8:
        return images.reshape(-1, *images.shape[-2:])
    return from_model_range(images)


def pixel_stats(images_uint8, labels=None):
    """Pixel measures of uint8 images [N, H, W] (0..255), with `labels` [N] (or None) for the
    digit-by-digit ink -> a plain dict (floats, lists; JSON as it is):

    n, ink_mean (sum of pixels / 255 per image, averaged), ink_per_digit and ink_spread_per_digit
    ({"3": mean, ...} and {"3": standard deviation (ddof 0), ...} over each digit's images; empty without
    labels), zero_share, faint_share, saturated_share (shares of all pixels that are 0, 1..16 and
    255), histogram (256 counts: how many pixels take each value 0..255).
    """
    x = np.asarray(images_uint8)
    if x.dtype != np.uint8 or x.ndim < 2:
        raise ValueError(f"expected uint8 images [N, H, W], got {x.dtype} {x.shape}")
    x = x.reshape(len(x), -1)                                          # [N, H W]
    if not x.size:
        raise ValueError(f"need at least one image with pixels, got shape {np.shape(images_uint8)}")
    ink = x.sum(axis=1, dtype=np.int64) / 255.0                        # [N]
    hist = np.bincount(x.ravel(), minlength=256)                       # [256]
    share = lambda lo, hi: float(hist[lo:hi + 1].sum() / x.size)
    per_digit, spread = {}, {}
    if labels is not None:
        labels = np.asarray(to_numpy(labels))
        if labels.shape != (len(x),):
            raise ValueError(f"{len(x)} images but labels of shape {labels.shape}")
        for d in np.unique(labels):
            per_digit[str(d)] = float(ink[labels == d].mean())
            spread[str(d)] = float(ink[labels == d].std())
    return dict(n=int(len(x)), ink_mean=float(ink.mean()), ink_per_digit=per_digit, ink_spread_per_digit=spread,
                zero_share=share(0, 0), faint_share=share(*FAINT), saturated_share=share(SATURATED, SATURATED),
                histogram=[int(c) for c in hist])


def histogram_distance(hist_a, hist_b):
    """Total variation distance of two histograms (counts, any totals): half the L1 distance of
    the normalised histograms, in [0, 1]. The share of pixels whose values would have to change
    to turn one into the other: 0 for the same shape, 1 when no bin holds pixels of both."""
    a, b = np.asarray(hist_a, np.float64), np.asarray(hist_b, np.float64)
    if a.shape != b.shape or a.sum() <= 0 or b.sum() <= 0:
        raise ValueError(f"need two non-empty histograms of one shape, got {a.shape} and {b.shape}")
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def real_digits(labels, data_dir=None, seed=0, download=True, quiet=False):
    """As many real MNIST training digits of each class as `labels` [N] holds, a fixed draw for a
    given seed -> (uint8 [N, 28, 28], their labels [N], digit by digit). Without replacement,
    unless a digit has fewer training images than asked for (the embedded subset)."""
    from .data import load_mnist
    train_u8, train_labels, _ = load_mnist("train", data_dir=data_dir, download=download, quiet=quiet)
    rng = np.random.default_rng(seed)
    picks = []
    for d, count in zip(*np.unique(np.asarray(to_numpy(labels)), return_counts=True)):
        pool = np.flatnonzero(train_labels == d)
        if not len(pool):
            raise ValueError(f"no training digits labelled {d!r}")
        picks.append(np.sort(rng.choice(pool, size=count, replace=count > len(pool))))
    pick = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    return train_u8[pick], train_labels[pick]


def compare_pixels(images, labels, real_images, real_labels):
    """dict(generated, real, histogram_tv): `pixel_stats` of generated images (uint8 [N, 28, 28], or
    model-range floats, rounded as the sample PNGs are) and of real ones, and the total variation
    distance of their pixel histograms (`histogram_distance`)."""
    gen, real = pixel_stats(_as_pixels(images), labels), pixel_stats(_as_pixels(real_images), real_labels)
    return dict(generated=gen, real=real, histogram_tv=histogram_distance(gen["histogram"], real["histogram"]))


def evaluate_images(images, requested_labels, model=None, data_dir=None, batch_size=500,
                    cache=True, download=True, reference=None, floor_n=10000, real=None):
    """Score generated images [N, 1, 28, 28] in [-1, 1] that were asked to show `requested_labels` [N].

    Returns dict(class_accuracy, per_digit_accuracy, fid, fid_floor, fid_floor_same_digits, n,
    reference, pixels): the class accuracy overall and for each requested digit ({"3": 0.95, ...}),
    fid against the MNIST test set (`reference`: dict(data, test_digits), the full test set or,
    offline, the embedded subset's 2,000 test digits: FIDs against the two do not compare), the
    floor that `floor_n` real training digits drawn at random score, and the FID of the real
    digits below, which a perfect generator asked for the same digits would score (all with this
    package's classifier). The last is the like-for-like floor:
    the test set's digits are not equally common (1s 11.4%, 5s 8.9%), and 1,000 real digits of
    each class score 0.42-0.46 against it where 10,000 drawn at random score 0.29-0.32.
    FID falls with the number of samples (real digits: about 3.8 at n = 1,000, 0.4 at 10,000,
    against a floor of 0.29), so compare at equal n, or pass floor_n=len(images).
    `reference`: a `reference_stats` result to reuse (default: computed, or read from the cache).
    pixels: `compare_pixels` of the images and `real` = (uint8 images, labels) (default:
    `real_digits(requested_labels)`, as many training digits of each class as were asked for).
    """
    from .data import source_kind
    model = model or load_classifier()
    pixels = _as_pixels(images)
    images = _as_images(images)
    requested = np.asarray(to_numpy(requested_labels))
    if len(images) != len(requested):
        raise ValueError(f"{len(images)} images but {len(requested)} labels")
    real = real if real is not None else real_digits(requested, data_dir=data_dir, download=download)
    feats, logits = _forward_batches(model, images, batch_size)
    ref = reference or reference_stats(model, data_dir=data_dir, cache=cache, floor_n=floor_n,
                                       batch_size=batch_size, download=download)
    mu, sigma = feature_stats(feats)
    mu_r, sigma_r = feature_stats(classifier_features(model, _as_images(real[0]), batch_size))
    right = logits.argmax(axis=1) == requested
    return dict(class_accuracy=float(right.mean()),
                per_digit_accuracy={str(d): float(right[requested == d].mean()) for d in np.unique(requested)},
                fid=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
                fid_floor=float(ref["fid_floor"]),
                fid_floor_same_digits=frechet_distance(mu_r, sigma_r, ref["mu"], ref["sigma"]), n=int(len(images)),
                reference=dict(data=source_kind(str(ref.get("source", "the reference passed in"))),
                               test_digits=int(ref["n_ref"]) if "n_ref" in ref else None),
                pixels=compare_pixels(pixels, requested, *real))
