"""The paper's design study on MNIST: U-ViT against each one-change variant, and its scaling sweep.

Bao et al. (CVPR 2023) compare, in section 3.1, five design choices of U-ViT (the long skip,
how time enters, where the 3x3 conv sits, the patch embedding, the positions) and, in
section 3.2, its depth, width and patch size. Here every model trains with each of the budget's
seeds. A seed fixes the data order, the noise and the start of every layer by its name
(model.UViT, layers.KeyedRng), so a variant with seed s starts from U-ViT seed s's weights
wherever the two share a layer. Each variant is then compared with U-ViT seed by seed (paired):
the mean difference over the seeds, its 95% t-interval, and a p-value corrected by Holm's method
over all the comparisons of the study. A claim of the paper is *agreed* or *disagreed* with only
when its comparison survives that correction; otherwise it is *unresolved at this budget*, with
the seeds that would resolve it. U-ViT's runs are scored a second time with another sampling
seed, which measures how much of the seed spread is sampling noise.

    from tinyuvit.tools.ablate_run import run_study
    run_study("runs/ablate-quick", "quick", only="skip,time")
    tinyuvit ablate --quick --only skip,time          (the same, from the shell)
    tinyuvit ablate --quick --pilot                   U-ViT's seeds with and without the variance levers

A study folder holds:
    study.json        the budget, every seed and every run asked for (another budget is refused; more
                      seeds, from --seeds, join the study)
    results.md        the paper's claims with tinyuvit's verdicts, every model's paired difference
                      to U-ViT, the sampling noise, the pilot's spreads (if run), every run's scores
    differences.png   the paired mean difference to U-ViT with its 95% interval, accuracy and FID
    pilot.png         the pilot's scores: every seed, each rescored with a second sampling seed
    loss.png, learning.png, grids.png    loss curves, learning curves (if any), sample grids
    uvit/, uvit-seed1/, skip-add/, skip-add-seed1/, ...   one train-mnist run folder per run

This module says what a study is (budgets, models, runs) and what its scores say (the
statistics); tools/ablate_run.py trains and scores the runs, and tools/ablate_report.py writes
results.md and the figures. The report is redrawn after every finished run, so a study cut short
already shows what it has. Running the same study again resumes it: finished runs are kept, a
half-trained run continues from its checkpoint, a trained but unscored one is scored.
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from ..config import TrainConfig
from ..errors import ConfigError
from ..model import CHOICES, INITS, UViT, ablations, get_config
from ..sampling import SampleConfig
from .evaluate import check_count
from .runfolder import read_jsonl

# ----------------------------------------------------------------------------------------
# Budgets: how much every run of a study gets
# ----------------------------------------------------------------------------------------

# The paper's Sec. 3.2 sweep: each knob and the UViTConfig field it sets.
SWEEP = {"depth": "depth", "width": "dim", "patch_size": "patch_size"}


@dataclass(frozen=True)
class Budget:
    """One study's budget: the base model, the training steps and seeds, and how runs are scored.
    Every training setting not named here is TrainConfig's default (lr, schedule, EMA, ...)."""
    preset: str = "tiny"
    model: dict = dataclasses.field(default_factory=dict)   # overrides of the preset: the base model
    steps: int = 4000
    batch_size: int = 256
    seeds: tuple = (0, 1, 2)        # every model trains with each; the comparisons pair them
    conv_init: str = "uniform"      # the final conv's start (model.INITS), where the model has it
    eval_every: int = 0             # learning curves: class accuracy and FID every N steps (0 = none)
    eval_per_digit: int = 50        # ... from this many samples per digit
    final_per_digit: int = 500      # the final score: samples per digit (10x that in all)
    score_seed: int = 0             # the final score's sampling noise, the same for every run
    sampler: str = SampleConfig.sampler
    sample_steps: int = SampleConfig.steps
    guidance: float = 1.0           # U-ViT's sampling, whatever SampleConfig's default: studies stay comparable
    sweep: dict = dataclasses.field(default_factory=dict)   # {knob: (smaller, larger)} around the base model

    def train_config(self, seed=0, overrides=None):
        """The TrainConfig of one run: this budget, the seed, the model's overrides. The final
        conv starts as `conv_init` where the model has one (conv "after"), else as U-ViT's; an
        override "conv_init" (the pilot's other arm) replaces it."""
        model = {**self.model, **(overrides or {})}
        conv_init = model.pop("conv_init", self.conv_init if model.get("conv", "after") == "after" else "uniform")
        return TrainConfig(preset=self.preset, steps=self.steps, batch_size=self.batch_size, seed=seed,
                           pos_init="normal", conv_init=conv_init,      # U-ViT's own init (but the conv's),
                           noise_schedule="linear",                     # its schedule, as the paper's study,
                           snr_gamma=5.0, clip_loss="none",             # the loss it first ran with
                           weak_at=0.0,                                 # and its sampling: no autoguidance
                           model_overrides=model, sample_every=0,
                           eval_every=self.eval_every, eval_per_digit=self.eval_per_digit,
                           sampler=self.sampler, sample_steps=self.sample_steps, guidance=self.guidance)

    def sample_config(self):
        """Guided at every step, to the cleanest step, the last x0 only clipped, whatever
        SampleConfig's default interval, final sigma and ink percentile: studies stay comparable."""
        return SampleConfig(sampler=self.sampler, steps=self.sample_steps, guidance=self.guidance,
                            guidance_interval=(0.0, float("inf")), final_sigma=0.0, ink_percentile=0.0)

    def base_model(self):
        """The base model's UViTConfig (U-ViT under this budget)."""
        return get_config(self.preset, **self.model)

    def validate(self):
        """ConfigError naming the first invalid field."""
        seeds = self.seeds
        if not isinstance(seeds, (tuple, list)) or not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"budget seeds must be one or more different seeds, got {seeds!r}")
        for s in seeds:
            check_count("budget seed", s, 0)
        check_count("budget final_per_digit", self.final_per_digit, 2)
        check_count("budget score_seed", self.score_seed, 0)
        if self.conv_init not in INITS["conv_init"]:
            raise ConfigError(f"budget conv_init must be one of {INITS['conv_init']}, got {self.conv_init!r}")
        try:
            self.train_config(seeds[0]).validate()
            self._check_sweep()
        except ValueError as e:       # model config fields: ValueError from UViTConfig
            raise ConfigError(f"budget: {e}") from None
        return self

    def _check_sweep(self):
        """ValueError unless every sweep knob has (smaller, larger) values around the base model
        that build (UViTConfig's checks)."""
        base = self.base_model()
        for knob, values in self.sweep.items():
            if knob not in SWEEP:
                raise ValueError(f"sweep knobs are {', '.join(SWEEP)}, got {knob!r}")
            here = getattr(base, SWEEP[knob])
            if len(values) != 2 or not values[0] < here < values[1]:
                raise ValueError(f"sweep {knob} must be (smaller, larger) around the base model's {here}, "
                                 f"got {tuple(values)}")
            for v in values:
                get_config(self.preset, **{**self.model, SWEEP[knob]: v})

    def to_dict(self):
        """The budget as JSON would hold it (study.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d):
        """The Budget that to_dict wrote (lists back to tuples)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["seeds"] = tuple(d.get("seeds", ()))
        d["sweep"] = {k: tuple(v) for k, v in d.get("sweep", {}).items()}
        return cls(**d)

    def describe(self):
        """ "tiny (dim=64), 2,500 steps of 64 images" for messages and the results' header."""
        model = ", ".join(f"{k}={v}" for k, v in self.model.items())
        return f"{self.preset}{f' ({model})' if model else ''}, {self.steps:,} steps of {self.batch_size} images"


