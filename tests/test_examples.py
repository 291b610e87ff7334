"""examples/autoguidance.py: guidance by a weaker run instead of the null label."""
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyuvit
from tinyuvit.tools import metrics
from tinyuvit.sampling import SampleConfig
from tinyuvit.errors import ConfigError
from tinyuvit.config import TrainConfig
from tinyuvit.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import autoguidance  # noqa: E402


def _run(folder, steps=2, **kw):
    rng = np.random.default_rng(0)
    cfg = TrainConfig(steps=steps, batch_size=4, sample_every=0, save_every=0, sample_steps=2, warmup=1,
                      model_overrides=dict(dim=16, depth=2, num_heads=2), **kw)
    train(cfg, folder, images=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
          labels=rng.integers(0, 10, 32), progress=False, log=lambda m: None)
    return tinyuvit.load(folder)


@pytest.fixture
def runs(tmp_path):
    return _run(tmp_path / "good", steps=3), _run(tmp_path / "weak", steps=1)


def test_a_guided_batch_sends_its_null_half_to_the_weak_model_with_the_labels(runs):
    good, weak = runs
    m = autoguidance.Autoguided(good.model, weak.model)
    rng = np.random.default_rng(1)
    x, t, y = rng.standard_normal((3, 1, 28, 28)).astype(np.float32), np.full(3, 500), np.array([1, 4, 7])
    null = np.full(3, good.model.cfg.num_classes)
    out = m.forward(np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([y, null]))
    np.testing.assert_array_equal(out[:3], good.model.forward(x, t, y, train=False))
    np.testing.assert_array_equal(out[3:], weak.model.forward(x, t, y, train=False))
    np.testing.assert_array_equal(m.forward(x, t, y), good.model.forward(x, t, y, train=False))  # unguided


def test_guided_by_itself_is_the_conditional_model_alone_and_a_weak_run_changes_it(runs):
    good, weak = runs
    labels, how = np.array([0, 3, 9]), SampleConfig(steps=4, guidance=2.0, guidance_interval=(0.0, float("inf")))
    alone = good.diffusion.sample(good.model, labels, np.random.default_rng(2), SampleConfig(steps=4, guidance=0.0))
    itself = autoguidance.autoguided_sample(good, good, labels, np.random.default_rng(2), how)
    np.testing.assert_allclose(itself, alone, rtol=0, atol=1e-6)   # out_c + s (out_c - out_c) = out_c
    other = autoguidance.autoguided_sample(good, weak, labels, np.random.default_rng(2), how)
    assert np.abs(other - alone).max() > 1e-3


def test_a_weak_run_of_another_diffusion_is_refused(runs, tmp_path):
    good, _ = runs
    linear = _run(tmp_path / "lin", steps=1, noise_schedule="linear")   # the default is cosine
    with pytest.raises(ConfigError, match="same diffusion"):
        autoguidance.autoguided_sample(good, linear, np.array([1]), np.random.default_rng(0), SampleConfig(steps=2))


@pytest.mark.usefixtures("offline")
def test_the_script_scores_like_evaluate(runs, tmp_path, monkeypatch, capsys):
    dim = metrics.load_classifier().cfg.dim
    fake = dict(mu=np.zeros(dim), sigma=np.eye(dim), fid_floor=1.0, n_ref=1, source="test")
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: fake)
    res = autoguidance.main(["--checkpoint", str(tmp_path / "good"), "--weak", str(tmp_path / "weak"),
                             "--per-digit", "2", "--steps", "2"])
    assert res["n"] == 20 and 0 <= res["class_accuracy"] <= 1
    assert "class accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*--guidance"):
        autoguidance.main(["--checkpoint", str(tmp_path / "good"), "--weak", str(tmp_path / "weak"),
                           "--guidance", "-1"])
