"""The `tinyuvit` command line: train-mnist, sample, gradcheck, and the evaluation tools."""
import functools
import os
import sys

import click
import numpy as np

from .diffusion import PREDICTIONS, WEIGHTINGS

# Defaults per device: what `tinyuvit train-mnist` does when not told otherwise.
# cpu: sized to finish within 30 minutes on a 2-core laptop; gpu: a larger run of a few minutes.
DEVICE_DEFAULTS = {
    "cpu": dict(steps=5000, batch_size=64),
    "gpu": dict(steps=5000, batch_size=256),
}


def friendly_errors(fn):
    """Turn the project's expected errors into a one-line message and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .backend import BackendError
        from .checkpoint import CheckpointError
        from .train import TrainingError
        try:
            return fn(*args, **kwargs)
        except (ValueError, BackendError, CheckpointError, TrainingError, OSError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"Error: {msg}", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tinyuvit")
def main():
    """tinyuvit: U-ViT, a diffusion transformer, from scratch in NumPy (CuPy on a GPU).

    Start with `tinyuvit train-mnist`, then `tinyuvit sample --checkpoint RUN/checkpoint.npz`.
    """


def threads_option(fn):
    """--threads: CPU threads, each running the model on its share of the batch."""
    return click.option("--threads", type=int, default=None,
                        help="CPU threads, each running the model on its share of every batch "
                             "(default: all cores). If other programs keep the cores busy, fewer "
                             "threads can be much faster.")(fn)


SAMPLERS_HELP = "dpm++ (DPM-Solver++ 2M, good at 10-25 steps), ddim (any steps), ddpm (1000 steps)."


def _train_defaults():
    """TrainConfig's defaults: the one place where the CLI's training and sampling defaults live."""
    from .train import TrainConfig
    return TrainConfig()


def sampler_options(steps_flag="--steps", what=SAMPLERS_HELP):
    """--sampler, --steps (train-mnist: --sample-steps) and --guidance, with one set of defaults
    (TrainConfig's) for the training grids, `sample` and `evaluate`."""
    d = _train_defaults()
    options = [
        click.option("--sampler", type=click.Choice(["ddim", "dpm++", "ddpm"]), default=d.sampler,
                     show_default=True, help=what),
        click.option(steps_flag, type=int, default=d.sample_steps, show_default=True,
                     help="Sampler steps (ddpm always uses 1000)."),
        click.option("--guidance", type=float, default=d.guidance, show_default=True,
                     help="Guidance scale s in eps = eps_c + s (eps_c - eps_u); 0 = none."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _load_run(ckpt, device, weights="ema"):
    """(checkpoint dict, backend, model with the run's EMA or raw weights, schedule)."""
    from .backend import Backend
    from .checkpoint import load_checkpoint
    from .diffusion import Schedule
    from .train import make_model
    ck = load_checkpoint(ckpt)
    backend = Backend(device, ck["config"].get("dtype", "float32"))
    model = make_model(ck["config"]["model"], backend)
    model.load_state_dict({k: backend.asarray(v) for k, v in ck["ema" if weights == "ema" else "params"].items()})
    return ck, backend, model, Schedule(ck["config"].get("T", 1000))


def _parse_digits(text):
    if text.strip().lower() == "all":
        return list(range(10))
    try:
        digits = [int(d) for d in text.replace(" ", "").split(",") if d != ""]
    except ValueError:
        raise ValueError(f"--digits must be 'all' or comma-separated digits like 3,7, got {text!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise ValueError(f"--digits must name digits 0..9, got {text!r}")
    return digits


@main.command("train-mnist")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="Model size from the presets table (tiny: 1.5M parameters, small: 7.7M).")
@click.option("--steps", type=int, default=None,
              help=f"Training steps. [default: {DEVICE_DEFAULTS['cpu']['steps']} on cpu, "
                   f"{DEVICE_DEFAULTS['gpu']['steps']} on gpu]")
@click.option("--batch-size", type=int, default=None,
              help=f"Images per step. [default: {DEVICE_DEFAULTS['cpu']['batch_size']} on cpu, "
                   f"{DEVICE_DEFAULTS['gpu']['batch_size']} on gpu]")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--warmup", type=int, default=200, show_default=True, help="Linear learning-rate warmup steps.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="cosine", show_default=True,
              help="After warmup: constant (as U-ViT) or cosine decay to 0.")
@click.option("--weight-decay", type=float, default=0.03, show_default=True, help="AdamW weight decay.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Clip the global gradient norm (0 = off).")
@click.option("--ema-decay", type=float, default=0.999, show_default=True, help="EMA of the weights; samples use it.")
@click.option("--ema-warmup/--no-ema-warmup", default=True, show_default=True,
              help="Let the EMA decay grow as min(decay, (1+k)/(10+k)) so short runs forget the init.")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=_train_defaults().prediction, show_default=True,
              help="What the network predicts: the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0, or the "
                   "noise eps (U-ViT, DDPM).")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default=_train_defaults().weighting, show_default=True,
              help="Loss weight, as a weight on the error of the predicted clean image: min(SNR + 1, gamma) "
                   "(the v loss, capped) or min(SNR, gamma) (Min-SNR, which all but ignores the noisiest steps).")
