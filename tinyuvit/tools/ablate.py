"""The paper's ablation study on MNIST: U-ViT against each of its one-change variants.

Bao et al. (CVPR 2023, section 3) compare five design choices of U-ViT: the long skip, how time
enters, where the 3x3 conv sits, the patch embedding and the position embedding. Here every
variant of model.ablations() trains with the same budget, seed, data order and recipe, and is
scored the same way; U-ViT itself trains with several seeds, so that its seed spread shows which
differences are larger than noise.

    from tinyuvit.tools.ablate import run_study
    run_study("runs/ablate-quick", "quick", only="skip,time")
    tinyuvit ablate --quick --only skip,time                    (the same, from the shell)

A study folder holds:
    study.json      the budget and the runs asked for (another budget in the same folder is refused)
    results.md      the table: parameters, class accuracy, FID, FID floor, training time
    scores.png      class accuracy and FID per variant, grouped by choice, against U-ViT's seeds
    loss.png        smoothed training loss, one panel per choice
    learning.png    class accuracy and FID during training, one panel per choice
    grids.png       every run's final 10x10 sample grid, labelled
    uvit/, uvit-seed1/, skip-add/, ...   one train-mnist run folder per run, plus its result.json

Everything in the folder but the run folders is redrawn after every finished run, so a study
cut short already shows what it has. Running the same study again resumes it: finished runs are
kept, a half-trained run continues from its checkpoint, a trained but unscored one is scored.
"""
import contextlib
import dataclasses
import json
import os
import re
import signal
import time
from dataclasses import dataclass

import numpy as np

from .checkpoint import checkpoint_step
from ..sampling import SampleConfig
from ..errors import ConfigError, DivergedError
from .evaluate import check_count
from .files import RunLock, atomic_write
from ..model import CHOICES, UViT, ablations, get_config
from ..config import TrainConfig, from_saved
from ..train import train
from .runfolder import StopSignals, read_jsonl

# ----------------------------------------------------------------------------------------
# Budgets: how much every run of a study gets
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """One study's budget: the base model, the training steps and seeds, and how runs are scored.
    Every training setting not named here is TrainConfig's default (lr, schedule, EMA, ...)."""
    preset: str = "tiny"
    model: dict = dataclasses.field(default_factory=dict)   # overrides of the preset: the base model
    steps: int = 4000
    batch_size: int = 256
    seeds: tuple = (0, 1, 2)        # U-ViT's runs; every variant trains with seeds[0]
    eval_every: int = 1000          # learning curves: class accuracy and FID every N steps (0 = none)
    eval_per_digit: int = 50        # ... from this many samples per digit
    final_per_digit: int = 500      # the final score: samples per digit (10x that in all)
    score_seed: int = 0             # the final score's sampling noise, the same for every run
    sampler: str = SampleConfig.sampler
    sample_steps: int = SampleConfig.steps
    guidance: float = 1.0           # U-ViT's sampling, whatever SampleConfig's default: studies stay comparable

    def train_config(self, seed=0, overrides=None):
        """The TrainConfig of one run: this budget, the seed, the variant's model overrides."""
        return TrainConfig(preset=self.preset, steps=self.steps, batch_size=self.batch_size, seed=seed,
                           pos_init="normal", conv_init="uniform",      # U-ViT's own init and schedule,
                           noise_schedule="linear",                     # as the paper's study,
                           snr_gamma=5.0, clip_loss="none",             # the loss it first ran with
                           weak_at=0.0,                                 # and its sampling: no autoguidance
                           model_overrides={**self.model, **(overrides or {})}, sample_every=0,
                           eval_every=self.eval_every, eval_per_digit=self.eval_per_digit,
                           sampler=self.sampler, sample_steps=self.sample_steps, guidance=self.guidance)

    def sample_config(self):
        """Guided at every step, to the cleanest step, the last x0 only clipped, whatever
        SampleConfig's default interval, final sigma and ink percentile: studies stay comparable."""
        return SampleConfig(sampler=self.sampler, steps=self.sample_steps, guidance=self.guidance,
                            guidance_interval=(0.0, float("inf")), final_sigma=0.0, ink_percentile=0.0)

    def validate(self):
        """ConfigError naming the first invalid field."""
        seeds = self.seeds
        if not isinstance(seeds, (tuple, list)) or not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"budget seeds must be one or more different seeds, got {seeds!r}")
        for s in seeds:
            check_count("budget seed", s, 0)
        check_count("budget final_per_digit", self.final_per_digit, 2)
        check_count("budget score_seed", self.score_seed, 0)
        try:
            self.train_config(seeds[0]).validate()
        except ValueError as e:       # model config fields: ValueError from UViTConfig
            raise ConfigError(f"budget: {e}") from None
        return self

    def to_dict(self):
        """The budget as JSON would hold it (study.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def describe(self):
        """ "tiny (dim=64), 2,500 steps of 64 images" for messages and the results' header."""
        model = ", ".join(f"{k}={v}" for k, v in self.model.items())
        return f"{self.preset}{f' ({model})' if model else ''}, {self.steps:,} steps of {self.batch_size} images"


