import os
import stat

import pytest

from tinyuvit.files import atomic_write


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
