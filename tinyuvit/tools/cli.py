"""The `tinyuvit` command line: a thin shell over the library (tinyuvit.train, tinyuvit.load).

Every default comes from the library's configs (TrainConfig, SampleConfig, evaluate.PER_DIGIT)
and every check of a value is the library's own, so the command line and Python cannot drift.
Expected errors (tinyuvit.errors.TinyUViTError) print one line and exit with status 1; anything
else is a bug and shows its traceback. `--debug` (or TINYUVIT_DEBUG=1) shows them all.
"""
import errno
import os
import sys

import click

from ..diffusion import CLIP_LOSSES, PREDICTIONS, WEIGHTINGS, Schedule
from ..sampling import SAMPLERS, SampleConfig
from .evaluate import LABELS
from ..errors import TinyUViTError
from ..model import INITS, PRESETS
from ..config import GPU_DEFAULTS, TrainConfig

# OS errors that are the machine's state, not a bug: shown in one line like the project's own.
_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class _Main(click.Group):
    """Runs a command; expected errors become one line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            msg = _expected(e)
            if msg is None or ctx.params.get("debug") or os.environ.get("TINYUVIT_DEBUG", "") not in ("", "0"):
                raise
            click.echo(f"Error: {msg}", err=True)
            ctx.exit(1)


def _expected(e):
    """The one-line message of an expected error, or None for a bug (which keeps its traceback)."""
    if isinstance(e, TinyUViTError):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.errno in _OS_ERRNOS:
        return f"cannot write {e.filename}: {e.strerror}" if e.filename else str(e)
    return None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of every error (also: TINYUVIT_DEBUG=1).")
@click.version_option(package_name="tinyuvit")
def main(debug):
    """tinyuvit: U-ViT, a diffusion transformer, from scratch in NumPy (CuPy on a GPU).

    Start with `tinyuvit train-mnist`, then `tinyuvit sample --checkpoint RUN/checkpoint.npz`.
    """


def threads_option(fn):
    """--threads: CPU threads, each running the model on its share of the batch."""
    return click.option("--threads", type=int, default=None,
                        help="CPU threads, each running the model on its share of every batch "
                             "(default: all cores). If other programs keep the cores busy, fewer "
                             "threads can be much faster.")(fn)


def device_option(fn):
    return click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
                        help="cpu: NumPy; gpu: CuPy on an NVIDIA GPU.")(fn)


def sampler_options(steps_flag="--steps", what=None):
    """--sampler, --steps (train-mnist: --sample-steps) and --guidance with SampleConfig's defaults."""
    d = SampleConfig
    options = [
        click.option("--sampler", type=click.Choice(SAMPLERS), default=d.sampler, show_default=True,
                     help=what or "dpm++ (DPM-Solver++ 2M, good at 10-25 steps), ddim (any steps), ddpm (every timestep)."),
        click.option(steps_flag, type=int, default=d.steps, show_default=True,
                     help="Sampler steps (ddpm takes every timestep, down to the final sigma)."),
        click.option("--guidance", type=float, default=d.guidance, show_default=True,
                     help="Guidance scale s in eps = eps_c + s (eps_c - eps_u); 0 = none."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


class _Interval(click.ParamType):
    """LO,HI: two numbers, as --guidance-interval takes them. Anything else is passed on as
    it is, for SampleConfig to refuse in one line like every other sampling setting."""
    name = "LO,HI"

    def convert(self, value, param, ctx):
        try:
            return tuple(float(v) for v in value.split(",")) if isinstance(value, str) else value
        except ValueError:
            return value


def guidance_interval_option(fn):
    lo, hi = SampleConfig.guidance_interval
    return click.option("--guidance-interval", type=_Interval(), default=f"{lo:g},{hi:g}", show_default=True,
                        help="Guide only the steps whose noise level sigma = sqrt((1 - abar)/abar) lies in "
                             "[LO, HI] (with the default cosine schedule 0.0064 at the clean end, 6 at "
                             "t = 893, 20,000 at pure noise; 0,inf guides every step); the others use the conditional model "
                             "alone and cost half.")(fn)


def autoguidance_option(fn):
    return click.option("--autoguidance", type=float, default=SampleConfig.autoguidance, show_default=True,
                        help="Autoguidance scale a: add a (out_c - weak_c) at every step, away from what the "
                             "run's own early weights (kept at --weak-at of training) predict for the same "
                             "digit; 0 = none. Runs saved without early weights sample without it.")(fn)


def final_sigma_option(fn):
    return click.option("--final-sigma", type=float, default=SampleConfig.final_sigma, show_default=True,
                        help="The noise level sigma of the sampler's last step, from which it jumps to the "
                             "clean image the network predicts there; the steps are spread down to it. "
                             "0 = the cleanest timestep (sigma 0.0064 with the cosine schedule), as "
                             "runs were sampled before this option.")(fn)


def ink_percentile_option(fn):
    return click.option("--ink-percentile", type=float, default=SampleConfig.ink_percentile, show_default=True,
                        help="At the last step, scale each image's ink so that this percentile of its "
                             "pixels lies at full ink (255) where the network put it higher, then clip: "
                             "as many pixels reach 255 as in real digits instead of every overshooting "
                             "one. 0 = clip only, as runs were sampled before this option.")(fn)


def _set_threads(threads):
    from ..backend import set_cpu_threads
    set_cpu_threads(threads)


def _parse_digits(text):
    from ..api import check_digits
    if text.strip().lower() == "all":
        return list(range(10))
    return check_digits([d for d in text.replace(" ", "").split(",") if d != ""] or [text])


# ----------------------------------------------------------------------------------------
# train-mnist
# ----------------------------------------------------------------------------------------

T = TrainConfig   # the defaults below are TrainConfig's


@main.command("train-mnist")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=T.preset, show_default=True,
              help="Model size from the presets table (tiny: 1.5M parameters, small: 7.7M).")
@click.option("--steps", type=int, default=None,
              help=f"Training steps. [default: {T.steps} on cpu, {GPU_DEFAULTS['steps']} on gpu]")
@click.option("--batch-size", type=int, default=None,
              help=f"Images per step. [default: {T.batch_size} on cpu, {GPU_DEFAULTS['batch_size']} on gpu]")
@click.option("--lr", type=float, default=T.lr, show_default=True, help="Peak AdamW learning rate.")
@click.option("--warmup", type=int, default=T.warmup, show_default=True, help="Linear learning-rate warmup steps.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=T.lr_schedule, show_default=True,
              help="After warmup: constant (as U-ViT) or cosine decay to 0.")
@click.option("--weight-decay", type=float, default=T.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--grad-clip", type=float, default=T.grad_clip, show_default=True,
              help="Clip the global gradient norm (0 = off).")
@click.option("--ema-decay", type=float, default=T.ema_decay, show_default=True, help="EMA of the weights; samples use it.")
@click.option("--ema-warmup/--no-ema-warmup", default=T.ema_warmup, show_default=True,
              help="Let the EMA decay grow as min(decay, (1+k)/(10+k)) so short runs forget the init.")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=T.prediction, show_default=True,
              help="What the network predicts: the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0, the "
                   "noise eps (U-ViT, DDPM), or the clean image x0. The loss weights the same x0 error in each.")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default=T.weighting, show_default=True,
              help="Loss weight, as a weight on the error of the predicted clean image: min(SNR + 1, gamma) "
                   "(the v loss, capped) or min(SNR, gamma) (Min-SNR, which all but ignores the noisiest steps).")