# Every number of a study in one table. quick: a 2-core CPU, about 4.7 min a run and an hour for
# the 13 runs when the machine is otherwise idle (measured); default: meant for a GPU.
BUDGETS = {
    "quick": Budget(preset="tiny", model=dict(dim=64), steps=2500, batch_size=64, seeds=(0, 1, 2),
                    eval_every=625, eval_per_digit=20, final_per_digit=100),
    "default": Budget(preset="tiny", steps=4000, batch_size=256, seeds=(0, 1, 2),
                      eval_every=1000, eval_per_digit=50, final_per_digit=500),
}


def get_budget(budget):
    """A Budget from its name in BUDGETS (or the Budget itself), checked."""
    if isinstance(budget, Budget):
        return budget.validate()
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)} or pass a Budget")
    return BUDGETS[budget].validate()


def budget_name(budget):
    """The name of a budget (a Budget or its dict) in BUDGETS, or None."""
    d = budget.to_dict() if isinstance(budget, Budget) else budget
    return next((name for name, b in BUDGETS.items() if b.to_dict() == d), None)


# ----------------------------------------------------------------------------------------
# The runs of a study
# ----------------------------------------------------------------------------------------

# Short names that --only accepts for the choices (as in `--only skip,time`).
ALIASES = {"time": "time_cond", "patch": "patch_embed", "pos": "pos_embed"}


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: U-ViT or one of its variants, with one seed, in its own folder."""
    variant: str            # "uvit", "skip=add", ...
    choice: str = None      # the choice it changes (None for U-ViT)
    value: str = None
    seed: int = 0
    overrides: tuple = ()   # the model overrides as (field, value) pairs

    @property
    def folder(self):
        """A file-system safe folder name: uvit, uvit-seed1, skip-add, time_cond-adaln."""
        name = self.variant + (f"-seed{self.seed}" if self.variant == "uvit" and self.seed else "")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name)

    @property
    def label(self):
        """How tables and figures name it: "U-ViT (seed 1)", "skip=add"."""
        return f"U-ViT (seed {self.seed})" if self.variant == "uvit" else self.variant


def plan_runs(budget, only=None):
    """The runs of a study, in order: U-ViT with each of the budget's seeds, then the variants
    (those that `only` picks, or all) with the first seed."""
    picked = parse_only(only)
    runs = [StudyRun("uvit", seed=s) for s in budget.seeds]
    for name, choice, overrides in ablations()[1:]:
        if picked is None or name in picked:
            runs.append(StudyRun(name, choice, overrides[choice], budget.seeds[0], tuple(overrides.items())))
    return runs


def parse_only(only):
    """The variant names that `only` (a comma list of choices, their short aliases, and variant
    names) picks, or None for all. ConfigError for a name that is none of these."""
    if only is None:
        return None
    variants = {name: choice for name, choice, _ in ablations()[1:]}
    words = [w.strip() for w in str(only).split(",") if w.strip()]
    if not words:
        raise ConfigError(f"--only names no choice or variant: {only!r}")
    picked = set()
    for word in words:
        choice = ALIASES.get(word, word)
        if choice in CHOICES:
            picked |= {name for name, c in variants.items() if c == choice}
        elif word in variants:
            picked.add(word)
        elif word != "uvit":
            aliases = ", ".join(f"{a} ({c})" for a, c in ALIASES.items())
            raise ConfigError(f"--only: unknown name {word!r}; choose from the choices {', '.join(CHOICES)} "
                              f"(short: {aliases}) or the variants {', '.join(variants)}")
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
    """[dict(name, choice, value, params, params_tiny)] for U-ViT and every variant: parameters in
    the budget's base model and in the tiny preset (None: not built in the network yet)."""
    budget = get_budget(budget)
    rows = []
    for name, choice, overrides in ablations():
        value = overrides.get(choice)
        rows.append(dict(name=name, choice=choice, value=value,
                         params=count_params(budget.preset, {**budget.model, **overrides}, value),
                         params_tiny=count_params("tiny", overrides, value)))
    return rows


