"""MNIST loading: IDX parsing, checks, search order, local-server download, subset fallback."""
import functools
import gzip
import os
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tinyuvit.tools import data
from tinyuvit.tools.data import DataError
from tinyuvit.tools.images import from_model_range, to_model_range

FULL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
HAVE_FULL = all((FULL / (name + ".gz")).is_file() for name in data.FILES)
needs_full = pytest.mark.skipif(not HAVE_FULL, reason=f"full MNIST not found in {FULL}")

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
LABELS = "t10k-labels-idx1-ubyte"  # the small file the corruption tests spoil


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No env var, an empty cache and home, no real mirrors, fresh per-process notes."""
    monkeypatch.delenv("TINYUVIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(data, "MIRRORS", [])
    monkeypatch.setitem(data._state, "noted", False)
    monkeypatch.setitem(data._state, "download_failed", None)


@pytest.fixture(scope="module")
def full():
    """The full train and test sets from the shared folder."""
    if not HAVE_FULL:
        pytest.skip(f"full MNIST not found in {FULL}")
    return {split: data.load_mnist(split, data_dir=FULL)[:2] for split in ("train", "test")}


def raw(name):
    """Decompressed bytes of one of the shared files."""
    return gzip.decompress((FULL / (name + ".gz")).read_bytes())


def link_copy(folder, skip=()):
    """Make folder a copy of the shared files (as symlinks), leaving out the names in skip."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in data.FILES:
        if name not in skip:
            os.symlink(FULL / (name + ".gz"), folder / (name + ".gz"))
    return folder


# ----- full MNIST ------------------------------------------------------------------------------

def test_full_shapes_dtypes_and_label_counts(full):
    (xtr, ytr), (xte, yte) = full["train"], full["test"]
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64 and ytr.shape == (60000,)
    assert np.bincount(ytr).tolist() == TRAIN_COUNTS
    assert np.bincount(yte).tolist() == TEST_COUNTS
    assert xtr.max() == 255 and xtr.min() == 0


@needs_full
def test_source_names_folder_and_raw_files_work(tmp_path):
    folder = link_copy(tmp_path / "mix", skip=[LABELS])
    (folder / LABELS).write_bytes(raw(LABELS))  # uncompressed next to .gz ones
    images, labels, source = data.load_mnist("test", data_dir=folder)
    assert source == f"full MNIST ({folder.resolve()})"
    assert np.bincount(labels).tolist() == TEST_COUNTS
    assert data.read_idx(folder / LABELS).tolist() == labels.tolist()


def test_bad_split_is_value_error():
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("validation", download=False)


# ----- embedded subset -------------------------------------------------------------------------

def test_subset_is_balanced_uint8_and_small():
    assert data.SUBSET_PATH.stat().st_size <= 3_000_000
    with np.load(data.SUBSET_PATH) as npz:
        for split, per_class, n in (("train", 1000, 10000), ("test", 200, 2000)):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            assert images.shape == (n, 28, 28) and images.dtype == np.uint8
            assert labels.dtype == np.uint8
            assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_subset_digits_are_real_mnist(full):
    rng = np.random.default_rng(0)
    with np.load(data.SUBSET_PATH) as npz:
        for split in ("train", "test"):
            images, labels = full[split]
            where = {images[i].tobytes(): i for i in range(len(images))}
            sub_x, sub_y = npz[f"{split}_images"], npz[f"{split}_labels"]
            for j in rng.choice(len(sub_x), 300, replace=False):
                i = where.get(sub_x[j].tobytes())
                assert i is not None, f"{split} subset image {j} is not in full MNIST"
                assert labels[i] == sub_y[j]
            index = npz[f"{split}_index"]
            assert np.array_equal(images[index], sub_x) and np.array_equal(labels[index], sub_y)


def test_fallback_prints_one_line_and_returns_subset(capsys):
    images, labels, source = data.load_mnist("train", download=False)
    assert source == "embedded subset"
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10
    images[0] = 0  # callers get their own copy
    test_images, test_labels, _ = data.load_mnist("test", download=False)
    assert test_images.shape == (2000, 28, 28) and np.bincount(test_labels).tolist() == [200] * 10
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err  # said once per process
    assert "embedded subset of 10000 train / 2000 test digits" in err
    assert "--data-dir" in err and "TINYUVIT_DATA" in err
    assert data.load_mnist("train", download=False)[0][0].any()


def test_fallback_when_no_mirror_answers(capsys):
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
        data.MIRRORS[:] = [dead]
        _, _, source = data.load_mnist("test", quiet=True)
    assert source == "embedded subset"
    assert "could not download" in data._state["download_failed"]
    assert capsys.readouterr().err == ""  # quiet
    assert not list(data.cache_dir().glob("*"))