@click.option("--snr-gamma", type=float, default=T.snr_gamma, show_default=True,
              help="The cap gamma of --weighting (0 = the plain MSE of what the network predicts).")
@click.option("--clip-loss", type=click.Choice(CLIP_LOSSES), default=T.clip_loss, show_default=True,
              help="Count no error where the true pixel is black (black; both: black or full ink) and the "
                   "predicted x0 lies beyond it: the sampler clips it there, so the network may draw black "
                   "below black instead of exactly at it.")
@click.option("--noise-schedule", type=click.Choice(Schedule.KINDS), default=T.noise_schedule, show_default=True,
              help="abar_t over the T steps: linear betas (DDPM, U-ViT) or cosine (Nichol & Dhariwal).")
@click.option("--pos-init", type=click.Choice(INITS["pos_init"]), default=T.pos_init, show_default=True,
              help="How the learned positions start: the 2-D sinusoidal table of the patch grid, or "
                   "N(0, 0.02) as U-ViT.")
@click.option("--conv-init", type=click.Choice(INITS["conv_init"]), default=T.conv_init, show_default=True,
              help="How the final 3x3 conv starts: PyTorch's uniform init as U-ViT, or the identity.")
@click.option("--p-uncond", type=float, default=T.p_uncond, show_default=True,
              help="Probability of replacing the label by the null label (for classifier-free guidance).")
@click.option("--weak-at", type=float, default=T.weak_at, show_default=True,
              help="Keep the EMA weights after this fraction of the steps in the checkpoint: the weak network "
                   "that autoguidance steers the samples away from (0 = keep none).")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=T.dtype, show_default=True)
@click.option("--seed", type=int, default=T.seed, show_default=True, help="Seed for weights, data order and noise.")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="Run folder. [default: runs/mnist-PRESET]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.npz.")
@click.option("--data-dir", type=click.Path(), default=None,
              help="Folder with the four MNIST IDX files (else $TINYUVIT_DATA, the cache, a download, "
                   "or the embedded subset).")
@click.option("--sample-every", type=int, default=T.sample_every, show_default=True,
              help="Save a 10x10 sample grid every N steps (0 = only at the end).")
@click.option("--save-every", type=int, default=T.save_every, show_default=True,
              help="Save the checkpoint every N steps (0 = only at the end).")
@sampler_options("--sample-steps", what="Sampler for the grids.")
@click.option("--eval-every", type=int, default=T.eval_every, show_default=True,
              help="Every N steps, score EMA samples (class accuracy, FID) into evals.jsonl and eval.png "
                   "(0 = never; costs sampling time).")
