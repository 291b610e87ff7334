"""Issue 10's crash-and-bad-input findings, each through train() or the real CLI: signals save,
resume never loses metric rows, one process per run folder, outputs never overwrite a checkpoint,
bad values give one line before any work, a bug keeps its traceback."""
import json
import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner

import tinyuvit.layers as layers
import tinyuvit.train as train_mod
from tinyuvit.tools.cli import main
from tinyuvit.errors import CheckpointError, ConfigError, TrainingError
from tinyuvit.tools.files import RunLock
from tinyuvit.optim import AdamW
from tinyuvit.config import TrainConfig
from tinyuvit.tools.checkpoint import load_checkpoint
from tinyuvit.train import train


pytestmark = pytest.mark.usefixtures("offline")   # tests/conftest.py: no network, empty cache


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(r):
    lines = r.output.strip().splitlines()
    return r.exit_code == 1 and "Traceback" not in r.output and lines[-1].startswith("Error: ") and \
        sum(line.startswith("Error") for line in lines) == 1


def cfg(**kw):
    base = dict(steps=6, batch_size=4, sample_every=0, save_every=2, sample_steps=2, warmup=1,
                model_overrides=dict(dim=16, depth=2, num_heads=2))
    base.update(kw)
    return TrainConfig(**base)


def digits(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32)


def quiet(**kw):
    return dict(progress=False, log=lambda m: None, **kw)


def rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def signal_at(monkeypatch, step, *signums):
    real = train_mod.step_rng

    def fake(seed, k):
        if k == step:
            for s in signums:
                os.kill(os.getpid(), s)
        return real(seed, k)
    monkeypatch.setattr(train_mod, "step_rng", fake)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_termination_signals_save_and_exit_with_128_plus_the_signal(tmp_path, monkeypatch, name):
    signum = getattr(signal, name)
    signal_at(monkeypatch, 3, signum)
    r = cli("train-mnist", "--steps", 6, "--out", tmp_path / "r", "--batch-size", 4, "--sample-every", 0,
            "--sample-steps", 2, "--quiet")
    assert r.exit_code == 128 + signum, r.output
    assert f"stopped by {name} at step 4" in r.output and "--resume" in r.output
    assert rows(tmp_path / "r") == [1, 2, 3, 4]
    assert (tmp_path / "r" / "loss.png").exists()     # the curve as far as the stop, with no grid drawn


def test_a_second_signal_while_stopping_does_not_lose_the_save(tmp_path, monkeypatch):
    images, labels = digits()
    signal_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT, signal.SIGTERM)
    out = train(cfg(), tmp_path, images=images, labels=labels, **quiet())
    assert out["stopped"] == "SIGINT" and out["step"] == 4
    assert load_checkpoint(tmp_path / "checkpoint.npz")["step"] == 4


