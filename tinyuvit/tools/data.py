"""MNIST: find or download the four IDX files (read by tinyuvit.tools.idx), or fall back to an embedded subset.

Search order for the full set: the `data_dir` argument, then `$TINYUVIT_DATA`, then the per-user
cache (`$XDG_CACHE_HOME/tinyuvit/mnist`, default `~/.cache/tinyuvit/mnist`). If none holds it,
the files are downloaded into the cache; if that fails too (offline), the embedded subset of real
MNIST digits in `tinyuvit/assets/mnist_subset.npz` is used instead, with a one-line note.
Every file is checked against the SHA-256 of its decompressed bytes before it is used.
"""
import gzip
import hashlib
import http.client
import os
import sys
import urllib.request
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import idx
from .files import atomic_write
from .progress import Progress

# SHA-256 of the decompressed files (a mirror's .gz may differ byte-wise, its content may not).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILES = tuple(SHA256)
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
SUBSET_PATH = Path(__file__).resolve().parents[1] / "assets" / "mnist_subset.npz"
ENV_VAR = "TINYUVIT_DATA"
FIX_HINT = ("delete it and rerun to download it again, or pass --data-dir DIR with good copies "
            "of the four MNIST files")

_verified = set()       # (path, size, mtime_ns) of files whose checksum passed in this process
_state = {"noted": False, "download_failed": None}


from ..errors import DataError, DownloadError  # noqa: F401,E402


