"""The design study (tinyuvit.tools.ablate, its report tools/ablate_report.py, `tinyuvit ablate`) on
a tiny budget: paired starts, every model with every seed, resume across seeds, the statistics on
a fake study with a known difference, the pilot, refusals, divergence, the model list."""
import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import tinyuvit.tools.ablate as ablate
import tinyuvit.tools.ablate_run as ablate_run
import tinyuvit.tools.ablate_report as report
import tinyuvit.train as train_mod
from tinyuvit.config import SAVED_BEFORE, from_saved
from tinyuvit.tools.checkpoint import load_checkpoint
from tinyuvit.diffusion import Diffusion
from tinyuvit.errors import ConfigError, TrainingError
from tinyuvit.model import UViT, ablations, get_config
from tinyuvit.tools.ablate import (BUDGETS, Budget, claim_verdicts, comparisons, count_params, holm, list_variants,
                                   parse_only, plan_runs, read_entries, study_models, study_size)
from tinyuvit.tools.ablate_run import run_study
from tinyuvit.tools.files import RunLock

from test_runfolder import cli, one_line   # the CLI runner and the one-line-error check

# A study in seconds: a 2-block model of width 16, 4 steps of 4 images, two seeds, 20 samples a score.
TEST = Budget(preset="tiny", model=dict(dim=16, depth=2, num_heads=2), steps=4, batch_size=4, seeds=(0, 1),
              conv_init="identity", eval_every=0, eval_per_digit=2, final_per_digit=2, sample_steps=2)


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


# ----------------------------------------------------------------------------------------
# Paired starts: the same seed, the same weights wherever a model shares a layer with U-ViT
# ----------------------------------------------------------------------------------------

def test_every_model_of_the_study_starts_from_uvits_weights_wherever_they_share_a_layer():
    budget = BUDGETS["quick"]
    build = lambda m, seed: UViT(budget.train_config(seed, dict(m.overrides)).model_config(), seed=seed).state_dict()
    models = study_models(budget)
    assert [m.name for m in models[:11]] == [name for name, _, _ in ablations()] and len(models) == 17
    uvit = build(models[0], 7)
    for m in models[1:]:
        params = build(m, 7)
        shared = [k for k in params if k in uvit and params[k].shape == uvit[k].shape]
        assert all(np.array_equal(params[k], uvit[k]) for k in shared), m.name
        if m.choice != "width":        # every width changes every shape; the others share the blocks
            assert {k for k in shared if "blocks.0.attn.qkv" in k}, m.name
    assert not np.array_equal(build(models[0], 8)["in_blocks.0.attn.qkv.W"], uvit["in_blocks.0.attn.qkv.W"])


# ----------------------------------------------------------------------------------------
# The study on a tiny budget: report, divergence, resume across seeds, the pilot
# ----------------------------------------------------------------------------------------

