"""Training end to end through the real CLI: files, samples, resume, refusals, Ctrl-C, NaN."""
import json
import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tinyuvit.train as train_mod
from tinyuvit.backend import cupy_status
from tinyuvit.tools.checkpoint import CheckpointError, load_checkpoint
from tinyuvit.tools.cli import main
from tinyuvit.diffusion import Diffusion
from tinyuvit.config import TrainConfig
from tinyuvit.errors import TrainingError
from tinyuvit.train import train

# constant lr after warmup: a run extended from 4 to 6 steps then has the same schedule as a
# 6-step run (a cosine schedule depends on the total number of steps)
FAST = ["--batch-size", "8", "--sample-steps", "2", "--warmup", "2", "--lr-schedule", "constant", "--quiet"]


pytestmark = pytest.mark.usefixtures("offline")   # tests/conftest.py: no network, empty cache


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def one_error_line(output):
    """The output ends in exactly one 'Error: ...' line and holds no traceback."""
    lines = output.strip().splitlines()
    return "Traceback" not in output and lines[-1].startswith("Error: ") and \
        sum(line.startswith("Error") for line in lines) == 1


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_sample_resume_through_cli(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = run("train-mnist", "--steps", 4, "--out", a, "--sample-every", 2, "--save-every", 2, *FAST)
    assert r.exit_code == 0, r.output
    assert "embedded subset" in r.output
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.png", "checkpoint.npz",
                 "samples/step_000002.png"):
        assert (a / name).is_file(), name
    grid = Image.open(a / "samples.png")
    assert grid.size == (604, 604)  # 10 x 10 digits of 28 px, 2 px gaps, upscaled x2
    ck = load_checkpoint(a / "checkpoint.npz")
    assert ck["step"] == 4 and ck["opt_k"] == 4 and ck["config"]["batch_size"] == 8
    assert set(ck["params"]) == set(ck["ema"]) and len(ck["opt"]) == 2 * len(ck["params"])
    assert not np.allclose(ck["params"]["decoder_pred.W"], ck["ema"]["decoder_pred.W"])
    assert len(losses(a)) == 4

    # resume to 6 steps == an uninterrupted 6-step run, loss for loss, exactly
    r = run("train-mnist", "--steps", 6, "--out", a, "--resume", "--sample-every", 2, "--save-every", 2, *FAST)
    assert r.exit_code == 0, r.output
    assert "resuming from step 4" in r.output
    r = run("train-mnist", "--steps", 6, "--out", b, "--sample-every", 0, "--save-every", 0, *FAST)
    assert r.exit_code == 0, r.output
    assert losses(a) == losses(b) and len(losses(b)) == 6
    wa, wb = load_checkpoint(a / "checkpoint.npz"), load_checkpoint(b / "checkpoint.npz")
    for k in wa["params"]:
        np.testing.assert_array_equal(wa["params"][k], wb["params"][k])
        np.testing.assert_array_equal(wa["ema"][k], wb["ema"][k])

    # sampling from the saved run: chosen digits, a grid and a GIF
    out = tmp_path / "s.png"
    r = run("sample", "--checkpoint", a / "checkpoint.npz", "--digits", "3,7", "--count", 4,
            "--steps", 3, "--sampler", "dpm++", "--out", out, "--gif", "--quiet")
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (((28 + 2) * 4 + 2) * 2, ((28 + 2) * 2 + 2) * 2)
    gif = Image.open(tmp_path / "s.gif")
    assert gif.n_frames >= 3


def test_resume_refuses_other_config_and_existing_run(tmp_path):
    a = tmp_path / "a"
    assert run("train-mnist", "--steps", 2, "--out", a, "--sample-every", 0, *FAST).exit_code == 0
    r = run("train-mnist", "--steps", 4, "--out", a, "--resume", "--lr", "0.01", "--seed", 3, *FAST)
    assert r.exit_code == 1
    assert "lr (checkpoint 0.002, now 0.01)" in r.output and "seed" in r.output
    assert one_error_line(r.output)
    r = run("train-mnist", "--steps", 4, "--out", a, *FAST)
    assert r.exit_code == 1 and "--resume" in r.output
    r = run("train-mnist", "--steps", 4, "--out", tmp_path / "new", "--resume", *FAST)
    assert r.exit_code == 1 and "no checkpoint" in r.output


