"""Running a study: train each run of it, score it, redraw the report (tools/ablate.py says
what the study is, tools/ablate_report.py what it found).

    from tinyuvit.tools.ablate_run import run_study
    run_study("runs/ablate-quick", "quick", only="skip,time")
"""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time

from ..config import from_saved
from ..errors import ConfigError, DivergedError
from ..train import train
from .ablate import (all_runs, budget_name, but_seeds, check_built, count_params, get_budget, plan_runs, read_json,
                     read_results, saved_study, with_seeds)
from .ablate_report import report_files, write_report
from .checkpoint import checkpoint_step
from .files import LOCK_NAME, RunLock, atomic_write
from .runfolder import StopSignals, read_jsonl


def run_study(out_dir, budget="quick", only=None, pilot=False, seeds=None, device="cpu", data_dir=None, log=print,
              progress=True, images=None, labels=None):
    """Train and score every run of the study in `out_dir` (see the module's docstring); returns
    dict(stopped, results, files). `budget`: a name in BUDGETS or a Budget. `only`: a comma list
    of choices, sweep knobs and models (U-ViT's runs are always in). `pilot`: U-ViT's seeds with
    and without the variance levers instead. `seeds`: the training seeds instead of the budget's
    (a tuple, or "0-5", "3,4,5"); a study folder keeps every seed it was run with, so
    `seeds="0-5", only="pos"` adds seeds 3-5 of U-ViT and the positions to a three-seed study.
    `images`/`labels`: as train()'s.

    Rerunning the same study resumes it. A run whose training diverges is recorded as diverged
    and the study goes on. SIGINT, SIGTERM or SIGHUP stop the study (a run in training saves
    first) and the result has `stopped` set to the signal's name.
    """
    from ..backend import Backend
    budget = get_budget(budget) if seeds is None else with_seeds(budget, seeds)
    runs = plan_runs(budget, only, pilot)
    check_built(budget, runs)
    Backend(device)                       # no usable GPU: say so before anything is written
    out_dir = _check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    with RunLock(out_dir), _stop_at_once():
        everything, run = [], None
        try:
            budget, everything = _open_study(out_dir, budget, runs)
            asked = {r.folder for r in runs}
            todo = [r for r in everything if r.folder in asked]       # with the scores earlier runs asked for
            score = _Scorer(budget, device, data_dir, progress)
            name = budget_name(budget)
            log(f"ablation {'pilot' if pilot else 'study'}{f' ({name} budget)' if name else ''}: {len(todo)} runs "
                f"of {budget.describe()} on {device} -> {out_dir}")
            for i, run in enumerate(todo, 1):
                where = f"[{i}/{len(todo)}] {run.label}"
                if _run_one(run, budget, os.path.join(out_dir, run.folder), where, score, device=device,
                            data_dir=data_dir, log=log, progress=progress, images=images, labels=labels):
                    write_report(out_dir, budget, everything)
            if not os.path.exists(os.path.join(out_dir, "results.md")):
                write_report(out_dir, budget, everything)
        except _Stopped as stop:
            during = f" during {run.label}" if run else ""
            log(f"the study stopped ({stop.name}){during}; finished runs are kept. To resume, run the same "
                "command again")
            return dict(stopped=stop.name, results=read_results(out_dir, everything), files=report_files(out_dir))
    log(f"done: {len(todo)} runs in {out_dir} ({(time.perf_counter() - t0) / 60:.1f} min this time)")
    return dict(stopped=None, results=read_results(out_dir, everything), files=report_files(out_dir))


