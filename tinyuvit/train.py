"""Training U-ViT on MNIST with DDPM: the loop, the run folder, checkpoints that resume.

A run folder holds:
    config.json      the run's configuration
    metrics.jsonl    one JSON line per step: step, loss, lr, grad_norm, seconds
    loss.png         the loss curve
    samples/         10x10 grids (one row per digit) drawn with the EMA weights at intervals
    samples.png      the final grid
    checkpoint.npz   weights, EMA weights, AdamW moments, step, config (resume from it)
"""
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from .backend import Backend, to_numpy, xp_of
from .checkpoint import CheckpointError, config_differences, load_checkpoint, save_checkpoint
from .diffusion import PREDICTIONS, WEIGHTINGS, Schedule, diffusion_loss, sample
from .images import plot_curves, save_grid
from .model import UViT, UViTConfig, get_config
from .optim import EMA, AdamW, clip_grad_norm, lr_at
from .parallel import on_cpu_threads
from .progress import Progress


from .errors import TrainingError  # noqa: F401,E402


@dataclass
class TrainConfig:
    preset: str = "tiny"
    steps: int = 5000                  # steps and batch: the CPU default (cli.DEVICE_DEFAULTS)
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
    prediction: str = "v"              # what the network predicts: "v" or "eps" (U-ViT)
    weighting: str = "min-snr+1"       # x0 weight min(SNR + 1, gamma), or "min-snr": min(SNR, gamma)
    snr_gamma: float = 5.0             # the cap gamma of the weighting (diffusion.loss_weight); 0 = plain MSE
    p_uncond: float = 0.1              # label dropout to the null label (classifier-free guidance)
    T: int = 1000
    seed: int = 0
    dtype: str = "float32"
    # previews and saving (may change on resume)
    sample_every: int = 1000
    save_every: int = 250
    sampler: str = "dpm++"
    sample_steps: int = 20
    guidance: float = 1.0
    eval_every: int = 0                # class accuracy and FID every N steps (0 = never)
    eval_per_digit: int = 100
    model_overrides: dict = dataclasses.field(default_factory=dict)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("steps", "sample_every", "save_every", "sampler", "sample_steps", "guidance",
                 "eval_every", "eval_per_digit")

    def validate(self):
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a positive number, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got {self.beta1}, {self.beta2}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.lr_schedule in ("constant", "cosine"), f"lr schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"),
            (self.grad_clip >= 0, f"gradient clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (0 <= self.ema_decay < 1, f"EMA decay must lie in [0, 1), got {self.ema_decay}"),
            (self.snr_gamma >= 0, f"SNR gamma must be >= 0 (0 = off), got {self.snr_gamma}"),
            (self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}"),
            (self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}"),
            (0 <= self.p_uncond < 1, f"label dropout must lie in [0, 1), got {self.p_uncond}"),
            (self.T >= 2, f"T must be >= 2, got {self.T}"),
            (self.sample_every >= 0 and self.save_every >= 0, "sample/save intervals must be >= 0 (0 = only at the end)"),
            (self.eval_every >= 0 and self.eval_per_digit >= 2, "eval interval must be >= 0 and eval samples per digit >= 2"),
            (self.sampler in ("ddpm", "ddim", "dpm++"), f"sampler must be ddpm, ddim or dpm++, got {self.sampler!r}"),
            (1 <= self.sample_steps <= self.T, f"sample steps must lie in 1..{self.T}, got {self.sample_steps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.model_config()  # raises ValueError on a bad preset or override

    def model_config(self) -> UViTConfig:
        return get_config(self.preset, **self.model_overrides)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["model"] = self.model_config().to_dict()
        return d


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


def preview_grid(model, schedule, cfg: TrainConfig, path, seed=1234):
    """A 10x10 grid, one row per digit, drawn with fixed noise so grids compare across steps."""
    xp = xp_of(model.decoder_pred.params["W"])
    labels = xp.asarray(np.repeat(np.arange(10), 10))
    x = sample(model, schedule, labels, np.random.default_rng(seed), sampler=cfg.sampler,
               steps=cfg.sample_steps, guidance=cfg.guidance, prediction=cfg.prediction)
    save_grid(to_numpy(x), path, nrow=10)


class _StopFlag:
    """Ctrl-C sets a flag that the loop reads between steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.set = False

    def __enter__(self):
        self.old = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.old = None
        return self

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def _read_metrics(path, upto):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= upto:
                    rows.append(row)
    return rows


def plot_loss(rows, path, cfg):
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    k = max(1, min(50, len(loss) // 20))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    plot_curves(path, {"loss": (steps, loss), f"mean of {k}": (steps[k - 1:], smooth)},
                title=f"training loss: {dict(eps='epsilon', v='v')[cfg.prediction]} MSE, " +
                      (f"{cfg.weighting} weighting (gamma {cfg.snr_gamma:g})" if cfg.snr_gamma else "unweighted"))


def train(cfg: TrainConfig, out_dir, device="cpu", data_dir=None, resume=False, log=print,
          progress=True, images=None, labels=None):
    """Train, writing the run folder `out_dir`. Returns a summary dict.

    `images`/`labels` (uint8 [N, 28, 28] / ints [N]) may be passed to skip loading MNIST.
    """
    cfg.validate()
    backend = Backend(device, cfg.dtype)
    xp = backend.xp
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.npz")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    run_cfg = cfg.to_dict()

    model = make_model(run_cfg["model"], backend, seed=cfg.seed)
    params = model.state_dict()
    opt = AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay, cfg.ema_warmup)
    start = 0
    if resume:
        if not os.path.exists(ckpt_path):
            raise CheckpointError(f"cannot resume: no checkpoint at {ckpt_path}; "
                                  "start without --resume or point --out at the run folder")
        ck = load_checkpoint(ckpt_path)
        diffs = config_differences(ck["config"], run_cfg, ignore=TrainConfig.RESUMABLE)
        if diffs:
            named = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, a, b in diffs)
            raise CheckpointError(f"cannot resume {ckpt_path}: the configuration differs in {named}; "
                                  "use the same settings or a new --out folder")
        for name in params:
            params[name][...] = backend.asarray(ck["params"][name])
            ema.shadow[name][...] = backend.asarray(ck["ema"][name])
        opt.load_state({k: backend.asarray(v) for k, v in ck["opt"].items()}, ck["opt_k"])
        start = ck["step"]
        log(f"resuming from step {start} of {ckpt_path}")
        if cfg.lr_schedule == "cosine" and ck["config"]["steps"] != cfg.steps:
            log(f"note: the cosine learning-rate schedule now ends at step {cfg.steps} "
                f"instead of {ck['config']['steps']}")
        if start >= cfg.steps:
            log(f"the run already has {start} steps (asked for {cfg.steps}); nothing to train")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(run_cfg, f, indent=2, sort_keys=True)

    if images is None:
        from .data import load_mnist
        images, labels, source = load_mnist("train", data_dir=data_dir, quiet=not progress)
        log(f"data: {source}, {len(images)} training digits")
    from .data import to_model_range
    x_all = backend.asarray(to_model_range(images))                     # [N, 1, 28, 28] in [-1, 1]
    y_all = np.asarray(labels, dtype=np.int64)
    n = len(images)

    schedule = Schedule(cfg.T)
    ema_model = make_model(run_cfg["model"], backend)
    ema_model.load_state_dict(ema.shadow)  # shares the EMA arrays: always current
    # On the CPU, every core runs the model on its share of each batch (tinyuvit.parallel).
    net, ema_net = on_cpu_threads(model), on_cpu_threads(ema_model)
    rows = _read_metrics(metrics_path, start)
    metrics_file = open(metrics_path, "w")
    for r in rows:
        metrics_file.write(json.dumps(r) + "\n")

    evaluator = _Evaluator(cfg, out_dir, backend, data_dir, start) if cfg.eval_every else None

    def save(step):
        save_checkpoint(ckpt_path, params=params, ema=ema.shadow, opt_state=opt.state(),
                        opt_k=opt.k, step=step, config=run_cfg)
        metrics_file.flush()

    step = start
    smooth = None
    stopped = None
    t0 = time.perf_counter()
    bar = Progress(cfg.steps, "train", unit="step", initial=start, disable=not progress)
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                if stop.set:
                    stopped = "interrupted"
                    break
                rng = step_rng(cfg.seed, step)
                idx = batch_indices(cfg.seed, step, cfg.batch_size, n)
                loss, dpred = diffusion_loss(net, schedule, x_all[xp.asarray(idx)], y_all[idx], rng,
                                             cfg.p_uncond, model.cfg.num_classes, cfg.snr_gamma, cfg.prediction,
                                             cfg.weighting)
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at step {step}; the last good checkpoint "
                        f"({'step %d' % _saved_step(ckpt_path) if os.path.exists(ckpt_path) else 'none yet'}) is kept. "
                        "Try a lower --lr or a longer warmup")
                net.backward(dpred)
                grads = net.grad_dict()
                gnorm = clip_grad_norm(grads, cfg.grad_clip)
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.lr_schedule)
                opt.step(grads, lr)
                ema.update(params, step)
                step += 1
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                metrics_file.write(json.dumps({"step": step, "loss": loss, "lr": lr,
                                               "grad_norm": round(gnorm, 4),
                                               "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
                bar.update(1, loss=f"{smooth:.4f}", **{"img/s": f"{bar.rate() * cfg.batch_size:.0f}"})
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save(step)
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                    preview_grid(ema_net, schedule, cfg, os.path.join(out_dir, "samples", f"step_{step:06d}.png"))
                    plot_loss(_read_metrics_flush(metrics_file, metrics_path, step), os.path.join(out_dir, "loss.png"), cfg)
                if evaluator and (step % cfg.eval_every == 0 or step == cfg.steps):
                    res = evaluator(ema_net, schedule, step)
                    log(f"step {step}: class accuracy {res['class_accuracy']:.3f}, FID {res['fid']:.2f} "
                        f"(floor {res['fid_floor']:.2f})")
    finally:
        bar.close()
        if stopped or step >= cfg.steps:
            save(step)
        metrics_file.close()
    if stopped:
        log(f"stopped by Ctrl-C at step {step}; saved {ckpt_path}. Continue with --resume")
        return {"step": step, "stopped": True, "checkpoint": ckpt_path}
    rows = _read_metrics(metrics_path, step)
    plot_loss(rows, os.path.join(out_dir, "loss.png"), cfg)
    final_grid = os.path.join(out_dir, "samples.png")
    if start < cfg.steps or not os.path.exists(final_grid):
        preview_grid(ema_net, schedule, cfg, final_grid)
    wall = time.perf_counter() - t0
    last = [r["loss"] for r in rows[-100:]]
    summary = {"step": step, "stopped": False, "checkpoint": ckpt_path, "grid": final_grid,
               "loss_curve": os.path.join(out_dir, "loss.png"), "seconds": round(wall, 1),
               "final_loss_mean100": float(np.mean(last)) if last else None}
    log(f"done: {step} steps in {wall / 60:.1f} min; samples {final_grid}; checkpoint {ckpt_path}")
    return summary


class _Evaluator:
    """Class accuracy and FID of the EMA model during training -> evals.jsonl and eval.png."""

    def __init__(self, cfg, out_dir, backend, data_dir, start):
        from .metrics import load_classifier, reference_stats
        self.cfg, self.out_dir = cfg, out_dir
        self.path = os.path.join(out_dir, "evals.jsonl")
        self.classifier = load_classifier(backend=backend)
        self.reference = reference_stats(self.classifier, data_dir=data_dir)
        self.rows = [r for r in _read_metrics(self.path, start)]

    def __call__(self, model, schedule, step):
        from .evaluate import evaluate_model
        c = self.cfg
        res = evaluate_model(model, schedule, c.eval_per_digit, c.sampler, c.sample_steps, c.guidance,
                             classifier=self.classifier, reference=self.reference, prediction=c.prediction)
        self.rows.append(dict(step=step, **res))
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        steps = [r["step"] for r in self.rows]
        plot_curves(os.path.join(self.out_dir, "eval.png"),
                    {"FID": (steps, [r["fid"] for r in self.rows]),
                     "FID floor": (steps, [r["fid_floor"] for r in self.rows]),
                     "class error (1 - accuracy) x 100": (steps, [100 * (1 - r["class_accuracy"]) + 1e-3 for r in self.rows])},
                    title=f"EMA samples, {c.eval_per_digit}/digit, {c.sampler} {c.sample_steps} steps, guidance {c.guidance}")
        return res


def _saved_step(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["step"])
    except Exception:
        return -1


def _read_metrics_flush(f, path, upto):
    f.flush()
    return _read_metrics(path, upto)
