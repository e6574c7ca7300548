"""Reader for the IDX file format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number `00 00 <dtype code> <ndim>`, then
`ndim` big-endian uint32 dimension sizes, then the values in row-major
order, big-endian. Files may be gzip-compressed.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib

import numpy as np

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX dtype code (third byte of the magic number) -> element dtype."""

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, raw or gzip-compressed (detected from its content).

    Args:
        path: the file.

    Returns:
        A new, writable array in native byte order, with the shape stored in the header, e.g.
        images: `[N, H, W]` uint8 or labels: `[N]` uint8.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not a valid IDX file (bad magic number, unknown dtype code,
            corrupt gzip stream, or a data size that does not match the header). The message
            names the file.
    """
    return _read_idx_array(os.fspath(path))


def read_idx_cached(path: str | os.PathLike) -> np.ndarray:
    """Like `read_idx` but cached in-process; the result is read-only.

    The cache is keyed by the resolved path, modification time and size, so a file replaced on
    disk is read again.

    Args:
        path: the file.

    Returns:
        The array `read_idx` returns, marked read-only (shared between calls).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not a valid IDX file (as for `read_idx`).
    """
    resolved = os.path.realpath(os.fspath(path))
    stat = os.stat(resolved)
    return _read_idx_readonly(resolved, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_readonly(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # only part of the cache key
    array = _read_idx_array(path)
    array.flags.writeable = False
    return array


def _read_idx_array(path: str) -> np.ndarray:
    content = _read_bytes(path)
    if len(content) < 4:
        raise ValueError(
            f"{path} is not an IDX file: it has {len(content)} bytes, fewer than "
            "the 4-byte magic number."
        )
    zero_0, zero_1, dtype_code, ndim = content[:4]
    if zero_0 != 0 or zero_1 != 0:
        raise ValueError(
            f"{path} is not an IDX file: magic number starts with "
            f"{content[:2].hex(' ')}, expected 00 00."
        )
    if dtype_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise ValueError(
            f"{path} has unknown IDX dtype code 0x{dtype_code:02X} "
            f"(known codes: {known})."
        )
    if ndim == 0:
        raise ValueError(f"{path} has an IDX header with 0 dimensions.")

    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(
            f"{path} is truncated: the header declares {ndim} dimensions "
            f"({header_size} header bytes) but the file has {len(content)} bytes."
        )
    shape = tuple(int(size) for size in np.frombuffer(content, ">u4", ndim, offset=4))
    dtype = IDX_DTYPES[dtype_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(content) - header_size
    if found != expected:
        problem = "is truncated" if found < expected else "has trailing bytes"
        raise ValueError(
            f"{path} {problem}: header says shape {shape} of {dtype.name} "
            f"({expected} data bytes) but the file holds {found} data bytes."
        )
    values = np.frombuffer(content, dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a writable, native-order copy


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        content = file.read()
    if not content.startswith(_GZIP_MAGIC):
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is a corrupt gzip file: {error}") from error
