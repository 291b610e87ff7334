"""Runs saved by earlier versions: every reader of a saved config (loading a checkpoint,
resuming, `tinyuvit.load`, the ablation study) fills in the fields added since from the one
table, config.SAVED_BEFORE, so an old run loads, resumes and samples as it trained."""
import json

import numpy as np

import tinyuvit
from tinyuvit.config import SAVED_BEFORE, TrainConfig, from_saved
from tinyuvit.diffusion import Diffusion
from tinyuvit.model import INITS, UViTConfig
from tinyuvit.sampling import SampleConfig
from tinyuvit.tools.checkpoint import load_checkpoint, save_checkpoint

from test_train import FAST, run             # the CLI runner and its fast settings
from test_sampling import _train                 # a tiny run trained through train()

TINY = dict(steps=4, batch_size=4, model_overrides=dict(dim=16, depth=2, num_heads=2))


def test_a_config_saved_before_every_field_reads_as_those_runs_trained(tmp_path):
    """A config with none of SAVED_BEFORE's fields: load_checkpoint, and so tinyuvit.load, give
    every field its old value (eps, Min-SNR, no clip loss, linear betas, U-ViT's init, no weak
    weights), whatever TrainConfig's and Diffusion()'s defaults are now."""
    ck = _train(tmp_path / "run", 2, weak_at=0)
    old = {k: v for k, v in ck["config"].items() if k not in SAVED_BEFORE}
    old["model"] = {k: v for k, v in old["model"].items() if k not in INITS}
    save_checkpoint(tmp_path / "old.npz", params=ck["params"], ema=ck["ema"], opt_state=ck["opt"],
                    opt_k=ck["opt_k"], step=ck["step"], config=old)
    config = load_checkpoint(tmp_path / "old.npz")["config"]
    assert {k: config[k] for k in SAVED_BEFORE} == SAVED_BEFORE
    assert config["model"]["pos_init"] == "normal" and config["model"]["conv_init"] == "uniform"
    assert tinyuvit.load(tmp_path / "old.npz").diffusion == Diffusion(
        prediction="eps", weighting="min-snr", noise_schedule="linear", clip_loss="none")
    assert from_saved(old) == config and from_saved(config) == config    # filled once, then unchanged
    for field, then in SAVED_BEFORE.items():                              # each differs from today's
        assert getattr(TrainConfig, field) != then, field


def test_an_old_model_config_builds_uvits_own_init():
    """A model entry saved before pos_init and conv_init builds U-ViT's own init (UViTConfig's
    defaults), not the recipe's."""
    c = UViTConfig(img_size=8, patch_size=2, dim=16, depth=4, num_heads=2, num_classes=3)
    old = {k: v for k, v in c.to_dict().items() if k not in INITS}
    assert UViTConfig.from_dict(old) == c
    assert INITS["pos_init"][0] == UViTConfig.pos_init and INITS["conv_init"][0] == UViTConfig.conv_init


def test_checkpoint_from_before_the_prediction_option_reads_as_eps(tmp_path):
    path = tmp_path / "checkpoint.npz"
    old = TrainConfig(steps=4, batch_size=4, model_overrides=dict(dim=16, depth=2, num_heads=2)).to_dict()
    del old["prediction"], old["weighting"], old["clip_loss"]
    save_checkpoint(path, params={}, ema={}, opt_state={}, opt_k=0, step=3, config=old)
    config = load_checkpoint(path, need=())["config"]
    assert config["prediction"] == "eps" and config["clip_loss"] == "none"   # every error counted then
    save_checkpoint(path, params={}, ema={}, opt_state={}, opt_k=0, step=3,
                    config=dict(old, prediction="v", clip_loss="black"))
    config = load_checkpoint(path, need=())["config"]
    assert config["prediction"] == "v" and config["clip_loss"] == "black"


def test_resume_of_a_checkpoint_saved_before_the_init_fields(tmp_path):
    """A checkpoint saved before noise_schedule, pos_init and conv_init existed is compared as it
    was trained (SAVED_BEFORE: linear, normal, uniform): it resumes with those, and only those."""
    from tinyuvit.model import INITS
    a = tmp_path / "a"
    old = ("--pos-init", "normal", "--noise-schedule", "linear", "--conv-init", "uniform")   # as runs were then
    assert run("train-mnist", "--steps", 2, "--out", a, "--sample-every", 0, *old, *FAST).exit_code == 0
    ck = dict(np.load(a / "checkpoint.npz"))
    config = json.loads(str(ck["config"]))
    config["model"] = {k: v for k, v in config["model"].items() if k not in INITS}
    for name in ("noise_schedule", "pos_init", "conv_init", "weak_at"):   # SAVED_BEFORE's newest
        config.pop(name)
    ck["config"] = np.array(json.dumps(config))
    np.savez(a / "checkpoint.npz", **ck)
    r = run("train-mnist", "--steps", 3, "--out", a, "--resume", "--sample-every", 0, *FAST)
    assert r.exit_code == 1 and "pos_init (checkpoint 'normal', now 'sincos2d')" in r.output   # as it was trained
    r = run("train-mnist", "--steps", 3, "--out", a, "--resume", "--sample-every", 0, *old, *FAST)
    assert r.exit_code == 0, r.output
    assert load_checkpoint(a)["step"] == 3


def test_a_run_without_weak_weights_loads_and_samples_as_before(tmp_path):
    ck = _train(tmp_path / "old", 2, weak_at=0)
    old = {k: v for k, v in ck["config"].items() if k != "weak_at"}   # a config from before the field
    save_checkpoint(tmp_path / "old.npz", params=ck["params"], ema=ck["ema"], opt_state=ck["opt"],
                    opt_k=ck["opt_k"], step=ck["step"], config=old)
    run = tinyuvit.load(tmp_path / "old.npz")
    assert run.weak is None and run.weak_step is None
    how = SampleConfig(autoguidance=0)
    np.testing.assert_array_equal(run.sample(digits=[1], count=2), run.sample(digits=[1], count=2, how=how))
