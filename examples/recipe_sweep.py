"""Compare training recipes: class accuracy and FID against steps, one curve per recipe.

Runs `tinyuvit train-mnist --eval-every N` once per recipe (several at a time: on a GPU the small
model leaves room for parallel runs), then prints a table and draws the learning curves.

    python examples/recipe_sweep.py --device gpu --steps 4000 --eval-every 500 --out runs/sweep \\
        --recipe "base:--lr 1e-3 --warmup 500" --recipe "fast:--lr 2e-3 --lr-schedule cosine"
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", required=True,
                    help='"name:extra train-mnist flags"; repeat for each recipe')
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-per-digit", type=int, default=100)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--parallel", type=int, default=1, help="recipes trained at the same time")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args()

    recipes = [r.split(":", 1) for r in args.recipe]
    os.makedirs(args.out, exist_ok=True)
    pending, running, t0 = list(recipes), [], time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            name, flags = pending.pop(0)
            cmd = [sys.executable, "-m", "tinyuvit.tools.cli", "train-mnist", "--device", args.device,
                   "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--eval-per-digit", str(args.eval_per_digit), "--sample-every", str(args.eval_every),
                   "--save-every", "0", "--quiet", "--out", os.path.join(args.out, name)]
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            cmd += shlex.split(flags)
            log = open(os.path.join(args.out, f"{name}.log"), "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
        for item in list(running):
            name, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{name}: exit {proc.returncode} after {time.time() - start:.0f} s", flush=True)
        time.sleep(1)

    rows = {}
    for name, flags in recipes:
        path = os.path.join(args.out, name, "evals.jsonl")
        if os.path.exists(path):
            rows[name] = [json.loads(line) for line in open(path)]
    print(f"\n{'recipe':14s} {'step':>6s} {'class acc':>9s} {'FID':>8s} {'floor':>6s}  flags")
    for name, flags in recipes:
        for r in rows.get(name, []):
            print(f"{name:14s} {r['step']:6d} {100 * r['class_accuracy']:8.1f}% {r['fid']:8.2f} "
                  f"{r['fid_floor']:6.2f}  {flags}")
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"recipes": dict(recipes), "evals": rows, "steps": args.steps,
                   "device": args.device, "seconds": time.time() - t0}, f, indent=1)
    if rows:
        plot(rows, os.path.join(args.out, "sweep.png"))
        print(f"\nwrote {os.path.join(args.out, 'sweep.png')}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyuvit.tools.images import plain_log_ticks
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, rs in rows.items():
        steps = [r["step"] for r in rs]
        a1.plot(steps, [100 * r["class_accuracy"] for r in rs], marker="o", label=name)
        a2.plot(steps, [r["fid"] for r in rs], marker="o", label=name)
    first = next(iter(rows.values()))[0]
    # FID falls with the number of samples: the fair floor is as many real digits as samples.
    floor, n = first.get("fid_floor_same_n", first["fid_floor"]), first.get("n", 10000)
    a2.axhline(floor, color="k", ls="--", lw=1, label=f"floor ({n:,} real digits)")
    a1.axhline(95, color="gray", ls=":", lw=1, label="95% (the CPU target)")
    a2.axhline(5 * floor, color="gray", ls=":", lw=1, label="5 x floor (the CPU target)")
    a1.set(xlabel="training step", ylabel="class accuracy (%)", ylim=(0, 100),
           title=f"class accuracy, {n:,} samples")
    a2.set(xlabel="training step", ylabel="FID (tinyuvit classifier)", yscale="log",
           title=f"FID, {n:,} samples")
    plain_log_ticks(a2)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