def test_resume_keeps_logged_rows_until_new_ones_arrive(tmp_path, monkeypatch):
    """Rows after the checkpoint are dropped, none before it are lost even if the resumed run
    dies at once (the file is rewritten atomically, then appended to)."""
    images, labels = digits()
    signal_at(monkeypatch, 3, signal.SIGINT)
    train(cfg(save_every=0), tmp_path, images=images, labels=labels, **quiet())
    with open(tmp_path / "metrics.jsonl", "a") as f:   # rows a killed run wrote after its last save
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 6, 7))

    def killed(seed, k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(train_mod, "step_rng", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(save_every=0), tmp_path, images=images, labels=labels, resume=True, **quiet())
    assert rows(tmp_path) == [1, 2, 3, 4]


def test_one_process_per_run_folder(tmp_path):
    images, labels = digits()
    (tmp_path / "r").mkdir()
    with RunLock(tmp_path / "r"):     # another run holds the folder
        with pytest.raises(TrainingError, match=f"in use by process {os.getpid()}"):
            train(cfg(), tmp_path / "r", images=images, labels=labels, **quiet())
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    images, labels = digits()
    train(cfg(steps=2), tmp_path, images=images, labels=labels, **quiet())
    part = tmp_path / ".checkpoint.npz.abc123.part"
    part.write_bytes(b"half a checkpoint")
    train(cfg(steps=4), tmp_path, images=images, labels=labels, resume=True, **quiet())
    assert not part.exists()


def test_resume_on_other_data_is_refused_naming_it(tmp_path):
    images, labels = digits(0)
    train(cfg(steps=2), tmp_path, images=images, labels=labels, **quiet())
    other, other_labels = digits(1)
    with pytest.raises(CheckpointError, match="trained on"):
        train(cfg(steps=4), tmp_path, images=other, labels=other_labels, resume=True, **quiet())


def test_weights_that_stopped_being_finite_are_never_saved(tmp_path, monkeypatch):
    images, labels = digits()
    real = AdamW.step

    def exploding(self, grads, lr=None):
        real(self, grads, lr)
        if self.k == 3:
            self._p[0][:5] = np.inf
    monkeypatch.setattr(AdamW, "step", exploding)
    with pytest.raises(TrainingError, match="no longer finite at step 3.*step 2"):
        train(cfg(save_every=1), tmp_path, images=images, labels=labels, **quiet())
    assert load_checkpoint(tmp_path / "checkpoint.npz")["step"] == 2


def test_failed_starts_leave_no_folder_behind(tmp_path):
    r = cli("train-mnist", "--out", tmp_path / "new", "--data-dir", tmp_path / "no-such-data", "--quiet")
    assert one_line(r) and not (tmp_path / "new").exists()
    r = cli("train-mnist", "--out", tmp_path / "new2", "--resume", "--quiet")
    assert one_line(r) and "no checkpoint" in r.output and not (tmp_path / "new2").exists()


def test_outputs_never_overwrite_a_checkpoint_and_are_checked_first(tmp_path):
    images, labels = digits()
    train(cfg(steps=2), tmp_path / "r", images=images, labels=labels, **quiet())
    ckpt = tmp_path / "r" / "checkpoint.npz"
    before = ckpt.read_bytes()
    r = cli("sample", "--checkpoint", ckpt, "--out", ckpt, "--quiet")
    assert one_line(r) and "checkpoint" in r.output and ckpt.read_bytes() == before
    r = cli("evaluate", "--checkpoint", ckpt, "--json", ckpt, "--quiet")
    assert one_line(r) and ckpt.read_bytes() == before
    r = cli("evaluate", "--checkpoint", tmp_path / "r", "--json", tmp_path / "nodir" / "x.json", "--quiet")
    assert one_line(r) and "does not exist" in r.output and "samples" not in r.output


@pytest.mark.parametrize("args,option", [
    (["sample", "--count", 0], "--count"), (["sample", "--digits", "3,12"], "--digits"),
    (["sample", "--guidance", "nan"], "--guidance"), (["sample", "--steps", 0], "--steps"),
    (["sample", "--seed", -1], "--seed"), (["sample", "--threads", 0], "--threads"),
    (["sample", "--eta", 3], "--eta"), (["evaluate", "--per-digit", 0], "--per-digit"),
    (["evaluate", "--batch-size", 0], "--batch-size"), (["evaluate", "--seed", -1], "--seed"),
    (["sample", "--guidance-interval", "0.7,0.1"], "--guidance-interval"),
    (["evaluate", "--guidance-interval", "0.5"], "--guidance-interval"),
    (["sample", "--final-sigma", "-1"], "--final-sigma"), (["evaluate", "--final-sigma", "nan"], "--final-sigma"),
    (["sample", "--final-sigma", "1e9"], "--final-sigma"),
    (["sample", "--ink-percentile", "101"], "--ink-percentile"), (["evaluate", "--ink-percentile", "nan"], "--ink-percentile"),
])
def test_bad_sampling_values_are_one_line_naming_the_option(tmp_path, args, option):
    images, labels = digits()
    train(cfg(steps=1), tmp_path / "r", images=images, labels=labels, **quiet())
    r = cli(args[0], "--checkpoint", tmp_path / "r", *args[1:], "--quiet")
    assert one_line(r) and option in r.output, r.output


@pytest.mark.parametrize("args,option", [(["--epochs", "inf"], "--epochs"), (["--epochs", "nan"], "--epochs"),
                                         (["--epochs", "0.0001"], "--epochs"), (["--lr", "nan"], "--lr"),
                                         (["--batch-size", 0], "--batch-size")])
def test_bad_classifier_options_are_one_line(tmp_path, args, option):
    r = cli("train-classifier", "--out", tmp_path / "c.npz", *args, "--quiet")
    assert one_line(r) and option in r.output, r.output
    assert not (tmp_path / "c.npz").exists()


def test_one_sampler_step_works_and_a_folder_is_a_checkpoint(tmp_path):
    images, labels = digits()
    train(cfg(steps=1), tmp_path / "r", images=images, labels=labels, **quiet())
    for sampler in ("ddim", "dpm++"):
        r = cli("sample", "--checkpoint", tmp_path / "r", "--steps", 1, "--sampler", sampler, "--quiet")
        assert r.exit_code == 0, r.output


def test_a_broken_layer_shows_its_traceback_and_debug_shows_expected_errors(tmp_path, monkeypatch):
    def broken(self, x, *, train=True):
        raise ValueError("operands could not be broadcast together")
    monkeypatch.setattr(layers.GELU, "forward", broken)
    r = cli("train-mnist", "--steps", 2, "--batch-size", 4, "--out", tmp_path / "r", "--quiet")
    assert isinstance(r.exception, ValueError) and "Error:" not in r.output   # not turned into one line
    monkeypatch.undo()
    r = cli("--debug", "train-mnist", "--steps", 0, "--out", tmp_path / "s")
    assert isinstance(r.exception, ConfigError)                              # --debug: the traceback
    monkeypatch.setenv("TINYUVIT_DEBUG", "1")
    assert isinstance(cli("train-mnist", "--steps", 0, "--out", tmp_path / "s").exception, ConfigError)
