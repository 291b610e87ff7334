"""Training U-ViT on MNIST with DDPM: the loop, the run folder, checkpoints that resume.

The loop (`train`) is the whole algorithm, one call a line:

    draw a noisy batch -> forward -> weighted loss and its gradient -> backward
    -> clip the gradient -> AdamW -> EMA of the weights

Everything else (resume, saving, sample grids, evaluation, the loss plot) is a helper beside it.

A run folder holds:
    config.json      the run's configuration (TrainConfig, the model config, the data used)
    metrics.jsonl    one JSON line per step: step, loss, lr, grad_norm, seconds
    loss.png         the loss curve
    samples/         10x10 grids (one row per digit) drawn with the EMA weights at intervals
    samples.png      the final grid
    checkpoint.npz   weights, EMA weights, AdamW moments, step, config (resume from it)
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass

import numpy as np

from .backend import Backend, to_numpy, xp_of
from .tools.checkpoint import config_differences, load_checkpoint, save_checkpoint
from .tools.data import dataset_difference
from .diffusion import Diffusion, SampleConfig
from .errors import CheckpointError, ConfigError, DivergedError, TrainingError  # noqa: F401 (TrainingError: re-exported)
from .tools.files import RunLock, atomic_write, remove_stale_parts
from .tools.images import plot_curves, save_grid
from .model import PRESETS, UViT, UViTConfig, get_config, network_with
from .optim import EMA, AdamW, FlatParams, clip_grad_norm, lr_at
from .tools.parallel import on_cpu_threads
from .tools.progress import Progress

# ----------------------------------------------------------------------------------------
# The configuration: every default of `tinyuvit train-mnist` lives here
# ----------------------------------------------------------------------------------------

# What `--device gpu` changes in the defaults (the CPU run is TrainConfig's own defaults).
# The GPU run keeps 5,000 steps (of 256): the 6,500 of the CPU run spend the time that a
# faster CPU step made (README, "Closer to real digits").
GPU_DEFAULTS = dict(batch_size=256, steps=5000)


@dataclass
class TrainConfig:
    """A training run. The defaults are the CPU run: 6,500 steps of 64 images, ~25 min on 2 cores."""
    preset: str = "tiny"
    steps: int = 6500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: int = 200
    lr_schedule: str = "cosine"        # or "constant" (U-ViT's choice after warmup)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True            # decay min(ema_decay, (1+k)/(10+k)) at step k
    # keep the EMA weights after this fraction of the steps as the weak network that guides the
    # final one (autoguidance, SampleConfig.autoguidance); 0 = keep none. 0.3: step 1,950 of 6,500
    weak_at: float = 0.3
    prediction: str = Diffusion.prediction
    weighting: str = Diffusion.weighting
    # the cap gamma of the x0 weight. 200 keeps weight on the nearly clean steps: 41-63% less grey
    # haze, at the same FID on one seed and a little worse on two others (README, "A heavier weight
    # on the clean end: --snr-gamma 200")
    snr_gamma: float = Diffusion.snr_gamma
    # forgive x0 below -1 where the pixel is black: backgrounds nearly as black as real ones (README,
    # "Black below black with v, and s = 0.6"); Diffusion's own default,
    # for old runs, is "none"
    clip_loss: str = "black"
    noise_schedule: str = "cosine"     # abar_t of Nichol & Dhariwal (U-ViT, DDPM: "linear" betas)
    pos_init: str = "sincos2d"         # learned positions start as the 2-D sinusoidal table (U-ViT: normal)
    conv_init: str = "identity"        # the final conv starts as the identity (U-ViT: "uniform"; model.INITS)
    p_uncond: float = 0.1              # label dropout to the null label (classifier-free guidance)
    T: int = Diffusion.T
    seed: int = 0
    dtype: str = "float32"
    # previews and saving (may change on resume)
    sample_every: int = 1000
    save_every: int = 250
    sampler: str = SampleConfig.sampler
    sample_steps: int = SampleConfig.steps
    guidance: float = SampleConfig.guidance
    eval_every: int = 0                # class accuracy and FID every N steps (0 = never)
    eval_per_digit: int = 100
    model_overrides: dict = dataclasses.field(default_factory=dict)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("steps", "weak_at", "sample_every", "save_every", "sampler", "sample_steps", "guidance",
                 "eval_every", "eval_per_digit")

    @classmethod
    def for_device(cls, device="cpu", **settings):
        """The defaults for `device` ("cpu" or "gpu"), with `settings` (None = default) on top."""
        if device not in ("cpu", "gpu"):
            raise ConfigError(f"device (--device) must be 'cpu' or 'gpu', got {device!r}")
        base = dict(GPU_DEFAULTS) if device == "gpu" else {}
        base.update({k: v for k, v in settings.items() if v is not None})
        return cls(**base)

    def validate(self):
        """ConfigError naming the first invalid field (and its command-line option)."""
        whole = lambda v, lo: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo
        real = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
            and math.isfinite(v)
        checks = [
            (self.preset in PRESETS, f"preset (--preset) must be one of {sorted(PRESETS)}, got {self.preset!r}"),
            (whole(self.steps, 1), f"steps (--steps) must be a whole number >= 1, got {self.steps!r}"),
            (whole(self.batch_size, 1), f"batch size (--batch-size) must be a whole number >= 1, got {self.batch_size!r}"),
            (real(self.lr) and self.lr > 0, f"learning rate (--lr) must be a finite number > 0, got {self.lr!r}"),
            (real(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay (--weight-decay) must be a finite number >= 0, got {self.weight_decay!r}"),
            (real(self.beta1) and real(self.beta2) and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"AdamW betas must lie in [0, 1), got {self.beta1!r}, {self.beta2!r}"),
            (whole(self.warmup, 0), f"warmup (--warmup) must be a whole number >= 0, got {self.warmup!r}"),
            (self.lr_schedule in ("constant", "cosine"),
             f"lr schedule (--lr-schedule) must be 'constant' or 'cosine', got {self.lr_schedule!r}"),
            (real(self.grad_clip) and self.grad_clip >= 0,
             f"gradient clip (--grad-clip) must be a finite number >= 0 (0 = off), got {self.grad_clip!r}"),
            (real(self.ema_decay) and 0 <= self.ema_decay < 1,
             f"EMA decay (--ema-decay) must lie in [0, 1), got {self.ema_decay!r}"),
            (real(self.weak_at) and 0 <= self.weak_at < 1,
             f"--weak-at must lie in [0, 1) (a fraction of the steps; 0 = no autoguidance), got {self.weak_at!r}"),
            (real(self.p_uncond) and 0 <= self.p_uncond < 1,
             f"label dropout (--p-uncond) must lie in [0, 1), got {self.p_uncond!r}"),
            (whole(self.seed, 0), f"seed (--seed) must be a whole number >= 0, got {self.seed!r}"),
            (self.dtype in ("float32", "float64"), f"dtype (--dtype) must be float32 or float64, got {self.dtype!r}"),
            (whole(self.sample_every, 0), f"--sample-every must be a whole number >= 0 (0 = only at the end), got {self.sample_every!r}"),
            (whole(self.save_every, 0), f"--save-every must be a whole number >= 0 (0 = only at the end), got {self.save_every!r}"),
            (whole(self.eval_every, 0), f"--eval-every must be a whole number >= 0 (0 = never), got {self.eval_every!r}"),
            (whole(self.eval_per_digit, 2), f"--eval-per-digit must be a whole number >= 2, got {self.eval_per_digit!r}"),
            (whole(self.sample_steps, 1) and self.sample_steps <= (self.T if whole(self.T, 2) else 1000),
             f"sampler steps (--sample-steps) must lie in 1..{self.T}, got {self.sample_steps!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        self.diffusion()       # each raises ConfigError on a bad field
        self.sample_config()
        self.model_config()

    def model_config(self) -> UViTConfig:
        inits = dict(pos_init=self.pos_init, conv_init=self.conv_init)
        return get_config(self.preset, **{**inits, **self.model_overrides})

    def diffusion(self) -> Diffusion:
        return Diffusion(T=self.T, prediction=self.prediction, weighting=self.weighting, snr_gamma=self.snr_gamma,
                         noise_schedule=self.noise_schedule, clip_loss=self.clip_loss)

    def weak_step(self):
        """The step after which the EMA weights are kept for autoguidance (None: never)."""
        return max(1, round(self.weak_at * self.steps)) if self.weak_at else None

    def sample_config(self) -> SampleConfig:
        """How the run's sample grids are drawn."""
        return SampleConfig(sampler=self.sampler, steps=self.sample_steps, guidance=self.guidance)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["model"] = self.model_config().to_dict()
        return d


