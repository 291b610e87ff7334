"""Autoguidance by the run's own early weights: the guided output, the weights a run keeps,
resuming with them, loading, sampling and the command line."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import tinyuvit
from tinyuvit.tools.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyuvit.tools.cli import main
from tinyuvit.model import UViTConfig
from tinyuvit.sampling import SampleConfig, guided_output
from tinyuvit.errors import ConfigError
from tinyuvit.config import TrainConfig
from tinyuvit.train import train

pytestmark = pytest.mark.usefixtures("offline")   # tests/conftest.py: no network, empty cache

SMALL = dict(dim=16, depth=2, num_heads=2)


def _data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32)


def _train(folder, steps, resume=False, **kw):
    cfg = TrainConfig(steps=steps, batch_size=4, sample_every=0, save_every=0, sample_steps=2, warmup=1,
                      lr_schedule="constant", model_overrides=SMALL, **kw)
    images, labels = _data()
    train(cfg, folder, images=images, labels=labels, progress=False, log=lambda m: None, resume=resume)
    return load_checkpoint(folder)


class Const:
    """A 'network' whose output is a constant per label (the null label: 10)."""
    cfg = UViTConfig(num_classes=10)

    def __init__(self, table):
        self.table = table

    def forward(self, x, t, y, train=False):
        return np.asarray([self.table[int(v)] for v in y], dtype=np.float64)[:, None, None, None] + 0 * x


def test_the_guided_output_adds_a_times_the_step_away_from_the_weak_prediction():
    x, y = np.zeros((2, 1, 1, 1)), np.array([1, 2])
    good, weak = Const({1: 3.0, 2: 5.0, 10: 1.0}), Const({1: 2.0, 2: 7.0})
    out = lambda s, a, w=weak: guided_output(good, x, 5, y, s, weak=w, autoguidance=a)[:, 0, 0, 0]
    # out_c + s (out_c - out_u) + a (out_c - weak_c)
    np.testing.assert_array_equal(out(2.0, 0.5), [3 + 2 * 2 + 0.5 * 1, 5 + 2 * 4 + 0.5 * -2])
    np.testing.assert_array_equal(out(0.0, 1.0), [3 + 1, 5 - 2])          # unguided steps too
    np.testing.assert_array_equal(out(2.0, 0.0), [3 + 4, 5 + 8])          # a = 0: guidance alone
    np.testing.assert_array_equal(out(2.0, 1.0, None), [3 + 4, 5 + 8])    # no weak network: the same


def test_examples_must_be_a_finite_number_at_least_0():
    for bad in (-0.5, float("nan"), "1"):
        with pytest.raises(ConfigError, match="--autoguidance"):
            SampleConfig(autoguidance=bad)
    assert "autoguidance 2" in SampleConfig(autoguidance=2).guidance_text(weak=True)
    assert "autoguidance" not in SampleConfig(autoguidance=2).guidance_text(weak=False)
    assert SampleConfig(autoguidance=2).autoguidance_with(True) == 2      # what evaluate reports
    assert SampleConfig(autoguidance=2).autoguidance_with(False) == 0


def test_weak_at_sets_the_step_and_is_checked():
    assert TrainConfig(steps=6500).weak_step() == 1950
    assert TrainConfig(steps=5000).weak_step() == 1500
    assert TrainConfig(steps=3, weak_at=0.1).weak_step() == 1      # never step 0
    assert TrainConfig(weak_at=0).weak_step() is None
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="--weak-at"):
            TrainConfig(weak_at=bad).validate()


def test_a_run_keeps_the_ema_of_its_weak_step_and_keeps_it_through_a_resume(tmp_path):
    # the EMA after 2 steps of a 4-step run is the EMA at the end of the same run stopped at 2
    # (a constant learning rate: the first 2 steps do not depend on the total)
    early = _train(tmp_path / "two", 2, weak_at=0)
    assert early["weak"] == {}
    full = _train(tmp_path / "four", 4, weak_at=0.5)
    assert set(full["weak"]) == set(full["ema"]) and full["weak_step"] == 2
    for name, w in full["weak"].items():
        np.testing.assert_array_equal(w, early["ema"][name])
    assert any(not np.array_equal(full["weak"][k], full["ema"][k]) for k in full["ema"])

    # a run that passed its weak step keeps the same weights when resumed, whatever the new length
    _train(tmp_path / "r", 3, weak_at=0.5)                  # keeps the EMA after round(1.5) = 2 steps
    kept = load_checkpoint(tmp_path / "r")["weak"]
    resumed = _train(tmp_path / "r", 8, resume=True, weak_at=0.5)
    assert resumed["weak_step"] == 2                        # not round(0.5 * 8)
    for name, w in kept.items():
        np.testing.assert_array_equal(resumed["weak"][name], w)
    np.testing.assert_array_equal(kept["decoder_pred.W"], early["ema"]["decoder_pred.W"])


def test_load_gives_the_weak_network_and_sampling_uses_it(tmp_path):
    _train(tmp_path / "run", 4, weak_at=0.5)
    run = tinyuvit.load(tmp_path / "run")
    assert run.weak is not None and run.weak_step == 2 and "weak weights of step 2" in repr(run)
    with_ag = run.sample(digits=[3], count=2, steps=3)
    without = run.sample(digits=[3], count=2, steps=3, autoguidance=0)
    assert not np.array_equal(with_ag, without)
    run.weak = None                                     # as a run saved without weak weights
    np.testing.assert_array_equal(run.sample(digits=[3], count=2, steps=3), without)


def test_damaged_weak_weights_are_refused_in_one_line(tmp_path):
    ck = _train(tmp_path / "run", 4, weak_at=0.5)
    weak = dict(ck["weak"], **{"decoder_pred.W": np.zeros((3, 3), np.float32)})
    save_checkpoint(tmp_path / "bad.npz", params=ck["params"], ema=ck["ema"], opt_state=ck["opt"],
                    opt_k=ck["opt_k"], step=ck["step"], config=ck["config"], weak=weak, weak_step=2)
    with pytest.raises(CheckpointError, match="early EMA weights .* decoder_pred.W has shape"):
        tinyuvit.load(tmp_path / "bad.npz")
    with np.load(tmp_path / "run" / "checkpoint.npz") as z:                 # an edited file
        np.savez(tmp_path / "nostep.npz", **{k: z[k] for k in z.files if k != "weak_step"})
    with pytest.raises(CheckpointError, match="no 'weak_step' entry"):
        tinyuvit.load(tmp_path / "nostep.npz")


def test_the_command_line_takes_autoguidance_and_names_it(tmp_path):
    _train(tmp_path / "run", 4, weak_at=0.5)
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "run"), "--per-digit", "2",
                                  "--steps", "2", "--quiet", "--autoguidance", "0.5"])
    assert r.exit_code == 0, r.output
    assert "autoguidance 0.5" in r.output and "step-2 weights" in r.output
    res = json.loads((tmp_path / "run" / "eval_dpm++2_g0.6_ag0.5_fs0.2_ip99.7.json").read_text())
    assert res["autoguidance"] == 0.5
    r = CliRunner().invoke(main, ["sample", "--checkpoint", str(tmp_path / "run"), "--autoguidance", "-1"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "--autoguidance" in r.output
    r = CliRunner().invoke(main, ["train-mnist", "--weak-at", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--weak-at must lie in [0, 1)" in r.output


def test_export_keeps_what_sampling_needs_and_samples_the_same(tmp_path):
    """`tinyuvit export` writes the EMA and early weights, step and config; the file samples and
    scores the same digits as the checkpoint, is smaller, and refuses to resume or give raw weights."""
    _train(tmp_path / "run", 4, weak_at=0.5)
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run" / "weights.npz"
    assert "wrote" in r.output and "early weights" in r.output and out.exists()
    assert out.stat().st_size < 0.5 * (tmp_path / "run" / "checkpoint.npz").stat().st_size
    full, slim = tinyuvit.load(tmp_path / "run"), tinyuvit.load(out)
    assert slim.step == full.step == 4 and slim.weak_step == full.weak_step and slim.config == full.config
    np.testing.assert_array_equal(slim.sample(digits=[1, 7], count=2, steps=3),
                                  full.sample(digits=[1, 7], count=2, steps=3))
    with pytest.raises(CheckpointError, match="only the EMA weights for sampling.*checkpoint.npz"):
        tinyuvit.load(out, weights="raw")
    with pytest.raises(CheckpointError, match="only the EMA weights for sampling"):
        load_checkpoint(out)                              # what --resume reads
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    assert r.exit_code != 0 and "Traceback" not in r.output and "--out" in r.output   # no overwriting a checkpoint
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "not found" in r.output