# Every number of a study in one table.
# quick: a 2-core CPU. The levers that lower the seed spread without changing the network: the
# final conv starts as the identity (a random start left all three pilot runs on a loss plateau,
# FID 26.9 against 13.9), no learning curves (they change no weight, only cost time), and 2,000
# samples per score instead of 1,000 (sampling sd of FID 0.29 instead of 0.61). Measured
# (`--pilot`, README): 5.0-5.6 min of training a run and 72 s a score on a slow day of this
# VM, so about 3.6 hours for the 33 runs of the eleven models (2.4 on a fast day, when the
# default run takes 25 min instead of 37.5) and about as long again for the sweep, whose
# patch_size=2 alone trains 30 min a run.
# default: meant for a GPU. 14 seeds: what the pilot's spread (FID sd 1.1 at 2,000 samples,
# quick's) needs for 80% power to find 2 FID after Holm over the study's 19 comparisons, if
# paired differences spread as two independent runs do (see results.md's pilot section).
BUDGETS = {
    "quick": Budget(preset="tiny", model=dict(dim=64), steps=2500, batch_size=64, seeds=(0, 1, 2),
                    conv_init="identity", eval_every=0, eval_per_digit=20, final_per_digit=200,
                    sweep=dict(depth=(4, 8), width=(32, 128), patch_size=(2, 7))),
    "default": Budget(preset="tiny", steps=4000, batch_size=256, seeds=tuple(range(14)),
                      conv_init="identity", eval_every=1000, eval_per_digit=50, final_per_digit=500,
                      sweep=dict(depth=(4, 8), width=(64, 256), patch_size=(2, 7))),
}