def _check_built(budget, runs):
    """ConfigError before any training if a variant asked for is not built in the network yet."""
    missing = [r.variant for r in runs if r.value is not None and
               count_params(budget.preset, {**budget.model, **dict(r.overrides)}, r.value) is None]
    if missing:
        raise ConfigError(f"not built in the network yet: {', '.join(missing)}; leave them out with --only "
                          "(see `tinyuvit ablate --list`)")


# ----------------------------------------------------------------------------------------
# The study: train each run, score it, redraw the results
# ----------------------------------------------------------------------------------------

def run_study(out_dir, budget="quick", only=None, device="cpu", data_dir=None, log=print, progress=True,
              images=None, labels=None):
    """Train and score every run of the study in `out_dir` (see the module's docstring); returns
    dict(stopped, results, files). `budget`: a name in BUDGETS or a Budget. `only`: a comma list
    of choices and variants (U-ViT's runs are always in). `images`/`labels`: as train()'s.

    Rerunning the same study resumes it. A variant whose training diverges is recorded as
    diverged and the study goes on. SIGINT, SIGTERM or SIGHUP stop the study (a run in training
    saves first) and the result has `stopped` set to the signal's name.
    """
    from ..backend import Backend
    budget = get_budget(budget)
    runs = plan_runs(budget, only)
    _check_built(budget, runs)
    Backend(device)                       # no usable GPU: say so before anything is written
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose a folder for the study")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    with RunLock(out_dir), _stop_at_once():
        everything, run = None, None
        try:
            everything = _open_study(out_dir, budget, runs)
            score = _Scorer(budget, device, data_dir, progress)
            name = budget_name(budget)
            log(f"ablation study{f' ({name} budget)' if name else ''}: {len(runs)} runs of {budget.describe()} "
                f"on {device} -> {out_dir}")
            for i, run in enumerate(runs, 1):
                where = f"[{i}/{len(runs)}] {run.label if run.variant == 'uvit' else run.variant}"
                if _run_one(run, budget, os.path.join(out_dir, run.folder), where, score, device=device,
                            data_dir=data_dir, log=log, progress=progress, images=images, labels=labels):
                    write_report(out_dir, budget, everything)
            if not os.path.exists(os.path.join(out_dir, "results.md")):
                write_report(out_dir, budget, everything)
        except _Stopped as stop:
            during = f" during {run.label}" if run else ""
            log(f"the study stopped ({stop.name}){during}; finished runs are kept. To resume, run the same "
                "command again")
            return dict(stopped=stop.name, results=_results(out_dir, everything or []),
                        files=report_files(out_dir))
    log(f"done: {len(runs)} runs in {out_dir} ({(time.perf_counter() - t0) / 60:.1f} min this time)")
    return dict(stopped=None, results=_results(out_dir, everything), files=report_files(out_dir))


def _open_study(out_dir, budget, runs):
    """Check that the study in `out_dir` (if any) has the same budget, then record the budget and
    every run asked for so far (study.json); -> those runs, in study order."""
    path = os.path.join(out_dir, "study.json")
    saved = _read_json(path)
    asked, recipe = budget.to_dict(), _recipe(budget)
    if saved is not None:
        _check_same(out_dir, saved.get("budget", {}), asked)
        if "recipe" in saved:                     # the same budget, but TrainConfig's defaults changed?
            _check_same(out_dir, from_saved(saved["recipe"]), recipe,
                        hint=" (training defaults that changed since)")
    before = {r["folder"] for r in (saved or {}).get("runs", [])}
    wanted = {r.folder for r in runs} | before
    everything = [r for r in plan_runs(budget) if r.folder in wanted]
    study = dict(budget=asked, budget_name=budget_name(budget), recipe=recipe,
                 runs=[dict(variant=r.variant, seed=r.seed, folder=r.folder) for r in everything])
    atomic_write(path, lambda f: f.write(json.dumps(study, indent=2).encode()))
    return everything


def _check_same(out_dir, old, asked, hint=None):
    """ConfigError naming the fields in which the study's saved budget (or recipe) differs."""
    diffs = [k for k in asked if old.get(k) != asked[k]]
    if diffs:
        show = lambda d: ", ".join(f"{k} {json.dumps(d.get(k))}" for k in diffs)
        name = budget_name(old)
        if hint is None:
            hint = f" (the {name} budget{': add --quick' if name == 'quick' else ''})" if name else ""
        raise ConfigError(f"this study ({out_dir}) was run with {show(old)}{hint}; asked for {show(asked)}: "
                          "use another --out or the same budget")


