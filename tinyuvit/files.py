"""Writing files so that a reader (or a crash, or Ctrl-C) never leaves half of one behind."""
import os
import tempfile


def atomic_write(path, write):
    """Call `write(f)` on a new temporary file beside `path`, flush it to disk, then rename it
    over `path` (atomic on POSIX and Windows: the old file stays whole until that moment).
    On any failure the temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes owner-only files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _default_mode():
    """The permissions open() would give a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