def get_budget(budget):
    """A Budget from its name in BUDGETS (or the Budget itself), checked."""
    if isinstance(budget, Budget):
        return budget.validate()
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)} or pass a Budget")
    return BUDGETS[budget].validate()


def budget_name(budget):
    """The name of a budget (a Budget or its dict) in BUDGETS, or None. The seeds do not count:
    the quick budget with other seeds (--seeds) is still the quick budget."""
    d = budget.to_dict() if isinstance(budget, Budget) else budget
    return next((name for name, b in BUDGETS.items() if but_seeds(b.to_dict()) == but_seeds(d)), None)


def but_seeds(d):
    """A budget's dict without its seeds: what two parts of one study share."""
    return {k: v for k, v in d.items() if k != "seeds"}


def parse_seeds(spec):
    """The training seeds that --seeds names, in order: "0-5" (both ends in), "3,4,5", "0-2,7".
    ConfigError for anything else."""
    seeds = []
    for word in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", word)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ConfigError(f"--seeds {spec!r} is not a list of seeds; write them as 0-5, 3,4,5 or 0-2,7")
        seeds += range(int(m[1]), int(m[2] if m[2] is not None else m[1]) + 1)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {spec!r} names a seed twice; name each once")
    return tuple(seeds)


def with_seeds(budget, seeds):
    """`budget` (a name or a Budget) with other training seeds: a tuple, or a spec for parse_seeds."""
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else tuple(seeds)
    return dataclasses.replace(get_budget(budget), seeds=seeds).validate()


# ----------------------------------------------------------------------------------------
# The models and runs of a study
# ----------------------------------------------------------------------------------------

# Short names that --only accepts (as in `--only skip,time`).
ALIASES = {"time": "time_cond", "patch": "patch_embed", "pos": "pos_embed"}
GROUPS = {"ablations": tuple(CHOICES), "sweep": tuple(SWEEP)}    # --only ablations, --only sweep

# The pilot scores every run at the budget's sample count and at this one (the first quick budget's).
PILOT_FEWER = 100


@dataclass(frozen=True)
class Model:
    """One model of a study: U-ViT, a one-change variant (Sec. 3.1) or a sweep entry (Sec. 3.2)."""
    name: str               # "uvit", "skip=add", "depth=8", ...
    choice: str = None      # the choice or sweep knob it changes (None for U-ViT)
    value: object = None
    overrides: tuple = ()   # the model overrides as (field, value) pairs


def study_models(budget):
    """U-ViT, then every variant of model.ablations(), then the budget's sweep entries."""
    out = [Model(name, choice, overrides.get(choice), tuple(overrides.items()))
           for name, choice, overrides in ablations()]
    for knob, values in budget.sweep.items():
        out += [Model(f"{knob}={v}", knob, v, ((SWEEP[knob], v),)) for v in values]
    return out


def pilot_arm(budget):
    """The pilot's other arm: U-ViT with the other start of the final conv."""
    other = next(v for v in INITS["conv_init"] if v != budget.conv_init)
    return Model(f"conv_init={other}", "conv_init", other, (("conv_init", other),))


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: one model with one seed, in its own folder, and the scores it needs
    as (samples per digit, sampling seed) pairs, the study's own score first."""
    model: Model
    seed: int = 0
    scores: tuple = ()

    @property
    def variant(self):
        return self.model.name

    @property
    def folder(self):
        """A file-system safe folder name: uvit, uvit-seed1, skip-add, skip-add-seed2."""
        name = self.model.name + (f"-seed{self.seed}" if self.seed else "")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name)

    @property
    def label(self):
        """How logs and tables name it: "U-ViT (seed 1)", "skip=add (seed 0)"."""
        return f"{'U-ViT' if self.variant == 'uvit' else self.variant} (seed {self.seed})"


