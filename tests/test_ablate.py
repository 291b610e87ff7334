"""The ablation study (tinyuvit.tools.ablate, `tinyuvit ablate`) on a tiny budget: the report, resume,
refusals, divergence, signals, the variant list."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

import tinyuvit.tools.ablate as ablate
import tinyuvit.train as train_mod
from tinyuvit.config import SAVED_BEFORE, TrainConfig, from_saved
from tinyuvit.tools.checkpoint import load_checkpoint
from tinyuvit.tools.ablate import BUDGETS, Budget, count_params, list_variants, parse_only, plan_runs, run_study
from tinyuvit.diffusion import Diffusion
from tinyuvit.errors import ConfigError, TrainingError
from tinyuvit.tools.files import RunLock
from tinyuvit.model import ablations

from test_runfolder import cli, one_line   # the CLI runner and the one-line-error check

# A study in seconds: a 2-block model of width 16, 4 steps of 4 images, two U-ViT seeds, one
# point of the learning curves (at the end).
TEST = Budget(preset="tiny", model=dict(dim=16, depth=2, num_heads=2), steps=4, batch_size=4, seeds=(0, 1),
              eval_every=4, eval_per_digit=2, final_per_digit=2, sample_steps=2)


@pytest.fixture
def study_env(offline, tmp_path_factory, monkeypatch):
    """Offline (conftest.py), with one cache for the module: the FID reference statistics of the
    embedded subset are computed once, not once per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "ablate-cache"))


pytestmark = pytest.mark.usefixtures("study_env")


def digits():
    rng = np.random.default_rng(0)
    return dict(images=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 32))


def study(out, budget=TEST, only="uvit", lines=None, **kw):
    log = (lines.append if lines is not None else lambda m: None)
    return run_study(out, budget, only=only, progress=False, log=log, **digits(), **kw)


