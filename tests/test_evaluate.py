"""Pixel measures of generated digits beside real ones (issue 13): hand-made images with known
answers, the real-digit draw, the results of evaluate, and `tinyuvit evaluate --picture`."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tinyuvit
from tinyuvit.tools import metrics
from tinyuvit.tools.cli import main
from tinyuvit.errors import ConfigError
from tinyuvit.tools.images import digit_tiles, from_model_range, grid, mark_pixels, plot_pixels, to_model_range
from tinyuvit.tools.metrics import compare_pixels, histogram_distance, pixel_stats, real_digits
from tinyuvit.config import TrainConfig
from tinyuvit.train import train

P = 28 * 28   # pixels of a digit
KEYS = {"n", "ink_mean", "ink_per_digit", "ink_spread_per_digit", "zero_share", "faint_share", "saturated_share",
        "histogram"}


def images_with(*values_and_counts):
    """One uint8 [28, 28] image per argument: a list of (value, how many pixels), the rest 0."""
    out = np.zeros((len(values_and_counts), P), np.uint8)
    for img, pairs in zip(out, values_and_counts):
        at = 0
        for value, count in pairs:
            img[at:at + count] = value
            at += count
    return out.reshape(-1, 28, 28)


# ----------------------------------------------------------------------------------------
# The measures on images with known answers
# ----------------------------------------------------------------------------------------

def test_an_all_zero_image_has_no_ink_and_only_zero_pixels():
    s = pixel_stats(np.zeros((1, 28, 28), np.uint8))
    assert set(s) == KEYS and s["n"] == 1
    assert s["ink_mean"] == 0 and s["zero_share"] == 1 and s["faint_share"] == 0 and s["saturated_share"] == 0
    assert s["histogram"] == [P] + [0] * 255
    assert s["ink_per_digit"] == {} and s["ink_spread_per_digit"] == {}      # no labels, no digits


@pytest.mark.parametrize("k", [1, 37, P])
def test_k_saturated_pixels_are_k_ink_and_share_k_over_784(k):
    s = pixel_stats(images_with([(255, k)]))
    assert s["ink_mean"] == pytest.approx(k) and s["saturated_share"] == pytest.approx(k / P)
    assert s["zero_share"] == pytest.approx(1 - k / P) and s["faint_share"] == 0
    assert s["histogram"][255] == k and sum(s["histogram"]) == P


def test_faint_means_1_to_16_and_ink_counts_grey_in_255ths():
    s = pixel_stats(images_with([(1, 3), (16, 5), (17, 7), (254, 2), (0, 10)]))
    assert s["faint_share"] == pytest.approx(8 / P) and s["saturated_share"] == 0
    assert s["zero_share"] == pytest.approx((P - 17) / P)
    assert s["ink_mean"] == pytest.approx((3 * 1 + 5 * 16 + 7 * 17 + 2 * 254) / 255)


def test_ink_per_digit_and_its_spread():
    # digit 3: ink 2 and 4 (mean 3, standard deviation 1); digit 5: one image of ink 10 (spread 0)
    images = images_with([(255, 2)], [(255, 4)], [(255, 10)])
    s = pixel_stats(images, labels=np.array([3, 3, 5]))
    assert s["ink_per_digit"] == {"3": pytest.approx(3), "5": pytest.approx(10)}
    assert s["ink_spread_per_digit"] == {"3": pytest.approx(1), "5": 0}
    assert s["ink_mean"] == pytest.approx(16 / 3)
    assert json.loads(json.dumps(s)) == s                                  # plain numbers and lists
    with pytest.raises(ValueError):
        pixel_stats(images, labels=np.array([3, 5]))
    with pytest.raises(ValueError):
        pixel_stats(images.astype(np.float32))
    with pytest.raises(ValueError):
        pixel_stats(np.zeros((0, 28, 28), np.uint8))


def test_histogram_distance_is_total_variation():
    h = np.random.default_rng(0).integers(0, 100, 256)
    assert histogram_distance(h, h) == 0 and histogram_distance(h, 3 * h) == pytest.approx(0)  # totals differ
    a, b = np.zeros(256), np.zeros(256)
    a[:10], b[10:20] = 1, 5
    assert histogram_distance(a, b) == pytest.approx(1)                    # disjoint
    c = np.zeros(256)
    c[5:15] = 1                                                            # half of it where a is
    assert histogram_distance(a, c) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        histogram_distance(a, a[:10])
    with pytest.raises(ValueError):
        histogram_distance(a, np.zeros(256))


def test_generated_floats_are_measured_as_the_sample_pngs_round_them():
    rng = np.random.default_rng(1)
    floats = rng.uniform(-1.2, 1.2, (20, 1, 28, 28)).astype(np.float32)   # beyond the range: clipped
    labels = np.repeat(np.arange(10), 2)
    real = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    by_floats = compare_pixels(floats, labels, real, labels)
    by_pixels = compare_pixels(from_model_range(floats), labels, to_model_range(real), labels)
    assert by_floats == by_pixels and set(by_floats) == {"generated", "real", "histogram_tv"}
    assert by_floats["generated"]["saturated_share"] > 0.05               # the clipped tail
    same = compare_pixels(real, labels, real, labels)
    assert same["histogram_tv"] == 0 and same["generated"] == same["real"]


# ----------------------------------------------------------------------------------------
# Real digits, and the measures in evaluate's results
# ----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("offline")
def test_real_digits_are_as_many_of_each_class_and_a_fixed_draw():
    labels = np.array([7, 3, 3, 7, 7, 0])
    images, got = real_digits(labels, quiet=True)
    assert images.dtype == np.uint8 and images.shape == (6, 28, 28)
    np.testing.assert_array_equal(got, [0, 3, 3, 7, 7, 7])                # digit by digit
    again, _ = real_digits(labels, quiet=True)
    other, _ = real_digits(labels, seed=1, quiet=True)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, other)
    # more of a digit than the embedded subset holds: drawn with replacement
    many, got = real_digits(np.full(3000, 1), quiet=True)
    assert len(many) == 3000 and (got == 1).all()
    with pytest.raises(ValueError, match="no training digits"):
        real_digits(np.array([11]), quiet=True)


@pytest.mark.usefixtures("offline")
def test_evaluate_images_keeps_its_keys_and_adds_pixels():
    classifier = metrics.load_classifier()
    labels = np.repeat(np.arange(10), 3)
    real, real_labels = real_digits(labels, seed=5, quiet=True)
    feats = metrics.classifier_features(classifier, to_model_range(real))
    mu, sigma = metrics.feature_stats(feats)
    reference = dict(mu=mu, sigma=sigma, fid_floor=1.0)
    res = metrics.evaluate_images(to_model_range(real), real_labels, classifier, reference=reference)
    assert {"class_accuracy", "per_digit_accuracy", "fid", "fid_floor", "n", "pixels"} <= set(res)
    pixels = res["pixels"]
    assert set(pixels["generated"]) == KEYS and set(pixels["real"]) == KEYS and pixels["real"]["n"] == 30
    assert sorted(pixels["real"]["ink_per_digit"]) == [str(d) for d in range(10)]
    assert 0 <= pixels["histogram_tv"] < 0.1                               # real digits against real digits
    json.dumps(res)
    # the same-digits floor is the FID of those real digits: samples equal to them score it exactly
    again = metrics.evaluate_images(to_model_range(real), real_labels, classifier, reference=reference,
                                    real=(real, real_labels))
    assert again["fid"] == pytest.approx(again["fid_floor_same_digits"], rel=1e-9, abs=1e-9)
    assert again["fid_floor_same_digits"] < 1e-6                       # and here the reference is them too
    given = metrics.evaluate_images(real, real_labels, classifier, reference=reference, real=(real, real_labels))
    assert given["pixels"]["histogram_tv"] == 0 and given["pixels"]["generated"] == given["pixels"]["real"]


# ----------------------------------------------------------------------------------------
# The picture
# ----------------------------------------------------------------------------------------

def test_digit_tiles_and_marks():
    images = np.arange(1, 4, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)   # values 1, 2, 3
    tiles = digit_tiles(images, np.array([4, 4, 9]), per_digit=2)
    assert tiles.shape == (20, 2, 2)
    assert (tiles[4] == 1).all() and (tiles[14] == 2).all() and (tiles[9] == 3).all()   # row r, digit d: r * 10 + d
    assert (tiles[19] == 96).all() and (tiles[0] == 96).all()                           # none: grey
    pic = np.array([[0, 1, 16, 17], [96, 254, 255, 255]], np.uint8)
    rgb = mark_pixels(pic)
    assert rgb.shape == (2, 4, 3)
    assert (rgb[0, 1] == (255, 140, 0)).all() and (rgb[0, 2] == (255, 140, 0)).all()   # faint: orange
    assert (rgb[1, 2:] == (0, 190, 255)).all()                                          # saturated: cyan
    assert (rgb[0, 0] == 0).all() and (rgb[0, 3] == 17).all() and (rgb[1, 1] == 254).all()


def _contains(picture, block):
    """Whether `block` [h, w, 3] appears pixel for pixel somewhere in `picture` [H, W, 3]."""
    h, w = block.shape[:2]
    for y, x in zip(*np.nonzero((picture[:-h + 1, :-w + 1] == block[0, 0]).all(axis=-1))):
        if np.array_equal(picture[y:y + h, x:x + w], block):
            return True
    return False


def test_plot_pixels_draws_the_crops_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(10), 3)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    real = images[::-1].copy()
    pixels = compare_pixels(images, labels, real, labels)
    path = tmp_path / "pixels.png"
    plot_pixels(path, pixels, images, labels, real, labels)
    picture = np.asarray(Image.open(path).convert("RGB"))
    crop = grid(digit_tiles(images, labels, 2), nrow=10, scale=4)          # 4x, nearest neighbour
    assert picture.shape[1] > crop.shape[1] > 1000
    assert _contains(picture, np.repeat(crop[..., None], 3, axis=-1))
    assert _contains(picture, mark_pixels(crop))


# ----------------------------------------------------------------------------------------
# tinyuvit evaluate: the lines, --json and --picture
# ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A 2-step tiny checkpoint, and a reference from a few real digits instead of the full one."""
    rng = np.random.default_rng(0)
    cfg = TrainConfig(steps=2, batch_size=4, sample_every=0, save_every=0, sample_steps=2, warmup=1,
                      model_overrides=dict(dim=16, depth=2, num_heads=2))
    train(cfg, tmp_path / "run", images=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
          labels=rng.integers(0, 10, 32), progress=False, log=lambda m: None)
    dim = metrics.load_classifier().cfg.dim
    fake = dict(mu=np.zeros(dim), sigma=np.eye(dim), fid_floor=1.0, n_ref=1, source="test")
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: fake)
    return tmp_path / "run" / "checkpoint.npz"