@click.option("--snr-gamma", type=float, default=5.0, show_default=True,
              help="The cap gamma of --weighting (0 = the plain MSE of what the network predicts).")
@click.option("--p-uncond", type=float, default=0.1, show_default=True,
              help="Probability of replacing the label by the null label (for classifier-free guidance).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: NumPy; gpu: CuPy on an NVIDIA GPU.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights, data order and noise.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder. [default: runs/mnist-PRESET]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.npz.")
@click.option("--data-dir", type=click.Path(), default=None,
              help="Folder with the four MNIST IDX files (else $TINYUVIT_DATA, the cache, a download, "
                   "or the embedded subset).")
@click.option("--sample-every", type=int, default=1000, show_default=True,
              help="Save a 10x10 sample grid every N steps (0 = only at the end).")
@click.option("--save-every", type=int, default=250, show_default=True,
              help="Save the checkpoint every N steps (0 = only at the end).")
@sampler_options("--sample-steps", what="Sampler for the grids.")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Every N steps, score EMA samples (class accuracy, FID) into evals.jsonl and eval.png "
                   "(0 = never; costs sampling time).")
@click.option("--eval-per-digit", type=int, default=100, show_default=True, help="Samples per digit for --eval-every.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
@friendly_errors
def train_mnist(preset, steps, batch_size, lr, warmup, lr_schedule, weight_decay, grad_clip, ema_decay,
                ema_warmup, prediction, weighting, snr_gamma, p_uncond, device, dtype, seed, out_dir, resume, data_dir, sample_every, save_every,
                sampler, sample_steps, guidance, eval_every, eval_per_digit, quiet, threads):
    """Train a class-conditional U-ViT on MNIST with DDPM (v or eps prediction).

    Writes a run folder with config.json, metrics.jsonl, loss.png, sample grids (one row per
    digit) and checkpoint.npz. Ctrl-C saves a checkpoint; --resume continues from it.
    """
    from .backend import Backend, set_cpu_threads
    from .train import TrainConfig, train
    set_cpu_threads(threads)
    Backend(device)  # fail early with a clear message if the GPU is not usable
    d = DEVICE_DEFAULTS[device]
    steps = d["steps"] if steps is None else steps
    batch_size = d["batch_size"] if batch_size is None else batch_size
    cfg = TrainConfig(preset=preset, steps=steps, batch_size=batch_size,
                      lr=lr, warmup=warmup, lr_schedule=lr_schedule, weight_decay=weight_decay,
                      grad_clip=grad_clip, ema_decay=ema_decay, ema_warmup=ema_warmup,
                      snr_gamma=snr_gamma, prediction=prediction, weighting=weighting, p_uncond=p_uncond, seed=seed, dtype=dtype,
                      sample_every=sample_every, save_every=save_every, sampler=sampler,
                      sample_steps=sample_steps, guidance=guidance, eval_every=eval_every,
                      eval_per_digit=eval_per_digit)
    cfg.validate()
    out_dir = out_dir or os.path.join("runs", f"mnist-{preset}")
    log = lambda m: click.echo(m, err=True)
    if not resume and os.path.exists(os.path.join(out_dir, "checkpoint.npz")):
        raise ValueError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    log(f"training U-ViT '{preset}' on {device} for {cfg.steps} steps of {cfg.batch_size} images -> {out_dir}")
    train(cfg, out_dir, device=device, data_dir=data_dir, resume=resume, log=log, progress=not quiet)


@main.command("sample")
@click.option("--checkpoint", "ckpt", type=click.Path(), required=True, help="A run's checkpoint.npz.")
@click.option("--digits", default="all", show_default=True, help="Which digits: 'all' or e.g. 3,7.")
@click.option("--count", type=int, default=10, show_default=True, help="Images per digit (one row each).")
@sampler_options()
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise (0 = deterministic).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="Sample with the EMA weights or the raw trained weights.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Grid PNG. [default: samples_<sampler>.png beside the checkpoint]")
@click.option("--gif", is_flag=True, help="Also write an animated GIF of the denoising (PNG name, .gif).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
@friendly_errors
def sample_cmd(ckpt, digits, count, sampler, steps, guidance, eta, seed, device, weights, out_path, gif, quiet,
               threads):
    """Draw digits from a trained run and save them as a grid (one row per digit)."""
    from .backend import set_cpu_threads
    from .data import from_model_range
    from .diffusion import sample
    from .images import save_gif, save_grid
    from .parallel import on_cpu_threads
    from .progress import Progress
    set_cpu_threads(threads)
    digits = _parse_digits(digits)
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    ck, backend, model, schedule = _load_run(ckpt, device, weights)
    model = on_cpu_threads(model)
    labels = backend.xp.asarray(np.repeat(digits, count))
    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"samples_{sampler}.png")
    frames = []
    n_steps = schedule.T if sampler == "ddpm" else steps
    every = max(1, n_steps // 40)
    record = (lambda i, x, x0: frames.append(from_model_range(x)) if (i % every == 0 or i == n_steps - 1) else None) if gif else None
    with Progress(n_steps, f"sampling {len(labels)} digits ({sampler})", unit="step", disable=quiet) as bar:
        x = sample(model, schedule, labels, np.random.default_rng(seed), sampler=sampler, steps=steps,
                   guidance=guidance, eta=eta, callback=record, progress=bar,
                   prediction=ck["config"]["prediction"])
    imgs = from_model_range(x)
    # one row per digit: `count` columns (at most 20 per row, wrapping)
    save_grid(imgs, out_path, nrow=min(count, 20) if len(digits) > 1 else min(count, 10))
    click.echo(f"wrote {out_path} (step {ck['step']} checkpoint, {sampler}, {n_steps} steps, guidance {guidance})", err=True)
    if gif:
        gif_path = os.path.splitext(out_path)[0] + ".gif"
        frames.append(imgs)
        save_gif(frames, gif_path, nrow=min(count, 20) if len(digits) > 1 else min(count, 10))
        click.echo(f"wrote {gif_path} ({len(frames)} frames)", err=True)


@main.command("evaluate")
@click.option("--checkpoint", "ckpt", type=click.Path(), required=True, help="A run's checkpoint.npz.")
@click.option("--per-digit", type=int, default=None,
              help="Samples per digit. [default: 300 on cpu (3,000 in all), 1000 on gpu (10,000)]")
@sampler_options()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=250, show_default=True,
              help="Images sampled at once (x2 with guidance; each costs ~5 MB of activations for the tiny preset on CPU).")
