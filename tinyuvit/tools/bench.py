"""How fast is tinyuvit? Time a training step and a sampling forward, optionally against PyTorch.

    run_bench(presets=("tiny",), batches=(64, 128), device="cpu", compare="torch")
    tinyuvit bench --preset tiny --batch 64 128 --compare torch        (the same, from the shell)

What is timed, per preset and batch B:
  train step         what tinyuvit.train does per step: the diffusion loss (v prediction,
                     min-snr+1 weights, gamma 5: TrainConfig's defaults), backward, global-norm
                     clip, AdamW, EMA. On the CPU the model is split over the threads
                     (tinyuvit.tools.parallel), as training does.
  sampling forward   one guided prediction: the network on the doubled batch (B conditional
                     + B null labels, 2B images) without gradients, as sampling.guided_output.
img/s counts the B images of the batch (for sampling: guided predictions per second).

How:
  - medians of `repeats` timed calls after `warmup` untimed ones; the GPU is synchronized
    before every clock read;
  - CPU: every measurement runs in a fresh process, alternating between the implementations
    (A, B, A, B, ... for `rounds` rounds), so that one's threads or heap do not slow the
    other; the reported time is the median of the rounds' medians;
  - GPU: one process holds both implementations and alternates between them round by round;
  - GFLOP/s from an analytic count of the matmul FLOPs (`uvit_flops`: backward = 2 x forward),
    and the share of this machine's float32 matmul peak, measured with one big matmul on the
    same threads (GPU: the same math mode, fp32 or TF32);
  - memory: the growth of resident memory (CPU) or of the memory pool's bytes in use (GPU)
    during one extra step, over what was in use just before it (parameters, optimizer state
    and data are not counted; activations and temporaries are), and the peak: on the CPU the
    process's peak resident set during that step, in a fresh process that runs only this step
    (Python and the libraries included: compare it between runs of the same library); on the
    GPU the pool's most bytes in use (parameters and data included, the CUDA context not).

`compare="torch"` builds the same network in PyTorch (tinyuvit/tools/torch_uvit.py, same parameter
count, tinyuvit's weights copied in) and does the same work: same loss, clip, AdamW, EMA, same
batch and threads. `compare="blas"` (CPU) times the unsplit model with multi-threaded BLAS
instead of tinyuvit.tools.parallel. `compare="unfused"` (GPU) times tinyuvit without its fused
kernels (tinyuvit/kernels.py): the plain array code on CuPy. Several can be given as a tuple,
e.g. ("torch", "unfused"). `profile=True` adds a per-layer profile of one training step and
one sampling forward.
"""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

from ..backend import Backend, cpu_threads, cupy_module, cupy_status, set_cpu_threads, synchronize, xp_of
from ..diffusion import Schedule
from ..errors import BackendError, ConfigError
from ..kernels import use as use_fused_kernels
from ..model import PRESETS, UViT, get_config
from ..optim import EMA, AdamW, FlatParams, ema_decay_at
from ..train import train_step

WHATS = ("train step", "sampling forward")
IMPLS = {"torch": "torch", "blas": "tinyuvit-blas", "unfused": "tinyuvit-unfused"}   # compare -> what runs
COMPARES = tuple(IMPLS)
DEFAULTS = {"cpu": dict(repeats=5, warmup=2), "gpu": dict(repeats=20, warmup=5)}


# ----------------------------------------------------------------------------------------
# FLOPs: matmuls only (2 per multiply-add), the rest (norms, softmax, GELU) is not counted
# ----------------------------------------------------------------------------------------