@pytest.mark.usefixtures("offline")
def test_evaluate_prints_writes_and_draws_the_pixel_measures(tiny_run, tmp_path):
    out, png = tmp_path / "eval.json", tmp_path / "pixels.png"
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_run), "--per-digit", "2", "--steps", "1",
                                  "--json", str(out), "--picture", str(png), "--quiet"])
    assert r.exit_code == 0, r.output
    for words in ("pixels (0..255)  generated      real", "faint 1..16", "saturated 255", "histogram TV",
                  "ink, generated", "spread, real", f"wrote {png}"):
        assert words in r.output
    assert r.output.index("FID floor") < r.output.index("FID, same digits") < r.output.index("pixels (0..255)")
    assert "(against the 1 test digits of test; FIDs against full MNIST do not compare)" in r.output
    res = json.loads(out.read_text())
    assert res["reference"] == {"data": "test", "test_digits": 1}      # the (fake) reference it was scored against
    assert {"class_accuracy", "per_digit_accuracy", "fid", "fid_floor", "fid_floor_same_n", "fid_floor_same_digits",
            "n"} <= set(res)
    pixels = res["pixels"]
    assert set(pixels) == {"generated", "real", "histogram_tv"}
    assert set(pixels["generated"]) == KEYS and pixels["generated"]["n"] == pixels["real"]["n"] == res["n"] == 20
    assert len(pixels["real"]["histogram"]) == 256 and sum(pixels["real"]["histogram"]) == 20 * P
    assert Image.open(png).format == "PNG"


