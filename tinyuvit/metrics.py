"""Scores for generated digits, offline: class accuracy and a FID with tinyuvit's own MNIST classifier.

- class accuracy: the fraction of samples that the shipped ViT classifier (tinyuvit/assets/
  classifier.npz, see tinyuvit.vit) reads as the digit that was asked for.
- FID (Heusel et al., NeurIPS 2017): the Frechet distance between Gaussians fitted to the
  classifier's penultimate features (the final LayerNorm's class token, 128 numbers) of the
  samples and of the 10,000 MNIST test digits. It is NOT comparable with Inception-based FIDs
  of papers: only with other numbers from this module. The "floor" is the FID of 10,000 real
  training digits against the same reference: what a perfect generator would score with as
  many samples. FID is biased upwards for few samples; compare runs at equal n.
"""
import hashlib
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg

from .backend import Backend, to_numpy
from .errors import DataError
from .files import atomic_write
from .vit import ViT

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent / "assets" / "classifier.npz"


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


def evaluate_images(images, requested_labels, model=None, data_dir=None, batch_size=500,
                    cache=True, download=True, reference=None, floor_n=10000):
    """Score generated images [N, 1, 28, 28] in [-1, 1] that were asked to show `requested_labels` [N].

    Returns dict(class_accuracy, per_digit_accuracy, fid, fid_floor, n): the class accuracy
    overall and for each requested digit ({"3": 0.95, ...}), fid against the MNIST test set, and the
    floor that `floor_n` real training digits score (both with this package's classifier).
    FID falls with the number of samples (real digits: about 3.8 at n = 1,000, 0.4 at 10,000,
    against a floor of 0.29), so compare at equal n, or pass floor_n=len(images).
    `reference`: a `reference_stats` result to reuse (default: computed, or read from the cache).
    """
    model = model or load_classifier()
    images = _as_images(images)
    requested = np.asarray(to_numpy(requested_labels))
    if len(images) != len(requested):
        raise ValueError(f"{len(images)} images but {len(requested)} labels")
    feats, logits = _forward_batches(model, images, batch_size)
    ref = reference or reference_stats(model, data_dir=data_dir, cache=cache, floor_n=floor_n,
                                       batch_size=batch_size, download=download)
    mu, sigma = feature_stats(feats)
    right = logits.argmax(axis=1) == requested
    return dict(class_accuracy=float(right.mean()),
                per_digit_accuracy={str(d): float(right[requested == d].mean()) for d in np.unique(requested)},
                fid=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
                fid_floor=float(ref["fid_floor"]), n=int(len(images)))