# ----- bad files -------------------------------------------------------------------------------

def _spoil(kind):
    """(file name, bytes) of a spoiled copy of the test labels."""
    good = raw(LABELS)
    if kind == "truncated gz":
        return LABELS + ".gz", gzip.compress(good)[:-50]
    if kind == "corrupt gz":
        return LABELS + ".gz", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8
    if kind == "truncated":
        return LABELS, good[:-10]
    if kind == "too long":
        return LABELS, good + b"\x00"
    if kind == "wrong magic":
        return LABELS, (0x00000804).to_bytes(4, "big") + good[4:]
    if kind == "wrong checksum":  # a well-formed file with one label changed
        return LABELS, good[:8] + bytes([(good[8] + 1) % 10]) + good[9:]
    raise AssertionError(kind)


KINDS = {"truncated gz": "gzip", "corrupt gz": "gzip", "truncated": "truncated",
         "too long": "wrong size", "wrong magic": "magic", "wrong checksum": "checksum"}


@needs_full
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_file_raises_data_error_naming_it(tmp_path, kind):
    folder = link_copy(tmp_path / "bad", skip=[LABELS])
    name, content = _spoil(kind)
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=KINDS[kind]) as info:
        data.load_mnist("test", data_dir=folder)
    message = str(info.value)
    assert str(folder / name) in message and "\n" not in message
    assert "delete it" in message and "--data-dir" in message
    if kind != "wrong checksum":  # the format checks live in read_idx itself
        with pytest.raises(DataError, match=KINDS[kind]):
            data.read_idx(folder / name)


@needs_full
def test_missing_file_raises_data_error_naming_it(tmp_path):
    folder = link_copy(tmp_path / "partial", skip=[LABELS])
    with pytest.raises(DataError, match=LABELS) as info:
        data.load_mnist("train", data_dir=folder)
    assert "\n" not in str(info.value)
    assert data.find_mnist(folder) is None
    with pytest.raises(DataError, match="nowhere"):
        data.read_idx(tmp_path / "nowhere")


@needs_full
@pytest.mark.parametrize("where", ["env", "cache"])
def test_bad_file_in_searched_folder_is_not_skipped(tmp_path, monkeypatch, where):
    folder = tmp_path / "env" if where == "env" else data.cache_dir()
    if where == "env":
        monkeypatch.setenv("TINYUVIT_DATA", str(folder))
    link_copy(folder, skip=[LABELS])
    (folder / LABELS).write_bytes(_spoil("wrong checksum")[1])
    with pytest.raises(DataError, match=LABELS):
        data.load_mnist("test", download=False)
    if where == "cache":  # even when the cache is only partly there
        (folder / "train-images-idx3-ubyte.gz").unlink()
        with pytest.raises(DataError, match=LABELS):
            data.load_mnist("train", download=False)


@needs_full
def test_partial_cache_without_download_falls_back():
    link_copy(data.cache_dir(), skip=[LABELS])
    assert data.load_mnist("test", download=False, quiet=True)[2] == "embedded subset"


def test_idx_reader_stands_alone(tmp_path):
    from tinyuvit.tools import idx
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = idx.IMAGE_MAGIC.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "x").write_bytes(blob + images.tobytes())
    (tmp_path / "x.gz").write_bytes(gzip.compress(blob + images.tobytes()))
    assert np.array_equal(idx.read_idx(tmp_path / "x"), images)
    assert np.array_equal(idx.read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "short").write_bytes(blob + images.tobytes()[:-1])
    with pytest.raises(DataError, match=r"truncated \(header says \(2, 3, 4\)") as info:
        idx.read_idx(tmp_path / "short")
    assert "--data-dir" not in str(info.value)          # the download advice is data.py's
    with pytest.raises(DataError, match="--data-dir"):
        data.read_idx(tmp_path / "short")


# ----- search order ----------------------------------------------------------------------------

@needs_full
def test_search_order(tmp_path, monkeypatch):
    given, env, cache = (link_copy(tmp_path / "given"), link_copy(tmp_path / "env"),
                         link_copy(data.cache_dir()))
    assert cache == tmp_path / "xdg" / "tinyuvit" / "mnist"
    monkeypatch.setenv("TINYUVIT_DATA", str(env))
    assert data.find_mnist(given) == str(given)
    assert data.load_mnist("test", data_dir=given)[2] == f"full MNIST ({given.resolve()})"
    assert data.find_mnist() == str(env)
    assert data.load_mnist("test")[2] == f"full MNIST ({env.resolve()})"
    monkeypatch.delenv("TINYUVIT_DATA")
    assert data.find_mnist() == str(cache)
    assert data.load_mnist("test")[2] == f"full MNIST ({cache.resolve()})"
    monkeypatch.delenv("XDG_CACHE_HOME")  # then ~/.cache
    home_cache = link_copy(tmp_path / "home" / ".cache" / "tinyuvit" / "mnist")
    assert data.find_mnist() == str(home_cache)
    home_cache.joinpath(LABELS + ".gz").unlink()
    assert data.find_mnist() is None