def plan_runs(budget, only=None, pilot=False):
    """The runs of a study, model by model (all seeds of a model together, U-ViT's first), so a
    study cut short has whole models. U-ViT is scored twice (the second time with the next
    sampling seed: the sampling noise). `pilot`: U-ViT's seeds with and without the levers."""
    main = (budget.final_per_digit, budget.score_seed)
    if pilot:
        if only is not None:
            raise ConfigError("--pilot runs U-ViT's seeds only; leave out --only")
        fewer = min(PILOT_FEWER, budget.final_per_digit)
        scores = tuple(dict.fromkeys([main, (main[0], main[1] + 1), (fewer, main[1]), (fewer, main[1] + 1)]))
        return [StudyRun(m, s, scores) for m in (study_models(budget)[0], pilot_arm(budget)) for s in budget.seeds]
    picked = parse_only(only, budget)
    runs = []
    for m in study_models(budget):
        if m.name == "uvit" or picked is None or m.name in picked:
            scores = (main, (main[0], main[1] + 1)) if m.name == "uvit" else (main,)
            runs += [StudyRun(m, s, scores) for s in budget.seeds]
    return runs


def parse_only(only, budget=None):
    """The model names that `only` (a comma list of choices, sweep knobs, their aliases, the
    groups "ablations" and "sweep", and model names) picks, or None for all. ConfigError for a
    name that is none of these."""
    if only is None:
        return None
    budget = get_budget("quick") if budget is None else budget
    models = {m.name: m.choice for m in study_models(budget)[1:]}
    words = [w.strip() for w in str(only).split(",") if w.strip()]
    if not words:
        raise ConfigError(f"--only names no choice or variant: {only!r}")
    picked = set()
    for word in words:
        choices = GROUPS.get(word, (ALIASES.get(word, word),))
        if all(c in CHOICES or c in budget.sweep for c in choices):
            picked |= {name for name, c in models.items() if c in choices}
        elif word in models:
            picked.add(word)
        elif word != "uvit":
            aliases = ", ".join(f"{a} ({c})" for a, c in ALIASES.items())
            raise ConfigError(f"--only: unknown name {word!r}; choose from the choices {', '.join(CHOICES)} "
                              f"(short: {aliases}), the sweep {', '.join(budget.sweep) or '(none)'}, the groups "
                              f"{', '.join(GROUPS)}, or the models {', '.join(models)}")
    return picked


def count_params(preset, overrides, value=None):
    """Parameters of U-ViT `preset` with `overrides`, or None when the variant `value` is not
    built in the network yet (building it raises NotImplementedError, or a ValueError naming the
    value). Any other error is a real one and is raised."""
    try:
        return UViT(get_config(preset, **overrides)).num_params()
    except NotImplementedError:
        return None
    except ValueError as e:
        if value is not None and repr(value) in str(e):
            return None
        raise


def list_variants(budget="quick"):
    """[dict(name, choice, value, params, params_tiny)] for U-ViT, every variant and the sweep:
    parameters in the budget's base model and in the tiny preset (None: not built yet)."""
    budget = get_budget(budget)
    rows = []
    for m in study_models(budget):
        overrides = dict(m.overrides)
        rows.append(dict(name=m.name, choice=m.choice, value=m.value,
                         params=count_params(budget.preset, {**budget.model, **overrides}, m.value),
                         params_tiny=count_params("tiny", overrides, m.value)))
    return rows


def check_built(budget, runs):
    """ConfigError before any training if a variant asked for is not built in the network yet."""
    missing = sorted({r.variant for r in runs if r.model.value is not None and r.model.choice in CHOICES and
                      count_params(budget.preset, {**budget.model, **dict(r.model.overrides)}, r.model.value) is None})
    if missing:
        raise ConfigError(f"not built in the network yet: {', '.join(missing)}; leave them out with --only "
                          "(see `tinyuvit ablate --list`)")


def all_runs(budget):
    """Every run a study with `budget` can hold, in study order: the study's, then the pilot's
    other arm (its scores: the study's defaults; study.json records those asked for)."""
    study = plan_runs(budget)
    folders = {r.folder for r in study}
    return study + [r for r in plan_runs(budget, pilot=True) if r.folder not in folders]