def _recipe(budget):
    """U-ViT's whole training configuration (but its seed) under `budget`: TrainConfig's defaults
    and the model config included, so that a study never mixes two recipes."""
    d = budget.train_config(budget.seeds[0]).to_dict()
    d.pop("seed")
    return json.loads(json.dumps(d))


def _run_one(run, budget, folder, where, score, log, **train_args):
    """Train (or resume) one run, then score it into result.json; a finished run is skipped.
    -> whether there is a new result."""
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):
        log(f"{where}: finished earlier ({_read_json(result_path).get('status')}), kept")
        return False
    ckpt, grid = os.path.join(folder, "checkpoint.npz"), os.path.join(folder, "samples.png")
    step = checkpoint_step(ckpt) if os.path.exists(ckpt) else None
    if step is None or step < budget.steps or not os.path.exists(grid):
        log(f"{where}: training {budget.steps:,} steps" if step is None else
            f"{where}: resuming at step {step:,} of {budget.steps:,}")
        # train's "Continue with --resume" is train-mnist's advice; a study resumes by itself
        quiet_resume = lambda m: log(m.replace(". Continue with --resume", ""))
        try:
            out = train(budget.train_config(run.seed, dict(run.overrides)), folder, resume=os.path.exists(ckpt),
                        log=quiet_resume, **train_args)
        except DivergedError as e:
            log(f"{where}: diverged: {e}; recorded as diverged, the study goes on (delete {folder} to retry it)")
            params = count_params(budget.preset, {**budget.model, **dict(run.overrides)}, run.value)
            _write_result(result_path, _result(run, folder, status="diverged", message=str(e), params=params))
            return True
        if out["stopped"]:
            raise _Stopped(out["stopped"])
    log(f"{where}: scoring {10 * budget.final_per_digit:,} samples")
    res = _result(run, folder, status="ok", **score(folder))
    _write_result(result_path, res)
    log(f"{where}: class accuracy {100 * res['class_accuracy']:.1f}%, FID {res['fid']:.2f} "
        f"(floor at n = {res['n']:,}: {res['fid_floor_same_n']:.2f})")
    return True


def _result(run, folder, status, message=None, params=None, **scores):
    """result.json of a run: what it is, its scores (None when diverged), its training time."""
    rows = read_jsonl(os.path.join(folder, "metrics.jsonl"))
    res = dict(variant=run.variant, choice=run.choice, value=run.value, seed=run.seed, folder=run.folder,
               status=status, message=message, params=params, class_accuracy=None, fid=None, fid_floor=None,
               fid_floor_same_n=None, n=None, steps=rows[-1]["step"] if rows else 0,
               train_seconds=round(train_seconds(rows), 1))
    res.update(scores)
    return res


def _write_result(path, res):
    atomic_write(path, lambda f: f.write(json.dumps(res, indent=2).encode()))


def train_seconds(rows):
    """Training time from metrics.jsonl rows: `seconds` restarts at 0 with every resume, so the
    segments are added (time after a segment's last logged step is not counted)."""
    total, last = 0.0, 0.0
    for r in rows:
        s = r.get("seconds", 0.0)
        if s < last:
            total += last
        last = s
    return total + last


class _Scorer:
    """The final score of a run's EMA weights: `final_per_digit` samples of each digit with fixed
    noise, class accuracy and FID. The classifier is loaded once for the whole study (the
    reference statistics are cached on disk by tinyuvit.tools.metrics)."""

    def __init__(self, budget, device, data_dir, progress=True):
        self.budget, self.device, self.data_dir, self.progress = budget, device, data_dir, progress
        self.classifier = None

    def __call__(self, folder):
        from ..api import load
        from ..backend import Backend
        from .metrics import load_classifier
        from .progress import Progress
        b = self.budget
        if self.classifier is None:
            self.classifier = load_classifier(backend=Backend(self.device, "float32"))
        run = load(folder, self.device)
        t0 = time.perf_counter()
        with Progress(10 * b.final_per_digit, "scoring", unit="img", disable=not self.progress) as bar:
            res = run.evaluate(b.final_per_digit, b.sample_config(), seed=b.score_seed, classifier=self.classifier,
                               data_dir=self.data_dir, progress=bar)
        return dict(params=run.model.num_params(), class_accuracy=res["class_accuracy"],
                    per_digit_accuracy=res["per_digit_accuracy"], fid=res["fid"], fid_floor=res["fid_floor"],
                    fid_floor_same_n=res["fid_floor_same_n"], n=res["n"], sampler=res["sampler"],
                    sample_steps=res["steps"], guidance=res["guidance"],
                    score_seconds=round(time.perf_counter() - t0, 1))


