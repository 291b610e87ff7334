"""The Python API a learner uses (tinyuvit.load, Run.sample, Run.evaluate) and the README's example."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tinyuvit
from tinyuvit.tools.cli import main, one_row_per_digit
from tinyuvit.errors import CheckpointError, ConfigError
from tinyuvit.tools.images import grid
from tinyuvit.config import TrainConfig
from tinyuvit.train import train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("offline")   # tests/conftest.py: no network, empty cache


def _tiny_run(folder, **kw):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32)
    cfg = TrainConfig(steps=3, batch_size=4, sample_every=0, save_every=0, sample_steps=2, warmup=1,
                      model_overrides=dict(dim=16, depth=2, num_heads=2), **kw)
    train(cfg, folder, images=images, labels=labels, progress=False, log=lambda m: None)
    return os.path.join(folder, "checkpoint.npz")


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_load_gives_back_the_model_diffusion_and_config(tmp_path, prediction):
    path = _tiny_run(tmp_path / "run", prediction=prediction, weighting="min-snr")
    run = tinyuvit.load(path)
    assert run.step == 3 and run.diffusion.prediction == prediction and run.diffusion.weighting == "min-snr"
    assert run.config["model"]["dim"] == 16 and run.model.cfg.dim == 16
    assert tinyuvit.load(tmp_path / "run").step == 3          # the run folder works too
    raw = tinyuvit.load(path, weights="raw")
    assert not np.array_equal(raw.model.decoder_pred.params["W"], run.model.decoder_pred.params["W"])
    assert "step 3" in repr(run)


def test_sample_equals_the_cli_and_keeps_rows_of_one_digit(tmp_path):
    path = _tiny_run(tmp_path / "run")
    run = tinyuvit.load(path)
    images = run.sample(digits=[3, 7], count=3, seed=5)
    assert images.dtype == np.uint8 and images.shape == (6, 28, 28)
    np.testing.assert_array_equal(images, run.sample(digits=[3, 7], count=3, seed=5))     # seeded
    assert not np.array_equal(images, run.sample(digits=[3, 7], count=3, seed=6))
    out = tmp_path / "grid.png"
    r = CliRunner().invoke(main, ["sample", "--checkpoint", path, "--digits", "3,7", "--count", "3",
                                  "--seed", "5", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.asarray(Image.open(out)), grid(images, nrow=3))
    # 25 per digit: rows of 20, each digit starting a new row, the rest of its last row empty
    rows = one_row_per_digit(np.repeat(np.arange(2, dtype=np.uint8), 25)[:, None, None] * np.ones((1, 2, 2), np.uint8), 25)
    assert rows.shape == (80, 2, 2)
    assert (rows[:25] == 0).all() and (rows[25:40] == 96).all() and (rows[40:65] == 1).all()


def test_bad_values_are_refused_before_any_work(tmp_path):
    path = _tiny_run(tmp_path / "run")
    run = tinyuvit.load(path)
    for kwargs, option in [(dict(digits=[11]), "--digits"), (dict(count=0), "--count"), (dict(seed=-1), "--seed"),
                           (dict(steps=0), "--steps"), (dict(guidance=float("nan")), "--guidance"),
                           (dict(sampler="euler"), "--sampler")]:
        with pytest.raises(ConfigError, match=option):
            run.sample(**kwargs)
    for kwargs, option in [(dict(per_digit=0), "--per-digit"), (dict(per_digit=1), "--per-digit"),
                           (dict(per_digit=2, batch_size=0), "--batch-size")]:
        with pytest.raises(ConfigError, match=option):
            run.evaluate(**kwargs)
    with pytest.raises(CheckpointError):
        tinyuvit.load(tmp_path / "nowhere.npz")


def test_readme_from_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "From Python" code block, run in a folder where the default run exists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "tinyuvit.load(" in code
    monkeypatch.chdir(tmp_path)
    _tiny_run(tmp_path / "runs" / "mnist-tiny")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images = namespace["images"]
    # the same images as `tinyuvit sample` with the same seed and digits
    r = CliRunner().invoke(main, ["sample", "--checkpoint", "runs/mnist-tiny/checkpoint.npz", "--digits", "3,7",
                                  "--count", "8", "--out", "cli.png", "--quiet"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.asarray(Image.open("cli.png")), grid(images, nrow=8))