# TrainConfig fields added after runs were saved, with what those runs did before they existed
FIELDS_ADDED = dict(noise_schedule="linear", pos_init="normal", conv_init="uniform", weak_at=0.0)


def saved_with_defaults(saved):
    """A saved run config with the fields added since it was saved filled in as that run
    trained (FIELDS_ADDED; the model's at their defaults, which is what loading it builds), so
    that resuming compares like with like."""
    saved = {**FIELDS_ADDED, **saved}
    if isinstance(saved.get("model"), dict):
        saved["model"] = UViTConfig.from_dict(saved["model"]).to_dict()
    return saved


def make_model(model_cfg: dict, backend: Backend, seed=0):
    return UViT(UViTConfig.from_dict(model_cfg), seed=seed).to(backend)


def step_rng(seed, step):
    """The generator for one training step: the same (seed, step) always gives the same draws."""
    return np.random.default_rng([seed, 1, step])


def batch_indices(seed, step, batch_size, n):
    """Indices of the training images for a step: epochs of seeded permutations, read in order."""
    parts, pos, need = [], step * batch_size, batch_size
    while need > 0:
        epoch, offset = divmod(pos, n)
        take = np.random.default_rng([seed, 0, epoch]).permutation(n)[offset: offset + need]
        parts.append(take)
        pos, need = pos + len(take), need - len(take)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------