def join_study(out_dir, other_dir, budget="quick", log=print):
    """Copy the finished runs of the study in `other_dir` into the study in `out_dir`, record
    them in its study.json and redraw its report; nothing is trained. This is how a study split
    over two processes (two folders, say `--only skip,time` and `--only conv,patch,pos`, each
    with one thread) becomes one. The two must have the same budget but for the seeds, which
    join too. A run that `out_dir` has finished is kept; one it holds unfinished is replaced by
    the other's finished one. Both folders are locked while it works (not during a study).
    -> dict(joined, kept: run folders; results; files)."""
    budget = get_budget(budget)
    out_dir, other_dir = _check_out_dir(out_dir), os.fspath(other_dir)
    if os.path.exists(out_dir) and os.path.exists(other_dir) and os.path.samefile(out_dir, other_dir):
        raise ConfigError(f"--join {other_dir} is the study's own folder (--out); name the folder of the other study")
    saved = read_json(os.path.join(other_dir, "study.json"))
    if saved is None:
        raise ConfigError(f"--join {other_dir} holds no study (no study.json); name a folder that "
                          "`tinyuvit ablate --out` wrote")
    with RunLock(other_dir, option="--join"):
        _check_study(other_dir, saved, budget, advice="join only studies of the same budget")
        other_budget, other_runs = saved_study(other_dir)
        finished = [r for r in other_runs if read_json(os.path.join(other_dir, r.folder, "result.json")) is not None]
        os.makedirs(out_dir, exist_ok=True)
        with RunLock(out_dir):
            joined, kept = [], []
            for r in finished:
                here = os.path.join(out_dir, r.folder)
                if read_json(os.path.join(here, "result.json")) is not None:
                    kept.append(r)
                    continue
                if os.path.exists(here):
                    log(f"{r.label}: unfinished in {out_dir}, finished in {other_dir}: the finished one replaces it")
                    shutil.rmtree(here)
                shutil.copytree(os.path.join(other_dir, r.folder), here, ignore=shutil.ignore_patterns(LOCK_NAME))
                joined.append(r)
            budget, everything = _open_study(out_dir, dataclasses.replace(budget, seeds=other_budget.seeds), joined)
            write_report(out_dir, budget, everything)
    log(f"joined {len(joined)} finished runs of {other_dir} into {out_dir}"
        + (f"; kept {len(kept)} it had finished already" if kept else ""))
    return dict(joined=[r.folder for r in joined], kept=[r.folder for r in kept],
                results=read_results(out_dir, everything), files=report_files(out_dir))


def _open_study(out_dir, budget, runs):
    """Check that the study in `out_dir` (if any) has the same budget but for its seeds, then
    record the budget with every seed run so far, and every run asked for so far, each with every
    score asked for it (study.json); -> (that budget, those runs in study order: the whole
    study's, then the pilot's other arm)."""
    path = os.path.join(out_dir, "study.json")
    saved = read_json(path)
    recipe = _recipe(budget)
    if saved is not None:
        _check_study(out_dir, saved, budget)
        old_seeds = saved.get("budget", {}).get("seeds", ())
        budget = dataclasses.replace(budget, seeds=tuple(sorted(set(old_seeds) | set(budget.seeds))))
    scores = {r["folder"]: [tuple(s) for s in r.get("scores", [])] for r in (saved or {}).get("runs", [])}
    for r in runs:
        scores[r.folder] = list(dict.fromkeys(scores.get(r.folder, []) + list(r.scores)))
    everything = [dataclasses.replace(r, scores=tuple(scores[r.folder])) for r in all_runs(budget)
                  if r.folder in scores]
    study = dict(budget=budget.to_dict(), budget_name=budget_name(budget), recipe=recipe,
                 runs=[dict(variant=r.variant, seed=r.seed, folder=r.folder, scores=r.scores) for r in everything])
    atomic_write(path, lambda f: f.write(json.dumps(study, indent=2).encode()))
    return budget, everything


def _check_out_dir(out_dir):
    """`out_dir` as a str; ConfigError if it is a file."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose a folder for the study")
    return out_dir


def _check_study(folder, saved, budget, advice="use another --out or the same budget"):
    """ConfigError unless the study that `folder`'s study.json (`saved`) records has `budget`,
    but for the seeds, and U-ViT's recipe under it (TrainConfig's defaults may have changed)."""
    _check_same(folder, but_seeds(saved.get("budget", {})), but_seeds(budget.to_dict()), advice=advice)
    if "recipe" in saved:
        _check_same(folder, from_saved(saved["recipe"]), _recipe(budget),
                    hint=" (training defaults that changed since)", advice=advice)


def _check_same(out_dir, old, asked, hint=None, advice="use another --out or the same budget"):
    """ConfigError naming the fields in which the study's saved budget (or recipe) differs."""
    diffs = [k for k in asked if old.get(k) != asked[k]]
    if diffs:
        show = lambda d: ", ".join(f"{k} {json.dumps(d.get(k))}" for k in diffs)
        name = budget_name(old)
        if hint is None:
            hint = f" (the {name} budget{': add --quick' if name == 'quick' else ''})" if name else ""
        raise ConfigError(f"this study ({out_dir}) was run with {show(old)}{hint}; asked for {show(asked)}: {advice}")


def _recipe(budget):
    """U-ViT's whole training configuration (but its seed) under `budget`: TrainConfig's defaults
    and the model config included, so that a study never mixes two recipes."""
    d = budget.train_config(budget.seeds[0]).to_dict()
    d.pop("seed")
    return json.loads(json.dumps(d))