def saved_study(out_dir):
    """(budget, runs) of the study that `out_dir/study.json` records."""
    study = read_json(os.path.join(out_dir, "study.json"))
    if study is None:
        raise ConfigError(f"{out_dir} holds no study (no study.json)")
    budget = Budget.from_dict(study["budget"])
    scores = {r["folder"]: tuple(tuple(s) for s in r.get("scores", [])) for r in study["runs"]}
    return budget, [dataclasses.replace(r, scores=scores[r.folder] or r.scores) for r in all_runs(budget)
                    if r.folder in scores]


def read_json(path):
    """The JSON in `path`, None if there is no such file; ConfigError if it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); delete it to redo what it records") from None


def read_results(out_dir, runs):
    """The result.json of each run that has one."""
    found = [read_json(os.path.join(out_dir, r.folder, "result.json")) for r in runs]
    return [r for r in found if r is not None]


# ----------------------------------------------------------------------------------------
# Reading a study back: each run's scores
# ----------------------------------------------------------------------------------------

class Entry:
    """One run's files, as the statistics and the report read them: result.json (its scores),
    metrics.jsonl and evals.jsonl (read when first asked for)."""

    def __init__(self, run, folder):
        self.run, self.folder = run, folder
        self.result = read_json(os.path.join(folder, "result.json"))
        self.ok = bool(self.result) and self.result["status"] == "ok"
        self._rows = self._evals = None

    @property
    def rows(self):
        if self._rows is None:
            self._rows = read_jsonl(os.path.join(self.folder, "metrics.jsonl"))
        return self._rows

    @property
    def evals(self):
        if self._evals is None:
            self._evals = read_jsonl(os.path.join(self.folder, "evals.jsonl"))
        return self._evals

    def score(self, metric, per_digit=None, seed=None):
        """Class accuracy (in %) or FID of the study's own score, or of the score with
        `per_digit` samples per digit and sampling seed `seed`; None if there is none."""
        if not self.ok:
            return None
        found = self.result if per_digit is None else next(
            (s for s in self.result.get("scores", []) if (s["per_digit"], s["seed"]) == (per_digit, seed)), None)
        if found is None:
            return None
        return 100 * found["class_accuracy"] if metric == "accuracy" else found["fid"]


def read_entries(out_dir, runs):
    """An Entry for each run, read from its folder in `out_dir`."""
    return [Entry(r, os.path.join(out_dir, r.folder)) for r in runs]


def by_seed(entries, model, metric, per_digit=None, seed=None):
    """{training seed: score} of `model`'s finished runs (see Entry.score)."""
    out = {}
    for e in entries:
        if e.run.variant == model and e.ok:
            v = e.score(metric, per_digit, seed)
            if v is not None:
                out[e.run.seed] = v
    return out


# ----------------------------------------------------------------------------------------
# The statistics: paired differences, Holm's correction, a verdict per claim
# ----------------------------------------------------------------------------------------

METRICS = ("accuracy", "fid")
ALPHA = 0.05            # the family-wise error rate of the study's verdicts
POWER = 0.8             # ... and the power a budget is sized for
# The differences the quick budget is meant to resolve (issue 31), and the margin within which
# a claim that one model "adds nothing" over another counts as agreed.
TARGET = {"accuracy": 3.0, "fid": 2.0}
MOST_SEEDS = 100        # seeds_needed says "more than this" beyond it


@dataclass(frozen=True)
class Claim:
    """One finding of the paper as a paired comparison on FID (the paper's measure): `a` is
    better than `b` (expect "better"), or `a` is no better than `b` (expect "no better")."""
    section: str
    words: str              # the paper's finding, in its words
    a: str
    b: str
    expect: str = "better"