def train(cfg: TrainConfig, out_dir, device="cpu", data_dir=None, resume=False, log=print,
          progress=True, images=None, labels=None):
    """Train, writing the run folder `out_dir`; returns a summary dict (step, stopped, paths).

    `images`/`labels` (uint8 [N, 28, 28] / ints [N]) may be passed to skip loading MNIST.
    Ctrl-C, SIGTERM and SIGHUP finish the step in flight, save, and return with
    `stopped` set to the signal's name.
    """
    cfg.validate()
    backend = Backend(device, cfg.dtype)
    x_all, y_all, data_id = _training_data(backend, images, labels, data_dir, progress, log)
    run_cfg = dict(cfg.to_dict(), data=data_id)
    run = RunFolder(out_dir)
    with run.open(resume):
        model, flat, opt, ema, weak, start = _start_or_resume(run, run_cfg, cfg, backend, resume, log)
        run.start_metrics(start)
        params = flat.params                                # {name: view into flat.data}
        ema_model = make_model(run_cfg["model"], backend)
        ema_model.load_state_dict(ema.shadow)              # shares the EMA arrays: always current
        net, ema_net = on_cpu_threads(model), on_cpu_threads(ema_model)  # every CPU core: a share
        diffusion, null_label, xp = cfg.diffusion(), model.cfg.num_classes, backend.xp
        save = lambda step: run.save(step, params, ema, opt, run_cfg, weak)
        evaluator = _Evaluator(cfg, run, backend, data_dir) if cfg.eval_every else None
        bar = Progress(cfg.steps, "train", unit="step", initial=start, disable=not progress)
        t0, smooth, done = time.perf_counter(), None, start
        with bar, StopSignals() as stop:
            for step in range(start, cfg.steps):
                if stop.name:
                    break
                idx = batch_indices(cfg.seed, step, cfg.batch_size, len(y_all))
                rng = step_rng(cfg.seed, step)
                xt, t, y, target, weight, side = diffusion.noisy_batch(x_all[xp.asarray(idx)], y_all[idx], rng,
                                                                 cfg.p_uncond, null_label)
                pred = net.forward(xt, t, y)                                    # [B, C, H, W]
                loss, dpred = diffusion.loss(pred, target, weight, side)
                net.backward(dpred)
                grads = flat.grad(net)                                          # [P] all of them
                gnorm = clip_grad_norm(grads, cfg.grad_clip, flat)
                _check_finite(loss, gnorm, step, run)                           # before the update
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.lr_schedule)
                opt.step(grads, lr)
                ema.update(flat, step)

                done = step + 1
                if done == cfg.weak_step() and not weak.weights:
                    weak.keep(ema.shadow, done)                 # the early EMA, for autoguidance
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                run.log_step(done, loss, lr, gnorm, time.perf_counter() - t0)
                bar.update(1, loss=f"{smooth:.4f}", **{"img/s": f"{bar.rate() * cfg.batch_size:.0f}"})
                if done < cfg.steps:
                    _every(done, cfg, run, save, ema_net, diffusion, evaluator, log, weak.net)
        save(done)
        run.plot_loss(cfg)
        if stop.name:
            log(f"stopped by {stop.name} at step {done}; saved {run.checkpoint}. Continue with --resume")
            return {"step": done, "stopped": stop.name, "checkpoint": run.checkpoint}
        if start < cfg.steps or not os.path.exists(run.grid):
            preview_grid(ema_net, diffusion, cfg.sample_config(), run.grid, weak=weak.net)
        if evaluator and start < cfg.steps:
            evaluator(ema_net, diffusion, done, log, weak.net)
    wall = time.perf_counter() - t0
    last = [r["loss"] for r in run.rows[-100:]]
    log(f"done: {done} steps in {wall / 60:.1f} min; samples {run.grid}; checkpoint {run.checkpoint}")
    return {"step": done, "stopped": None, "checkpoint": run.checkpoint, "grid": run.grid,
            "loss_curve": run.loss_plot, "seconds": round(wall, 1),
            "final_loss_mean100": float(np.mean(last)) if last else None}