class _Stopped(BaseException):
    """A signal stopped the study (BaseException, like KeyboardInterrupt: nothing catches it
    on the way out)."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _stop_at_once():
    """Outside train(), which saves first (StopSignals), SIGINT, SIGTERM and SIGHUP stop the study
    at once: what they cut short (scoring, the figures) is redone by the next run of the study."""
    def stop(signum, frame):
        raise _Stopped(signal.Signals(signum).name)
    old = {}
    try:
        for s in StopSignals.SIGNALS:
            try:
                old[s] = signal.signal(s, stop)
            except ValueError:   # not the main thread: leave signals alone
                break
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _read_json(path):
    """The JSON in `path`, None if there is no such file; ConfigError if it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); delete it to redo what it records") from None


def _results(out_dir, runs):
    """The result.json of each run that has one."""
    found = [_read_json(os.path.join(out_dir, r.folder, "result.json")) for r in runs]
    return [r for r in found if r is not None]


# ----------------------------------------------------------------------------------------
# The report: results.md and the figures, from the run folders
# ----------------------------------------------------------------------------------------

REPORT = ("results.md", "scores.png", "loss.png", "learning.png", "grids.png")
SMOOTH = 50          # loss.png: running mean over this many steps
SEED_GREYS = ("0.55", "0.7", "0.8", "0.85")   # U-ViT's seeds after the first


def report_files(out_dir):
    return [os.path.join(out_dir, name) for name in REPORT if os.path.exists(os.path.join(out_dir, name))]


def write_report(out_dir, budget=None, runs=None):
    """(Re)write results.md, scores.png, loss.png, learning.png and grids.png from the run
    folders of the study in `out_dir` (default: the budget and runs that study.json records)."""
    if budget is None or runs is None:
        study = _read_json(os.path.join(out_dir, "study.json"))
        if study is None:
            raise ConfigError(f"{out_dir} holds no study (no study.json)")
        budget = Budget(**{**study["budget"], "seeds": tuple(study["budget"]["seeds"])})
        runs = [r for r in plan_runs(budget) if r.folder in {s["folder"] for s in study["runs"]}]
    entries = [_Entry(r, os.path.join(out_dir, r.folder)) for r in runs]
    atomic_write(os.path.join(out_dir, "results.md"), lambda f: f.write(results_markdown(budget, entries).encode()))
    done = [e for e in entries if e.result]
    if not done:
        return
    import matplotlib
    matplotlib.use("Agg")
    plot_scores(os.path.join(out_dir, "scores.png"), budget, done)
    plot_loss(os.path.join(out_dir, "loss.png"), budget, done)
    plot_learning(os.path.join(out_dir, "learning.png"), budget, done)
    save_grids(os.path.join(out_dir, "grids.png"), done)


class _Entry:
    """One run's files, as the report reads them: result.json, metrics.jsonl, evals.jsonl."""

    def __init__(self, run, folder):
        self.run, self.folder = run, folder
        self.result = _read_json(os.path.join(folder, "result.json"))
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

    def score(self, metric):
        """The final class accuracy (in %) or FID, or None."""
        if not self.ok:
            return None
        return 100 * self.result["class_accuracy"] if metric == "accuracy" else self.result["fid"]


def _uvit_seeds(entries):
    return [e for e in entries if e.run.variant == "uvit" and e.ok]


def _seed_stats(entries, metric):
    """(mean, std, min, max) of U-ViT's seeds, or None without any."""
    v = np.array([e.score(metric) for e in _uvit_seeds(entries)])
    if not len(v):
        return None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(v.min()), float(v.max())


# -- results.md ---------------------------------------------------------------------------

