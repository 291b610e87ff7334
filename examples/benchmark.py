"""Time one training step (forward, backward, AdamW, EMA) and one sampling forward, per device.

    python examples/benchmark.py --devices cpu gpu --batch 128 --preset tiny --repeats 10

Prints the median over --repeats timed steps after --warmup untimed ones (the GPU is synchronized
before each clock read) and over --rounds alternating runs, images per second, and the speed of
each device relative to the first.
On the CPU it times two ways of using the cores, alternating between them: "cpu" splits the
batch across the cores (tinyuvit.parallel, what tinyuvit does), "cpu-blas" runs the plain
model with multi-threaded BLAS (the matmuls on every core, everything else on one).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from tinyuvit.backend import Backend, cpu_threads, synchronize
from tinyuvit.diffusion import Schedule, diffusion_loss
from tinyuvit.model import UViT, get_config
from tinyuvit.optim import EMA, AdamW, clip_grad_norm
from tinyuvit.parallel import on_cpu_threads


def setup(device, preset, batch, dtype):
    """(step functions by name) for "cpu", "cpu-blas" or "gpu"."""
    be = Backend("cpu" if device == "cpu-blas" else device, dtype)
    model = UViT(get_config(preset)).to(be)
    params = model.state_dict()
    net = model if device == "cpu-blas" else on_cpu_threads(model)
    opt, ema = AdamW(params, lr=1e-4), EMA(params)
    sched = Schedule()
    rng = np.random.default_rng(0)
    x0 = be.asarray(rng.uniform(-1, 1, (batch, 1, 28, 28)))
    y = rng.integers(0, 10, batch)

    def train_step(k):
        loss, d = diffusion_loss(net, sched, x0, y, rng)
        net.backward(d)
        grads = net.grad_dict()
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        ema.update(params, k)

    def sample_forward(k):
        t = be.xp.full((batch,), 500)
        net.forward(x0, t, be.xp.asarray(y))

    return {"train step": train_step, "sampling forward": sample_forward}


def time_one(device, preset, batch, repeats, warmup, dtype):
    """{name: median seconds} of `repeats` timed calls after `warmup` untimed ones."""
    fns = setup(device, preset, batch, dtype)
    out = {}
    for name, fn in fns.items():
        for k in range(warmup):
            fn(k)
        synchronize()
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            fn(k)
            synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return out


def time_devices(devices, preset, batch, repeats, warmup, dtype, rounds):
    """{device: {name: median seconds}}: each device in a fresh process, alternating
    (A, B, A, B, ...) for `rounds` rounds; the median over the rounds. (Separate processes, so
    that BLAS threads still spinning after one device's run do not slow the other's down.)"""
    runs = {d: [] for d in devices}
    for _ in range(rounds):
        for d in devices:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", d, "--preset", preset,
                   "--batch", str(batch), "--repeats", str(repeats), "--warmup", str(warmup),
                   "--dtype", dtype]
            runs[d].append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                     text=True).stdout.splitlines()[-1]))
    return {d: {name: float(np.median([r[name] for r in rs])) for name in rs[0]} for d, rs in runs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", nargs="+", default=["cpu-blas", "cpu"], choices=["cpu-blas", "cpu", "gpu"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[128])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds, one process per device each")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one device, JSON out
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(time_one(args.worker, args.preset, args.batch[0], args.repeats, args.warmup, args.dtype)))
        return
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                         for i in threadpool_info())
    except Exception:
        blas = "unknown BLAS"
    print(f"{platform.processor() or platform.machine()}; NumPy BLAS: {blas}; {cpu_threads()} CPU threads; "
          f"preset {args.preset}; {args.dtype}")
    for batch in args.batch:
        results = time_devices(args.devices, args.preset, batch, args.repeats, args.warmup, args.dtype,
                               args.rounds)
        first = args.devices[0]
        for d, r in results.items():
            for name, sec in r.items():
                ratio = results[first][name] / sec
                print(f"batch {batch:4d}  {d:8s}  {name:16s}  median {1000 * sec:8.1f} ms  "
                      f"{batch / sec:8.0f} img/s  x{ratio:.1f} vs {first}")


if __name__ == "__main__":
    main()
