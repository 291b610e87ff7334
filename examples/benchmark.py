"""Time one training step (forward, backward, AdamW, EMA) and one sampling forward, per device.

    python examples/benchmark.py --devices cpu gpu --batch 128 --preset tiny --repeats 10

Prints the median over --repeats timed steps after --warmup untimed ones (the GPU is synchronized
before each clock read), images per second, and the speed of each device relative to the first.
"""
import argparse
import platform
import time

import numpy as np

from tinyuvit.backend import Backend, synchronize
from tinyuvit.diffusion import Schedule, diffusion_loss
from tinyuvit.model import UViT, get_config
from tinyuvit.optim import EMA, AdamW, clip_grad_norm


def time_device(device, preset, batch, repeats, warmup, dtype):
    be = Backend(device, dtype)
    model = UViT(get_config(preset)).to(be)
    params = model.state_dict()
    opt, ema = AdamW(params, lr=1e-4), EMA(params)
    sched = Schedule()
    rng = np.random.default_rng(0)
    x0 = be.asarray(rng.uniform(-1, 1, (batch, 1, 28, 28)))
    y = rng.integers(0, 10, batch)

    def train_step(k):
        loss, d = diffusion_loss(model, sched, x0, y, rng)
        model.backward(d)
        grads = model.grad_dict()
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        ema.update(params, k)

    def sample_forward(k):
        t = be.xp.full((batch,), 500)
        model.forward(x0, t, be.xp.asarray(y))

    out = {}
    for name, fn in (("train step", train_step), ("sampling forward", sample_forward)):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "gpu"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[128])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                         for i in threadpool_info())
    except Exception:
        blas = "unknown BLAS"
    print(f"{platform.processor() or platform.machine()}; NumPy BLAS: {blas}; preset {args.preset}; {args.dtype}")
    for batch in args.batch:
        results = {d: time_device(d, args.preset, batch, args.repeats, args.warmup, args.dtype) for d in args.devices}
        first = args.devices[0]
        for d, r in results.items():
            for name, sec in r.items():
                ratio = results[first][name] / sec
                print(f"batch {batch:4d}  {d:3s}  {name:16s}  median {1000 * sec:8.1f} ms  "
                      f"{batch / sec:8.0f} img/s  x{ratio:.1f} vs {first}")


if __name__ == "__main__":
    main()