def results_markdown(budget, entries):
    """The study's table in Markdown, with the budget above it and notes below."""
    b = budget
    name = budget_name(b)
    n = 10 * b.final_per_digit
    lines = [
        "# U-ViT ablation on MNIST", "",
        f"Budget{f' `{name}`' if name else ''}: {b.describe()}, every other training setting TrainConfig's "
        f"default. U-ViT trained with seeds {', '.join(map(str, b.seeds))}; every variant with seed "
        f"{b.seeds[0]} (same data order and recipe).",
        f"Scores: EMA weights, {b.final_per_digit} samples per digit (n = {n:,}), {b.sampler} {b.sample_steps} "
        f"steps, guidance {b.guidance:g}, sampling seed {b.score_seed}; class accuracy by tinyuvit's MNIST "
        "classifier, FID on its features against the MNIST test digits. FID floor: as many real training "
        "digits as samples.", ""]
    lines += results_table(b, entries)
    lines += ["", "(Δ: difference from U-ViT's mean. \\*: outside the range of U-ViT's seeds, i.e. larger than "
              "the seed noise seen here. Few seeds and short training: treat small differences with care. "
              "Train time includes the learning curves' evaluations.)"]
    diverged = [e for e in entries if e.result and not e.ok]
    if diverged:
        lines += ["", "Diverged:"] + [f"- {e.run.label}: {e.result.get('message')}" for e in diverged]
    return "\n".join(lines) + "\n"


def results_table(budget, entries):
    """The Markdown table's lines: U-ViT's seeds, their mean ± spread, then each variant."""
    n = 10 * budget.final_per_digit
    lines = [f"| variant | choice | parameters | class accuracy (%) | FID | FID floor (n = {n:,}) | "
             "train time (min) |", "|---|---|---:|---:|---:|---:|---:|"]
    acc, fid = _seed_stats(entries, "accuracy"), _seed_stats(entries, "fid")
    for e in entries:
        if e.run.variant == "uvit":
            lines.append(_row(e, None, None))
    if acc:
        spread = lambda s, f: f"{s[0]:{f}} ± {s[1]:{f}} ({s[2]:{f}}–{s[3]:{f}})"
        k = len(_uvit_seeds(entries))
        lines.append(f"| **U-ViT mean ± std** ({k} seed{'s' if k > 1 else ''}; min–max) | | | "
                     f"{spread(acc, '.1f')} | {spread(fid, '.2f')} | | |")
    for e in entries:
        if e.run.variant != "uvit":
            lines.append(_row(e, acc, fid))
    return lines


def _row(e, acc, fid):
    r, run = e.result, e.run
    choice = f"{run.choice}" if run.choice else "—"
    if not r:
        return f"| {run.label} | {choice} | | not run yet | | | |"
    minutes = f"{r['train_seconds'] / 60:.1f}"
    params = f"{r['params']:,}" if r.get("params") else ""
    if not e.ok:
        return f"| {run.label} | {choice} | {params} | **diverged** | **diverged** | | {minutes} |"
    return (f"| {run.label} | {choice} | {params} | {_vs(e.score('accuracy'), acc, '.1f')} | "
            f"{_vs(e.score('fid'), fid, '.2f')} | {r['fid_floor_same_n']:.2f} | {minutes} |")


def _vs(value, stats, fmt):
    """ "91.2 (−1.1)\\*": the value, its difference from U-ViT's mean, * if outside U-ViT's seeds."""
    if stats is None:
        return f"{value:{fmt}}"
    mean, _, lo, hi = stats
    star = "\\*" if not lo <= value <= hi else ""
    return f"{value:{fmt}} ({value - mean:+{fmt}}){star}".replace("-", "−")


# -- the figures ----------------------------------------------------------------------------

def _choices(entries):
    """The choices that the finished variants vary, in CHOICES order."""
    have = {e.run.choice for e in entries}
    return [c for c in CHOICES if c in have]


def _variants(entries, choice):
    """The variants of `choice` (U-ViT, whose choice is None too, is not one of them)."""
    return [e for e in entries if e.run.variant != "uvit" and e.run.choice == choice]


