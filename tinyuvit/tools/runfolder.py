"""A training run's folder, and what the loop does beside its steps.

`train.train` is the loop; this module is everything around it:

    RunFolder      the folder's files and lock, starting or resuming (`start`), the metrics,
                   saving, and what happens at intervals (`after_step`): the early weights kept
                   for autoguidance, checkpoints, sample grids, the loss plot, evaluations
    StopSignals    Ctrl-C, SIGTERM and SIGHUP: finish the step, save, stop
    WeakWeights    the EMA weights kept early in the run (the weak network of autoguidance)
    Evaluator      class accuracy and FID of the EMA model during training (--eval-every)

A run folder holds:
    config.json      the run's configuration (TrainConfig, the model config, the data used)
    metrics.jsonl    one JSON line per step: step, loss, lr, grad_norm, seconds
    loss.png         the loss curve
    samples/         10x10 grids (one row per digit) drawn with the EMA weights at intervals
    samples.png      the final grid
    checkpoint.npz   weights, EMA weights, AdamW moments, step, config (resume from it)
    evals.jsonl, eval.png   with --eval-every: class accuracy and FID during training
"""
import contextlib
import json
import os
import shutil
import signal
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy, xp_of
from ..config import TrainConfig
from ..errors import CheckpointError, ConfigError, DivergedError
from ..model import UViT, UViTConfig, network_with
from ..optim import EMA, AdamW, FlatParams
from .checkpoint import config_differences, load_checkpoint, save_checkpoint
from .data import dataset_difference
from .files import RunLock, atomic_write, remove_stale_parts
from .images import plot_curves, save_grid
from .parallel import on_cpu_threads


def training_data(backend, images, labels, data_dir, progress, log):
    """(images on the backend in [-1, 1] [N, 1, 28, 28], labels [N], identity of the data):
    MNIST's training set, or the arrays passed to train()."""
    from .data import dataset_id, load_mnist
    from .images import to_model_range
    if images is None:
        images, labels, source = load_mnist("train", data_dir=data_dir, quiet=not progress)
        log(f"data: {source}, {len(images)} training digits")
    else:
        source = "arrays passed to train()"
    labels = np.asarray(labels, dtype=np.int64)
    return backend.asarray(to_model_range(images)), labels, dataset_id(images, labels, source)


@dataclass
class Training:
    """What the loop updates: the model, its parameters as one buffer (`flat`), AdamW, the EMA,
    and the step to start from."""
    model: UViT
    flat: FlatParams
    opt: AdamW
    ema: EMA
    start: int