def test_noise_schedule_reaches_the_run_and_its_samples(tmp_path):
    """--noise-schedule linear (U-ViT's; the default is cosine) is trained with, saved, and used
    again when the run is loaded."""
    import tinyuvit
    a = tmp_path / "a"
    r = run("train-mnist", "--steps", 2, "--out", a, "--sample-every", 0, "--noise-schedule", "linear", *FAST)
    assert r.exit_code == 0, r.output
    loaded = tinyuvit.load(a)
    assert loaded.config["noise_schedule"] == "linear" and loaded.diffusion.schedule.kind == "linear"
    assert loaded.sample(digits=[1], count=2, steps=3).shape == (2, 28, 28)
    r = run("train-mnist", "--steps", 3, "--out", a, "--resume", "--sample-every", 0, *FAST)
    assert r.exit_code == 1 and "noise_schedule (checkpoint 'linear', now 'cosine')" in r.output


def test_bad_options_and_checkpoints_give_one_line(tmp_path):
    for args, words in [(["--steps", 0], "--steps"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
                        (["--batch-size", 0], "--batch-size"), (["--seed", -1], "--seed"),
                        (["--guidance", "nan"], "--guidance"), (["--sample-steps", 0], "--sample-steps"),
                        (["--p-uncond", "inf"], "--p-uncond"), (["--snr-gamma", "nan"], "--snr-gamma"),
                        (["--eval-per-digit", 1], "--eval-per-digit"), (["--threads", 0], "--threads")]:
        r = run("train-mnist", "--out", tmp_path / "x", *args, "--quiet")
        assert r.exit_code == 1 and words in r.output and r.output.count("\n") == 1, r.output  # nothing else printed
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    r = run("sample", "--checkpoint", bad)
    assert r.exit_code == 1 and "unreadable" in r.output and one_error_line(r.output)
    r = run("sample", "--checkpoint", tmp_path / "missing.npz")
    assert r.exit_code == 1 and "not found" in r.output
    r = run("sample", "--checkpoint", bad, "--digits", "3,x")
    assert r.exit_code == 1 and "--digits" in r.output


@pytest.mark.skipif(cupy_status()[0], reason="a GPU is present")
def test_gpu_without_cupy_or_gpu_is_one_line(tmp_path):
    r = run("train-mnist", "--device", "gpu", "--out", tmp_path / "g")
    assert r.exit_code == 1 and r.output.startswith("Error: ") and one_error_line(r.output)
    assert "CuPy" in r.output or "GPU" in r.output


def _tiny_cfg(**kw):
    base = dict(steps=6, batch_size=4, sample_every=0, save_every=2, sample_steps=2, warmup=1,
                model_overrides=dict(dim=16, depth=2, num_heads=2))
    base.update(kw)
    return TrainConfig(**base)


def _digits():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    images, labels = _digits()
    real = Diffusion.loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, d = real(*args, **kwargs)
        return (float("nan"), d) if calls["n"] == 4 else (loss, d)

    monkeypatch.setattr(Diffusion, "loss", staticmethod(poisoned))
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*step 2"):
        train(_tiny_cfg(), tmp_path, images=images, labels=labels, progress=False, log=lambda m: None)
    assert load_checkpoint(tmp_path / "checkpoint.npz")["step"] == 2


def test_ctrl_c_saves_and_resumes(tmp_path, monkeypatch):
    images, labels = _digits()
    real = train_mod.step_rng

    def interrupt_at_3(seed, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as from Ctrl-C
        return real(seed, step)

    monkeypatch.setattr(train_mod, "step_rng", interrupt_at_3)
    out = train(_tiny_cfg(), tmp_path, images=images, labels=labels, progress=False, log=lambda m: None)
    assert out["stopped"] and out["step"] == 4  # the step in flight finishes, then it saves
    assert load_checkpoint(tmp_path / "checkpoint.npz")["step"] == 4
    monkeypatch.setattr(train_mod, "step_rng", real)
    out = train(_tiny_cfg(), tmp_path, images=images, labels=labels, progress=False, resume=True,
                log=lambda m: None)
    assert out["step"] == 6 and not out["stopped"]
    # interrupted + resumed == uninterrupted, with the default (cosine) schedule
    train(_tiny_cfg(), tmp_path / "straight", images=images, labels=labels, progress=False, log=lambda m: None)
    assert losses(tmp_path) == losses(tmp_path / "straight")


def test_corrupt_checkpoint_is_refused_not_used(tmp_path):
    images, labels = _digits()
    train(_tiny_cfg(steps=2), tmp_path, images=images, labels=labels, progress=False, log=lambda m: None)
    path = tmp_path / "checkpoint.npz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # as if a save had been cut short without the rename
    with pytest.raises(CheckpointError, match="unreadable"):
        train(_tiny_cfg(steps=4), tmp_path, images=images, labels=labels, progress=False, resume=True,
              log=lambda m: None)