def _save(fig, path):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def plot_scores(path, budget, entries):
    """Two panels, class accuracy and FID: U-ViT's mean (its seeds as points) then the variants,
    grouped by choice, with U-ViT's seed range as a band across the panel."""
    import matplotlib.pyplot as plt
    choices = _choices(entries)
    colors = {c: f"C{i}" for i, c in enumerate(choices)}
    xs, labels, bars, groups, x = [], [], [], [], 0.0
    seeds = _uvit_seeds(entries)
    if seeds:
        xs.append(x)
        labels.append(f"U-ViT\n({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        bars.append(None)
        x += 1.5
    for c in choices:
        first = x
        for e in entries:
            if e.run.choice == c:
                xs.append(x)
                labels.append(e.run.value)
                bars.append(e)
                x += 1
        groups.append((c, (first + x - 1) / 2))
        x += 0.5
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.85 * len(xs) + 2), 8), dpi=110, sharex=True)
    n = 10 * budget.final_per_digit
    for ax, metric, title in ((axes[0], "accuracy", f"class accuracy (%), higher is better (n = {n:,})"),
                              (axes[1], "fid", f"FID, lower is better (n = {n:,})")):
        stats = _seed_stats(entries, metric)
        values = [e.score(metric) for e in entries if e.ok]
        if stats:
            mean, _, lo, hi = stats
            ax.axhspan(lo, hi, color="0.5", alpha=0.18, lw=0, label="U-ViT seed range (min–max)")
            ax.axhline(mean, color="0.3", ls="--", lw=1, label="U-ViT mean")
            ax.bar(xs[0], mean, width=0.7, color="0.35", zorder=2)
            points = [e.score(metric) for e in seeds]
            ax.scatter([xs[0]] * len(seeds), points, color="white", edgecolor="k", zorder=3, s=22,
                       label="U-ViT's seeds (the bar: their mean)")
            _bar_label(ax, xs[0], mean, metric, at=max(points))     # above the points
        for xi, e in zip(xs, bars):
            if e is None:
                continue
            if e.ok:
                ax.bar(xi, e.score(metric), width=0.7, color=colors[e.run.choice], zorder=2)
                _bar_label(ax, xi, e.score(metric), metric)
            else:
                ax.text(xi, 0.03, "diverged", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", color="red", fontsize=9)
        _score_limits(ax, metric, values)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(labels, fontsize=8)
    axes[1].set_xlim(min(xs) - 1, max(xs) + 1)
    for c, center in groups:       # the choice's name under its group of bars
        axes[1].annotate(c, (center, 0), xycoords=("data", "axes fraction"), xytext=(0, -30),
                         textcoords="offset points", ha="center", va="top", fontsize=9, fontweight="bold",
                         color=colors[c])
    fig.suptitle(f"U-ViT ablation on MNIST: {budget.describe()}", fontsize=11)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:        # one legend for both panels, under the title
        fig.legend(handles, names, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.955))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save(fig, path)


def _bar_label(ax, x, value, metric, at=None):
    """The value written above its bar (or above `at`)."""
    ax.annotate(f"{value:.1f}" if metric == "accuracy" else f"{value:.2f}", (x, value if at is None else at),
                xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7)


def _score_limits(ax, metric, values):
    """Accuracy: zoom on the values (the axis then does not start at 0); FID: from 0."""
    if not values:
        return
    lo, hi = min(values), max(values)
    if metric == "accuracy":
        pad = max(1.0, 0.25 * (hi - lo))
        ax.set_ylim(max(0.0, lo - 2 * pad), min(100.0, hi + pad) + 0.5 * pad)
    else:
        ax.set_ylim(0, 1.18 * hi)