@click.option("--eval-per-digit", type=int, default=T.eval_per_digit, show_default=True,
              help="Samples per digit for --eval-every.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def train_mnist(preset, steps, batch_size, lr, warmup, lr_schedule, weight_decay, grad_clip, ema_decay,
                ema_warmup, prediction, weighting, snr_gamma, clip_loss, noise_schedule, pos_init, conv_init, p_uncond, weak_at, device,
                dtype, seed, out_dir, resume,
                data_dir, sample_every, save_every, sampler, sample_steps, guidance, eval_every, eval_per_digit,
                quiet, threads):
    """Train a class-conditional U-ViT on MNIST with DDPM (v, eps or x0 prediction).

    Writes a run folder with config.json, metrics.jsonl, loss.png, sample grids (one row per
    digit) and checkpoint.npz. Ctrl-C (or SIGTERM, SIGHUP) saves a checkpoint and exits with
    status 128 + the signal's number; --resume continues from it.
    """
    from ..backend import Backend
    from ..train import train
    cfg = TrainConfig.for_device(
        device, preset=preset, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, lr_schedule=lr_schedule,
        weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay, ema_warmup=ema_warmup,
        prediction=prediction, weighting=weighting, snr_gamma=snr_gamma, clip_loss=clip_loss,
        noise_schedule=noise_schedule,
        pos_init=pos_init, conv_init=conv_init, p_uncond=p_uncond, weak_at=weak_at, dtype=dtype, seed=seed,
        sample_every=sample_every, save_every=save_every, sampler=sampler, sample_steps=sample_steps,
        guidance=guidance, eval_every=eval_every, eval_per_digit=eval_per_digit)
    cfg.validate()
    _set_threads(threads)
    Backend(device)  # fail early with a clear message if the GPU is not usable
    out_dir = out_dir or os.path.join("runs", f"mnist-{preset}")
    log = lambda m: click.echo(m, err=True)
    log(f"training U-ViT '{preset}' on {device} for {cfg.steps} steps of {cfg.batch_size} images -> {out_dir}")
    summary = train(cfg, out_dir, device=device, data_dir=data_dir, resume=resume, log=log, progress=not quiet)
    if summary["stopped"]:
        import signal
        sys.exit(128 + int(getattr(signal, summary["stopped"])))


# ----------------------------------------------------------------------------------------
# sample, evaluate
# ----------------------------------------------------------------------------------------