def test_a_study_runs_every_model_with_every_seed_records_a_divergence_and_a_rerun_trains_nothing(
        tmp_path, monkeypatch):
    real_loss, poison = Diffusion.loss, {"on": False}

    def loss(pred, batch):   # NaN in skip=add's seed 1
        value, grad = real_loss(pred, batch)
        return (float("nan"), grad) if poison["on"] else (value, grad)

    real_train, configs = ablate_run.train, []

    def train(cfg, *args, **kw):
        configs.append(cfg)
        poison["on"] = cfg.model_overrides.get("skip") == "add" and cfg.seed == 1
        return real_train(cfg, *args, **kw)
    monkeypatch.setattr(Diffusion, "loss", staticmethod(loss))
    monkeypatch.setattr(ablate_run, "train", train)
    lines = []
    out = study(tmp_path, only="skip=add,conv=none", lines=lines)
    assert out["stopped"] is None
    assert [(r["variant"], r["seed"], r["status"]) for r in out["results"]] == [
        ("uvit", 0, "ok"), ("uvit", 1, "ok"), ("skip=add", 0, "ok"), ("skip=add", 1, "diverged"),
        ("conv=none", 0, "ok"), ("conv=none", 1, "ok")]
    assert [(c.seed, c.conv_init) for c in configs] == [(0, "identity"), (1, "identity")] * 2 + [(0, "uniform"),
                                                                                               (1, "uniform")]
    assert "[4/6] skip=add (seed 1): training 4 steps" in lines and any("skip=add (seed 1): diverged" in m
                                                                        for m in lines)
    for name in ("results.md", "differences.png", "loss.png", "grids.png"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "learning.png").exists()          # no learning curves in this budget
    for name in ("differences.png", "loss.png", "grids.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 300
    uvit = json.loads((tmp_path / "uvit-seed1" / "result.json").read_text())
    assert [(s["per_digit"], s["seed"]) for s in uvit["scores"]] == [(2, 0), (2, 1)]      # scored twice
    assert uvit["fid"] == uvit["scores"][0]["fid"] and uvit["seed"] == 1 and uvit["n"] == 20
    ok = json.loads((tmp_path / "conv-none-seed1" / "result.json").read_text())
    assert len(ok["scores"]) == 1 and 0 <= ok["class_accuracy"] <= 1 and ok["params"] > 0
    bad = json.loads((tmp_path / "skip-add-seed1" / "result.json").read_text())
    assert bad["fid"] is None and "loss became nan" in bad["message"]
    md = (tmp_path / "results.md").read_text()
    assert "| skip=add (seed 1) |" in md and "**diverged**" in md and "| skip=add (1 diverged) |" in md
    assert "## Sampling noise" in md and "## How this recipe differs from the paper's" in md
    assert "| 3.1 3x3 conv | a 3x3 conv after the linear decoder is slightly better than none |" in md
    assert "skip=add vs skip=none" not in md       # skip=none was not run: no such claim yet

    # the same study again: every run is finished, nothing is trained or scored
    stamps = {f: os.stat(tmp_path / f / "result.json").st_mtime_ns for f in ("uvit", "conv-none", "skip-add-seed1")}
    monkeypatch.setattr(ablate_run, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(ablate_run._Scorer, "__call__", lambda *a, **k: pytest.fail("scored again"))
    lines = []
    study(tmp_path, only="skip=add,conv=none", lines=lines)
    assert "[6/6] conv=none (seed 1): finished earlier (ok), kept" in lines
    assert stamps == {f: os.stat(tmp_path / f / "result.json").st_mtime_ns for f in stamps}


def test_a_study_cut_between_seeds_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setitem(BUDGETS, "default", TEST)
    real, calls = train_mod.step_rng, []

    def sigterm_in_the_fourth_run(seed, step):   # skip=none's seed 1 (U-ViT 0, 1, skip=none 0, 1), step 2
        calls.append(step)
        if calls.count(2) == 4 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(seed, step)
    monkeypatch.setattr(train_mod, "step_rng", sigterm_in_the_fourth_run)
    r = cli("ablate", "--out", tmp_path, "--only", "skip=none", "--quiet")
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "run the same command again" in r.output
    folders = ("uvit", "uvit-seed1", "skip-none", "skip-none-seed1")
    assert [f for f in folders if (tmp_path / f / "result.json").exists()] == ["uvit", "uvit-seed1", "skip-none"]
    assert load_checkpoint(tmp_path / "skip-none-seed1")["step"] == 3     # saved first
    assert "| skip=none (seed 0) |" in (tmp_path / "results.md").read_text()        # the report so far

    monkeypatch.setattr(train_mod, "step_rng", real)
    r = cli("ablate", "--out", tmp_path, "--only", "skip=none", "--quiet")
    assert r.exit_code == 0, r.output
    assert "[3/4] skip=none (seed 0): finished earlier" in r.output
    assert "[4/4] skip=none (seed 1): resuming at step 3 of 4" in r.output
    assert "no long skip" in r.output and "results.md" in r.output                  # the claims, the files

    # trained but not scored (killed while scoring): scored only
    os.remove(tmp_path / "skip-none-seed1" / "result.json")
    monkeypatch.setattr(ablate_run, "train", lambda *a, **k: pytest.fail("trained again"))
    lines = []
    study(tmp_path, only="skip=none", lines=lines)
    assert "[4/4] skip=none (seed 1): scoring 20 samples (sampling seed 0)" in lines
    assert (tmp_path / "skip-none-seed1" / "result.json").is_file()


def test_more_seeds_extend_a_study_and_fresh_seeds_start_another(tmp_path):
    study(tmp_path, only="skip=none")                           # TEST's seeds: 0, 1
    lines = []
    study(tmp_path, only="skip=none", seeds="0-2", lines=lines)
    assert "[2/6] U-ViT (seed 1): finished earlier (ok), kept" in lines
    assert "[3/6] U-ViT (seed 2): training 4 steps" in lines and "[6/6] skip=none (seed 2): training 4 steps" in lines
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["budget"]["seeds"] == [0, 1, 2]
    budget, runs = ablate.saved_study(tmp_path)
    table = comparisons(budget, read_entries(tmp_path, runs))
    assert table[("skip=none", "uvit")]["fid"]["n"] == 3 and table[("skip=none", "uvit")]["fid"]["seeds"] == [0, 1, 2]

    study(tmp_path, only="conv=none")                           # the budget's two seeds: the study keeps three
    budget, runs = ablate.saved_study(tmp_path)
    assert budget.seeds == (0, 1, 2) and [r.seed for r in runs if r.variant == "conv=none"] == [0, 1]
    md = (tmp_path / "results.md").read_text()
    assert "every model trains with each of the seeds 0, 1, 2, but conv=none with 0, 1." in md
    assert "| runs | one per variant | 2–3 seeds per model, paired |" in md
    with pytest.raises(ConfigError, match=r"run with steps 4; asked for steps 5"):   # other fields still count
        study(tmp_path, dataclasses.replace(TEST, steps=5), seeds="0-3")

    study(tmp_path / "fresh", seeds=(5, 6))                     # a new folder: only the seeds asked for
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.is_dir()) == ["uvit-seed5", "uvit-seed6"]
    assert "every model trains with each of the seeds 5, 6." in (tmp_path / "fresh" / "results.md").read_text()


def test_a_study_split_over_two_folders_joins_into_one(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    study(a, only="skip=none")
    study(b, only="conv=none")                                  # U-ViT trains over there too
    os.remove(b / "conv-none-seed1" / "result.json")            # unfinished over there: not joined
    os.makedirs(a / "conv-none")                                # unfinished here, finished there: replaced
    (a / "conv-none" / "metrics.jsonl").write_text("")
    lines = []
    out = ablate_run.join_study(a, b, TEST, log=lines.append)
    assert out["joined"] == ["conv-none"] and out["kept"] == ["uvit", "uvit-seed1"]
    assert any(m.startswith("conv=none (seed 0): unfinished in") for m in lines)
    assert lines[-1] == f"joined 1 finished runs of {b} into {a}; kept 2 it had finished already"
    budget, runs = ablate.saved_study(a)
    assert [r.folder for r in runs] == ["uvit", "uvit-seed1", "skip-none", "skip-none-seed1", "conv-none"]
    assert (json.loads((a / "conv-none" / "result.json").read_text()) ==
            json.loads((b / "conv-none" / "result.json").read_text()))
    assert not (a / "conv-none" / ".lock").exists()
    md = (a / "results.md").read_text()
    assert "| conv=none (seed 0) |" in md and "conv=none with 0." in md

    monkeypatch.setitem(BUDGETS, "quick", TEST)
    r = cli("ablate", "--quick", "--out", a, "--join", b)                   # again: nothing new
    assert r.exit_code == 0 and "joined 0 finished runs" in r.output and "results.md" in r.output
    for args, words in ((("--join", b, "--only", "skip"), "--join trains nothing, so --only has no effect"),
                        (("--join", a), "is the study's own folder"),
                        (("--join", tmp_path / "none"), "holds no study (no study.json)")):
        r = cli("ablate", "--quick", "--out", a, *args)
        assert one_line(r) and words in r.output, r.output
    saved = json.loads((b / "study.json").read_text())
    saved["budget"]["steps"] = 5
    (b / "study.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="run with steps 5; asked for steps 4: join only studies of the same budget"):
        ablate_run.join_study(a, b, TEST)
    with RunLock(b):
        with pytest.raises(TrainingError, match="in use by process"):
            ablate_run.join_study(a, b, TEST)


def test_seeds_are_ranges_or_lists_and_anything_else_is_one_line():
    assert ablate.parse_seeds("0-5") == (0, 1, 2, 3, 4, 5)
    assert ablate.parse_seeds("3,4,5") == (3, 4, 5) and ablate.parse_seeds(" 0-2, 7") == (0, 1, 2, 7)
    for bad in ("", "a", "5-3", "-1", "1,1", "0-2,2", "1.5"):
        with pytest.raises(ConfigError, match="--seeds"):
            ablate.parse_seeds(bad)
    r = cli("ablate", "--quick", "--seeds", "2-1", "--out", "never-made")
    assert one_line(r) and "--seeds '2-1' is not a list of seeds" in r.output and not os.path.exists("never-made")
    assert ablate.budget_name(ablate.with_seeds("quick", "0-5")) == "quick"      # other seeds, the same budget
    assert ablate.with_seeds("quick", (7,)).seeds == (7,)


def test_the_pilot_measures_both_conv_starts_at_two_sample_counts_and_the_study_reuses_its_uvit(
        tmp_path, monkeypatch):
    for module in (ablate, report):
        monkeypatch.setattr(module, "PILOT_FEWER", 2)
    budget = dataclasses.replace(TEST, final_per_digit=3)
    runs = plan_runs(budget, pilot=True)
    assert [(r.folder, r.scores) for r in runs[::2]] == [
        ("uvit", ((3, 0), (3, 1), (2, 0), (2, 1))), ("conv_init-uniform", ((3, 0), (3, 1), (2, 0), (2, 1)))]
    assert budget.train_config(1, dict(runs[2].model.overrides)).conv_init == "uniform"
    study(tmp_path, budget, only=None, pilot=True)
    md = (tmp_path / "results.md").read_text()
    assert "## Pilot" in md and "| identity (the budget) | 30 |" in md and "| uniform | 20 |" in md
    assert "## The paper's claims" not in md and (tmp_path / "pilot.png").is_file()   # no variant yet
    monkeypatch.setattr(ablate_run, "train", lambda cfg, *a, **k: pytest.fail("trained U-ViT again") if
                        not cfg.model_overrides.get("skip") else train_mod.train(cfg, *a, **k))
    lines = []
    study(tmp_path, budget, only="skip=none", lines=lines)
    assert "[1/4] U-ViT (seed 0): finished earlier (ok), kept" in lines
    assert "## Pilot" in (tmp_path / "results.md").read_text()
    r = cli("ablate", "--pilot", "--only", "skip", "--out", tmp_path)
    assert one_line(r) and "leave out --only" in r.output


# ----------------------------------------------------------------------------------------
# The statistics, on a fake study with a known difference
# ----------------------------------------------------------------------------------------

FAKE = dataclasses.replace(TEST, seeds=(0, 1, 2))
UVIT_FID = {0: 20.0, 1: 14.0, 2: 17.0}
SHIFT = {                            # FID of model = U-ViT's of the same seed + these, seed by seed
    "skip=add": (0.1, -0.1, 0.05), "skip=add_linear": (1.0, 3.0, 2.0), "skip=linear_add": (0.0, 0.0, 0.3),
    "skip=none": (0.0, 0.0, 0.1), "time_cond=adaln": (1.0, 6.0, 2.0),
    "pos_embed=sincos2d": (-5.0, -5.05, -4.95), "pos_embed=none": (60.0, 60.1, 59.9)}


def fake_study(out_dir):
    """result.json files with the FIDs above and accuracy = 100 - FID (no training)."""
    runs = plan_runs(FAKE, only="skip,time,pos")
    for r in runs:
        fid = UVIT_FID[r.seed] + (SHIFT[r.variant][r.seed] if r.variant != "uvit" else 0.0)
        score = dict(per_digit=2, seed=0, n=20, class_accuracy=(100 - fid) / 100, fid=fid, fid_floor_same_n=1.0,
                     score_seconds=0.1)
        scores = [score] + ([dict(score, seed=1, fid=fid + 0.5 * (-1) ** r.seed)] if r.variant == "uvit" else [])
        result = dict(variant=r.variant, seed=r.seed, status="ok", params=100, train_seconds=6.0,
                      fid_floor=1.0, **{k: score[k] for k in ("n", "class_accuracy", "fid", "fid_floor_same_n")},
                      scores=scores)
        os.makedirs(out_dir / r.folder)
        (out_dir / r.folder / "result.json").write_text(json.dumps(result))
    return runs


def our_holm(p, m):
    """Holm's adjusted p-values over a family of m, of which these are tested (the rest as p = 1),
    written out another way: sorted ascending, (m - i) * p, running max."""
    order = np.argsort(p)
    adjusted = np.minimum(1, np.maximum.accumulate((m - np.arange(len(p))) * np.array(p)[order]))
    out = np.empty(len(p))
    out[order] = adjusted
    return out


def test_a_fake_study_with_a_known_difference_gives_the_expected_intervals_and_verdicts(tmp_path):
    entries = read_entries(tmp_path, fake_study(tmp_path))
    table = comparisons(FAKE, entries)
    pairs = [(v, "uvit") for v in SHIFT] + [("skip=add", "skip=none"), ("skip=add_linear", "skip=none"),
                                             ("skip=linear_add", "skip=none")]
    assert set(table) == set(pairs)                       # every model against U-ViT, the skip claims' pairs
    fid = lambda model: np.array([UVIT_FID[s] + (SHIFT[model][s] if model != "uvit" else 0) for s in range(3)])
    p = [stats.ttest_rel(fid(a), fid(b)).pvalue for a, b in pairs]
    m = study_size(FAKE)                                  # the whole study's family, run or not
    assert m == 13 > len(pairs)
    for (a, b), p_holm in zip(pairs, our_holm(p, m)):
        d = fid(a) - fid(b)
        lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
        s = table[(a, b)]["fid"]
        assert s["mean"] == pytest.approx(d.mean()) and (s["lo"], s["hi"]) == pytest.approx((lo, hi))
        assert s["p_holm"] == pytest.approx(p_holm) and s["m"] == m
        assert table[(a, b)]["accuracy"]["mean"] == pytest.approx(-d.mean())    # accuracy = 100 - FID
    adaln = table[("time_cond=adaln", "uvit")]["fid"]
    assert adaln["mean"] == pytest.approx(3.0) and adaln["half"] == pytest.approx(4.303 * math.sqrt(7) / math.sqrt(3),
                                                                                   rel=1e-3)
    words = {(r["claim"].a, r["claim"].b): r["word"] for r in claim_verdicts(FAKE, entries, table)}
    assert words == {
        ("skip=add", "skip=none"): "agrees",             # no better by 2 FID: the Bonferroni interval says so
        ("uvit", "skip=none"): "unresolved at this budget",
        ("skip=add_linear", "skip=none"): "unresolved at this budget",
        ("skip=linear_add", "skip=none"): "unresolved at this budget",
        ("uvit", "skip=add_linear"): "unresolved at this budget",
        ("uvit", "skip=linear_add"): "unresolved at this budget",
        ("uvit", "time_cond=adaln"): "unresolved at this budget",    # 3 FID, but 3 seeds this spread
        ("uvit", "pos_embed=sincos2d"): "disagrees",     # sincos2d is better, past the correction
        ("uvit", "pos_embed=none"): "agrees"}
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert holm([0.01, None, 0.04], m=4) == pytest.approx([0.04, None, 0.12])     # two of four not run yet


def test_the_report_of_a_fake_study_states_each_claim_with_its_interval_and_verdict(tmp_path):
    runs = fake_study(tmp_path)
    report.write_report(tmp_path, FAKE, runs)
    md = (tmp_path / "results.md").read_text()
    assert ("| 3.1 positions | learned 1-D positions beat 2-D sinusoidal ones | U-ViT vs pos_embed=sincos2d | "
            "+5.00 [") in md and "**disagrees** (Holm p = " in md
    assert "| 3.1 time | time as a token beats adaptive LayerNorm | U-ViT vs time_cond=adaln | −3.00 [" in md
    assert "study's 13 comparisons, 3 of them not run yet and counted as p = 1" in md and "seeds would resolve" in md
    # the sampling noise: U-ViT rescored 0.5 FID away each seed, so its sampling sd is 0.5/sqrt(2)
    assert f"FID: sampling sd {0.5 / math.sqrt(2):.2f} against a seed sd of 3.00" in md
    with Image.open(tmp_path / "differences.png") as im:
        assert im.size[0] > 600 and im.size[1] > 600


def test_seeds_needed_grows_as_the_spread_does():
    few, many = ablate.seeds_needed(2.0, 1.0, 10), ablate.seeds_needed(2.0, 3.0, 10)
    assert 2 <= few < many and ablate.seeds_needed(0.1, 10.0, 10) is None


# ----------------------------------------------------------------------------------------
# Budgets, --only, --list, refusals
# ----------------------------------------------------------------------------------------

def test_another_budget_in_the_same_folder_is_one_line_naming_the_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate_run, "_run_one", lambda *a, **k: None)        # record the study, train nothing
    monkeypatch.setitem(BUDGETS, "default", dataclasses.replace(TEST, steps=6))
    monkeypatch.setitem(BUDGETS, "quick", TEST)
    assert cli("ablate", "--quick", "--out", tmp_path, "--only", "uvit").exit_code == 0
    r = cli("ablate", "--out", tmp_path, "--only", "uvit")
    assert one_line(r) and "run with steps 4 (the quick budget: add --quick); asked for steps 6" in r.output
    with pytest.raises(ConfigError, match=r"batch_size 4, conv_init \"identity\" .*; asked for batch_size 8, "
                                          r"conv_init \"uniform\""):
        study(tmp_path, dataclasses.replace(TEST, batch_size=8, conv_init="uniform"))
    assert cli("ablate", "--quick", "--out", tmp_path, "--only", "conv").exit_code == 0   # same budget: fine
    saved = json.loads((tmp_path / "study.json").read_text())
    assert [r["folder"] for r in saved["runs"]] == ["uvit", "uvit-seed1", "conv-before", "conv-before-seed1",
                                                    "conv-none", "conv-none-seed1"]
    saved["recipe"]["lr"] = 1e-3                  # the same budget, but TrainConfig's defaults changed
    (tmp_path / "study.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"run with lr 0.001 .*; asked for lr 0.002"):
        study(tmp_path)
    (tmp_path / "study.json").write_text('{"budget": {"steps": 4')        # a hand edit gone wrong
    with pytest.raises(ConfigError, match="study.json is not readable JSON"):
        study(tmp_path)


def test_only_picks_choices_sweep_knobs_groups_and_models_and_refuses_others_in_one_line():
    quick = BUDGETS["quick"]
    assert parse_only(None) is None
    assert parse_only("skip,time") == {"skip=add", "skip=add_linear", "skip=linear_add", "skip=none",
                                       "time_cond=adaln"}
    assert parse_only(" pos , conv=none") == {"pos_embed=sincos2d", "pos_embed=none", "conv=none"}
    assert parse_only("depth") == {"depth=4", "depth=8"} and parse_only("width") == {"width=32", "width=128"}
    assert parse_only("patch_size,patch") == {"patch_size=2", "patch_size=7", "patch_embed=conv"}
    assert len(parse_only("sweep")) == 6 and len(parse_only("ablations")) == 10
    runs = plan_runs(quick, "conv=none")
    assert [r.folder for r in runs] == ["uvit", "uvit-seed1", "uvit-seed2", "conv-none", "conv-none-seed1",
                                        "conv-none-seed2"]
    assert [len(r.scores) for r in runs] == [2, 2, 2, 1, 1, 1]
    assert len(plan_runs(quick)) == 17 * 3
    for only in ("skip,bogus", ",", "skip=sideways"):
        r = cli("ablate", "--only", only, "--out", "unused")
        assert one_line(r) and "--only" in r.output, r.output
    r = cli("ablate", "--only", "skip,bogus", "--quick")
    assert "'bogus'" in r.output and "time (time_cond)" in r.output and "depth=8" in r.output


def test_list_prints_every_model_with_its_parameters_the_sweep_included():
    r = cli("ablate", "--list", "--quick")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 + 11 + 6 and "params (quick: tiny dim=64)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [m.name for m in study_models(BUDGETS["quick"])]
    assert "379,546" in lines[1] and "1,496,346" in lines[1]           # U-ViT: quick's model, and tiny
    assert [line.split()[0] for line in lines[12:]] == ["depth=4", "depth=8", "width=32", "width=128",
                                                       "patch_size=2", "patch_size=7"]
    rows = list_variants("quick")
    params = {r["name"]: r["params"] for r in rows}
    assert params["width=32"] < params["uvit"] == 379_546 < params["width=128"] and params["depth=4"] < params["uvit"]


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
    assert (quick.conv_init, quick.eval_every, quick.final_per_digit) == ("identity", 0, 200)
    assert len(BUDGETS["default"].seeds) >= 3
    cfg = quick.train_config(2, {"skip": "add"})
    assert cfg.seed == 2 and cfg.model_overrides == {"dim": 64, "skip": "add"} and cfg.lr == train_mod.TrainConfig.lr
    assert cfg.conv_init == "identity" and cfg.eval_every == 0
    for conv in ("before", "none"):      # no final conv to start as the identity
        assert quick.train_config(0, {"conv": conv}).model_config().conv_init == "uniform"
    for m in study_models(quick):
        quick.train_config(0, dict(m.overrides)).validate()
    for bad, words in ((dict(seeds=()), "seeds"), (dict(seeds=(0, 0)), "seeds"), (dict(steps=0), "--steps"),
                       (dict(final_per_digit=1), "final_per_digit"), (dict(model={"dim": 15}), "num_heads"),
                       (dict(conv_init="zeros"), "conv_init"), (dict(sweep={"depth": (4, 8)}), "around"),
                       (dict(sweep={"width": (8, 33)}), "num_heads"), (dict(sweep={"heads": (1, 4)}), "knobs")):
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
    assert ablate_run.train_seconds(rows) == 4.5 and ablate_run.train_seconds([]) == 0


def test_help_has_examples():
    r = cli("ablate", "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and "--only skip,time" in r.output
    assert "--pilot" in r.output and "--only sweep" in r.output and "--seeds 3-8" in r.output
    assert "--join runs/sweep" in r.output


def test_a_study_saved_before_newer_training_fields_still_matches_its_recipe():
    """A study.json written before noise_schedule, pos_init and conv_init existed resumes: its
    runs trained as those fields' SAVED_BEFORE values say, which is what the study still asks for
    (U-ViT's own init and the loss weight gamma = 5 the study first ran with, whatever
    train-mnist's default); a changed field is still refused."""
    from tinyuvit.model import INITS
    budget = dataclasses.replace(BUDGETS["quick"], conv_init="uniform")
    recipe = ablate_run._recipe(budget)
    assert recipe["pos_init"] == "normal" and budget.sample_config().guidance_interval == (0.0, float("inf"))
    assert recipe["snr_gamma"] == 5.0
    added_since = ("noise_schedule", "pos_init", "conv_init", "weak_at", "clip_loss")   # after the first studies
    assert set(added_since) <= set(SAVED_BEFORE)
    old = {k: v for k, v in recipe.items() if k not in added_since}
    old["model"] = {k: v for k, v in recipe["model"].items() if k not in INITS}
    ablate_run._check_same("study", from_saved(old), recipe)
    with pytest.raises(ConfigError, match="lr"):
        ablate_run._check_same("study", from_saved(dict(old, lr=1.0)), recipe)


def test_sweep_models_build_with_the_base_model_and_the_preset():
    quick = BUDGETS["quick"]
    base = quick.base_model()
    for m in study_models(quick)[11:]:
        cfg = get_config(quick.preset, **{**quick.model, **dict(m.overrides)})
        assert getattr(cfg, ablate.SWEEP[m.choice]) == m.value and cfg.img_size % cfg.patch_size == 0
        assert getattr(base, ablate.SWEEP[m.choice]) != m.value