@click.option("--data-dir", type=click.Path(), default=None, help="MNIST folder for the FID reference.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the results here. [default: eval_<sampler><steps>_g<guidance>.json beside the checkpoint]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
@friendly_errors
def evaluate_cmd(ckpt, per_digit, sampler, steps, guidance, seed, device, batch_size, data_dir, json_path, quiet,
                 threads):
    """Score a run: class accuracy and FID of its samples, with the FID floor of real digits.

    Samples --per-digit images of every digit with the EMA weights; the shipped ViT classifier
    labels them (class accuracy = share read as the digit asked for) and its penultimate
    features give the Frechet distance to the MNIST test set (FID). The floor is the FID of
    10,000 real training digits: the best a generator can hope for.
    """
    import json
    from .backend import set_cpu_threads
    from .evaluate import evaluate_model
    from .metrics import load_classifier, reference_stats
    from .progress import Progress
    set_cpu_threads(threads)
    per_digit = per_digit or (1000 if device == "gpu" else 300)
    if per_digit < 2:
        raise ValueError(f"--per-digit must be >= 2 (a covariance needs several samples), got {per_digit}")
    ck, backend, model, schedule = _load_run(ckpt, device)
    classifier = load_classifier(backend=backend)
    reference = reference_stats(classifier, data_dir=data_dir)
    with Progress(10 * per_digit, f"sampling ({sampler}, {steps} steps)", unit="img", disable=quiet) as bar:
        res = evaluate_model(model, schedule, per_digit, sampler, steps, guidance,
                             seed, batch_size, classifier, reference, progress=bar,
                             prediction=ck["config"]["prediction"])
    res["checkpoint_step"] = ck["step"]
    # FID falls with the number of samples: the floor at the same n is the like-for-like bound
    res["fid_floor_same_n"] = float(reference_stats(classifier, data_dir=data_dir, floor_n=res["n"])["fid_floor"])
    json_path = json_path or os.path.join(os.path.dirname(os.path.abspath(ckpt)),
                                          f"eval_{sampler}{steps}_g{guidance:g}.json")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=2)
    click.echo(f"checkpoint       {ckpt} (step {ck['step']})")
    click.echo(f"samples          {res['n']} ({per_digit} per digit), {sampler} {steps} steps, guidance {guidance:g}")
    click.echo(f"class accuracy   {100 * res['class_accuracy']:.2f}%")
    click.echo("  per digit      " + "  ".join(f"{d}: {100 * a:.0f}%" for d, a in res["per_digit_accuracy"].items()))
    click.echo(f"FID              {res['fid']:.3f}")
    click.echo(f"FID floor        {res['fid_floor']:.3f}   (10,000 real training digits; FID / floor = {res['fid'] / res['fid_floor']:.1f})")
    click.echo(f"FID floor, n={res['n']:<5d} {res['fid_floor_same_n']:.3f}   (as many real training digits as samples; "
               f"FID / this = {res['fid'] / res['fid_floor_same_n']:.1f})")
    click.echo(f"wrote {json_path}")