# Sec. 3.1, CIFAR-10, U-ViT-S/2, FID of 10K samples, one run per variant (UVIT-FACTS.md)
CLAIMS = (
    Claim("3.1 long skip", "adding h_m + h_s directly gives no benefit over no long skip",
          "skip=add", "skip=none", "no better"),
    Claim("3.1 long skip", "Linear(Concat(h_m, h_s)) improves on no long skip", "uvit", "skip=none"),
    Claim("3.1 long skip", "h_m + Linear(h_s) improves on no long skip", "skip=add_linear", "skip=none"),
    Claim("3.1 long skip", "Linear(h_m + h_s) improves on no long skip", "skip=linear_add", "skip=none"),
    Claim("3.1 long skip", "the concatenation is the best of them: beats h_m + Linear(h_s)",
          "uvit", "skip=add_linear"),
    Claim("3.1 long skip", "the concatenation is the best of them: beats Linear(h_m + h_s)",
          "uvit", "skip=linear_add"),
    Claim("3.1 time", "time as a token beats adaptive LayerNorm", "uvit", "time_cond=adaln"),
    Claim("3.1 3x3 conv", "a 3x3 conv after the linear decoder is slightly better than one before it",
          "uvit", "conv=before"),
    Claim("3.1 3x3 conv", "a 3x3 conv after the linear decoder is slightly better than none", "uvit", "conv=none"),
    Claim("3.1 patch embedding", "a linear patch embedding beats 3x3 conv blocks followed by a 1x1 conv",
          "uvit", "patch_embed=conv"),
    Claim("3.1 positions", "learned 1-D positions beat 2-D sinusoidal ones", "uvit", "pos_embed=sincos2d"),
    Claim("3.1 positions", "without any positions the samples are not plausible", "uvit", "pos_embed=none"),
)


def sweep_claims(budget):
    """Sec. 3.2's findings (CIFAR-10, depth 9/13/17 blocks, width 256/512/768, patch 8/4/2/1 at
    32x32) as claims on the budget's sweep: the smaller value, U-ViT, the larger value."""
    s, out = budget.sweep, []
    if "depth" in s:
        out += [Claim("3.2 depth", "more blocks help (9 → 13)", "uvit", f"depth={s['depth'][0]}"),
                Claim("3.2 depth", "more blocks beyond that add nothing (13 → 17)",
                      f"depth={s['depth'][1]}", "uvit", "no better")]
    if "width" in s:
        out += [Claim("3.2 width", "a wider model helps (256 → 512)", "uvit", f"width={s['width'][0]}"),
                Claim("3.2 width", "wider beyond that adds nothing (512 → 768)",
                      f"width={s['width'][1]}", "uvit", "no better")]
    if "patch_size" in s:
        out += [Claim("3.2 patch size", "a smaller patch helps (8 → 4)", "uvit", f"patch_size={s['patch_size'][1]}"),
                Claim("3.2 patch size", "a smaller patch helps (4 → 2)", f"patch_size={s['patch_size'][0]}", "uvit")]
    return out


def paired(a, b):
    """The paired difference a - b over the seeds both have ({seed: value} each): dict(seeds,
    diffs, n, mean, sd, half (of the 95% t-interval), lo, hi, p (two-sided t-test of no
    difference)); sd, interval and p are None below two seeds."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n = len(d)
    out = dict(seeds=seeds, diffs=d.tolist(), n=n, mean=float(d.mean()) if n else None,
               sd=None, half=None, lo=None, hi=None, p=None)
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(out["mean"]) / se, n - 1)) if se > 0 else float(out["mean"] == 0)
    return dict(out, sd=sd, half=half, lo=out["mean"] - half, hi=out["mean"] + half, p=p)


def holm(pvalues, m=None):
    """Holm's step-down adjusted p-values, in the order given (None stays None): the k-th smallest
    of m is multiplied by m - k + 1, then made non-decreasing. `m`: the size of the whole family
    when some of it is not tested yet (as if the rest had p = 1), so that a verdict drawn from
    part of a study still holds for all of it; by default the p-values given."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = max(m or 0, len(tested)), [None] * len(pvalues), 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def bonferroni_interval(stat, m):
    """(lo, hi): the paired difference's t-interval at level ALPHA / m, two-sided (None below two seeds)."""
    from scipy import stats
    if stat["sd"] is None:
        return None
    half = float(stats.t.ppf(1 - ALPHA / (2 * m), stat["n"] - 1)) * stat["sd"] / math.sqrt(stat["n"])
    return stat["mean"] - half, stat["mean"] + half


def seeds_needed(delta, sd, m, power=POWER):
    """The seeds for `power` to find a true paired difference `delta` whose differences spread
    `sd` (two-sided t-test at ALPHA / m: Bonferroni, which Holm is never stricter than); None if
    more than MOST_SEEDS."""
    from scipy import stats
    if not sd:
        return 2
    for n in range(2, MOST_SEEDS + 1):
        df, nc = n - 1, abs(delta) * math.sqrt(n) / sd
        crit = stats.t.ppf(1 - ALPHA / (2 * m), df)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return n
    return None