def test_a_study_writes_its_report_records_a_divergence_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    real_loss, poison = Diffusion.loss, {"on": False}

    def loss(pred, batch):   # NaN in skip=add's run
        value, grad = real_loss(pred, batch)
        return (float("nan"), grad) if poison["on"] else (value, grad)

    real_train = ablate.train

    def train(cfg, *args, **kw):
        poison["on"] = cfg.model_overrides.get("skip") == "add"
        return real_train(cfg, *args, **kw)
    monkeypatch.setattr(Diffusion, "loss", staticmethod(loss))
    monkeypatch.setattr(ablate, "train", train)
    lines = []
    out = study(tmp_path, only="skip=add,skip=none", lines=lines)
    assert out["stopped"] is None and [r["status"] for r in out["results"]] == ["ok", "ok", "diverged", "ok"]
    assert "[3/4] skip=add: training 4 steps" in lines and any("skip=add: diverged" in m for m in lines)

    for name in ("results.md", "scores.png", "loss.png", "learning.png", "grids.png"):
        assert (tmp_path / name).is_file(), name
    for name in ("scores.png", "loss.png", "learning.png", "grids.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 300
    for folder in ("uvit", "uvit-seed1", "skip-add", "skip-none"):
        res = json.loads((tmp_path / folder / "result.json").read_text())
        assert {"variant", "choice", "value", "seed", "params", "class_accuracy", "fid", "fid_floor", "n",
                "train_seconds", "status"} <= set(res)
    ok = json.loads((tmp_path / "skip-none" / "result.json").read_text())
    assert ok["n"] == 20 and 0 <= ok["class_accuracy"] <= 1 and ok["params"] > 0 and ok["seed"] == 0
    bad = json.loads((tmp_path / "skip-add" / "result.json").read_text())
    assert bad["fid"] is None and "loss became nan" in bad["message"]
    table = (tmp_path / "results.md").read_text()
    assert "U-ViT mean ± std" in table and "| skip=none | skip |" in table
    assert "| skip=add | skip |" in table and "**diverged**" in table
    assert json.loads((tmp_path / "study.json").read_text())["budget"]["steps"] == 4

    # the same study again: every run is finished, nothing is trained or scored
    stamps = {f: os.stat(tmp_path / f / "result.json").st_mtime_ns for f in ("uvit", "skip-none", "skip-add")}
    monkeypatch.setattr(ablate, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(ablate._Scorer, "__call__", lambda *a, **k: pytest.fail("scored again"))
    lines = []
    study(tmp_path, only="skip=add,skip=none", lines=lines)
    assert "[4/4] skip=none: finished earlier (ok), kept" in lines
    assert stamps == {f: os.stat(tmp_path / f / "result.json").st_mtime_ns for f in stamps}


def test_a_signal_stops_the_study_and_the_same_command_resumes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(BUDGETS, "default", TEST)
    real = train_mod.step_rng

    def sigterm_in_seed_1(seed, step):           # U-ViT's second seed, at its third step
        if seed == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(seed, step)
    monkeypatch.setattr(train_mod, "step_rng", sigterm_in_seed_1)
    r = cli("ablate", "--out", tmp_path, "--only", "uvit", "--quiet")
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "run the same command again" in r.output
    assert (tmp_path / "uvit" / "result.json").is_file() and not (tmp_path / "uvit-seed1" / "result.json").exists()
    assert load_checkpoint(tmp_path / "uvit-seed1")["step"] == 3     # saved first
    assert "U-ViT (seed 0)" in (tmp_path / "results.md").read_text()           # the report so far

    monkeypatch.setattr(train_mod, "step_rng", real)
    r = cli("ablate", "--out", tmp_path, "--only", "uvit", "--quiet")
    assert r.exit_code == 0, r.output
    assert "[1/2] U-ViT (seed 0): finished earlier" in r.output
    assert "[2/2] U-ViT (seed 1): resuming at step 3 of 4" in r.output
    assert "| U-ViT (seed 1) |" in r.output and "results.md" in r.output        # the table, the files

    # trained but not scored (killed while scoring): scored only
    os.remove(tmp_path / "uvit-seed1" / "result.json")
    monkeypatch.setattr(ablate, "train", lambda *a, **k: pytest.fail("trained again"))
    lines = []
    study(tmp_path, lines=lines)
    assert "[2/2] U-ViT (seed 1): scoring 20 samples" in lines and (tmp_path / "uvit-seed1" / "result.json").is_file()


def test_another_budget_in_the_same_folder_is_one_line_naming_the_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "_run_one", lambda *a, **k: None)        # record the study, train nothing
    monkeypatch.setitem(BUDGETS, "default", dataclasses.replace(TEST, steps=6))
    monkeypatch.setitem(BUDGETS, "quick", TEST)
    assert cli("ablate", "--quick", "--out", tmp_path, "--only", "uvit").exit_code == 0
    r = cli("ablate", "--out", tmp_path, "--only", "uvit")
    assert one_line(r) and "run with steps 4 (the quick budget: add --quick); asked for steps 6" in r.output
    with pytest.raises(ConfigError, match=r"batch_size 4, eval_every 4 .*; asked for batch_size 8, eval_every 3"):
        study(tmp_path, dataclasses.replace(TEST, batch_size=8, eval_every=3))
    assert cli("ablate", "--quick", "--out", tmp_path, "--only", "conv").exit_code == 0   # same budget: fine
    saved = json.loads((tmp_path / "study.json").read_text())
    assert [r["folder"] for r in saved["runs"]] == ["uvit", "uvit-seed1", "conv-before", "conv-none"]
    saved["recipe"]["lr"] = 1e-3                  # the same budget, but TrainConfig's defaults changed
    (tmp_path / "study.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"run with lr 0.001 .*; asked for lr 0.002"):
        study(tmp_path)
    (tmp_path / "study.json").write_text('{"budget": {"steps": 4')        # a hand edit gone wrong
    with pytest.raises(ConfigError, match="study.json is not readable JSON"):
        study(tmp_path)


def test_only_picks_choices_aliases_and_variants_and_refuses_others_in_one_line():
    assert parse_only(None) is None
    assert parse_only("skip,time") == {"skip=add", "skip=add_linear", "skip=linear_add", "skip=none",
                                       "time_cond=adaln"}
    assert parse_only(" pos , conv=none") == {"pos_embed=sincos2d", "pos_embed=none", "conv=none"}
    runs = plan_runs(BUDGETS["quick"], "conv=none")
    assert [r.folder for r in runs] == ["uvit", "uvit-seed1", "uvit-seed2", "conv-none"]
    assert [r.seed for r in runs] == [0, 1, 2, 0]
    assert len(plan_runs(BUDGETS["quick"])) == 13
    for only in ("skip,bogus", ",", "skip=sideways"):
        r = cli("ablate", "--only", only, "--out", "unused")
        assert one_line(r) and "--only" in r.output, r.output
    r = cli("ablate", "--only", "skip,bogus")
    assert "'bogus'" in r.output and "time (time_cond)" in r.output and "pos_embed=none" in r.output


def test_list_prints_every_variant_with_its_parameters():
    r = cli("ablate", "--list", "--quick")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 + 11 and "params (quick: tiny dim=64)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [name for name, _, _ in ablations()]
    assert "379,546" in lines[1] and "1,496,346" in lines[1]           # U-ViT: quick's model, and tiny
    rows = list_variants("quick")
    assert len(rows) == 11 and rows[0]["name"] == "uvit" and rows[0]["params"] == 379_546


def test_a_variant_not_built_yet_counts_as_none_but_real_errors_are_raised(tmp_path, monkeypatch):
    def building(cfg, seed=0):
        raise ValueError(f"no such long skip: {cfg.skip!r}")
    monkeypatch.setattr(ablate, "UViT", building)
    assert count_params("tiny", {"skip": "add_linear"}, "add_linear") is None
    with pytest.raises(ValueError):
        count_params("tiny", {"skip": "concat"}, "add")              # an error that is not about the value
    with pytest.raises(ConfigError, match="not built in the network yet: skip=add"):
        study(tmp_path, only="skip=add")


def test_budgets_are_checked_and_the_folder_is_locked(tmp_path):
    quick = BUDGETS["quick"]
    assert (quick.steps, quick.batch_size, quick.model, len(quick.seeds)) == (2500, 64, {"dim": 64}, 3)
    assert len(BUDGETS["default"].seeds) >= 3
    cfg = quick.train_config(2, {"skip": "add"})
    assert cfg.seed == 2 and cfg.model_overrides == {"dim": 64, "skip": "add"} and cfg.lr == TrainConfig.lr
    for bad, words in ((dict(seeds=()), "seeds"), (dict(seeds=(0, 0)), "seeds"), (dict(steps=0), "--steps"),
                       (dict(final_per_digit=1), "final_per_digit"), (dict(model={"dim": 15}), "num_heads")):
        with pytest.raises(ConfigError, match=words):
            study(tmp_path / "x", dataclasses.replace(TEST, **bad))
    with pytest.raises(ConfigError, match="unknown budget 'huge'"):
        study(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()
    with RunLock(tmp_path):
        with pytest.raises(TrainingError, match="in use by process"):
            study(tmp_path)


def test_training_time_adds_the_segments_of_a_resumed_run():
    rows = [{"seconds": s} for s in (1.0, 2.0, 3.0, 0.5, 1.5)]
    assert ablate.train_seconds(rows) == 4.5 and ablate.train_seconds([]) == 0


def test_help_has_an_example():
    r = cli("ablate", "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and "--only skip,time" in r.output and "--quick" in r.output


def test_a_study_saved_before_newer_training_fields_still_matches_its_recipe():
    """A study.json written before noise_schedule, pos_init and conv_init existed resumes: its
    runs trained as those fields' FIELDS_ADDED values say, which is what the study still asks for
    (U-ViT's own init and the loss weight gamma = 5 the study first ran with, whatever
    train-mnist's default); a changed field is still refused."""
    from tinyuvit.model import INITS
    budget = BUDGETS["quick"]
    recipe = ablate._recipe(budget)
    assert recipe["pos_init"] == "normal" and budget.sample_config().guidance_interval == (0.0, float("inf"))
    assert recipe["snr_gamma"] == 5.0
    added_since = ("noise_schedule", "pos_init", "conv_init", "weak_at", "clip_loss")   # after the first studies
    assert set(added_since) <= set(SAVED_BEFORE)
    old = {k: v for k, v in recipe.items() if k not in added_since}
    old["model"] = {k: v for k, v in recipe["model"].items() if k not in INITS}
    ablate._check_same("study", from_saved(old), recipe)
    with pytest.raises(ConfigError, match="lr"):
        ablate._check_same("study", from_saved(dict(old, lr=1.0)), recipe)
