import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyuvit.tools import files
from tinyuvit.errors import ConfigError, TrainingError
from tinyuvit.tools.files import RunLock, atomic_write, check_output_path


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.bin"          # missing folders are made
    atomic_write(path, lambda f: f.write(b"first"))
    atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["a.bin"]
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"")                      # what open() gives a new file
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half of it")
        raise KeyboardInterrupt                 # Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


# ----- one process per run folder --------------------------------------------------------------

HOLD = """
import sys, time
from tinyuvit.tools.files import RunLock
with RunLock(sys.argv[1], command="tinyuvit train-mnist --out " + sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process holding tmp_path / "run"; yields (folder, process)."""
    folder = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(files.fcntl is None, reason="no fcntl: RunLock takes no lock")
def test_run_lock_refuses_a_second_process_and_names_it(holder):
    folder, proc = holder
    with pytest.raises(TrainingError) as info:
        with RunLock(folder):
            pass
    message = str(info.value)
    assert message == (f"{folder} is in use by process {proc.pid} (tinyuvit train-mnist --out "
                       f"{folder}); wait for it to finish or choose another --out")
    proc.kill()                 # a killed holder leaves no stale lock
    proc.wait()
    with RunLock(folder) as lock:
        assert (folder / ".lock").read_text().startswith(f"{os.getpid()} ")
        with pytest.raises(TrainingError, match=f"process {os.getpid()}"):
            RunLock(folder).acquire()        # a second lock in the same process is refused too
    with RunLock(folder):                    # released on exit
        pass
    assert lock.fd is None


def test_remove_stale_parts_only_removes_atomic_write_temporaries(tmp_path):
    (tmp_path / "samples").mkdir()
    stale = [tmp_path / ".checkpoint.npz.k2j3.part", tmp_path / "samples" / ".step_000002.png.x.part"]
    kept = [tmp_path / "checkpoint.npz", tmp_path / "notes.part", tmp_path / ".lock",
            tmp_path / "samples" / "step_000002.png"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert files.remove_stale_parts(tmp_path) == sorted(str(p) for p in stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert files.remove_stale_parts(tmp_path / "missing") == []


# ----- output paths ----------------------------------------------------------------------------

def test_check_output_path_accepts_new_and_same_kind_files(tmp_path):
    assert check_output_path(tmp_path / "a.png") == str(tmp_path / "a.png")
    png = tmp_path / "b.PNG"
    png.write_bytes(b"\x89PNG\r\n\x1a\n rest")
    assert check_output_path(png) == str(png)
    js = tmp_path / "r.json"
    js.write_text('{"fid": 1.0}\n')
    assert check_output_path(js, (".json",), "--json") == str(js)
    (tmp_path / "empty.png").write_bytes(b"")
    check_output_path(tmp_path / "empty.png")


@pytest.mark.parametrize("case, words", [
    ("folder", "is a folder"),
    ("no folder", "does not exist"),
    ("suffix", "must end in .png"),
    ("checkpoint", "is a training checkpoint"),
    ("npz named png", "is not a PNG image"),
    ("text as json", "is not a JSON file"),
])
def test_check_output_path_refuses_in_one_line(tmp_path, case, words):
    suffixes, what = (".png",), "--out"
    if case == "folder":
        path = tmp_path
    elif case == "no folder":
        path = tmp_path / "missing" / "a.png"
    elif case == "suffix":
        path = tmp_path / "checkpoint.npz"
    elif case == "checkpoint":
        path, suffixes = tmp_path / "checkpoint.npz", (".npz",)
        np.savez(path, step=np.int64(3), opt_k=np.int64(3), config=np.array("{}"))
    elif case == "npz named png":
        path = tmp_path / "grid.png"
        np.savez(tmp_path / "x.npz", a=np.zeros(3))
        os.replace(tmp_path / "x.npz", path)
    else:
        path, suffixes, what = tmp_path / "notes.json", (".json",), "--json"
        path.write_text("my notes, not json\n")
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ConfigError, match=words) as info:
        check_output_path(path, suffixes, what)
    assert str(info.value).startswith(f"{what} {path}") and "\n" not in str(info.value)
    if before is not None:
        assert path.read_bytes() == before