def comparisons(budget, entries):
    """Every paired comparison of the study, per metric: each model against U-ViT (model - U-ViT)
    and each claim's pair between two variants, with Holm's adjusted p over all of them (one
    family per metric: the whole study's study_size(budget) comparisons, run or not yet, so a
    study cut short claims no more than the finished one could). -> {(a, b): {metric: stat}}
    for the pairs whose models have results."""
    done = {e.run.variant for e in entries if e.ok}
    pairs = [(m.name, "uvit") for m in study_models(budget)[1:] if m.name in done and "uvit" in done]
    for c in CLAIMS + tuple(sweep_claims(budget)):
        if {c.a, c.b} <= done and (c.a, c.b) not in pairs and (c.b, c.a) not in pairs:
            pairs.append((c.a, c.b))
    out = {pair: {} for pair in pairs}
    for metric in METRICS:
        stats = [paired(by_seed(entries, a, metric), by_seed(entries, b, metric)) for a, b in pairs]
        m = max(study_size(budget), sum(s["p"] is not None for s in stats))
        for pair, s, p in zip(pairs, stats, holm([s["p"] for s in stats], m)):
            out[pair][metric] = dict(s, p_holm=p, m=m)
    return out


def oriented(table, a, b):
    """The stats of a - b from a comparisons() table, whichever way round the pair is stored."""
    if (a, b) in table:
        return table[(a, b)]
    flip = lambda s: dict(s, diffs=[-d for d in s["diffs"]], mean=None if s["mean"] is None else -s["mean"],
                          lo=None if s["hi"] is None else -s["hi"], hi=None if s["lo"] is None else -s["lo"])
    return {metric: flip(s) for metric, s in table[(b, a)].items()}


def verdict(claim, fid):
    """(word, why) for a claim from the paired FID difference a - b (below 0: a is better).

    "better": agrees / disagrees when the difference survives Holm's correction, in the claimed
    direction or against it. "no better": disagrees when a is better after the correction; agrees
    when a is worse after it, or when the Bonferroni interval rules out a being better by
    TARGET["fid"] or more. Everything else is unresolved, with the seeds that would resolve it.
    """
    if fid["p"] is None:
        return "unresolved at this budget", "fewer than two paired seeds"
    significant, a_better = fid["p_holm"] < ALPHA, fid["mean"] < 0
    holm_p = f"Holm p = {fid['p_holm']:.2g}"
    if significant and claim.expect == "better":
        return ("agrees" if a_better else "disagrees"), holm_p
    if significant:
        return ("disagrees" if a_better else "agrees"), holm_p
    lo, hi = bonferroni_interval(fid, fid["m"])
    interval = f"Bonferroni interval [{lo:.2f}, {hi:.2f}]".replace("-", "\u2212")
    if claim.expect == "no better" and lo > -TARGET["fid"]:
        return "agrees", f"{holm_p}; not better by {TARGET['fid']:g} FID or more: {interval}"
    if -TARGET["fid"] < lo and hi < TARGET["fid"]:      # small either way: how many seeds for one this small
        n = seeds_needed(fid["mean"], fid["sd"], fid["m"])
        return "unresolved at this budget", (f"{holm_p}; no difference of {TARGET['fid']:g} FID or more either "
                                             f"way ({interval}); one of {abs(fid['mean']):.2f} would need "
                                             + (f"about {n} seeds" if n else f"more than {MOST_SEEDS} seeds"))
    delta = max(abs(fid["mean"]), TARGET["fid"])
    n = seeds_needed(delta, fid["sd"], fid["m"])
    return "unresolved at this budget", (f"{holm_p}; " + (f"about {n} seeds" if n else
                                                         f"more than {MOST_SEEDS} seeds") +
                                         f" would resolve a difference of {delta:.1f} FID")


def claim_verdicts(budget, entries, table=None):
    """[dict(claim, accuracy, fid, word, why)] for every claim whose two models have results:
    the stats of a - b (accuracy: above 0, a better; FID: below 0, a better) and the verdict."""
    table = comparisons(budget, entries) if table is None else table
    out = []
    for c in CLAIMS + tuple(sweep_claims(budget)):
        if (c.a, c.b) in table or (c.b, c.a) in table:
            s = oriented(table, c.a, c.b)
            word, why = verdict(c, s["fid"])
            out.append(dict(claim=c, accuracy=s["accuracy"], fid=s["fid"], word=word, why=why))
    return out