@main.command("train-classifier")
@click.option("--epochs", type=float, default=18, show_default=True, help="Passes over the 60,000 training digits.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--data-dir", type=click.Path(), default=None, help="Folder with the four MNIST IDX files.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="classifier.npz", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def train_classifier_cmd(epochs, batch_size, lr, seed, device, data_dir, out_path, quiet):
    """Train the ViT classifier used for FID and class accuracy, and report its test accuracy.

    The package ships one (tinyuvit/assets/classifier.npz, made with the defaults); this command
    re-creates it, or trains your own for `tinyuvit evaluate`.
    """
    from .backend import Backend
    from .vit import train_classifier
    Backend(device)
    if epochs <= 0 or batch_size < 1 or lr <= 0:
        raise ValueError("--epochs and --lr must be positive and --batch-size >= 1")
    res = train_classifier(out_path, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           data_dir=data_dir, device=device, progress=not quiet)
    click.echo(f"test accuracy {100 * res['test_accuracy']:.2f}% after {res['steps']} steps "
               f"({res['seconds'] / 60:.1f} min); saved {out_path}")


@main.command("gradcheck")
@friendly_errors
def gradcheck_cmd():
    """Check every layer's hand-written backward against finite differences (and autograd)."""
    from .gradcheck import main as run
    sys.exit(run())


# ----------------------------------------------------------------------------------------
# tinyuvit bench: a thin shell over tinyuvit.bench.run_bench
# ----------------------------------------------------------------------------------------

def _more_values(ctx, presets, batches):
    """Let `--batch 64 128` and `--preset tiny small` list several values after one option:
    click leaves the extra words in ctx.args; integers are batch sizes, names are presets."""
    from .errors import ConfigError
    from .model import PRESETS
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
@click.option("--compare", type=click.Choice(["torch", "blas"]), default=None,
              help="torch: the same network and training step in PyTorch (needs torch installed); "
                   "blas: the unsplit model on multi-threaded BLAS (CPU).")
@click.option("--tf32", is_flag=True, help="GPU: TF32 matmuls for tinyuvit (CUPY_TF32=1) and PyTorch.")
@click.option("--profile", is_flag=True, help="Also print where the time of one step goes, layer type by layer type.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every result (all timings, FLOP rates, memory) to this JSON file.")
@threads_option
@friendly_errors
def bench_cmd(presets, batches, device, rounds, repeats, warmup, compare, tf32, profile, json_path, threads):
    """Time a training step and a sampling forward: median ms, img/s, GFLOP/s, memory.

    The training step is tinyuvit.train's (loss, backward, clip, AdamW, EMA); the sampling
    forward is one guided prediction (the network on the doubled batch). On the CPU every
    measurement runs in a fresh process, alternating between what is compared.

    \b
    Examples:
      tinyuvit bench --batch 64 128
      tinyuvit bench --compare torch --preset tiny --preset small --json bench.json
      tinyuvit bench --device gpu --compare torch --tf32 --batch 256 1024
    """
    from .bench import run_bench
    presets, batches = _more_values(click.get_current_context(), presets, batches)
    run_bench(presets=presets, batches=batches, device=device, rounds=rounds, repeats=repeats, warmup=warmup,
              compare=compare, tf32=tf32, profile=profile, json_path=json_path, threads=threads, log=click.echo)


if __name__ == "__main__":
    main()