def _run_one(run, budget, folder, where, score, log, **train_args):
    """Train (or resume) one run, then score it into result.json, each score it still lacks;
    a run with every score is skipped. -> whether there is a new result."""
    result_path = os.path.join(folder, "result.json")
    result = read_json(result_path)
    if result is not None and (result.get("status") != "ok" or not _missing_scores(run, result)):
        log(f"{where}: finished earlier ({result.get('status')}), kept")
        return False
    if result is None:
        if not _train(run, budget, folder, where, log, **train_args):
            return True                                           # diverged, recorded
    for per_digit, seed in _missing_scores(run, result or {}):
        log(f"{where}: scoring {10 * per_digit:,} samples (sampling seed {seed})")
        s = score(folder, per_digit, seed)
        if result is None:                                        # the first score is the study's own
            result = _result(run, folder, status="ok", **s)
        result["scores"].append(dict(per_digit=per_digit, seed=seed, **{k: s[k] for k in SCORE_KEYS}))
        _write_result(result_path, result)
        log(f"{where}: class accuracy {100 * s['class_accuracy']:.1f}%, FID {s['fid']:.2f} "
            f"(floor at n = {s['n']:,}: {s['fid_floor_same_n']:.2f})")
    return True


SCORE_KEYS = ("n", "class_accuracy", "fid", "fid_floor_same_n", "score_seconds")   # kept of every score


def _missing_scores(run, result):
    """The (per_digit, sampling seed) scores that `run` asks for and result.json lacks."""
    have = {(s["per_digit"], s["seed"]) for s in result.get("scores", [])}
    return [s for s in run.scores if tuple(s) not in have]


def _train(run, budget, folder, where, log, **train_args):
    """Train or resume the run to the budget's steps (a trained one is left alone); -> False if
    it diverged (recorded in result.json). A signal raises _Stopped after train() saved."""
    ckpt, grid = os.path.join(folder, "checkpoint.npz"), os.path.join(folder, "samples.png")
    step = checkpoint_step(ckpt) if os.path.exists(ckpt) else None
    if step is not None and step >= budget.steps and os.path.exists(grid):
        return True
    log(f"{where}: training {budget.steps:,} steps" if step is None else
        f"{where}: resuming at step {step:,} of {budget.steps:,}")
    # train's "Continue with --resume" is train-mnist's advice; a study resumes by itself
    quiet_resume = lambda m: log(m.replace(". Continue with --resume", ""))
    try:
        out = train(budget.train_config(run.seed, dict(run.model.overrides)), folder, resume=os.path.exists(ckpt),
                    log=quiet_resume, **train_args)
    except DivergedError as e:
        log(f"{where}: diverged: {e}; recorded as diverged, the study goes on (delete {folder} to retry it)")
        m = run.model
        params = count_params(budget.preset, {**budget.model, **dict(m.overrides)}, m.value)
        _write_result(os.path.join(folder, "result.json"),
                      _result(run, folder, status="diverged", message=str(e), params=params))
        return False
    if out["stopped"]:
        raise _Stopped(out["stopped"])
    return True


def _result(run, folder, status, message=None, params=None, **score):
    """result.json of a run: what it is, the study's own score (None when diverged), its
    training time, and `scores`: every score taken (the study's first)."""
    rows = read_jsonl(os.path.join(folder, "metrics.jsonl"))
    m = run.model
    res = dict(variant=m.name, choice=m.choice, value=m.value, seed=run.seed, folder=run.folder,
               status=status, message=message, params=params, class_accuracy=None, fid=None, fid_floor=None,
               fid_floor_same_n=None, n=None, steps=rows[-1]["step"] if rows else 0,
               train_seconds=round(train_seconds(rows), 1))
    res.update(score)
    res["scores"] = []
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
    """A score of a run's EMA weights: `per_digit` samples of each digit with the noise of
    sampling seed `seed`, class accuracy and FID. The classifier is loaded once for the whole
    study (the reference statistics are cached on disk by tinyuvit.tools.metrics)."""

    def __init__(self, budget, device, data_dir, progress=True):
        self.budget, self.device, self.data_dir, self.progress = budget, device, data_dir, progress
        self.classifier = None

    def __call__(self, folder, per_digit, seed):
        from ..api import load
        from ..backend import Backend
        from .metrics import load_classifier
        from .progress import Progress
        if self.classifier is None:
            self.classifier = load_classifier(backend=Backend(self.device, "float32"))
        run = load(folder, self.device)
        t0 = time.perf_counter()
        with Progress(10 * per_digit, "scoring", unit="img", disable=not self.progress) as bar:
            res = run.evaluate(per_digit, self.budget.sample_config(), seed=seed, classifier=self.classifier,
                               data_dir=self.data_dir, progress=bar)
        return dict(params=run.model.num_params(), class_accuracy=res["class_accuracy"],
                    per_digit_accuracy=res["per_digit_accuracy"],
                    fid=res["fid"], fid_floor=res["fid_floor"], fid_floor_same_n=res["fid_floor_same_n"],
                    n=res["n"], sampler=res["sampler"], sample_steps=res["steps"], guidance=res["guidance"],
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
