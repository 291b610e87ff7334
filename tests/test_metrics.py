"""Metrics: the Frechet distance against closed forms, and the shipped classifier on real digits."""
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import sqrtm

from tinyuvit.tools import metrics
from tinyuvit.tools.metrics import feature_stats, frechet_distance

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


# ----------------------------------------------------------------------------------------
# The Frechet distance
# ----------------------------------------------------------------------------------------

def test_identical_features_give_zero():
    feats = np.random.default_rng(0).standard_normal((2000, 16)) @ np.diag(np.arange(1, 17.0))
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_full_covariances_closed_forms():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((6, 6))
    S = A @ A.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # same covariance: only the means count
    assert frechet_distance(mu1, S, mu2, S) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)
    # S and c S commute: tr(S + cS - 2 sqrt(c) S) = (1 - sqrt c)^2 tr S
    assert frechet_distance(mu1, S, mu1, 4 * S) == pytest.approx(np.trace(S), rel=1e-8)
    # a general pair against the definition with an independent square root (symmetric form)
    B = rng.standard_normal((6, 6))
    T = B @ B.T + 0.1 * np.eye(6)
    r = np.real(sqrtm(S))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(S + T - 2 * np.real(sqrtm(r @ T @ r)))
    assert frechet_distance(mu1, S, mu2, T) == pytest.approx(want, rel=1e-8)


def test_sample_statistics_and_singular_covariances():
    feats = np.random.default_rng(3).standard_normal((5, 10))          # 5 samples in 10-D: rank 4
    mu, sigma = feature_stats(feats)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.T))
    d = frechet_distance(mu, sigma, np.zeros(10), np.eye(10))
    assert np.isfinite(d) and d > 0
    zero = np.zeros((10, 10))                                          # fully degenerate
    assert frechet_distance(mu, zero, mu, zero) == pytest.approx(0, abs=1e-4)
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# ----------------------------------------------------------------------------------------
# The shipped classifier on real digits
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    """(test images, test labels, data_dir): the full test set where it is present, else the subset."""
    from tinyuvit.tools.data import load_mnist
    from tinyuvit.tools.images import to_model_range
    data_dir = str(MNIST_DIR) if MNIST_DIR.is_dir() else None
    images, labels, source = load_mnist("test", data_dir=data_dir, download=False, quiet=True)
    if len(labels) < 1000:
        pytest.skip(f"too few test digits ({source})")
    return to_model_range(images), labels, data_dir


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier()


def test_shipped_classifier_accuracy(classifier, mnist):
    images, labels, _ = mnist
    assert classifier.cfg.dim == metrics.classifier_features(classifier, images[:3]).shape[1]
    acc = metrics.class_accuracy(classifier, images, labels, batch_size=1000)
    assert acc >= 0.99, f"shipped classifier: test accuracy {acc:.4f} < 0.99"


def test_reference_stats_cache_and_fid_of_real_digits(classifier, mnist, tmp_path, monkeypatch):
    images, labels, data_dir = mnist
    if data_dir is None:
        pytest.skip("the FID reference needs full MNIST")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ref = metrics.reference_stats(classifier, data_dir=data_dir, floor_n=2000)
    assert len(list((tmp_path / "tinyuvit").glob("fid_ref_*.npz"))) == 1
    again = metrics.reference_stats(classifier, data_dir=data_dir, floor_n=2000)   # from the cache
    np.testing.assert_array_equal(again["sigma"], ref["sigma"])
    assert again["fid_floor"] == ref["fid_floor"] and 0 < ref["fid_floor"] < 5

    # real test digits against the test-set reference: small; noise: large
    real = metrics.evaluate_images(images[:2000], labels[:2000], classifier, reference=ref, data_dir=data_dir)
    assert real["n"] == 2000 and real["class_accuracy"] >= 0.98
    per = real["per_digit_accuracy"]
    assert sorted(per) == [str(d) for d in range(10)] and min(per.values()) >= 0.95
    n_d = np.bincount(labels[:2000], minlength=10)             # the overall figure, digit by digit
    assert sum(per[str(d)] * n_d[d] for d in range(10)) / 2000 == pytest.approx(real["class_accuracy"])
    noise = np.random.default_rng(0).uniform(-1, 1, (500, 1, 28, 28)).astype(np.float32)
    bad = metrics.evaluate_images(noise, np.zeros(500, int), classifier, reference=ref, data_dir=data_dir)
    assert real["fid"] < 3 * ref["fid_floor"] + 1 and bad["fid"] > 20 * real["fid"]

    # pixels: test digits look like as many training digits of each class; noise does not
    pixels, noisy = real["pixels"], bad["pixels"]
    assert pixels["real"]["n"] == 2000 and pixels["histogram_tv"] < 0.02
    assert abs(pixels["generated"]["ink_mean"] / pixels["real"]["ink_mean"] - 1) < 0.1   # 95 vs 101: other writers
    assert 0.75 < pixels["real"]["zero_share"] < 0.85 and pixels["real"]["faint_share"] < 0.03
    assert noisy["histogram_tv"] > 0.7 and noisy["generated"]["faint_share"] > 0.05


# ----------------------------------------------------------------------------------------
# Classifier files that are not classifiers: one line each
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, words", [
    ("missing", "no classifier at"),
    ("folder", "(a folder)"),
    ("text", "is not a tinyuvit classifier (an .npz file)"),
    ("no config", "no config entry"),
    ("truncated", "BadZipFile"),
    ("bad config", "dim 5 must be divisible by num_heads 4"),
    ("wrong weights", "parameter names differ"),
])
def test_bad_classifier_files_are_one_line(tmp_path, case, words):
    from tinyuvit.errors import DataError
    path = tmp_path / "c.npz"
    if case == "folder":
        path = tmp_path
    elif case == "text":
        path.write_text("hello")
    elif case == "no config":
        np.savez(path, a=np.zeros(2))
    elif case == "truncated":
        raw = metrics.DEFAULT_CLASSIFIER.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "bad config":
        np.savez(path, config=np.array('{"dim": 5}'))
    elif case == "wrong weights":
        np.savez(path, config=np.array('{"dim": 16, "num_heads": 2}'), **{"head.W": np.zeros((3, 3))})
    with pytest.raises(DataError) as info:
        metrics.load_classifier(path)
    message = str(info.value)
    assert words in message and str(path) in message and "\n" not in message, message
    assert "pickle" not in message and "train-classifier --out" in message
