"""examples/gpu_check.sh's `ablate` step, rehearsed on the CPU. A GPU call is lent rarely and its
time is short, so the step must end by itself and bring every finished run back. Here a fake
nvidia-smi stands in (its sampler, like the real one's `-l`, runs until it is killed) and a study
of seconds stands in for `tinyuvit ablate --quick --device gpu`, with the same options."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

FAKE_SMI = """#!/usr/bin/env bash
case "$*" in
  *"-l "*) echo $$ > "{pids}/smi.$$"; while true; do echo "sample"; sleep 1; done ;;
  *) echo "fake GPU, 0 MiB" ;;
esac
"""

# The study of seconds: the CLI's --out/--only/--seeds/--join, a 2-block width-16 model.
FAKE_ABLATE = """
import argparse, sys
from tinyuvit.tools.ablate import Budget
from tinyuvit.tools.ablate_run import run_study, join_study
BUDGET = Budget(preset="tiny", model=dict(dim=16, depth=2, num_heads=2), steps=4, batch_size=4, seeds=(0, 1),
                conv_init="identity", eval_every=0, eval_per_digit=2, final_per_digit=2, sample_steps=2,
                sweep=dict(depth=(1, 4), patch_size=(2, 7)))
p = argparse.ArgumentParser()
for option in ("--out", "--only", "--seeds", "--join"):
    p.add_argument(option)
a = p.parse_args()
if a.join:
    join_study(a.out, a.join, BUDGET)
else:
    sys.exit(130 if run_study(a.out, BUDGET, only=a.only, seeds=a.seeds, progress=False)["stopped"] else 0)
"""


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
@pytest.mark.skipif(not MNIST.is_dir(), reason="needs the shared copy of MNIST (the step warms the FID cache on it)")
def test_the_ablate_step_ends_by_itself_and_brings_back_every_run(tmp_path):
    from tinyuvit.tools.ablate import read_json
    from tinyuvit.tools.ablate_run import join_study

    bin_dir, pids, out, work = (tmp_path / d for d in ("bin", "pids", "out", "work"))
    for d in (bin_dir, pids):
        d.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI.format(pids=pids))
    (bin_dir / "nvidia-smi").chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)        # the script's python3 is the tests' Python
    fake = tmp_path / "fake_ablate.py"
    fake.write_text(FAKE_ABLATE)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", XDG_CACHE_HOME=str(tmp_path / "cache"),
               STEPS="ablate", OUT=str(out), MNIST=str(MNIST), ABLATE_DIR=str(work), ABLATE_SEEDS="0 1",
               ABLATE_GROUPS="patch_size=7;depth", ABLATE_LIMIT="150", ABLATE_CMD=f"{sys.executable} {fake}")
    r = subprocess.run(["bash", str(ROOT / "examples" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "=== end" in r.stdout and "packed what there is" not in r.stdout, r.stdout[-3000:]

    sampler = [int(p.read_text()) for p in pids.iterdir()]    # the sampler ran, and was stopped
    assert sampler and not any(os.path.exists(f"/proc/{pid}") for pid in sampler)

    back = tmp_path / "back"
    with tarfile.open(out / "ablate.tar.gz") as tar:
        assert not any(n.endswith("checkpoint.npz") for n in tar.getnames())
        tar.extractall(back)
    folders = sorted(p.name for p in back.iterdir() if p.name != "logs")
    assert folders == ["s0-g0", "s0-g1", "s1-g0", "s1-g1"]
    for s in (0, 1):                  # the second group took U-ViT's run by --join instead of training it
        log = (back / "logs" / f"s{s}-g1.log").read_text()
        assert f"U-ViT (seed {s}): finished earlier" in log and f"U-ViT (seed {s}): training" not in log, log

    namespace = {}                    # the fake's budget, to join the four folders here as a user would
    exec(FAKE_ABLATE.split("p = argparse")[0], namespace)
    for f in folders:
        joined = join_study(tmp_path / "study", back / f, namespace["BUDGET"], log=lambda m: None)
    done = sorted(r["folder"] for r in joined["results"] if r.get("status") == "ok")
    assert done == sorted(f"{m}{'-seed1' if s else ''}" for s in (0, 1)
                          for m in ("uvit", "patch_size-7", "depth-1", "depth-4")), done
    assert read_json(tmp_path / "study" / "uvit-seed1" / "result.json")["scores"][1]["seed"] == 1   # scored twice