def _smooth(rows, k=SMOOTH):
    """(steps, running mean of the loss over k steps)."""
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows], dtype=float)
    k = max(1, min(k, len(loss) // 5))
    return steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid")


def _panels(n, ncols):
    """A figure with n panels in rows of `ncols`, the unused ones hidden."""
    import matplotlib.pyplot as plt
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _reference_lines(ax, entries, x_y, **style):
    """U-ViT's seed 0 in black, its other seeds in grey: every panel's reference."""
    for i, e in enumerate(_uvit_seeds(entries)):
        xs, ys = x_y(e)
        grey = SEED_GREYS[min(i - 1, len(SEED_GREYS) - 1)]
        ax.plot(xs, ys, color="k" if i == 0 else grey, lw=1.4 if i == 0 else 1, label=e.run.label,
                zorder=3 if i == 0 else 2, **style)


def plot_loss(path, budget, entries):
    """The smoothed training loss: one panel per choice, U-ViT (all seeds) against its variants."""
    from .images import plain_log_ticks
    choices = _choices(entries) or [None]
    fig, axes = _panels(len(choices), min(3, len(choices)))
    curve = lambda e: _smooth(e.rows)
    for ax, c in zip(axes, choices):
        _reference_lines(ax, entries, curve)
        tails = [curve(e)[1] for e in entries if (e.run.variant == "uvit" or e.run.choice == c) and e.rows]
        for i, e in enumerate(e for e in _variants(entries, c) if e.rows):
            xs, ys = curve(e)
            ax.plot(xs, ys, color=f"C{i}", lw=1.2, label=e.run.variant + ("" if e.ok else " (diverged)"))
        ax.set_yscale("log")
        plain_log_ticks(ax)
        _zoom_on_tail(ax, tails)
        ax.set_title(f"{c}" if c else "U-ViT", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"training loss, running mean of {SMOOTH} steps\n{budget.describe()}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    _save(fig, path)


def _zoom_on_tail(ax, curves):
    """y limits that show the curves after their first fifth (the start is far above the rest)."""
    tails = [y[len(y) // 5:] for y in curves if len(y)]
    tails = [t[np.isfinite(t)] for t in tails if len(t)]
    tails = [t for t in tails if len(t)]
    if tails:
        lo, hi = min(t.min() for t in tails), max(t.max() for t in tails)
        if lo > 0 and hi > lo:
            ax.set_ylim(lo / 1.05, hi * 1.1)


def plot_learning(path, budget, entries):
    """Class accuracy and FID during training (evals.jsonl), one row of two panels per choice."""
    import matplotlib.pyplot as plt

    from .images import plain_log_ticks
    choices = _choices(entries) or [None]
    fig, axes = plt.subplots(len(choices), 2, figsize=(10, 2.9 * len(choices) + 0.6), dpi=100, squeeze=False)
    series = lambda key: lambda e: ([r["step"] for r in e.evals],
                                    [(100 * r[key] if key == "class_accuracy" else r[key]) for r in e.evals])
    for row, c in zip(axes, choices):
        for ax, key, what in ((row[0], "class_accuracy", "class accuracy (%)"), (row[1], "fid", "FID")):
            _reference_lines(ax, entries, series(key), marker="o", ms=3)
            for i, e in enumerate(e for e in _variants(entries, c) if e.evals):
                xs, ys = series(key)(e)
                ax.plot(xs, ys, color=f"C{i}", lw=1.2, marker="o", ms=3,
                        label=e.run.variant + ("" if e.ok else " (diverged)"))
            if key == "fid":
                ax.set_yscale("log")
                plain_log_ticks(ax)
            ax.set_title(f"{c or 'U-ViT'}: {what}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        row[0].legend(fontsize=7)            # the FID panel beside it has the same lines
        row[0].set_ylabel("%")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    n = 10 * budget.eval_per_digit
    fig.suptitle(f"during training: EMA samples, n = {n:,} per point (FID is higher at smaller n: compare "
                 "curves with each other, not with the final table)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))   # room for the title
    _save(fig, path)


def save_grids(path, entries, tile=302, caption=40, pad=8):
    """Every run's final samples.png side by side, one row per choice (U-ViT's seeds first), each
    under its name and scores. A diverged run, which has no grid, is a grey tile saying so."""
    from PIL import Image, ImageDraw
    groups = [[e for e in entries if e.run.variant == "uvit"]]
    groups += [[e for e in entries if e.run.choice == c] for c in _choices(entries)]
    groups = [g for g in groups if g]
    ncols = max(len(g) for g in groups)
    rows = [groups[0]]
    for g in groups[1:]:             # choices share a row while they fit (time_cond and conv, ...)
        if rows[-1] is not groups[0] and len(rows[-1]) + len(g) <= ncols:
            rows[-1] = rows[-1] + g
        else:
            rows.append(g)
    W, H = pad + ncols * (tile + pad), pad + len(rows) * (caption + tile + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(16), _font(13)
    for i, row in enumerate(rows):
        for j, e in enumerate(row):
            x, y = pad + j * (tile + pad), pad + i * (caption + tile + pad)
            draw.text((x, y), e.run.label, fill="black", font=big)
            if e.ok:
                draw.text((x, y + 20), f"class accuracy {100 * e.result['class_accuracy']:.1f}%, "
                                       f"FID {e.result['fid']:.2f}", fill="dimgray", font=small)
            grid = os.path.join(e.folder, "samples.png")
            if os.path.exists(grid) and e.ok:
                with Image.open(grid) as im:
                    canvas.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.BOX), (x, y + caption))
            else:
                draw.rectangle((x, y + caption, x + tile - 1, y + caption + tile - 1), fill=(200, 200, 200))
                draw.text((x + tile // 2, y + caption + tile // 2), "diverged" if not e.ok else "no grid",
                          fill="red", font=big, anchor="mm")
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):   # Pillow < 10.1, or no FreeType: the small bitmap font
        return ImageFont.load_default()


# ----------------------------------------------------------------------------------------
# Text for the command line
# ----------------------------------------------------------------------------------------

def format_variants(rows, budget):
    """`tinyuvit ablate --list`: one line per variant with its parameter counts."""
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