class RunFolder:
    """A run's folder: its file names, the lock that keeps a second process out, starting or
    resuming, the metrics (kept in memory, appended to metrics.jsonl, flushed with every
    checkpoint), saving, and what happens at intervals.

    `cfg` is the run's TrainConfig and `run_cfg` the config that config.json records (cfg's
    fields, the model config and the data used)."""

    def __init__(self, path, cfg: TrainConfig, run_cfg: dict):
        self.path, self.cfg, self.run_cfg = os.fspath(path), cfg, run_cfg
        join = lambda name: os.path.join(self.path, name)
        self.checkpoint, self.metrics, self.config = join("checkpoint.npz"), join("metrics.jsonl"), join("config.json")
        self.loss_plot, self.grid = join("loss.png"), join("samples.png")
        self.rows, self.saved_step, self._file = [], None, None
        self.training = self.weak = self.ema_net = self.evaluator = None

    @contextlib.contextmanager
    def open(self, resume):
        """`with run.open(resume):` holds the folder's lock (creating the folder), after checking
        that a new run does not overwrite an old one and that a resume has something to resume.
        On a failure before any checkpoint, a folder this call created is removed again."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"--out {self.path} is a file, not a folder; choose a folder for the run")
        created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        try:
            with RunLock(self.path):
                has_run = os.path.exists(self.checkpoint)
                if resume and not has_run:
                    raise CheckpointError(f"cannot resume: no checkpoint at {self.checkpoint}; "
                                          "start without --resume or point --out at the run folder")
                if not resume and has_run:
                    raise ConfigError(f"{self.path} already holds a run: pass --resume to continue it, "
                                      "or choose another --out")
                remove_stale_parts(self.path)   # temporary files of saves that a kill cut short
                try:
                    yield self
                finally:
                    if self._file:
                        self._file.close()
        except BaseException:
            if created and self.saved_step is None:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def start(self, backend, resume, data_dir, log):
        """The Training (model, its FlatParams, AdamW, EMA, first step): fresh from the seed, or as
        the run's checkpoint left them; with the EMA network, the weak weights and the evaluator."""
        run, run_cfg, cfg = self, self.run_cfg, self.cfg
        model = UViT(UViTConfig.from_dict(run_cfg["model"]), seed=cfg.seed).to(backend)
        flat = FlatParams(model)            # every parameter a view into one buffer (tinyuvit.optim)
        params = flat.params
        opt = AdamW(flat, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        ema = EMA(flat, cfg.ema_decay, cfg.ema_warmup)
        weak = WeakWeights(run_cfg["model"], backend)
        self.weak = weak
        ema_model = UViT(UViTConfig.from_dict(run_cfg["model"])).to(backend)
        ema_model.load_state_dict(ema.shadow)              # shares the EMA arrays: always current
        self.ema_net = on_cpu_threads(ema_model)
        if not resume:
            run.write_config(run_cfg)
            return self._started(Training(model, flat, opt, ema, 0), data_dir, log)
        ck = load_checkpoint(run.checkpoint, need=("params", "ema", "opt"))
        saved = ck["config"]                   # as that run trained: load_checkpoint's from_saved
        diffs = config_differences(saved, run_cfg, ignore=TrainConfig.RESUMABLE + ("data",))
        if diffs:
            named = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, a, b in diffs)
            raise CheckpointError(f"cannot resume {run.checkpoint}: the configuration differs in {named}; "
                                  "use the same settings or a new --out folder")
        other_data = dataset_difference(saved.get("data"), run_cfg["data"])
        if other_data:
            raise CheckpointError(f"cannot resume {run.checkpoint}: {other_data}; resume with the same data "
                                  "(--data-dir or $TINYUVIT_DATA) or start a new --out folder")
        for name in params:
            params[name][...] = backend.asarray(ck["params"][name])
            ema.shadow[name][...] = backend.asarray(ck["ema"][name])
        opt.load_state({k: backend.asarray(v) for k, v in ck["opt"].items()}, ck["opt_k"])
        if ck["weak"]:
            weak.keep({k: backend.asarray(v) for k, v in ck["weak"].items()}, ck["weak_step"])
        start = run.saved_step = ck["step"]
        log(f"resuming from step {start} of {run.checkpoint}")
        if cfg.lr_schedule == "cosine" and saved["steps"] != cfg.steps:
            log(f"note: the cosine learning-rate schedule now ends at step {cfg.steps} instead of {saved['steps']}")
        if start >= cfg.steps:
            log(f"the run already has {start} steps (asked for {cfg.steps}); nothing to train")
        run.write_config(run_cfg)
        return self._started(Training(model, flat, opt, ema, start), data_dir, log)


    def _started(self, training, data_dir, log):
        self.training = training
        self.evaluator = Evaluator(self, training.model.backend, data_dir, log) if self.cfg.eval_every else None
        self.start_metrics(training.start)
        return training

    def write_config(self, run_cfg):
        atomic_write(self.config, lambda f: f.write(json.dumps(run_cfg, indent=2, sort_keys=True).encode()))

    def start_metrics(self, start):
        """Keep the rows of steps 1..start (a resume drops rows logged after its checkpoint),
        rewrite the file with them atomically, then append."""
        self.rows = [r for r in read_jsonl(self.metrics) if r.get("step", 0) <= start] if start else []
        atomic_write(self.metrics, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in self.rows))
        self._file = open(self.metrics, "a")

    def log_step(self, step, loss, lr, gnorm, seconds):
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": round(gnorm, 4), "seconds": round(seconds, 2)}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")

    def kept(self):
        """'the last good checkpoint (step N) is kept', for messages about a diverged run."""
        return f"the last good checkpoint ({f'step {self.saved_step}' if self.saved_step is not None else 'none yet'}) is kept"

    def save(self, step):
        """Save a checkpoint, unless the weights are no longer finite (then stop, keeping the last)."""
        if step == self.saved_step:
            return
        tr = self.training
        params, ema, opt, weak = tr.flat.params, tr.ema, tr.opt, self.weak
        bad = [name for name, p in params.items() if not bool(xp_of(p).isfinite(p).all())]
        if bad:
            raise DivergedError(f"the weights are no longer finite at step {step} ({bad[0]}); {self.kept()}. "
                                "Try a lower --lr or a longer --warmup")
        if self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        # CheckpointError on a full disk: the old one is kept
        save_checkpoint(self.checkpoint, params=params, ema=ema.shadow, opt_state=opt.state(), opt_k=opt.k,
                        step=step, config=self.run_cfg, weak=weak.weights, weak_step=weak.step)
        self.saved_step = step

    def plot_loss(self):
        cfg = self.cfg
        if not self.rows:
            return
        steps = np.array([r["step"] for r in self.rows])
        loss = np.array([r["loss"] for r in self.rows])
        k = max(1, min(50, len(loss) // 20))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        weighting = f"{cfg.weighting} weighting (gamma {cfg.snr_gamma:g})" if cfg.snr_gamma else "unweighted"
        if cfg.clip_loss != "none":
            weighting += f", clip loss {cfg.clip_loss}"
        plot_curves(self.loss_plot, {"loss": (steps, loss), f"mean of {k}": (steps[k - 1:], smooth)},
                    title=f"training loss: {dict(eps='epsilon', v='v', x0='x0')[cfg.prediction]} MSE, {weighting}")

    def after_step(self, step, loss, lr, gnorm, seconds):
        """After step `step` (counted from 1): log it, keep the early EMA weights at the weak
        step, and at intervals save, draw a grid, redraw the loss plot and evaluate."""
        cfg, ema = self.cfg, self.training.ema
        if step == cfg.weak_step() and not self.weak.weights:
            self.weak.keep(ema.shadow, step)                 # the early EMA, for autoguidance
        self.log_step(step, loss, lr, gnorm, seconds)
        if step >= cfg.steps:
            return                                           # the end: `finish` saves and draws
        saved = cfg.save_every and step % cfg.save_every == 0
        drawn = cfg.sample_every and step % cfg.sample_every == 0
        if saved:
            self.save(step)
        if drawn:
            preview_grid(self.ema_net, cfg.diffusion(), cfg.sample_config(),
                         os.path.join(self.path, "samples", f"step_{step:06d}.png"), weak=self.weak.net)
        if saved or drawn:
            self.plot_loss()                 # the curve as far as the checkpoint or the grid
        if self.evaluator and step % cfg.eval_every == 0:
            self.evaluator(self.ema_net, cfg.diffusion(), step, self.weak.net)

    def finish(self, step, stopped):
        """Save the last step and plot the loss; for a run that reached its end, the final
        grid and evaluation."""
        cfg = self.cfg
        self.save(step)
        self.plot_loss()
        if stopped:
            return
        if self.training.start < cfg.steps or not os.path.exists(self.grid):
            preview_grid(self.ema_net, cfg.diffusion(), cfg.sample_config(), self.grid, weak=self.weak.net)
        if self.evaluator and self.training.start < cfg.steps:
            self.evaluator(self.ema_net, cfg.diffusion(), step, self.weak.net)


def read_jsonl(path):
    """The rows of a JSON-lines file ([] if it does not exist), skipping a line torn by a kill."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue          # a line torn by a kill
    return rows


def preview_grid(model, diffusion, how, path, seed=1234, weak=None):
    """A 10x10 grid, one row per digit, drawn with fixed noise so grids compare across steps
    (with autoguidance once the run has kept its weak weights)."""
    labels = model.backend.xp.asarray(np.repeat(np.arange(10), 10))
    x = diffusion.sample(model, labels, np.random.default_rng(seed), how, weak=weak)
    save_grid(to_numpy(x), path, nrow=10)


class WeakWeights:
    """The EMA weights kept early in the run (`weights`, {} until then), after which `step`,
    and the network that holds them (`net`, None until then): the weak network of autoguidance."""

    def __init__(self, model_cfg, backend):
        self.model_cfg, self.backend, self.weights, self.step, self.net = model_cfg, backend, {}, None, None

    def keep(self, weights, step):
        self.weights, self.step = {k: v.copy() for k, v in weights.items()}, step
        self.net = on_cpu_threads(network_with(self.model_cfg, self.backend, self.weights))


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP set `name`, which the loop reads after each step,
    so a run stopped by a terminal, `timeout`, `docker stop` or a batch scheduler saves first.
    Signals that arrive while stopping are noted and ignored: the save must not be cut short."""

    SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))

    def __init__(self):
        self.name, self.old = None, {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self.old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handler(self, signum, frame):
        if self.name is None:
            self.name = signal.Signals(signum).name
        else:
            os.write(2, b"\nalready stopping: the checkpoint is saved after the step in flight\n")

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)