@pytest.mark.usefixtures("offline")
def test_bad_picture_paths_are_refused_before_sampling(tiny_run, tmp_path, monkeypatch):
    import tinyuvit.tools.evaluate as evaluate_mod
    monkeypatch.setattr(evaluate_mod, "sample_digits", lambda *a, **k: pytest.fail("sampled"))
    for path, words in [(tmp_path / "nodir" / "p.png", "does not exist"), (tmp_path / "p.txt", "must end in .png"),
                        (tiny_run, "must end in .png"), (tmp_path, "is a directory")]:
        r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_run), "--per-digit", "2",
                                      "--json", str(tmp_path / "e.json"), "--picture", str(path), "--quiet"])
        # a folder is click's usage error (status 2), the rest the project's one line (status 1)
        assert r.exit_code in (1, 2) and "--picture" in r.output and words in r.output, r.output
        assert not (tmp_path / "e.json").exists()
    with pytest.raises(ConfigError, match="--picture"):
        tinyuvit.load(tiny_run).evaluate(per_digit=2, picture=tmp_path / "nodir" / "p.png")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("per_digit", [1, 7, 300])
def test_digit_labels_balanced_or_in_the_training_sets_proportions(per_digit):
    from tinyuvit.tools.data import load_mnist
    from tinyuvit.tools.evaluate import digit_labels
    np.testing.assert_array_equal(digit_labels(per_digit), np.repeat(np.arange(10), per_digit))
    labels = digit_labels(per_digit, "data")
    n = 10 * per_digit
    assert len(labels) == n and np.all(np.diff(labels) >= 0)            # as many in all, digit by digit
    _, train_labels, _ = load_mnist("train", quiet=True)
    share = np.bincount(train_labels, minlength=10) / len(train_labels) * n
    counts = np.bincount(labels, minlength=10)
    assert np.all(np.abs(counts - share) < 1)                            # each count rounds its share
    with pytest.raises(ConfigError, match="--labels"):
        digit_labels(per_digit, "uniform")


@pytest.mark.usefixtures("offline")
def test_evaluate_with_labels_data_draws_the_training_mix(tiny_run, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_run), "--per-digit", "3", "--steps", "1",
                                  "--labels", "data", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "digits in the training set's proportions" in r.output
    out = tiny_run.parent / "eval_dpm++1_g0.6_ag1_fs0.2_ip99.7_data.json"   # its own default name
    res = json.loads(out.read_text())
    assert res["labels"] == "data" and res["n"] == 30 and res["pixels"]["real"]["n"] == 30
    assert res["ink_percentile"] == 99.7 and res["final_sigma"] == 0.2
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_run), "--labels", "mixed"])
    assert r.exit_code == 2 and "--labels" in r.output
