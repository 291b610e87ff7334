"""IDX files, the format MNIST is published in: read one, checking its header against its size.

    bytes 0-1   0x00 0x00
    byte  2     the element type (0x08: unsigned byte; the only one MNIST uses)
    byte  3     the number of dimensions, n
    4 n bytes   the size of each dimension, big-endian int32
    the rest    the elements, row-major

So MNIST's images start with 0x00000803 (three dimensions: N, 28, 28) and its labels with
0x00000801 (one: N). Files may be gzipped (`.gz`). Errors are DataErrors naming the file.
"""
import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801


def read_bytes(path):
    """The file's content, gunzipped if its name ends in .gz."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file, truncated or corrupt ({e})") from None
    return data


def parse_idx(data, where):
    """A uint8 array from the bytes of an IDX file; `where` names the file in errors."""
    if len(data) < 8:
        raise DataError(f"{where}: truncated ({len(data)} bytes, too short for an IDX header)")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise DataError(f"{where}: wrong magic number 0x{magic:08x} (expected 0x{IMAGE_MAGIC:08x} "
                        f"for images or 0x{LABEL_MAGIC:08x} for labels), not an MNIST IDX file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated inside the IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected, found = int(np.prod(shape)), len(data) - header
    if found != expected:
        kind = "truncated" if found < expected else "wrong size"
        raise DataError(f"{where}: {kind} (header says {shape}, i.e. {expected} data bytes, "
                        f"found {found})")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def read_idx(path):
    """A uint8 array from an IDX file (.gz or raw), after checking its magic, shape and size."""
    return parse_idx(read_bytes(path), Path(path))
