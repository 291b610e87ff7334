"""Autoguidance by another run, in place of the null label.

Classifier-free guidance extrapolates away from the network's prediction for the null label:
                                     out = out_c + s (out_c - out(null))
Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself")
extrapolates away from a weaker network's prediction for the same label:
                                     out = out_c + s (out_c - weak_c)
`tinyuvit sample` does both, the second with the run's own early EMA weights (`--weak-at`,
`--autoguidance`). This example instead puts any weaker run of the same diffusion (schedule, T,
what it predicts) in the null label's place, e.g. a `tinyuvit ablate --quick` run, without
classifier-free guidance. The guidance interval applies as in `sample`.

    python examples/autoguidance.py --checkpoint runs/mnist-tiny --weak runs/ablate-quick/uvit \\
        --guidance 1 --per-digit 200

Prints class accuracy, FID and ink as `tinyuvit evaluate` scores them (the same digits, sampling
seed and classifier), so the two kinds of guidance compare like for like.
"""
import argparse
import sys

import numpy as np


class Autoguided:
    """Looks like a model to Diffusion.sample. A guided step sends [x, x] with [y, null] labels
    (diffusion.guided_output); here the null half goes to the weak model with the labels y."""

    def __init__(self, model, weak):
        self.model, self.weak = model, weak
        self.cfg, self.dtype = model.cfg, model.dtype

    def forward(self, x, t, y, *, train=False):
        B = x.shape[0] // 2
        xp = self.model.backend.xp
        if 2 * B != x.shape[0] or not bool((y[B:] == self.cfg.num_classes).all()):
            return self.model.forward(x, t, y, train=False)          # an unguided step
        return xp.concatenate([self.model.forward(x[:B], t[:B], y[:B], train=False),
                               self.weak.forward(x[:B], t[:B], y[:B], train=False)])


def autoguided(run, weak):
    """The model that run.diffusion.sample calls for `run` guided by `weak` (on every CPU core);
    ConfigError unless both runs use the same diffusion."""
    from tinyuvit.tools.parallel import on_cpu_threads
    d, w = run.diffusion, weak.diffusion
    same = (d.prediction, d.noise_schedule, d.T) == (w.prediction, w.noise_schedule, w.T) \
        and run.model.cfg.num_classes == weak.model.cfg.num_classes
    if not same:
        from tinyuvit.errors import ConfigError
        raise ConfigError(f"the weak run must use the same diffusion: {d} against {w}")
    return Autoguided(on_cpu_threads(run.model), on_cpu_threads(weak.model))


def autoguided_sample(run, weak, labels, rng, how):
    """run.diffusion.sample with autoguidance from the weak run: [B] labels -> x0 [B, C, H, W]."""
    return run.diffusion.sample(autoguided(run, weak), labels, rng, how)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="the run to sample from (checkpoint.npz or its folder)")
    ap.add_argument("--weak", required=True, help="the weaker run that guides it")
    ap.add_argument("--guidance", type=float, default=1.0, help="s in out_c + s (out_c - weak_c)")
    ap.add_argument("--guidance-interval", default="0,6", help="LO,HI noise levels sigma that are guided")
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    ap.add_argument("--per-digit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = ap.parse_args(argv)

    import tinyuvit
    from tinyuvit.backend import to_numpy
    from tinyuvit.sampling import SampleConfig
    from tinyuvit.errors import TinyUViTError
    from tinyuvit.tools.evaluate import BATCH_SIZE, digit_labels
    from tinyuvit.tools.metrics import evaluate_images
    from tinyuvit.tools.progress import Progress
    try:
        lo_hi = tuple(float(v) for v in args.guidance_interval.split(","))
        how = SampleConfig(steps=args.steps, guidance=args.guidance, guidance_interval=lo_hi)
        run, weak = tinyuvit.load(args.checkpoint, args.device), tinyuvit.load(args.weak, args.device)
        model, labels = autoguided(run, weak), digit_labels(args.per_digit)
        rng, xp, images = np.random.default_rng(args.seed), run.model.backend.xp, []
        with Progress(len(labels), "sampling with autoguidance", unit="img") as bar:
            for i in range(0, len(labels), BATCH_SIZE):     # the replicas are built once, above
                y = xp.asarray(labels[i:i + BATCH_SIZE])
                images.append(to_numpy(run.diffusion.sample(model, y, rng, how)).astype(np.float32))
                bar.update(len(y))
        res = evaluate_images(np.concatenate(images), labels)
    except (TinyUViTError, ValueError) as e:
        sys.exit(f"error: {e}")
    ink = res["pixels"]["generated"]["ink_mean"], res["pixels"]["real"]["ink_mean"]
    print(f"{len(labels)} samples, {how.guidance_text()} (autoguidance by {args.weak})")
    print(f"class accuracy {100 * res['class_accuracy']:.2f}%   FID {res['fid']:.3f}   "
          f"(same digits, real: {res['fid_floor_same_digits']:.3f})   ink {ink[0]:.1f} (real {ink[1]:.1f})")
    return res


if __name__ == "__main__":
    main()
