"""MATLAB files read with a bound on what they inflate: a v5 ``.mat`` stores each variable as an
optionally zlib-compressed element, and a few kilobytes can inflate to gigabytes (a zlib bomb)
that scipy's ``loadmat`` would allocate before any field is checked."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

MI_COMPRESSED = 15  # the element type of a compressed variable (MAT-file format, level 5)
HEADER_BYTES = 128
STEP = 1 << 20  # inflated bytes per decompression call while counting


class MatTooLarge(ValueError):
    """The file's compressed variables inflate beyond the bound."""


def check_inflated_size(path: Path, limit: int) -> None:
    """Walk the top-level elements of a v5 file, inflating compressed ones only to count their
    bytes (nothing is kept); raise MatTooLarge once the total passes ``limit``. Files that are not
    v5 (v4 has no compression; v7.3 is HDF5, which loadmat refuses) pass through unchanged."""
    with open(path, "rb") as fh:
        header = fh.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[126:128] not in (b"IM", b"MI"):
            return
        order = "<" if header[126:128] == b"IM" else ">"
        total = 0
        while len(tag := fh.read(8)) == 8:
            kind, nbytes = struct.unpack(order + "2I", tag)
            if kind != MI_COMPRESSED:
                total += nbytes
                fh.seek(nbytes + (-nbytes % 8), 1)
            else:
                total += _inflated_size(fh, nbytes, limit - total)
            if total > limit:
                raise MatTooLarge(f"inflates to more than {limit >> 20} MiB")


def _inflated_size(fh, nbytes: int, budget: int) -> int:
    """Bytes that the next ``nbytes`` compressed bytes inflate to, stopping just past ``budget``."""
    inflater, size, left = zlib.decompressobj(), 0, nbytes
    while left > 0 and size <= budget:
        chunk = fh.read(min(left, STEP))
        if not chunk:
            break
        left -= len(chunk)
        data = chunk
        while data and size <= budget:
            size += len(inflater.decompress(data, STEP))
            data = inflater.unconsumed_tail
    if left > 0:
        fh.seek(left, 1)
    return size
