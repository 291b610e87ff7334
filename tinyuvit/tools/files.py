"""Files a run writes: atomically (a crash or Ctrl-C never leaves half of one), in a run folder
that one process at a time may use, and never over a file of another kind."""
import json
import os
import sys
import tempfile
import zipfile

try:  # POSIX: flock locks that the OS drops when the holder dies, so no lock is ever stale
    import fcntl
except ImportError:  # Windows: RunLock does nothing (see RunLock)
    fcntl = None

from ..errors import ConfigError, TrainingError

PART_SUFFIX = ".part"      # atomic_write's temporary files: .<name>.<random>.part
LOCK_NAME = ".lock"        # RunLock's file in the run folder


# ----------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------

def atomic_write(path, write):
    """Call `write(f)` on a new temporary file beside `path`, flush it to disk, then rename it
    over `path` (atomic on POSIX and Windows: the old file stays whole until that moment).
    On any failure the temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=PART_SUFFIX)
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


def remove_stale_parts(folder):
    """Delete the temporary files that a killed atomic_write left in `folder` and its subfolders
    (`.<name>.<random>.part`); returns their paths. Call it only while holding the folder's
    RunLock: another live process may be writing its own .part files there otherwise."""
    removed = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(PART_SUFFIX):
                path = os.path.join(root, name)
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return sorted(removed)


# ----------------------------------------------------------------------------------------
# One process per run folder
# ----------------------------------------------------------------------------------------

class RunLock:
    """`with RunLock(folder):` holds the run folder for this process, or raises TrainingError
    naming the process that holds it.

    An exclusive flock on `folder/.lock`, which then holds the holder's PID and command line
    for the message the next process gives. The OS drops the lock when the holder exits or is
    killed, so a lock is never stale; the file itself stays (deleting it would let two processes
    lock two different files). Without fcntl (Windows) no lock is taken.
    """

    def __init__(self, folder, command=None, option="--out"):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.command = command if command is not None else _command_line()
        self.option = option
        self.fd = None

    def acquire(self):
        if fcntl is None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's line stays
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: someone holds it
            holder = _read_holder(fd)
            os.close(fd)
            raise TrainingError(f"{self.folder} is in use by {holder}; wait for it to finish "
                                f"or choose another {self.option}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.command}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)       # no holder to name any more
            finally:
                os.close(self.fd)              # closing drops the flock
                self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _command_line():
    """This process's command, e.g. "tinyuvit train-mnist --out runs/x"."""
    argv = list(sys.argv) or ["python"]
    argv[0] = os.path.basename(argv[0])
    return " ".join(argv)


def _read_holder(fd):
    """ "process 1234 (tinyuvit train-mnist ...)" from a lock file, or "another process"."""
    try:
        line = os.pread(fd, 4096, 0).decode(errors="replace").strip().splitlines()
    except OSError:
        line = []
    pid, _, command = (line[0] if line else "").partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" ({command})" if command else "")


# ----------------------------------------------------------------------------------------
# Output paths, checked before any work starts
# ----------------------------------------------------------------------------------------

def _is_json(path):
    with open(path, "rb") as f:
        head = f.read(1 << 20).strip()
    if not head:
        return True
    try:
        json.loads(head)
        return True
    except ValueError:
        return False


def _has_magic(*magics):
    def check(path):
        with open(path, "rb") as f:
            head = f.read(16)
        return head == b"" or any(head.startswith(m) for m in magics)
    return check


# What an existing file of each kind must start with before it may be replaced.
_KINDS = {
    ".png": ("a PNG image", _has_magic(b"\x89PNG\r\n\x1a\n")),
    ".gif": ("a GIF image", _has_magic(b"GIF87a", b"GIF89a")),
    ".npz": ("an .npz archive", _has_magic(b"PK\x03\x04", b"PK\x05\x06")),
    ".json": ("a JSON file", _is_json),
    ".jsonl": ("a JSON-lines file", lambda path: True),
}


def _is_training_checkpoint(path):
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return {"step.npy", "opt_k.npy", "config.npy"} <= names


def check_output_path(path, suffixes=(".png",), what="--out"):
    """`path` (as a str) if a result may be written there, else ConfigError in one line.

    Refused, before any work starts: a path that is a folder, whose folder does not exist or
    cannot be written, whose name does not end in one of `suffixes`, and an existing file that
    is not of that kind (a PNG over checkpoint.npz, --json over a text file) or that is a
    tinyuvit training checkpoint. `what` names the option in the message.
    """
    path = os.fspath(path)
    suffixes = tuple(s.lower() for s in suffixes)
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a folder; give a file name ending in "
                          f"{' or '.join(suffixes)}")
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"{what} {path} must end in {' or '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{what} {path}: the folder {os.path.dirname(path) or folder} does not "
                          "exist; create it first or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the folder {os.path.dirname(path) or folder} cannot be "
                          "written; choose another path")
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise ConfigError(f"{what} {path} exists and is not a regular file; choose another path")
        if _is_training_checkpoint(path):
            raise ConfigError(f"{what} {path} is a training checkpoint; it would be overwritten: "
                              "choose another path")
        kind = _KINDS.get(os.path.splitext(path)[1].lower())
        if kind is not None and not kind[1](path):
            raise ConfigError(f"{what} {path} exists and is not {kind[0]}; it would be "
                              "overwritten: choose another path or delete it first")
    return path