class Evaluator:
    """Class accuracy and FID of the EMA model during training -> evals.jsonl and eval.png."""

    def __init__(self, run, backend, data_dir, log=print):
        from .metrics import load_classifier, reference_stats
        self.cfg, self.run, self.data_dir, self.log = run.cfg, run, data_dir, log
        self.path, self.plot = os.path.join(run.path, "evals.jsonl"), os.path.join(run.path, "eval.png")
        self.classifier = load_classifier(backend=backend)
        self.reference = reference_stats(self.classifier, data_dir=data_dir)
        self.rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= (run.saved_step or 0)]

    def __call__(self, model, diffusion, step, weak=None):
        from .evaluate import evaluate_model
        c = self.cfg
        res = evaluate_model(model, diffusion, c.eval_per_digit, c.sample_config(), classifier=self.classifier,
                             reference=self.reference, data_dir=self.data_dir, weak=weak)
        self.rows.append(dict(step=step, **res))
        atomic_write(self.path, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in self.rows))
        steps = [r["step"] for r in self.rows]
        plot_curves(self.plot, {"FID": (steps, [r["fid"] for r in self.rows]),
                                "FID floor": (steps, [r["fid_floor"] for r in self.rows]),
                                "class error (1 - accuracy) x 100": (steps, [100 * (1 - r["class_accuracy"]) + 1e-3
                                                                            for r in self.rows])},
                    title=f"EMA samples, {c.eval_per_digit}/digit, {c.sampler} {c.sample_steps} steps, "
                          f"guidance {c.guidance}")
        self.log(f"step {step}: class accuracy {res['class_accuracy']:.3f}, FID {res['fid']:.2f} "
            f"(floor {res['fid_floor']:.2f})")
        return res
