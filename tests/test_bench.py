"""`tinyuvit bench`: the FLOP count, result lines and JSON, the command's errors, and the PyTorch
twin (same forward in float64, same parameter count, same training step)."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from tinyuvit.tools import bench
from tinyuvit.tools.bench import run_bench, uvit_flops
from tinyuvit.tools.cli import main
from tinyuvit.model import UViT, get_config

SMALL = dict(dim=32, depth=2, num_heads=2)  # a model small enough for a benchmark in a test

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (only needed to compare)")


# ----------------------------------------------------------------------------------------
# FLOPs: the formula against matmuls counted while the model runs
# ----------------------------------------------------------------------------------------

class Counted(np.ndarray):
    """An array that adds 2 m k n (times the broadcast batch) to `flops` for every matmul it
    takes part in; what it produces is Counted too, so the count follows the data."""
    flops = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = lambda a: a.view(np.ndarray) if isinstance(a, Counted) else a
        args = [plain(a) for a in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        if ufunc is np.matmul and method == "__call__":
            a, b = args
            batch = int(np.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])))
            Counted.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        res = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return res.view(Counted) if isinstance(res, np.ndarray) else res


def counted_flops(cfg, B):
    """(forward FLOPs, backward FLOPs) of a float64 UViT, counted matmul by matmul."""
    model = UViT(cfg, seed=0)
    for _, m, k in model.named_parameters():
        m.params[k] = m.params[k].view(Counted)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, cfg.in_chans, cfg.img_size, cfg.img_size)).view(Counted)
    Counted.flops = 0
    out = model.forward(x, rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes + 1, B))
    fwd, Counted.flops = Counted.flops, 0
    model.backward(rng.standard_normal(out.shape).view(Counted))
    return fwd, Counted.flops


@pytest.mark.parametrize("overrides", [
    dict(img_size=8, patch_size=2, in_chans=2, dim=16, depth=2, num_heads=2, num_classes=3),
    dict(img_size=8, patch_size=4, in_chans=1, dim=12, depth=4, num_heads=3, mlp_ratio=2, skip="add", conv="none"),
    dict(img_size=6, patch_size=3, in_chans=3, dim=8, depth=2, num_heads=1, skip="none", pos_embed="none"),
])
def test_flop_count_equals_the_counted_matmuls_and_backward_is_twice_forward(overrides):
    cfg = get_config("tiny", **overrides)
    B = 3
    fwd, bwd = counted_flops(cfg, B)
    assert uvit_flops(cfg, B) == fwd
    label_table_grad = 2 * B * (cfg.num_classes + 1) * cfg.dim   # the one matmul left out of "2 x forward"
    assert bwd == 2 * fwd + label_table_grad


def test_flop_count_of_the_presets():
    tiny = uvit_flops(get_config("tiny"), 1)
    # ~ 2 x (parameters in the blocks) x tokens, plus attention: 1.5M params, 51 tokens
    assert 1.4e8 < tiny < 1.8e8
    assert uvit_flops(get_config("tiny"), 64) == 64 * tiny
    assert bench.step_flops(get_config("tiny"), 8, "train step") == 3 * 8 * tiny
    assert bench.step_flops(get_config("tiny"), 8, "sampling forward") == 16 * tiny


# ----------------------------------------------------------------------------------------
# A real (tiny) run: result lines and JSON
# ----------------------------------------------------------------------------------------

def test_bench_prints_one_line_per_result_and_writes_json(tmp_path):
    lines = []
    path = tmp_path / "bench.json"
    out = run_bench(presets=("tiny",), batches=(2,), rounds=1, repeats=1, warmup=0, compare="blas",
                    json_path=str(path), threads=1, overrides=SMALL, peak_n=128, log=lines.append)
    rows = [line for line in lines if " batch " in line]
    assert len(rows) == 4                       # {train step, sampling forward} x {tinyuvit, tinyuvit-blas}
    for line in rows:
        assert line.startswith("tiny  batch    2") and " ms " in line and "img/s" in line and "GFLOP/s" in line
    assert sum("train step" in line for line in rows) == 2 and sum("sampling forward" in line for line in rows) == 2
    assert all("tinyuvit's speed" in line for line in rows if "tinyuvit-blas" in line)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(out))
    assert saved["machine"]["threads"] == 1 and saved["machine"]["peak_flops"] > 0
    r = saved["results"][0]
    for key in ("preset", "batch", "what", "impl", "median_ms", "img_per_s", "gflop_per_s", "peak_fraction",
                "mem_bytes", "round_medians_ms", "times_ms"):
        assert key in r
    assert r["img_per_s"] == pytest.approx(2 / (r["median_ms"] / 1000))
    if os.path.exists("/proc/self/clear_refs"):   # Linux: each step's peak, from a process of its own
        for r in saved["results"]:
            assert r["mem_peak_bytes"] > r["mem_bytes"] >= 0
            assert r["mem_peak_bytes"] > 20 * 2 ** 20             # at least Python and NumPy
        assert all("(peak " in line for line in rows)


def test_profile_shares_add_up_to_the_step():
    prof = bench.profile_tinyuvit(get_config("tiny", **SMALL), 2, steps=1)
    for what in ("train step", "sampling forward"):
        p = prof[what]
        groups = {row[0] for row in p["rows"]}
        assert {"Linear", "LayerNorm", "GELU", "Attention core", "Conv3x3"} <= groups
        assert sum(sum(row[1:]) for row in p["rows"]) == pytest.approx(p["total_ms"], rel=1e-9)
    assert {"AdamW", "EMA", "clip grad norm"} <= {row[0] for row in prof["train step"]["rows"]}
    import tinyuvit.train as train_mod
    assert train_mod.clip_grad_norm.__module__ == "tinyuvit.optim"   # the wrapper is gone again
    assert "share" in "\n".join(bench.format_profile(prof, "tiny", 2, "cpu"))


# ----------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "batch must be an integer >= 1"),
    (["--rounds", "0"], "rounds must be an integer >= 1"),
    (["--repeats", "0"], "repeats must be an integer >= 1"),
    (["--batch", "4", "x"], "unexpected argument 'x'"),
    (["--tf32"], "tf32 is a GPU math mode"),
    (["--compare", "blas", "--device", "gpu"], "CPU comparison"),
    (["--compare", "unfused"], "GPU comparison"),
    (["--kernels"], "counted on the GPU"),
])
def test_bench_command_refuses_bad_values_in_one_line(args, message):
    r = CliRunner().invoke(main, ["bench"] + args)
    assert r.exit_code == 1 and message in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_bench_command_without_torch_or_cupy(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    r = CliRunner().invoke(main, ["bench", "--compare", "torch"])
    assert r.exit_code == 1 and "needs it installed" in r.output
    monkeypatch.setattr(bench, "cupy_status", lambda: (False, "CuPy is not installed"))
    r = CliRunner().invoke(main, ["bench", "--device", "gpu"])
    assert r.exit_code == 1 and r.output.strip() == "Error: CuPy is not installed"


def test_several_values_after_one_option(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda **kw: seen.update(kw))
    r = CliRunner().invoke(main, ["bench", "--batch", "8", "16", "--preset", "tiny", "small"])
    assert r.exit_code == 0, r.output
    assert seen["batches"] == [8, 16] and seen["presets"] == ["tiny", "small"]


# ----------------------------------------------------------------------------------------
# The PyTorch twin
# ----------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_torch_model_has_the_same_parameter_count(preset):
    from tinyuvit.tools.torch_uvit import TorchUViT, copy_weights
    cfg = get_config(preset)
    model = UViT(cfg)
    tm = copy_weights(TorchUViT(cfg), model)
    assert sum(p.numel() for p in tm.parameters()) == model.num_params() == {"tiny": 1_496_346, "small": 7_682_574}[preset]


@needs_torch
@pytest.mark.parametrize("overrides", [{}, dict(img_size=8, patch_size=2, in_chans=3, dim=12, depth=2, num_heads=3)])
def test_torch_forward_equals_tinyuvit_in_float64(overrides):
    from tinyuvit.tools.torch_uvit import TorchUViT, copy_weights
    cfg = get_config("tiny", **overrides)
    model = UViT(cfg, seed=3)
    rng = np.random.default_rng(0)
    for _, m, k in model.named_parameters():                  # away from the init's small, regular values
        m.params[k] = m.params[k] + rng.normal(0, 0.1, m.params[k].shape)
    tm = copy_weights(TorchUViT(cfg).double(), model)
    x = rng.standard_normal((3, cfg.in_chans, cfg.img_size, cfg.img_size))
    t, y = np.array([0, 417, 999]), np.array([1, cfg.num_classes, 0])
    ours = model.forward(x, t, y)
    with torch.no_grad():
        theirs = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert np.abs(ours - theirs).max() <= 1e-10 * max(1.0, np.abs(ours).max())


@needs_torch
def test_torch_training_step_does_the_same_work():
    """Same draws, loss, clip, AdamW: the losses of two steps agree to float32 rounding."""
    cfg = get_config("tiny", **SMALL)
    ours = bench.setup_tinyuvit(cfg, 4, threads=1, split=False)
    theirs = bench.setup_torch(cfg, 4, threads=1)
    for k in range(2):
        assert theirs["train step"](k) == pytest.approx(ours["train step"](k), rel=1e-4)
    assert theirs["sampling forward"](0).shape == (8, 1, 28, 28)


@pytest.mark.skipif(not bench.cupy_status()[0], reason="needs CuPy and a GPU")
def test_gpu_bench_beside_the_unfused_path_with_kernel_counts():
    extra = ("torch",) if torch is not None else ()
    out = run_bench(presets=("tiny",), batches=(2,), device="gpu", rounds=1, repeats=1, warmup=0,
                    compare=("unfused",) + extra, kernels=torch is not None,
                    overrides=dict(dim=32, depth=2, num_heads=2), log=lambda line: None)
    rows = {(r["impl"], r["what"]): r for r in out["results"]}
    assert {impl for impl, _ in rows} == {"tinyuvit", "tinyuvit-unfused"} | set(extra)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["mem_peak_bytes"] >= r["mem_bytes"] > 0
    if torch is not None:   # the profiler sees CuPy's kernels too; fusing means fewer of them
        fused, plain = rows["tinyuvit", "train step"]["kernels"], rows["tinyuvit-unfused", "train step"]["kernels"]
        assert 0 < fused["kernels"] < plain["kernels"]
