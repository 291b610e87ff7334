"""Training U-ViT on MNIST with DDPM: one step, and the loop that repeats it.

    draw a noisy batch -> forward -> weighted loss and its gradient -> backward
    -> clip the gradient -> AdamW -> EMA of the weights

`train_step` is that line (the benchmark times the same function); `train` is the loop around
it. What a run folder needs beside the steps (resuming, saving, sample grids, the loss plot,
evaluations, signals) is tools/runfolder.py's; the configuration is config.py's.
"""
import math
import time

import numpy as np

from .backend import Backend
from .config import TrainConfig
from .errors import DivergedError
from .optim import clip_grad_norm, lr_at
from .tools.parallel import on_cpu_threads
from .tools.progress import Progress
from .tools.runfolder import RunFolder, StopSignals, training_data


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


def train_step(net, flat, opt, ema, diffusion, x0, y, rng, step, cfg: TrainConfig):
    """One step on clean images x0 [B, C, H, W] and labels y [B] -> (loss, gradient norm, lr).
    A NaN or infinite loss or gradient raises DivergedError before it reaches the weights."""
    batch = diffusion.noisy_batch(x0, y, rng, cfg.p_uncond, net.cfg.num_classes)
    pred = net.forward(batch.xt, batch.t, batch.y)                         # [B, C, H, W]
    loss, dpred = diffusion.loss(pred, batch)
    net.backward(dpred)
    grads = flat.grad(net)                                                 # [P] all of them
    gnorm = clip_grad_norm(grads, cfg.grad_clip, flat)
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise DivergedError(f"loss became {loss} at step {step}" if not math.isfinite(loss)
                            else f"gradient norm became {gnorm} at step {step}")
    lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.lr_schedule)
    opt.step(grads, lr)
    ema.update(flat, step)
    return loss, gnorm, lr


def train(cfg: TrainConfig, out_dir, device="cpu", data_dir=None, resume=False, log=print,
          progress=True, images=None, labels=None):
    """Train, writing the run folder `out_dir`; returns a summary dict (step, stopped, paths).

    `images`/`labels` (uint8 [N, 28, 28] / ints [N]) may be passed to skip loading MNIST.
    Ctrl-C, SIGTERM and SIGHUP finish the step in flight, save, and return with
    `stopped` set to the signal's name.
    """
    cfg.validate()
    backend = Backend(device, cfg.dtype)
    x_all, y_all, data_id = training_data(backend, images, labels, data_dir, progress, log)
    run = RunFolder(out_dir, cfg, dict(cfg.to_dict(), data=data_id))
    with run.open(resume):
        tr = run.start(backend, resume, data_dir, log)          # fresh, or from the checkpoint
        net = on_cpu_threads(tr.model)                          # every CPU core: a share of the batch
        diffusion, xp = cfg.diffusion(), backend.xp
        bar = Progress(cfg.steps, "train", unit="step", initial=tr.start, disable=not progress)
        t0, smooth, done = time.perf_counter(), None, tr.start
        with bar, StopSignals() as stop:
            for step in range(tr.start, cfg.steps):
                if stop.name:
                    break
                idx = batch_indices(cfg.seed, step, cfg.batch_size, len(y_all))
                try:
                    loss, gnorm, lr = train_step(net, tr.flat, tr.opt, tr.ema, diffusion, x_all[xp.asarray(idx)],
                                                 y_all[idx], step_rng(cfg.seed, step), step, cfg)
                except DivergedError as e:
                    raise DivergedError(f"{e}; {run.kept()}. Try a lower --lr or a longer --warmup") from None
                done = step + 1
                run.after_step(done, loss, lr, gnorm, time.perf_counter() - t0)   # save, draw, ... at intervals
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                bar.update(1, loss=f"{smooth:.4f}", **{"img/s": f"{bar.rate() * cfg.batch_size:.0f}"})
        run.finish(done, stop.name)
        if stop.name:
            log(f"stopped by {stop.name} at step {done}; saved {run.checkpoint}. Continue with --resume")
            return {"step": done, "stopped": stop.name, "checkpoint": run.checkpoint}
    wall = time.perf_counter() - t0
    last = [r["loss"] for r in run.rows[-100:]]
    log(f"done: {done} steps in {wall / 60:.1f} min; samples {run.grid}; checkpoint {run.checkpoint}")
    return {"step": done, "stopped": None, "checkpoint": run.checkpoint, "grid": run.grid,
            "loss_curve": run.loss_plot, "seconds": round(wall, 1),
            "final_loss_mean100": float(np.mean(last)) if last else None}
