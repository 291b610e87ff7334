"""The commands a newcomer runs first: --help everywhere, gradcheck, the walk-through example."""
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tinyuvit.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(main.commands))
def test_help_of_every_command_lists_its_own_options(name):
    """`tinyuvit NAME --help` exits 0 with its usage, its summary, and every option the command
    takes (read from the command itself, so a new option must show up in --help too)."""
    command = main.commands[name]
    r = CliRunner().invoke(main, [name, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"{name} [OPTIONS]" in r.output and command.get_short_help_str(200)[:40] in " ".join(r.output.split())
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    for p in options:
        assert any(opt in r.output for opt in p.opts), f"{name} --help lacks {p.opts}"


def test_gradcheck_command_passes_and_prints_a_table(monkeypatch):
    """The command over the first cases of the table (tests/test_layers.py runs them all)."""
    import tinyuvit.gradcheck as gc
    cases = gc.layer_cases()
    monkeypatch.setattr(gc, "layer_cases", lambda: cases[:7] + [c for c in cases if c.name == "UViT depth 2"])
    r = CliRunner().invoke(main, ["gradcheck"])
    assert r.exit_code == 0, r.output
    for layer in ("Linear", "LayerNorm", "GELU", "Attention", "UViT"):
        assert layer in r.output
    assert "fail" not in r.output.replace("pass/fail", "")


def test_walk_example_prints_every_stage(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    shared = ROOT.parent / "shared" / "data" / "mnist"
    if shared.is_dir():  # full MNIST where it is at hand, so nothing tries the network
        env["TINYUVIT_DATA"] = str(shared)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "walk_uvit.py")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for stage in ("patch_embed", "[1, 49, 128]", "[1, 51, 128]", "out_blocks[0] (long skip from in_blocks[2])",
                  "final_layer"):
        assert stage in out.stdout


def test_progress_bar_off_a_terminal_prints_plain_lines_once_each():
    import io

    from tinyuvit.tools.progress import Progress
    out = io.StringIO()
    with Progress(4, "train", unit="step", stream=out, log_every=0) as bar:
        for _ in range(4):
            bar.update(1, loss="0.5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("train |" + "#" * 24 + "| 4/4 loss 0.5")
    assert "\r" not in out.getvalue()