def uvit_flops(cfg, batch):
    """Matmul FLOPs of one forward pass of a UViT with config `cfg` on `batch` images.

    Per image, with L = 2 + N tokens, width D, MLP width rD:
      patch embed  2 N (p^2 C) D          blocks: qkv 2 L D 3D, q k^T and A v 2 L^2 D each,
      decoder      2 L D (p^2 C)                  proj 2 L D^2, MLP 2 x 2 L D rD,
      3x3 conv     2 H W C_out 9 C                out-blocks' skip Linear 2 L 2D D.
    A backward pass costs twice the forward (two matmuls per forward matmul: the input's and the
    weight's gradient), so a training step is 3x; the label table's gradient (a one-hot matmul,
    2 B (K+1) D) is left out. tests/test_bench.py checks this against counted matmuls.
    """
    D, p, C = cfg.dim, cfg.patch_size, cfg.in_chans
    N, L, R = cfg.num_patches, cfg.num_patches + 2, cfg.mlp_ratio
    block = 2 * L * D * 3 * D + 2 * (2 * L * L * D) + 2 * L * D * D + 2 * (2 * L * D * R * D)
    skip_linear = 2 * L * 2 * D * D if cfg.skip == "concat" else 0
    per_image = (2 * N * p * p * C * D
                 + cfg.num_blocks * block + (cfg.depth // 2) * skip_linear
                 + 2 * L * D * p * p * C
                 + (2 * cfg.img_size ** 2 * C * 9 * C if cfg.conv == "after" else 0))
    return batch * per_image


def step_flops(cfg, batch, what):
    """FLOPs of what is timed: a training step (3 x forward on B), a guided forward (on 2B)."""
    return 3 * uvit_flops(cfg, batch) if what == "train step" else uvit_flops(cfg, 2 * batch)


# ----------------------------------------------------------------------------------------
# The library calls being timed: one function each (re-point these when the library changes)
# ----------------------------------------------------------------------------------------

def train_settings():
    """The training recipe timed by the benchmark: TrainConfig's defaults."""
    from ..config import TrainConfig
    return TrainConfig()


def sampling_forward(net, x, t, y, null_label):
    """The network's guided prediction as sampling.guided_output computes it: one forward on the
    doubled batch (x with labels y, then x with the null label), without backward caches
    (`train=False`). [B, C, H, W] -> [2B, C, H, W]."""
    xp = xp_of(x)
    return net.forward(xp.concatenate([x, x]), xp.concatenate([t, t]),
                       xp.concatenate([y, xp.full_like(y, null_label)]), train=False)


# ----------------------------------------------------------------------------------------
# The implementations: each returns {"train step": fn(k), "sampling forward": fn(k)}, plus
# "sync" and "drop" (free activations kept between calls, before a memory measurement)
# ----------------------------------------------------------------------------------------

def _inputs(cfg, batch, seed=0):
    """Host arrays: images x0 in [-1, 1], labels, noisy images for sampling."""
    rng = np.random.default_rng(seed)
    shape = (batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    return (rng.uniform(-1, 1, shape).astype(np.float32), rng.integers(0, cfg.num_classes, batch),
            rng.standard_normal(shape).astype(np.float32))


def setup_tinyuvit(cfg, batch, device="cpu", threads=None, split=True):
    """tinyuvit's training step and sampling forward (split=False: the unsplit CPU model)."""
    from .parallel import on_cpu_threads
    tc = train_settings()
    be = Backend(device, "float32")
    model = UViT(cfg, seed=0).to(be)
    flat = FlatParams(model)
    net = on_cpu_threads(model, threads) if split else model
    opt = AdamW(flat, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    ema = EMA(flat, tc.ema_decay, tc.ema_warmup)
    diffusion = tc.diffusion()
    schedule = diffusion.schedule
    x0_h, y_h, xs_h = _inputs(cfg, batch)
    x0, xs = be.asarray(x0_h), be.asarray(xs_h)
    ys, ts = be.xp.asarray(y_h), be.xp.full((batch,), schedule.T // 2, dtype=np.int64)
    rng = np.random.default_rng(1)

    def drop():
        """Forget the activations the layers keep for backward (they persist between calls)."""
        for m in getattr(net, "replicas", [model]):
            for _, mod in m.modules():
                mod.cache = None        # what the last forward kept for backward (layers.Module.save)

    def release():
        """Drop the activations and hand the GPU memory pool's free blocks back (for the other side)."""
        drop()
        if device == "gpu":
            be.xp.get_default_memory_pool().free_all_blocks()

    return {"train step": lambda k: train_step(net, flat, opt, ema, diffusion, x0, y_h, rng, k, tc)[0],
            "sampling forward": lambda k: sampling_forward(net, xs, ts, ys, cfg.num_classes),
            "sync": synchronize, "drop": drop, "release": release, "model": model, "opt": opt, "ema": ema}


def setup_torch(cfg, batch, device="cpu", threads=None, tf32=False):
    """The same work in PyTorch: TorchUViT with tinyuvit's initial weights, the same loss
    (noise, timesteps and label dropout drawn on the host with NumPy, as tinyuvit does),
    clip_grad_norm_, torch.optim.AdamW, an EMA with torch._foreach ops."""
    import torch
    from ..diffusion import clip_side, forgiven, loss_weight
    from .torch_uvit import TorchUViT, copy_weights
    tc = train_settings()
    if device == "gpu":
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(threads or cpu_threads())
    net = copy_weights(TorchUViT(cfg), UViT(cfg, seed=0)).to(dev)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    shadow = [p.detach().clone() for p in params]
    ema_decay = lambda k: ema_decay_at(k, tc.ema_decay, tc.ema_warmup)
    schedule = Schedule(tc.T, tc.noise_schedule)
    x0_h, y_h, xs_h = _inputs(cfg, batch)
    x0, xs, ys = (torch.from_numpy(a).to(dev) for a in (x0_h, xs_h, y_h))
    ts = torch.full((batch,), schedule.T // 2, dtype=torch.int64, device=dev)
    rng = np.random.default_rng(1)
    col = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(dev)[:, None, None, None]

    def train(k):
        t = rng.integers(0, schedule.T, size=batch)
        noise = torch.from_numpy(rng.standard_normal(x0_h.shape, dtype=np.float32)).to(dev)
        y = torch.from_numpy(np.where(rng.random(batch) < tc.p_uncond, cfg.num_classes, y_h)).to(dev)
        a = schedule.abar(t)
        sa, s1 = col(np.sqrt(a)), col(np.sqrt(1 - a))
        w = col(loss_weight(a / (1 - a), tc.snr_gamma, tc.prediction, tc.weighting))
        pred = net(sa * x0 + s1 * noise, torch.from_numpy(t).to(dev), y)
        target = {"v": sa * noise - s1 * x0, "eps": noise, "x0": x0}[tc.prediction]
        diff = forgiven(pred - target, clip_side(x0, tc.clip_loss, tc.prediction))
        loss = (w * diff ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = float(loss.detach())                         # the loop reads it, as train.py does
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        with torch.no_grad():
            d = ema_decay(k)
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, params, alpha=1.0 - d)
        return loss

    def sample(k):
        with torch.no_grad():
            return net(torch.cat([xs, xs]), torch.cat([ts, ts]), torch.cat([ys, torch.full_like(ys, cfg.num_classes)]))

    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    release = torch.cuda.empty_cache if device == "gpu" else (lambda: None)
    return {"train step": train, "sampling forward": sample, "sync": sync, "drop": lambda: None, "release": release}


def _setup(impl, cfg, batch, device, threads, tf32):
    if impl == "torch":
        return setup_torch(cfg, batch, device, threads, tf32)
    s = setup_tinyuvit(cfg, batch, device, threads, split=(impl != "tinyuvit-blas"))
    if impl == "tinyuvit-unfused":
        for what in WHATS:
            s[what] = lambda k, f=s[what]: _unfused(f, k)
    return s


def _unfused(f, k):
    with use_fused_kernels(False):
        return f(k)


# ----------------------------------------------------------------------------------------
# Measuring: time, memory, the matmul peak
# ----------------------------------------------------------------------------------------

def _time(fn, sync, repeats, warmup):
    """Seconds of `repeats` calls of fn(k) after `warmup` untimed ones."""
    for k in range(warmup):
        fn(k)
    sync()
    times = []
    for k in range(warmup, warmup + repeats):
        t0 = time.perf_counter()
        fn(k)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _proc_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _cpu_memory(fn, sync, k):
    """(growth, peak) of the resident set during fn(k), in bytes: the peak (VmHWM, reset to the
    resident set first) minus the resident set before, and the peak itself (the whole process:
    Python, the libraries, the model, its optimizer state and the step's arrays). (None, None)
    where Linux's /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                   # reset the peak to the current RSS
        before = _proc_kb("VmRSS")
        fn(k)
        sync()
        peak = _proc_kb("VmHWM")
        return 1024 * (peak - before), 1024 * peak
    except OSError:
        return None, None


def _gpu_memory(impl, fn, sync, k):
    """(growth, peak): the growth of the bytes in use by the framework's GPU memory pool during
    fn(k), and the most bytes in use at any moment of it (parameters, optimizer state and data
    included; the CUDA context's few hundred MB are not)."""
    sync()
    if impl == "torch":
        import torch
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(k)
        sync()
        return torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()
    cupy = cupy_module()
    pool = cupy.get_default_memory_pool()
    before, peak = pool.used_bytes(), [pool.used_bytes()]

    def tracking_malloc(size):                             # the pool's allocator, watching its peak
        mem = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return mem
    cupy.cuda.set_allocator(tracking_malloc)
    try:
        fn(k)
        sync()
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    return peak[0] - before, peak[0]


def gpu_kernels(fn, sync, k, top=12):
    """The GPU work of one call fn(k), read with PyTorch's profiler (CUPTI sees every kernel of
    the process, CuPy's too): {"kernels": launches, "copies": memcpy/memset, "gpu_ms": the sum
    of their durations, "top": [[name, launches, ms], ...] by time}. None without PyTorch."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(k)
        sync()
    by_name, launches, copies, total = defaultdict(lambda: [0, 0.0]), 0, 0, 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.end - e.time_range.start
        if e.name.startswith(("Memcpy", "Memset")):
            copies += 1
        else:
            launches += 1
        total += us
        by_name[e.name][0] += 1
        by_name[e.name][1] += us / 1000
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels": launches, "copies": copies, "gpu_ms": total / 1000,
            "top": [[name[:90], n, ms] for name, (n, ms) in ranked]}


def matmul_peak(device="cpu", n=None, repeats=3):
    """This machine's float32 matmul rate in FLOP/s: the best of `repeats` n x n products (CPU:
    NumPy on the current BLAS threads, n = 2048; GPU: CuPy, n = 8192, in CuPy's math mode,
    TF32 where CUPY_TF32=1 was set before its first matmul)."""
    if device == "gpu":
        xp = cupy_module()
        n = n or 8192
    else:
        xp = np
        n = n or 2048
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    a @ b
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ----------------------------------------------------------------------------------------
# Per-layer profile of tinyuvit: every module's forward and backward wrapped with a timer
# ----------------------------------------------------------------------------------------

GROUPS = {"Attention": "Attention core", "PatchEmbed": "patchify", "Block": "Block (residuals, skip concat)",
          "MLP": "MLP (glue)", "UViT": "UViT (tokens, unpatchify)", "LabelEmbedding": "label embedding",
          "PosEmbed": "pos embedding"}


class _Profiler:
    """Exclusive time per label: a wrapped call's time minus that of the wrapped calls inside it."""

    def __init__(self, sync):
        self.sync, self.totals, self.stack = sync, defaultdict(float), []

    def wrap(self, obj, method, label):
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            self.stack.append(0.0)
            try:
                return inner(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                self.totals[label] += dt - self.stack.pop()
                if self.stack:
                    self.stack[-1] += dt
                else:
                    self.outer = dt        # the outermost call: the labels' times add up to it
        setattr(obj, method, timed)
        return timed

    def run(self, fn, label):
        """(seconds of fn(), {label: exclusive seconds}); the exclusive times add up to the total."""
        self.totals.clear()
        self.wrap(type("Root", (), {"f": staticmethod(fn)}), "f", label)()  # the rest: `label`
        return self.outer, dict(self.totals)


def profile_tinyuvit(cfg, batch, device="cpu", threads=None, steps=2):
    """{"train step": {...}, "sampling forward": {...}}, each {"total_ms", "rows": [(group,
    forward ms, backward ms, other ms)]} for the last of `steps` profiled calls ("other": the
    optimizer, EMA, clip, loss: whatever is neither a layer's forward nor its backward). On the CPU the unsplit
    model runs with BLAS threads (layer timers of threads running at once would overlap)."""
    from .. import train as train_module          # train_step's clip_grad_norm, timed in place
    s = setup_tinyuvit(cfg, batch, device, threads, split=False)
    prof = _Profiler(s["sync"])
    for _, m in s["model"].modules():
        name = type(m).__name__
        for method in ("forward", "backward"):
            prof.wrap(m, method, (GROUPS.get(name, name), method))
    prof.wrap(s["opt"], "step", ("AdamW", "step"))
    prof.wrap(s["ema"], "update", ("EMA", "step"))
    plain_clip = train_module.clip_grad_norm
    train_module.clip_grad_norm = prof.wrap(type("C", (), {"f": staticmethod(plain_clip)}), "f",
                                            ("clip grad norm", "step"))
    out = {}
    try:
        for what, rest in (("train step", "loss (noise, q_sample, weights)"), ("sampling forward", "concat (doubled batch)")):
            for k in range(steps):
                total, totals = prof.run(lambda: s[what](k), (rest, "step"))
            groups = defaultdict(lambda: [0.0, 0.0, 0.0])
            for (group, phase), sec in totals.items():
                groups[group][("forward", "backward", "step").index(phase)] += 1000 * sec
            rows = sorted(((g, *ms) for g, ms in groups.items()), key=lambda r: -sum(r[1:]))
            out[what] = {"total_ms": 1000 * total, "rows": rows}
    finally:
        train_module.clip_grad_norm = plain_clip
    return out


def format_profile(prof, preset, batch, device):
    lines = []
    for what, p in prof.items():
        lines.append(f"profile: {preset}, batch {batch}, {what} on {device}: {p['total_ms']:.1f} ms with "
                     f"a timer around every layer{' (synchronized)' if device == 'gpu' else ''}")
        lines.append(f"  {'':32s} {'forward':>10s} {'backward':>10s} {'other':>10s} {'total':>10s} {'share':>6s}")
        cell = lambda ms: f"{ms:8.2f}ms" if ms else f"{'-':>10s}"
        for group, *ms in p["rows"]:
            lines.append(f"  {group:32s} " + " ".join(cell(m) for m in ms)
                         + f" {cell(sum(ms))} {100 * sum(ms) / p['total_ms']:5.1f}%")
    return lines


# ----------------------------------------------------------------------------------------
# Workers: one measurement in a fresh process (CPU), or an A/B session in one process (GPU)
# ----------------------------------------------------------------------------------------

def _spec_config(spec):
    """The model config a worker's job names: its preset with its overrides."""
    return get_config(spec["preset"], **spec.get("overrides", {}))


def _spec_setup(impl, spec):
    """`_setup` of `impl` for the preset, batch, device, threads and math mode a job names."""
    return _setup(impl, _spec_config(spec), spec["batch"], spec["device"], spec.get("threads"), spec.get("tf32"))


def _measure(impls, spec):
    """{impl: {what: {"rounds": [[seconds...] per round]}}}, alternating between the
    implementations round by round in this process; on a GPU also "mem", "mem_peak" (and
    "kernels"). The CPU's memory is measured apart, by `_memory`."""
    setups = {impl: _spec_setup(impl, spec) for impl in impls}
    out = {impl: {what: {"rounds": []} for what in WHATS} for impl in impls}
    for r in range(spec.get("rounds", 1)):
        for impl, s in setups.items():
            for what in WHATS:
                warm = spec["warmup"] if r == 0 else min(spec["warmup"], 1)
                out[impl][what]["rounds"].append(_time(s[what], s["sync"], spec["repeats"], warm))
            if len(setups) > 1:   # one process, one GPU: leave the memory to the other side
                s["sync"]()
                s["release"]()
    if spec["device"] != "gpu":
        return out
    for impl, s in setups.items():  # one more step each, watching memory
        for what in WHATS:
            s["drop"]()
            s["sync"]()
            k = spec["warmup"] + spec["repeats"]
            out[impl][what]["mem"], out[impl][what]["mem_peak"] = _gpu_memory(impl, s[what], s["sync"], k)
            if spec.get("kernels"):
                out[impl][what]["kernels"] = gpu_kernels(s[what], s["sync"], k + 1)
    return out


def _memory(impl, what, spec):
    """{"mem", "mem_peak"} (CPU): `_cpu_memory` of one more call of `what` after the warm-up calls,
    in a process that does nothing else (so the peak is that of this step alone)."""
    s = _spec_setup(impl, spec)
    for k in range(spec["warmup"]):
        s[what](k)
    s["drop"]()
    growth, peak = _cpu_memory(s[what], s["sync"], spec["warmup"])
    return {"mem": growth, "mem_peak": peak}


def _worker(spec):
    """Run one job described by `spec` (a dict) in this process and return its JSON answer."""
    if spec.get("threads") and spec["device"] == "cpu":
        set_cpu_threads(spec["threads"])
    job = spec["job"]
    if job == "measure":
        ans = {"results": _measure(spec["impls"], spec)}
        if spec["device"] == "gpu":
            ans["peak"] = matmul_peak("gpu")
            ans["info"] = _gpu_info(spec["impls"])
        return ans
    if job == "memory":
        return _memory(spec["impls"][0], spec["what"], spec)
    if job == "profile":
        return {"profile": profile_tinyuvit(_spec_config(spec), spec["batch"], spec["device"], spec.get("threads"))}
    raise ValueError(f"unknown job {job!r}")


def _gpu_info(impls):
    cupy = cupy_module()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    info = {"gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
            "cupy": cupy.__version__, "cupy_tf32": os.environ.get("CUPY_TF32", "0")}
    if "torch" in impls:
        import torch
        info["torch"] = torch.__version__
    return info


def _spawn(spec):
    """Run `_worker(spec)` in a fresh Python process; its answer is the last line it prints."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env["CUPY_TF32"] = "1" if spec.get("tf32") else "0"    # read by CuPy at its first float32 matmul
    proc = subprocess.run([sys.executable, "-m", "tinyuvit.tools.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({spec['job']}, {spec.get('impls')}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------

def _check(presets, batches, device, rounds, repeats, warmup, compare, tf32, threads, kernels=False):
    """ConfigError / BackendError for values the benchmark cannot run with."""
    for p in presets:
        if p not in PRESETS:
            raise ConfigError(f"unknown preset {p!r}; choose from {sorted(PRESETS)}")
    if not presets or not batches:
        raise ConfigError("give at least one preset and one batch size")
    for name, v, low in (("batch", min(batches), 1), ("rounds", rounds, 1), ("repeats", repeats, 1),
                         ("warmup", warmup, 0), ("threads", threads if threads is not None else 1, 1)):
        if int(v) != v or v < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {v}")
    if device not in ("cpu", "gpu"):
        raise BackendError(f"device must be 'cpu' or 'gpu', got {device!r}")
    for c in compare:
        if c not in COMPARES:
            raise ConfigError(f"compare must be one of {COMPARES} (or none), got {c!r}")
    if "torch" in compare and importlib.util.find_spec("torch") is None:
        raise ConfigError("comparing with PyTorch needs it installed (pip install torch); tinyuvit itself does not")
    if "blas" in compare and device != "cpu":
        raise ConfigError("compare 'blas' (the unsplit model on BLAS threads) is a CPU comparison")
    if "unfused" in compare and device != "gpu":
        raise ConfigError("compare 'unfused' (without the fused CUDA kernels) is a GPU comparison")
    if tf32 and device != "gpu":
        raise ConfigError("tf32 is a GPU math mode: use it with device 'gpu'")
    if kernels and device != "gpu":
        raise ConfigError("kernels are counted on the GPU: use --kernels with --device gpu")
    if kernels and importlib.util.find_spec("torch") is None:
        raise ConfigError("counting kernels uses PyTorch's profiler: install torch, or leave out --kernels")
    if device == "gpu":
        ok, why = cupy_status()
        if not ok:
            raise BackendError(why)


def run_bench(presets=("tiny",), batches=(64, 128), device="cpu", rounds=3, repeats=None, warmup=None,
              compare=None, tf32=False, profile=False, json_path=None, threads=None, overrides=None,
              peak_n=None, kernels=False, log=print):
    """Time tinyuvit's training step and sampling forward for every preset and batch size.

    device "cpu" (NumPy) or "gpu" (CuPy); repeats / warmup default to 5 / 2 on the CPU, 20 / 5
    on the GPU; compare None, "torch", "blas" or "unfused", or a tuple of them; tf32: TF32
    matmuls on the GPU for both sides;
    threads: CPU threads (default: tinyuvit's, every core); overrides: model config fields
    changed in every preset (e.g. a small dim for tests); peak_n: the size of the peak matmul;
    kernels (GPU, PyTorch installed): count and time the kernels of one call of each (`gpu_kernels`).
    Prints one line per result through `log` and returns {"machine": ..., "results": [...],
    "profiles": [...]}, also written to `json_path` if given.
    """
    d = DEFAULTS.get(device, DEFAULTS["cpu"])
    repeats = d["repeats"] if repeats is None else repeats
    warmup = d["warmup"] if warmup is None else warmup
    presets, batches = tuple(presets), tuple(batches)
    compare = () if not compare else (compare,) if isinstance(compare, str) else tuple(dict.fromkeys(compare))
    _check(presets, batches, device, rounds, repeats, warmup, compare, tf32, threads, kernels)
    threads = threads or cpu_threads()
    overrides = dict(overrides or {})
    impls = ["tinyuvit"] + [IMPLS[c] for c in compare]
    machine = {"device": device, "python": platform.python_version(), "numpy": np.__version__,
               "rounds": rounds, "repeats": repeats, "warmup": warmup, "tf32": bool(tf32)}
    if device == "cpu":
        set_cpu_threads(threads)
        peak = matmul_peak("cpu", peak_n)
        machine.update(cpu=platform.processor() or platform.machine(), threads=threads, blas=_blas_info(),
                       peak_flops=peak)
        log(f"cpu: {machine['cpu']}, {threads} threads; NumPy {np.__version__} ({machine['blas']}); "
            f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    log(f"medians of {repeats} timed calls after {warmup} warm-up calls, "
        + (f"{rounds} alternating rounds in fresh processes" if device == "cpu"
           else f"{rounds} alternating rounds in one process"))
    results, profiles = [], []
    for preset in presets:
        cfg = get_config(preset, **overrides)
        for batch in batches:
            spec = dict(job="measure", preset=preset, batch=batch, device=device, repeats=repeats,
                        warmup=warmup, threads=threads, tf32=bool(tf32), overrides=overrides,
                        kernels=bool(kernels))
            if device == "cpu":           # fresh processes: A, B, A, B, ...
                measured = {impl: {what: {"rounds": []} for what in WHATS} for impl in impls}
                for _ in range(rounds):
                    for impl in impls:
                        got = _spawn(dict(spec, impls=[impl]))["results"][impl]
                        for what in WHATS:
                            measured[impl][what]["rounds"] += got[what]["rounds"]
                for impl in impls:        # memory: each step alone in a fresh process
                    for what in WHATS:
                        measured[impl][what].update(_spawn(dict(spec, job="memory", impls=[impl], what=what)))
            else:                         # one process, alternating round by round
                ans = _spawn(dict(spec, impls=impls, rounds=rounds))
                measured, peak = ans["results"], ans["peak"]
                if "peak_flops" not in machine:
                    machine.update(ans["info"], peak_flops=peak)
                    log(f"gpu: {ans['info']['gpu']}; CuPy {ans['info']['cupy']}"
                        + (f"; PyTorch {ans['info']['torch']}" if "torch" in ans["info"] else "")
                        + f"; {'TF32' if tf32 else 'float32'} matmul peak {peak / 1e12:.1f} TFLOP/s")
            rows = _summarize(measured, cfg, preset, batch, device, machine["peak_flops"])
            for row in rows:
                log(format_row(row))
            results += rows
            if profile:
                prof = _spawn(dict(spec, job="profile"))["profile"]
                for line in format_profile(prof, preset, batch, device):
                    log(line)
                profiles.append({"preset": preset, "batch": batch, **prof})
    out = {"machine": machine, "results": results, "profiles": profiles}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
        log(f"wrote {json_path}")
    return out


def _summarize(measured, cfg, preset, batch, device, peak):
    rows = []
    for what in WHATS:
        for impl, m in measured.items():
            medians = [float(np.median(r)) for r in m[what]["rounds"]]
            sec = float(np.median(medians))
            flops = step_flops(cfg, batch, what)
            rows.append({"preset": preset, "batch": batch, "device": device, "what": what, "impl": impl,
                         "median_ms": 1000 * sec, "img_per_s": batch / sec, "gflop": flops / 1e9,
                         "gflop_per_s": flops / sec / 1e9, "peak_fraction": flops / sec / peak,
                         "mem_bytes": m[what]["mem"], "mem_peak_bytes": m[what].get("mem_peak"),
                         "kernels": m[what].get("kernels"), "round_medians_ms": [1000 * s for s in medians],
                         "times_ms": [1000 * t for r in m[what]["rounds"] for t in r]})
        base = {r["impl"]: r["median_ms"] for r in rows if r["what"] == what}
        for r in rows:
            if r["what"] == what and r["impl"] != "tinyuvit" and "tinyuvit" in base:
                r["speed_vs_tinyuvit"] = r["median_ms"] and base["tinyuvit"] / r["median_ms"]
            if r["what"] == what and r["impl"] == "tinyuvit" and "torch" in base:
                r["speed_vs_torch"] = base["torch"] / r["median_ms"]
    return rows


def format_row(r):
    """One result line: preset, batch, what, implementation, median, img/s, FLOP rate, memory."""
    mem = "mem n/a" if r["mem_bytes"] is None else f"mem +{r['mem_bytes'] / 2 ** 20:.0f} MiB"
    if r.get("mem_peak_bytes") is not None:
        mem += f" (peak {r['mem_peak_bytes'] / 2 ** 20:.0f} MiB)"
    line = (f"{r['preset']:5s} batch {r['batch']:4d}  {r['what']:16s}  {r['impl']:13s} "
            f"{r['median_ms']:9.2f} ms  {r['img_per_s']:8.0f} img/s  {r['gflop_per_s']:8.1f} GFLOP/s "
            f"({100 * r['peak_fraction']:4.1f}% of peak)  {mem}")
    if "speed_vs_torch" in r:
        line += f"  x{r['speed_vs_torch']:.2f} torch's speed"
    elif "speed_vs_tinyuvit" in r:
        line += f"  x{r['speed_vs_tinyuvit']:.2f} tinyuvit's speed"
    kern = r.get("kernels")
    if kern:
        line += (f"\n      GPU work of one call: {kern['kernels']} kernels + {kern['copies']} copies, "
                 f"{kern['gpu_ms']:.2f} ms busy ({100 * kern['gpu_ms'] / r['median_ms']:.0f}% of the wall time)")
        if r["impl"] != "torch":
            line += "".join(f"\n        {ms:7.2f} ms {n:4d}x  {name}" for name, n, ms in kern["top"][:8])
    return line


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
        return ", ".join(f"{i['internal_api']} {i.get('version')}" for i in threadpool_info()
                         if i.get("user_api") == "blas") or "unknown BLAS"
    except Exception:
        return "unknown BLAS"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="A benchmark worker (internal); use `tinyuvit bench`.")
    ap.add_argument("--worker", required=True, help="the job, as JSON")
    print(json.dumps(_worker(json.loads(ap.parse_args().worker))))
