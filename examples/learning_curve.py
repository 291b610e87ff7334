"""Learning curves from saved checkpoints: class accuracy and FID against training steps.

Scores each checkpoint like `tinyuvit evaluate` (EMA weights, the shipped classifier) and draws
one curve per run. Copies of a run's checkpoint.npz taken while it trains (it is rewritten
every --save-every steps) give the curve without slowing the run down, unlike --eval-every.

    python examples/learning_curve.py --out runs/curve \\
        --curve "default:runs/snap/step1000.npz runs/snap/step2000.npz runs/mnist-tiny/checkpoint.npz"
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_sweep import plot  # noqa: E402  (same figure as the recipe sweep)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curve", action="append", required=True,
                    help='"name:checkpoint checkpoint ..."; repeat for each run')
    ap.add_argument("--per-digit", type=int, default=100)
    ap.add_argument("--sampler", default="dpm++", choices=["ddim", "dpm++", "ddpm"])
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/curve")
    args = ap.parse_args()

    import tinyuvit
    from tinyuvit.tools.progress import Progress

    os.makedirs(args.out, exist_ok=True)
    rows = {}
    for spec in args.curve:
        name, paths = spec.split(":", 1)
        for path in paths.split():
            run = tinyuvit.load(path, args.device)      # the run knows what its network predicts
            with Progress(10 * args.per_digit, f"{name} step {run.step}", unit="img") as bar:
                res = run.evaluate(args.per_digit, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                   data_dir=args.data_dir, progress=bar)
            rows.setdefault(name, []).append(dict(checkpoint=path, step=run.step, **res))
            print(f"{name:14s} step {run.step:6d}  class accuracy {100 * res['class_accuracy']:5.1f}%"
                  f"  FID {res['fid']:7.2f}  (floor {res['fid_floor_same_n']:.2f} for as many real digits)",
                  flush=True)
    for rs in rows.values():
        rs.sort(key=lambda r: r["step"])
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(args.out, "curve.png"))
    print(f"wrote {os.path.join(args.out, 'curve.png')} and curve.json")


if __name__ == "__main__":
    main()