def sampling_noise(entries, model, per_digit, score_seed):
    """How much of `model`'s seed spread is sampling noise: from its runs scored with sampling
    seeds score_seed and score_seed + 1 at `per_digit`. -> {metric: dict(runs, sampling_sd,
    seed_sd, share)} (share: the sampling variance over the seed variance), or None without two
    such runs. A score's sampling variance is half the mean square of its two scores' difference."""
    out = {}
    for metric in METRICS:
        first = by_seed(entries, model, metric, per_digit, score_seed)
        second = by_seed(entries, model, metric, per_digit, score_seed + 1)
        seeds = sorted(set(first) & set(second))
        if len(seeds) < 2:
            return None
        d = np.array([second[s] - first[s] for s in seeds])
        sampling_var = float(np.mean(d * d) / 2)
        seed_var = float(np.var([first[s] for s in seeds], ddof=1))
        out[metric] = dict(runs=len(seeds), sampling_sd=math.sqrt(sampling_var), seed_sd=math.sqrt(seed_var),
                           share=sampling_var / seed_var if seed_var > 0 else None)
    return out


def spread(entries, model, metric, per_digit=None, seed=None):
    """dict(values {seed: score}, mean, sd) of one model's runs at one score (None without runs)."""
    v = by_seed(entries, model, metric, per_digit, seed)
    if not v:
        return None
    x = np.array(list(v.values()))
    return dict(values=v, mean=float(x.mean()), sd=float(x.std(ddof=1)) if len(x) > 1 else None)


def study_size(budget):
    """The number of comparisons of the whole study (every model against U-ViT, and the claims
    between two variants): the m that Holm's correction divides by when everything has run."""
    pairs = {(m.name, "uvit") for m in study_models(budget)[1:]}
    for c in CLAIMS + tuple(sweep_claims(budget)):
        if (c.b, c.a) not in pairs:
            pairs.add((c.a, c.b))
    return len(pairs)


def pilot_spreads(budget, entries):
    """The pilot's measure of each lever: for U-ViT with each start of the final conv and each
    sample count, the spread over the training seeds, the sampling noise, and the seeds the
    whole study would need to resolve TARGET if paired differences spread sqrt(2) times the
    seed spread (two independent runs; pairing can only help). -> [dict(model, conv_init,
    per_digit, accuracy, fid, noise, needed)] for the arms with runs."""
    m_all = study_size(budget)
    arms = [("uvit", budget.conv_init), (pilot_arm(budget).name, pilot_arm(budget).value)]
    counts = sorted({budget.final_per_digit, min(PILOT_FEWER, budget.final_per_digit)}, reverse=True)
    out = []
    for model, conv_init in arms:
        for per_digit in counts:
            s = {metric: spread(entries, model, metric, per_digit, budget.score_seed) for metric in METRICS}
            if s["fid"] is None:
                continue
            needed = {metric: seeds_needed(TARGET[metric], math.sqrt(2) * s[metric]["sd"], m_all)
                      if s[metric]["sd"] is not None else None for metric in METRICS}
            out.append(dict(model=model, conv_init=conv_init, per_digit=per_digit, accuracy=s["accuracy"],
                            fid=s["fid"], noise=sampling_noise(entries, model, per_digit, budget.score_seed),
                            needed=needed))
    return out


# ----------------------------------------------------------------------------------------
# Text for the command line
# ----------------------------------------------------------------------------------------

def format_variants(rows, budget):
    """`tinyuvit ablate --list`: one line per model with its parameter counts."""
    b = get_budget(budget)
    name = budget_name(b) or "this budget"
    model = ", ".join(f"{k}={v}" for k, v in b.model.items())
    head = f"params ({name}: {b.preset}{' ' + model if model else ''})"
    fmt = lambda p: "not built" if p is None else f"{p:,}"
    lines = [f"{'variant':22s} {'choice':12s} {head:>30s} {'params (tiny)':>15s}"]
    for r in rows:
        lines.append(f"{r['name']:22s} {r['choice'] or '(all first)':12s} {fmt(r['params']):>30s} "
                     f"{fmt(r['params_tiny']):>15s}")
    return "\n".join(lines)