def _every(step, cfg, run, save, ema_net, diffusion, evaluator, log, weak_net):
    """What happens at intervals after a step: save, draw a grid, redraw the loss plot, evaluate."""
    saved = cfg.save_every and step % cfg.save_every == 0
    drawn = cfg.sample_every and step % cfg.sample_every == 0
    if saved:
        save(step)
    if drawn:
        preview_grid(ema_net, diffusion, cfg.sample_config(), os.path.join(run.path, "samples", f"step_{step:06d}.png"),
                     weak=weak_net)
    if saved or drawn:
        run.plot_loss(cfg)                 # the curve as far as the checkpoint or the grid
    if evaluator and step % cfg.eval_every == 0:
        evaluator(ema_net, diffusion, step, log, weak_net)


def _check_finite(loss, gnorm, step, run):
    """Stop before a NaN or infinite loss or gradient reaches the weights."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {gnorm}"
        kept = f"step {run.saved_step}" if run.saved_step is not None else "none yet"
        raise DivergedError(f"{what} at step {step}; the last good checkpoint ({kept}) is kept. "
                            "Try a lower --lr or a longer --warmup")


# ----------------------------------------------------------------------------------------
# Helpers beside the loop: data, starting or resuming, the run folder, pictures, signals
# ----------------------------------------------------------------------------------------

def _training_data(backend, images, labels, data_dir, progress, log):
    """(images on the backend in [-1, 1] [N, 1, 28, 28], labels [N], identity of the data)."""
    from .tools.data import dataset_id, load_mnist
    from .tools.images import to_model_range
    if images is None:
        images, labels, source = load_mnist("train", data_dir=data_dir, quiet=not progress)
        log(f"data: {source}, {len(images)} training digits")
    else:
        source = "arrays passed to train()"
    labels = np.asarray(labels, dtype=np.int64)
    return backend.asarray(to_model_range(images)), labels, dataset_id(images, labels, source)


def _start_or_resume(run, run_cfg, cfg, backend, resume, log):
    """(model, its FlatParams, AdamW, EMA, WeakWeights, first step): fresh from the seed, or as
    the run's checkpoint left them."""
    model = make_model(run_cfg["model"], backend, seed=cfg.seed)
    flat = FlatParams(model)            # every parameter a view into one buffer (tinyuvit.optim)
    params = flat.params
    opt = AdamW(flat, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    ema = EMA(flat, cfg.ema_decay, cfg.ema_warmup)
    weak = WeakWeights(run_cfg["model"], backend)
    if not resume:
        run.write_config(run_cfg)
        return model, flat, opt, ema, weak, 0
    ck = load_checkpoint(run.checkpoint, need=("params", "ema", "opt"))
    saved = saved_with_defaults(ck["config"])
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
    return model, flat, opt, ema, weak, start


class WeakWeights:
    """The EMA weights kept early in the run (`weights`, {} until then), after which `step`,
    and the network that holds them (`net`, None until then): the weak network of autoguidance."""

    def __init__(self, model_cfg, backend):
        self.model_cfg, self.backend, self.weights, self.step, self.net = model_cfg, backend, {}, None, None

    def keep(self, weights, step):
        self.weights, self.step = {k: v.copy() for k, v in weights.items()}, step
        self.net = on_cpu_threads(network_with(self.model_cfg, self.backend, self.weights))


class RunFolder:
    """A run's folder: its file names, the lock that keeps a second process out, the metrics
    (kept in memory, appended to metrics.jsonl, flushed with every checkpoint) and saving."""

    def __init__(self, path):
        self.path = os.fspath(path)
        join = lambda name: os.path.join(self.path, name)
        self.checkpoint, self.metrics, self.config = join("checkpoint.npz"), join("metrics.jsonl"), join("config.json")
        self.loss_plot, self.grid = join("loss.png"), join("samples.png")
        self.rows, self.saved_step, self._file = [], None, None

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

    def write_config(self, run_cfg):
        atomic_write(self.config, lambda f: f.write(json.dumps(run_cfg, indent=2, sort_keys=True).encode()))

    def start_metrics(self, start):
        """Keep the rows of steps 1..start (a resume drops rows logged after its checkpoint),
        rewrite the file with them atomically, then append."""
        self.rows = [r for r in _read_jsonl(self.metrics) if r.get("step", 0) <= start] if start else []
        atomic_write(self.metrics, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in self.rows))
        self._file = open(self.metrics, "a")

    def log_step(self, step, loss, lr, gnorm, seconds):
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": round(gnorm, 4), "seconds": round(seconds, 2)}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")

    def save(self, step, params, ema, opt, run_cfg, weak):
        """Save a checkpoint, unless the weights are no longer finite (then stop, keeping the last)."""
        if step == self.saved_step:
            return
        bad = [name for name, p in params.items() if not bool(xp_of(p).isfinite(p).all())]
        if bad:
            kept = f"step {self.saved_step}" if self.saved_step is not None else "none yet"
            raise DivergedError(f"the weights are no longer finite at step {step} ({bad[0]}); the last "
                                f"good checkpoint ({kept}) is kept. Try a lower --lr or a longer --warmup")
        if self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        # CheckpointError on a full disk: the old one is kept
        save_checkpoint(self.checkpoint, params=params, ema=ema.shadow, opt_state=opt.state(), opt_k=opt.k,
                        step=step, config=run_cfg, weak=weak.weights, weak_step=weak.step)
        self.saved_step = step

    def plot_loss(self, cfg):
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


def _read_jsonl(path):
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


class _Evaluator:
    """Class accuracy and FID of the EMA model during training -> evals.jsonl and eval.png."""

    def __init__(self, cfg, run, backend, data_dir):
        from .tools.metrics import load_classifier, reference_stats
        self.cfg, self.run, self.data_dir = cfg, run, data_dir
        self.path, self.plot = os.path.join(run.path, "evals.jsonl"), os.path.join(run.path, "eval.png")
        self.classifier = load_classifier(backend=backend)
        self.reference = reference_stats(self.classifier, data_dir=data_dir)
        self.rows = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= (run.saved_step or 0)]

    def __call__(self, model, diffusion, step, log, weak=None):
        from .tools.evaluate import evaluate_model
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
        log(f"step {step}: class accuracy {res['class_accuracy']:.3f}, FID {res['fid']:.2f} "
            f"(floor {res['fid_floor']:.2f})")
        return res