@main.command("sample")
@click.option("--checkpoint", "ckpt", type=click.Path(), required=True, help="A run's checkpoint.npz (or its folder).")
@click.option("--digits", default="all", show_default=True, help="Which digits: 'all' or e.g. 3,7.")
@click.option("--count", type=int, default=10, show_default=True, help="Images per digit (one row each).")
@sampler_options()
@guidance_interval_option
@autoguidance_option
@final_sigma_option
@ink_percentile_option
@click.option("--eta", type=float, default=SampleConfig.eta, show_default=True, help="DDIM noise (0 = deterministic).")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="Sample with the EMA weights or the raw trained weights.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Grid PNG. [default: samples_<sampler>.png beside the checkpoint]")
@click.option("--gif", is_flag=True, help="Also write an animated GIF of the denoising (PNG name, .gif).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def sample_cmd(ckpt, digits, count, sampler, steps, guidance, guidance_interval, autoguidance, final_sigma,
               ink_percentile, eta, seed, device, weights, out_path, gif, quiet, threads):
    """Draw digits from a trained run and save them as a grid (one row per digit)."""
    from ..api import load
    from .evaluate import check_count
    from .files import check_output_path
    from .images import from_model_range, save_gif, save_grid
    from .progress import Progress
    how = SampleConfig(sampler=sampler, steps=steps, guidance=guidance, eta=eta, guidance_interval=guidance_interval,
                       autoguidance=autoguidance, final_sigma=final_sigma, ink_percentile=ink_percentile)
    digits = _parse_digits(digits)     # checked here too, before the progress bar is drawn
    check_count("count (--count)", count, 1)
    check_count("seed (--seed)", seed, 0)
    _set_threads(threads)
    run = load(ckpt, device, weights)
    out_path = check_output_path(out_path or os.path.join(os.path.dirname(run.path), f"samples_{sampler}.png"),
                                 suffixes=(".png",), what="--out")
    if gif:
        check_output_path(os.path.splitext(out_path)[0] + ".gif", suffixes=(".gif",), what="--gif")
    n_steps = len(run.diffusion.sampler_timesteps(how))
    frames, every = [], max(1, n_steps // 40)
    record = (lambda i, x, x0: frames.append(from_model_range(x)) if (i % every == 0 or i == n_steps - 1) else None)
    with Progress(n_steps, f"sampling {len(digits) * count} digits ({sampler})", unit="step", disable=quiet) as bar:
        images = run.sample(digits, count, how, seed=seed, callback=record if gif else None, progress=bar)
    rows = one_row_per_digit(images, count)
    save_grid(rows, out_path, nrow=min(count, ROW))
    click.echo(f"wrote {out_path} (step {run.step} checkpoint, {sampler}, {n_steps} steps, "
               f"{how.guidance_text(run.weak is not None)})",
               err=True)
    if gif:
        frames.append(images)
        gif_path = os.path.splitext(out_path)[0] + ".gif"
        save_gif([one_row_per_digit(f, count) for f in frames], gif_path, nrow=min(count, ROW))
        click.echo(f"wrote {gif_path} ({len(frames)} frames)", err=True)


ROW = 20   # at most this many digits in a row of a grid


def one_row_per_digit(images, count):
    """Pad each digit's `count` images to whole rows of min(count, ROW), with empty tiles, so
    that a row never mixes two digits."""
    import numpy as np
    width = min(count, ROW)
    per = -(-count // width) * width
    out = np.full((len(images) // count, per) + images.shape[1:], 96, np.uint8)  # the grid's grey
    out[:, :count] = images.reshape(len(images) // count, count, *images.shape[1:])
    return out.reshape(-1, *images.shape[1:])


@main.command("evaluate")
@click.option("--checkpoint", "ckpt", type=click.Path(), required=True, help="A run's checkpoint.npz (or its folder).")
@click.option("--per-digit", type=int, default=None,
              help="Samples per digit. [default: 300 on cpu (3,000 in all), 1000 on gpu (10,000)]")
@click.option("--labels", type=click.Choice(LABELS), default="balanced", show_default=True,
              help="Which digits to draw, 10 x --per-digit in all: the same number of each, or as many of "
                   "each as the training set holds in proportion (what the FID floor of real digits drawn "
                   "at random assumes).")
@sampler_options()
@guidance_interval_option
@autoguidance_option
@final_sigma_option
@ink_percentile_option
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--batch-size", type=int, default=250, show_default=True,
              help="Images sampled at once (x2 with guidance).")
@click.option("--classifier", type=click.Path(dir_okay=False), default=None,
              help="A classifier from `tinyuvit train-classifier`. [default: the one shipped with tinyuvit]")
@click.option("--data-dir", type=click.Path(), default=None, help="MNIST folder for the FID reference.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the results here. [default: eval_<sampler><steps>_g<guidance>.json beside the checkpoint, "
                   "with _ag<autoguidance> before .json for a run with early weights, _fs<final sigma> "
                   "and _ip<ink percentile> unless they are 0, and _data with --labels data]")
@click.option("--picture", "picture_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw a PNG here (e.g. pixels.png): the pixel-value histograms of samples and real "
                   "digits (log scale), the ink per digit, and samples beside real digits enlarged 4x, as "
                   "they are and with faint (1..16) and saturated (255) pixels marked.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def evaluate_cmd(ckpt, per_digit, labels, sampler, steps, guidance, guidance_interval, autoguidance, final_sigma,
                 ink_percentile, seed, device, batch_size, classifier, data_dir, json_path, picture_path, quiet, threads):
    """Score a run: class accuracy and FID of its samples, with the FID floor of real digits,
    and their pixels beside real digits.

    Samples --per-digit images of every digit with the EMA weights; the shipped ViT classifier
    labels them (class accuracy = share read as the digit asked for) and its penultimate
    features give the Frechet distance to the MNIST test set (FID). The floor is the FID of
    10,000 real training digits drawn at random. Real digits drawn as the samples are (as many
    of each digit) score higher, because the test set's digits are not equally common: that FID
    is printed too, as what a perfect generator would score here. --labels data draws the digits
    in the training set's proportions instead, so that a perfect generator would score the floor.

    The pixels (0..255, as in the sample PNGs) are compared with as many real training digits
    of each class: ink (sum of pixels / 255) per digit and its spread, the shares of pixels
    that are 0, faint (1..16, grey haze) and saturated (255), and the total variation distance
    of the pixel histograms (0 = the same, 1 = no value in common).
    """
    import json
    from ..api import load
    from .evaluate import PER_DIGIT, check_count
    from .files import atomic_write, check_output_path
    from .progress import Progress
    how = SampleConfig(sampler=sampler, steps=steps, guidance=guidance, guidance_interval=guidance_interval,
                       autoguidance=autoguidance, final_sigma=final_sigma, ink_percentile=ink_percentile)
    per_digit = check_count("samples per digit (--per-digit)", PER_DIGIT[device] if per_digit is None else per_digit, 2)
    check_count("batch size (--batch-size)", batch_size, 1)
    check_count("seed (--seed)", seed, 0)
    _set_threads(threads)
    run = load(ckpt, device)
    run.diffusion.sampler_timesteps(how)     # a --steps or --final-sigma it cannot take: say so before any work
    autoguided = how.autoguidance_with(run.weak is not None) > 0
    json_path = check_output_path(json_path or os.path.join(os.path.dirname(run.path),
                                                            f"eval_{sampler}{steps}_g{guidance:g}"
                                                            f"{f'_ag{autoguidance:g}' if autoguided else ''}"
                                                            f"{f'_fs{final_sigma:g}' if final_sigma else ''}"
                                                            f"{f'_ip{ink_percentile:g}' if ink_percentile else ''}"
                                                            f"{'' if labels == 'balanced' else '_' + labels}.json"),
                                  suffixes=(".json",), what="--json")
    if picture_path is not None:
        picture_path = check_output_path(picture_path, suffixes=(".png",), what="--picture")
    with Progress(10 * per_digit, f"sampling ({sampler}, {steps} steps)", unit="img", disable=quiet) as bar:
        res = run.evaluate(per_digit, how, seed, batch_size, classifier=classifier, data_dir=data_dir, progress=bar,
                           picture=picture_path, labels=labels)
    click.echo(f"checkpoint       {run.path} (step {run.step})")
    mix = f"{per_digit} per digit" if labels == "balanced" else "digits in the training set's proportions"
    click.echo(f"samples          {res['n']} ({mix}), {sampler} {steps} steps, "
               f"{how.guidance_text(run.weak is not None)}"
               + (f" (the step-{run.weak_step} weights)" if autoguided else ""))
    click.echo(f"class accuracy   {100 * res['class_accuracy']:.2f}%")
    click.echo("  per digit      " + "  ".join(f"{d}: {100 * a:.0f}%" for d, a in res["per_digit_accuracy"].items()))
    ref = res["reference"]
    click.echo(f"FID              {res['fid']:.3f}   (against the {ref['test_digits']:,} test digits of {ref['data']}"
               + ("; FIDs against full MNIST do not compare)" if ref["data"] != "full MNIST" else ")"))
    click.echo(f"FID floor        {res['fid_floor']:.3f}   (10,000 real training digits; "
               f"FID / floor = {res['fid'] / res['fid_floor']:.1f})")
    click.echo(f"FID floor, n={res['n']:<5d} {res['fid_floor_same_n']:.3f}   (as many real training digits as "
               f"samples; FID / this = {res['fid'] / res['fid_floor_same_n']:.1f})")
    click.echo(f"FID, same digits {res['fid_floor_same_digits']:.3f}   (real training digits, as many of each as the "
               f"samples: a perfect generator's FID here; FID / this = {res['fid'] / res['fid_floor_same_digits']:.1f})")
    for line in pixel_lines(res["pixels"]):
        click.echo(line)
    atomic_write(json_path, lambda f: f.write(json.dumps(res, indent=2).encode()))
    click.echo(f"wrote {json_path}")
    if picture_path is not None:
        click.echo(f"wrote {picture_path}")


def pixel_lines(pixels):
    """`tinyuvit evaluate`'s lines for metrics.compare_pixels: generated beside real, then digit by digit."""
    g, r = pixels["generated"], pixels["real"]
    share = lambda key, label, note="": f"  {label:<15}{100 * g[key]:>8.2f}%{100 * r[key]:>9.2f}%" + note
    digits = sorted(set(g["ink_per_digit"]) | set(r["ink_per_digit"]), key=int)
    row = lambda label, values: f"  {label:<19}" + "".join(f"{values.get(d, float('nan')):>5.0f}" for d in digits)
    return [f"pixels (0..255)  generated      real   ({r['n']} real MNIST training digits, as many of each digit)",
            f"  {'ink':<15}{g['ink_mean']:>9.1f}{r['ink_mean']:>10.1f}   (sum of pixels / 255, the mean per digit)",
            share("zero_share", "zero"),
            share("faint_share", "faint 1..16", "   (grey haze)"),
            share("saturated_share", "saturated 255"),
            f"  {'histogram TV':<15}{pixels['histogram_tv']:>9.3f}"
            "             (total variation distance: 0 = the same histogram, 1 = disjoint)",
            f"  {'digit':<19}" + "".join(f"{d:>5}" for d in digits),
            row("ink, generated", g["ink_per_digit"]),
            row("ink, real", r["ink_per_digit"]),
            row("spread, generated", g["ink_spread_per_digit"]) + "   (standard deviation of the ink)",
            row("spread, real", r["ink_spread_per_digit"])]


@main.command("export")
@click.option("--checkpoint", "ckpt", type=click.Path(), required=True, help="A run's checkpoint.npz (or its folder).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="The weights file to write. [default: weights.npz beside the checkpoint]")
def export_cmd(ckpt, out_path):
    """Keep what sampling needs of a run in a file under half the checkpoint's size.

    Writes the EMA weights, the early weights for autoguidance, the step and the config, without
    the raw weights and the optimizer's moments: `sample`, `evaluate` and tinyuvit.load() take
    it as --checkpoint; training cannot resume from it. The library call:
    tinyuvit.tools.checkpoint.export_weights(checkpoint, out).
    """
    from .checkpoint import export_weights, resolve
    from .files import check_output_path
    src = resolve(ckpt)
    out_path = check_output_path(out_path or os.path.join(os.path.dirname(src), "weights.npz"),
                                 suffixes=(".npz",), what="--out")
    ck = export_weights(src, out_path)
    mb = lambda path: os.path.getsize(path) / 2 ** 20
    click.echo(f"wrote {out_path} (step {ck['step']}, {mb(out_path):.1f} MB of the checkpoint's {mb(src):.1f} MB"
               f"{', with the early weights for autoguidance' if ck['weak'] else ''}); sample it with "
               f"--checkpoint {out_path}", err=True)


# ----------------------------------------------------------------------------------------
# train-classifier, gradcheck
# ----------------------------------------------------------------------------------------

@main.command("train-classifier")
@click.option("--epochs", type=float, default=18, show_default=True, help="Passes over the 60,000 training digits.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--data-dir", type=click.Path(), default=None, help="Folder with the four MNIST IDX files.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="classifier.npz", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_classifier_cmd(epochs, batch_size, lr, seed, device, data_dir, out_path, quiet):
    """Train the ViT classifier used for FID and class accuracy, and report its test accuracy.

    The package ships one (tinyuvit/assets/classifier.npz, made with the defaults); this command
    re-creates it, or trains your own: score with it by `tinyuvit evaluate --classifier FILE`.
    """
    from ..backend import Backend
    from .evaluate import check_count
    from .vit import train_classifier
    check_count("seed (--seed)", seed, 0)
    Backend(device)
    res = train_classifier(out_path, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           data_dir=data_dir, device=device, progress=not quiet)
    click.echo(f"test accuracy {100 * res['test_accuracy']:.2f}% after {res['steps']} steps "
               f"({res['seconds'] / 60:.1f} min); saved {out_path}")


@main.command("gradcheck")
def gradcheck_cmd():
    """Check every layer's hand-written backward against finite differences (and autograd)."""
    from ..gradcheck import main as run
    sys.exit(run())


# ----------------------------------------------------------------------------------------
# tinyuvit bench: a thin shell over tinyuvit.tools.bench.run_bench
# ----------------------------------------------------------------------------------------

def _more_values(ctx, presets, batches):
    """Let `--batch 64 128` and `--preset tiny small` list several values after one option:
    click leaves the extra words in ctx.args; integers are batch sizes, names are presets."""
    from ..errors import ConfigError
    from ..model import PRESETS
    more_presets = [a for a in ctx.args if a in PRESETS]
    more_batches = [a for a in ctx.args if a not in PRESETS]
    for a in more_batches:
        if not a.lstrip("-").isdigit():
            raise ConfigError(f"unexpected argument {a!r}: batch sizes are integers, presets {sorted(PRESETS)}")
    from click.core import ParameterSource
    default = lambda name: ctx.get_parameter_source(name) == ParameterSource.DEFAULT
    if more_presets:
        presets = ([] if default("presets") else list(presets)) + more_presets
    if more_batches:
        batches = ([] if default("batches") else list(batches)) + [int(a) for a in more_batches]
    return list(presets), list(batches)


@main.command("bench", context_settings={"allow_extra_args": True})
@click.option("--preset", "presets", type=click.Choice(["tiny", "small"]), multiple=True, default=["tiny"],
              show_default=True, help="Model size; repeat the option for several (--preset tiny --preset small).")
@click.option("--batch", "batches", type=int, multiple=True, default=[64, 128], show_default=True,
              help="Batch size; repeat the option, or list several after one: --batch 64 128.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: NumPy; gpu: CuPy on an NVIDIA GPU.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Alternating rounds (A, B, A, B, ...); the CPU runs each in a fresh process.")
@click.option("--repeats", type=int, default=None, help="Timed calls per round. [default: 5 on cpu, 20 on gpu]")
@click.option("--warmup", type=int, default=None, help="Untimed calls first. [default: 2 on cpu, 5 on gpu]")
@click.option("--compare", type=click.Choice(["torch", "blas", "unfused"]), multiple=True,
              help="torch: the same network and training step in PyTorch (needs torch installed); "
                   "blas: the unsplit model on multi-threaded BLAS (CPU); unfused: tinyuvit without its "
                   "fused CUDA kernels (GPU). Repeat the option to compare with several.")
@click.option("--tf32", is_flag=True, help="GPU: TF32 matmuls for tinyuvit (CUPY_TF32=1) and PyTorch.")
@click.option("--profile", is_flag=True, help="Also print where the time of one step goes, layer type by layer type.")
@click.option("--kernels", is_flag=True,
              help="GPU: count and time the kernels of one call of each, with PyTorch's profiler (needs torch).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every result (all timings, FLOP rates, memory) to this JSON file.")
@threads_option
def bench_cmd(presets, batches, device, rounds, repeats, warmup, compare, tf32, profile, kernels, json_path,
              threads):
    """Time a training step and a sampling forward: median ms, img/s, GFLOP/s, memory.

    The training step is tinyuvit.train's (loss, backward, clip, AdamW, EMA); the sampling
    forward is one guided prediction (the network on the doubled batch). On the CPU every
    measurement runs in a fresh process, alternating between what is compared. Memory: the
    growth during one step and the peak (CPU: the peak resident set of a fresh process that
    runs only that step, Python and the libraries included; GPU: the memory pool's peak).

    \b
    Examples:
      tinyuvit bench --batch 64 128
      tinyuvit bench --compare torch --preset tiny --preset small --json bench.json
      tinyuvit bench --device gpu --compare torch --tf32 --batch 256 1024
      tinyuvit bench --device gpu --compare torch --compare unfused --kernels
    """
    from .bench import run_bench
    presets, batches = _more_values(click.get_current_context(), presets, batches)
    run_bench(presets=presets, batches=batches, device=device, rounds=rounds, repeats=repeats, warmup=warmup,
              compare=compare, tf32=tf32, profile=profile, kernels=kernels, json_path=json_path, threads=threads,
              log=click.echo)


# ----------------------------------------------------------------------------------------
# tinyuvit ablate: a thin shell over tinyuvit.tools.ablate_run.run_study
# ----------------------------------------------------------------------------------------

def _budget_help():
    from .ablate import BUDGETS
    b = BUDGETS
    return (f"The CPU budget: {b['quick'].describe()}, {len(b['quick'].seeds)} seeds per model (about 3 hours "
            f"on 2 cores for the eleven models, as long again for the sweep). Without it: "
            f"{b['default'].describe()}, {len(b['default'].seeds)} seeds per model, meant for a GPU.")


def _seeds_default():
    from .ablate import BUDGETS
    span = lambda seeds: f"{seeds[0]}-{seeds[-1]}"
    return f"{span(BUDGETS['quick'].seeds)} with --quick, else {span(BUDGETS['default'].seeds)}"


def _headline_tables(markdown):
    """The tables of results.md worth printing: the claims and the pilot's, else every run's."""
    sections = {part.split("\n", 1)[0]: part for part in markdown.split("\n## ")[1:]}
    chosen = [text for title, text in sections.items() if title.startswith(("The paper's claims", "Pilot"))]
    chosen = chosen or [text for title, text in sections.items() if title.startswith("Every run")]
    return "\n\n".join("\n".join(line for line in text.splitlines() if line.startswith("|")) for text in chosen)


@main.command("ablate", epilog="\b\nExamples:\n"
              "  tinyuvit ablate --list --quick\n"
              "  tinyuvit ablate --quick --pilot              # U-ViT's seeds with and without the levers\n"
              "  tinyuvit ablate --quick --only skip,time     # U-ViT, the skip and time variants, every seed\n"
              "  tinyuvit ablate --quick --only sweep         # depth, width and patch size\n"
              "  tinyuvit ablate --quick --only pos --seeds 3-8 --out runs/confirm-pos   # a fresh look at one claim\n"
              "  tinyuvit ablate --quick --only sweep --out runs/sweep --threads 1   # beside another study, then:\n"
              "  tinyuvit ablate --quick --join runs/sweep     # its finished runs join runs/ablate-quick\n"
              "  tinyuvit ablate --device gpu --out runs/ablate")
@click.option("--quick", is_flag=True, help=_budget_help())
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Study folder; the pilot goes in the same one, so that the study reuses its U-ViT runs. "
                   "[default: runs/ablate-quick with --quick, else runs/ablate]")
@click.option("--only", default=None,
              help="Comma list of choices (skip, time_cond or time, conv, patch_embed or patch, pos_embed or "
                   "pos), sweep knobs (depth, width, patch_size), the groups ablations and sweep, and/or models "
                   "(skip=add, depth=8); U-ViT's runs (the reference of every comparison) are always in, and "
                   "--only uvit runs them alone. "
                   "[default: every model]")
@click.option("--pilot", is_flag=True,
              help="Instead of the study: U-ViT's seeds with the budget's start of the final conv and with the "
                   "other, each scored at two sample counts and two sampling seeds, to measure the seed spread "
                   "with and without the levers (results.md). The study, run later in the same folder, reuses "
                   "U-ViT's runs.")
@click.option("--seeds", default=None,
              help="Training seeds of every model asked for, as 0-5 or 3,4,5, instead of the budget's. A folder "
                   "keeps every seed run in it: --seeds 0-5 --only pos adds seeds 3-5 of U-ViT and the "
                   "positions to a three-seed study. To test a claim again after seeing its result, use fresh "
                   "seeds in a new folder (seeds added because a result looked close bias its p-value). "
                   f"[default: {_seeds_default()}]")
@click.option("--join", "join_dir", type=click.Path(), default=None,
              help="Instead of training: copy the finished runs of the study in this folder (the same budget, "
                   "run beside this one, say with --threads 1 each) into --out's study and redraw its report.")
@click.option("--list", "list_only", is_flag=True, help="List the models and their parameter counts, then stop.")
@device_option
@click.option("--data-dir", type=click.Path(), default=None,
              help="Folder with the four MNIST IDX files (else $TINYUVIT_DATA, the cache, a download, "
                   "or the embedded subset).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@threads_option
def ablate_cmd(quick, out_dir, only, pilot, seeds, join_dir, list_only, device, data_dir, quiet, threads):
    """The paper's design study: U-ViT against each one-change variant (Sec. 3.1) and its depth,
    width and patch-size sweep (Sec. 3.2).

    Every model trains with each of the budget's seeds; a seed fixes the data order, the noise and
    every layer's starting weights by name, so each model is compared with U-ViT of the same seed
    (paired): the mean difference, its 95% interval, Holm-corrected p-values, and one verdict per
    claim of the paper (agrees, disagrees, or unresolved at this budget). Writes results.md,
    differences.png, loss.png, learning.png (if any) and grids.png into --out (redrawn after every
    run), beside one run folder per run. Running the same command again resumes the study.
    Ctrl-C (or SIGTERM, SIGHUP) stops it, after the run in training saved its checkpoint, with
    exit status 128 + the signal's number.
    """
    from ..errors import ConfigError
    from .ablate import format_variants, list_variants
    from .ablate_run import join_study, run_study
    budget = "quick" if quick else "default"
    if list_only:
        click.echo(format_variants(list_variants(budget), budget))
        return
    out_dir = out_dir or os.path.join("runs", "ablate-quick" if quick else "ablate")
    log = lambda m: click.echo(m, err=True)
    if join_dir is not None:
        extra = [name for name, v in (("--only", only), ("--pilot", pilot), ("--seeds", seeds)) if v]
        if extra:
            raise ConfigError(f"--join trains nothing, so {', '.join(extra)} has no effect; leave it out")
        out = join_study(out_dir, join_dir, budget, log=log)
        click.echo(f"wrote {', '.join(os.path.basename(p) for p in out['files'])} in {out_dir}")
        return
    _set_threads(threads)
    out = run_study(out_dir, budget, only=only, pilot=pilot, seeds=seeds, device=device, data_dir=data_dir,
                    log=log, progress=not quiet)
    if out["stopped"]:
        import signal
        sys.exit(128 + int(getattr(signal, out["stopped"])))
    with open(os.path.join(out_dir, "results.md"), encoding="utf-8") as f:
        click.echo(_headline_tables(f.read()))
    click.echo(f"\nwrote {', '.join(os.path.basename(p) for p in out['files'])} in {out_dir}")


# ----------------------------------------------------------------------------------------
# explain: a thin shell over Run.explain (tinyuvit.tools.explain)
# ----------------------------------------------------------------------------------------

@main.command("explain", epilog="\b\nExamples:\n"
              "  tinyuvit explain --checkpoint runs/mnist-tiny --digit 3 --out explain-3\n"
              "  tinyuvit explain --checkpoint runs/mnist-tiny/checkpoint.npz --digit 7 --seed 2 --patch 3,4")
@click.option("--checkpoint", "ckpt", type=click.Path(), required=True, help="A run's checkpoint.npz (or its folder).")
@click.option("--digit", type=int, default=3, show_default=True, help="The digit to sample and look inside (0..9).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampler's noise: the digit `tinyuvit sample --digits D --count 1 --seed S` draws.")
@click.option("--patch", default=None,
              help="ROW,COL (from 0) of the patch whose attention is drawn. [default: the patch with the most ink]")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Folder for the PNGs and explain.json. [default: explain/ beside the checkpoint]")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def explain_cmd(ckpt, digit, seed, patch, out_dir, device, quiet):
    """Look inside a trained run: sample one digit with the run's sampling defaults and draw how
    it emerges, what the tokens attend to, what the positions learned and what the long skips
    carry, each as a PNG whose title says how to read it.

    \b
    explain_1_emergence.png    x_t and the x0 at every step, with the label and without
    explain_2_tokens.png       where the label and time tokens look, block by block
    explain_2_patch.png        where one patch looks, block by block
    explain_2_heads.png        the heads of the mid-block apart
    explain_2_share.png        the patches' attention on the label and time tokens, and its reach
    explain_3_positions.png    the learned positions' similarity beside the 2-D sinusoidal table
    explain_4_skip_norms.png   the main and skip parts of each out-block's input
    explain_4_skips_zeroed.png x0 with each long skip zeroed
    explain.json               the numbers the pictures show

    Parts a run does not have (a time token with --time-cond adaln, learned positions, long
    skips) are skipped with a line that says so. The library call: tinyuvit.load(RUN).explain(OUT).
    """
    from ..api import load
    from ..backend import Backend
    from .checkpoint import resolve
    from .evaluate import check_count
    from .explain import check_digit, check_out_dir
    check_digit(digit)
    check_count("seed (--seed)", seed, 0)
    patch = _parse_patch(patch)
    Backend(device)                   # no usable GPU: one line before anything is read
    src = resolve(ckpt)
    out_dir = check_out_dir(out_dir or os.path.join(os.path.dirname(src), "explain"))
    run = load(src, device)
    log = lambda m: click.echo(m, err=True)
    res = run.explain(out_dir, digit=digit, seed=seed, patch=patch, progress=not quiet, log=log)
    how = res["how"]
    chosen = "the one with the most ink" if patch is None else "as asked"
    log(f"digit {digit} (seed {seed}) from {run.path} (step {run.step}): {how.sampler}, "
        f"{res['measures']['steps']} steps, {how.guidance_text(run.weak is not None)}; patch {res['patch']}: {chosen}")
    click.echo("\n".join(f"wrote {f}" for f in res["files"]))


def _parse_patch(text):
    """'3,4' -> (3, 4); None stays None; anything else a ConfigError (the range is checked
    against the run's patch grid once it is loaded)."""
    from ..errors import ConfigError
    if text is None:
        return None
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"patch (--patch) must be ROW,COL like 3,4 (from 0), got {text!r}") from None
    return row, col


if __name__ == "__main__":
    main()