def cache_dir():
    """The per-user folder that downloads go to: $XDG_CACHE_HOME (or ~/.cache)/tinyuvit/mnist."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyuvit" / "mnist"


def _search_dirs(data_dir=None):
    """(label, folder) pairs in search order: data_dir, $TINYUVIT_DATA, the cache."""
    dirs = []
    if data_dir:
        dirs.append(("data_dir", Path(data_dir).expanduser()))
    if os.environ.get(ENV_VAR):
        dirs.append((ENV_VAR, Path(os.environ[ENV_VAR]).expanduser()))
    dirs.append(("cache", cache_dir()))
    return dirs


def _locate(folder, name):
    """The path of `name` or `name.gz` in folder, or None."""
    for candidate in (Path(folder) / name, Path(folder) / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing(folder):
    """Names of the four MNIST files that folder lacks."""
    return [name for name in FILES if _locate(folder, name) is None]


def find_mnist(data_dir=None):
    """The first folder in search order holding all four MNIST files (gz or raw), or None."""
    for _, folder in _search_dirs(data_dir):
        if not _missing(folder):
            return str(folder)
    return None


def _with_hint(read, *args):
    """read(*args), with FIX_HINT added to a DataError (the IDX reader knows nothing of downloads)."""
    try:
        return read(*args)
    except DataError as e:
        raise DataError(f"{e}; {FIX_HINT}") from None


def read_idx(path):
    """A uint8 array from an IDX file (.gz or raw), after checking its magic, shape and size
    (tinyuvit.tools.idx.read_idx, with the advice of how to get a good copy in its errors)."""
    return _with_hint(idx.read_idx, path)


def _checksum_problem(data, name):
    """Why data (decompressed) is not the original `name`, or None if its SHA-256 matches."""
    digest = hashlib.sha256(data).hexdigest()
    if digest == SHA256[name]:
        return None
    return (f"wrong checksum for {name} (SHA-256 {digest[:16]}..., expected "
            f"{SHA256[name][:16]}...), not the original MNIST file")


def _read_verified(folder, name):
    """The array in folder's copy of `name`, checked for format and checksum."""
    path = _locate(folder, name)
    if path is None:
        raise DataError(f"{Path(folder) / name}: missing (neither {name} nor {name}.gz exists); "
                        f"put the four MNIST files there, or pass --data-dir DIR")
    data = _with_hint(idx.read_bytes, path)
    array = _with_hint(idx.parse_idx, data, path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        problem = _checksum_problem(data, name)
        if problem:
            raise DataError(f"{path}: {problem}; {FIX_HINT}")
        _verified.add(key)
    return array


def _fetch(url, timeout, quiet):
    """The bytes at url, with a progress bar on stderr."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with Progress(total, f"downloading {url.rsplit('/', 1)[-1]}", unit="B",
                      disable=quiet) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise DataError(f"incomplete download ({len(data)} of {total} bytes)")
    return data


def _download_one(name, dest, mirrors, timeout, quiet):
    """Fetch name.gz from the first mirror whose copy decompresses to the right bytes."""
    problems = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name + ".gz"
        try:
            blob = _fetch(url, timeout, quiet)
            problem = _checksum_problem(gzip.decompress(blob), name)
        except (OSError, EOFError, zlib.error, ValueError, http.client.HTTPException) as e:
            problem = str(e) or type(e).__name__  # URLError, timeouts, bad gzip, short reads
        if problem:
            problems.append(f"{url}: {problem}")
            continue
        atomic_write(dest / (name + ".gz"), lambda f: f.write(blob))
        return
    raise DownloadError(f"could not download {name}.gz: " + "; ".join(problems or ["no mirrors"]))


def download_mnist(dest_dir, mirrors=None, timeout=10, quiet=False):
    """Download the MNIST files that dest_dir lacks, verify them, and return dest_dir.

    Files already there are checked (DataError if bad) and kept; each missing one is tried on
    every mirror in turn and written atomically only once its decompressed SHA-256 matches.
    """
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = MIRRORS if mirrors is None else mirrors
    for name in FILES:
        if _locate(dest, name) is not None:
            _read_verified(dest, name)
        else:
            _download_one(name, dest, mirrors, timeout, quiet)
    return str(dest)


def _full_copy(data_dir, download, quiet):
    """The folder with full MNIST to use, or None when only the subset is available."""
    for label, folder in _search_dirs(data_dir)[:-1]:  # folders the user named must be complete
        missing = _missing(folder)
        if missing:
            how = "--data-dir" if label == "data_dir" else ENV_VAR
            raise DataError(f"{folder} (from {label}): missing {', '.join(missing)} (.gz or not); "
                            f"put the four MNIST files there, or point {how} at a folder with them")
        return folder
    cache = cache_dir()
    missing = _missing(cache)
    if not missing:
        return cache
    for name in set(FILES) - set(missing):  # a partial cache: its files must still be good
        _read_verified(cache, name)
    if not download or _state["download_failed"]:
        return None
    try:
        download_mnist(cache, quiet=quiet)
    except DownloadError as e:
        _state["download_failed"] = str(e)
        return None
    except OSError as e:  # e.g. the cache folder cannot be created
        _state["download_failed"] = f"{cache}: {e}"
        return None
    return cache


@lru_cache(maxsize=1)
def _subset():
    """The embedded subset as a dict of read-only arrays."""
    with np.load(SUBSET_PATH) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def _note_subset(quiet):
    """Say once per process, on one stderr line, that the subset is in use and how to avoid it."""
    if quiet or _state["noted"]:
        return
    _state["noted"] = True
    s = _subset()
    why = "could not be downloaded" if _state["download_failed"] else "was not found"
    print(f"tinyuvit: full MNIST {why}, using the embedded subset of "
          f"{len(s['train_labels'])} train / {len(s['test_labels'])} test digits; for full MNIST "
          f"pass --data-dir DIR with the four MNIST files, set {ENV_VAR}=DIR, or go online so it "
          f"downloads to {cache_dir()}", file=sys.stderr)


def load_mnist(split="train", data_dir=None, download=True, quiet=False):
    """(images uint8 [N, 28, 28], labels int64 [N], source) for split "train" or "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name, count = SPLITS[split]
    folder = _full_copy(data_dir, download, quiet)
    if folder is None:
        _note_subset(quiet)
        s = _subset()
        return s[f"{split}_images"].copy(), s[f"{split}_labels"].astype(np.int64), "embedded subset"
    images = _read_verified(folder, image_name)
    labels = _read_verified(folder, label_name)
    assert images.shape == (count, 28, 28) and labels.shape == (count,)  # implied by the checksum
    return images, labels.astype(np.int64), f"full MNIST ({Path(folder).resolve()})"


# ----------------------------------------------------------------------------------------
# Which data a run trained on
# ----------------------------------------------------------------------------------------

def dataset_id(images, labels, source):
    """A short identity of a training set, for a run's config: dict(source, n, sha256).

    source: "full MNIST" or "embedded subset" (load_mnist's source without its folder, so a
    moved data folder is the same data); sha256: the first 16 hex digits of the SHA-256 of the
    images (uint8) and labels (int64) bytes. 25 ms for the 60,000 training digits (load_mnist
    itself takes 0.2 s), so it is computed at every start.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    h = hashlib.sha256(repr((images.shape, labels.shape)).encode())
    h.update(memoryview(images).cast("B"))
    h.update(memoryview(labels).cast("B"))
    return {"source": source_kind(source), "n": int(len(labels)), "sha256": h.hexdigest()[:16]}


def source_kind(source):
    """load_mnist's source without its folder: "full MNIST" or "embedded subset"."""
    return "embedded subset" if "subset" in source else "full MNIST" if "MNIST" in source else source


def describe_dataset(ident):
    """ "full MNIST (60000 digits, sha256 0123abcd...)" for messages."""
    return f"{ident.get('source', '?')} ({ident.get('n', '?')} digits, sha256 {ident.get('sha256', '?')})"


def dataset_difference(saved, current):
    """None if two dataset_id results name the same data, else a phrase saying how they differ:
    "the checkpoint trained on full MNIST (60000 digits, ...), this run has embedded subset (...)".
    A run saved before the identity was stored (saved None) has nothing to compare: None."""
    if saved is None or saved == current:
        return None
    return (f"the checkpoint trained on {describe_dataset(saved)}, this run has "
            f"{describe_dataset(current)}")