@needs_full
def test_named_folder_without_files_is_an_error(tmp_path, monkeypatch):
    link_copy(data.cache_dir())
    with pytest.raises(DataError, match="data_dir"):
        data.load_mnist("test", data_dir=tmp_path / "empty")
    monkeypatch.setenv("TINYUVIT_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="TINYUVIT_DATA"):
        data.load_mnist("test")


# ----- download from a local server ------------------------------------------------------------

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Base URL of an HTTP server on 127.0.0.1 serving tmp_path / "www"."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@needs_full
def test_download_into_cache_through_load_mnist(server, capsys):
    root, url = server
    mirror = root / "good"
    mirror.mkdir()
    for name in data.FILES:  # recompressed, so the .gz differs byte-wise from the shared copy
        (mirror / (name + ".gz")).write_bytes(gzip.compress(raw(name), compresslevel=1))
    data.MIRRORS[:] = [url + "missing/", url + "good/"]
    images, labels, source = data.load_mnist("train")
    cache = data.cache_dir()
    assert source == f"full MNIST ({cache.resolve()})" and images.shape == (60000, 28, 28)
    assert np.bincount(labels).tolist() == TRAIN_COUNTS
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in data.FILES)
    err = capsys.readouterr().err
    assert "downloading train-images-idx3-ubyte.gz" in err


@needs_full
@pytest.mark.parametrize("kind", ["wrong checksum", "truncated gz"])
def test_download_rejects_bad_content(tmp_path, server, kind):
    root, url = server
    (root / "bad").mkdir()
    name, content = _spoil(kind)
    if not name.endswith(".gz"):
        content = gzip.compress(content)
    (root / "bad" / (LABELS + ".gz")).write_bytes(content)
    dest = link_copy(tmp_path / "dest", skip=[LABELS])
    with pytest.raises(DataError, match=f"could not download {LABELS}.gz"):
        data.download_mnist(dest, mirrors=[url + "bad/"], quiet=True)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        n + ".gz" for n in data.FILES if n != LABELS)  # nothing bad, no temp files left

    (root / "good").mkdir()
    os.symlink(FULL / (LABELS + ".gz"), root / "good" / (LABELS + ".gz"))
    assert data.download_mnist(dest, mirrors=[url + "bad/", url + "good/"], quiet=True) == str(dest)
    assert data.find_mnist(dest) == str(dest)
    assert np.bincount(data.load_mnist("test", data_dir=dest)[1]).tolist() == TEST_COUNTS


# ----- model range -----------------------------------------------------------------------------

def test_model_range_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    images[0, 0, :2] = [0, 255]
    x = to_model_range(images)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(from_model_range(x), images)
    assert np.array_equal(from_model_range(x[:, 0]), images)
    noisy = x + np.float32(0.002)  # less than half a grey level
    assert np.array_equal(from_model_range(noisy), images)
    out = from_model_range(np.array([[[[-3.0, 3.0, 0.0]]]], np.float32))
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 255, 128]]]


# ----- data identity ---------------------------------------------------------------------------

def test_dataset_id_tells_full_from_subset_and_ignores_the_folder(full, tmp_path):
    x, y = full["train"]
    a = data.dataset_id(x, y, "full MNIST (/somewhere)")
    assert a == {"source": "full MNIST", "n": 60000, "sha256": a["sha256"]} and len(a["sha256"]) == 16
    assert data.dataset_id(x, y, "full MNIST (/elsewhere)") == a
    sx, sy, source = data.load_mnist("train", download=False, quiet=True)
    b = data.dataset_id(sx, sy, source)
    assert b["source"] == "embedded subset" and b["n"] == 10000 and b["sha256"] != a["sha256"]
    assert data.dataset_difference(a, dict(a)) is None and data.dataset_difference(None, a) is None
    said = data.dataset_difference(a, b)
    assert said.startswith("the checkpoint trained on full MNIST (60000 digits") and "embedded subset" in said
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 10                       # one label changed: other data
    assert data.dataset_id(x, y2, "full MNIST")["sha256"] != a["sha256"]
