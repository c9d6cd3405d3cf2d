"""A forward-only reader of tar streams (POSIX ustar, GNU long names, pax headers), member by member.

Why not ``tarfile``: in stream mode it costs about 40 µs a member to turn each 512-byte header
into a ``TarInfo`` (a sample of a WebDataset shard has two or three members), more than opening
and reading the same JPEG from a folder; this reader parses a header in a few µs, so a shard
feeds the decoder at least as fast as a folder does (``benchmarks/embed_shards.py``).
Compressed shards (``.tar.gz``, ``.tar.bz2``, ``.tar.xz``) are read through the standard
library's decompressors, still as one stream, never unpacked to disk.

Unlike ``tarfile``, a damaged header after the first one is an error, not a silent end of the
archive: a shard whose middle is corrupt must not look complete.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: size is not data
_POSIX_MAGIC = b"ustar\x0000"
MAX_HEADER_DATA = 1 << 20  # a pax header or GNU long name above this is damage, not a name


class TarFormatError(Exception):
    """The stream is not a tar archive, or is truncated or corrupt where the message says."""


def open_decompressed(handle: BinaryIO) -> BinaryIO:
    """``handle`` itself for a plain tar; a decompressing stream over it for gzip, bzip2 or xz."""
    magic = handle.peek(6)[:6] if hasattr(handle, "peek") else b""
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=handle, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(handle)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(handle)
    return handle


class TarReader:
    """Iterate to get the name of each regular file in order; :meth:`read` gives the current
    file's bytes (members not read are skipped, seeking where the stream allows it)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._seekable = stream.seekable() if hasattr(stream, "seekable") else False
        self._offset = 0  # of the next unread byte, for messages
        self._left = 0  # bytes of the current member (data and padding) not yet consumed
        self._unread: int | None = None  # size of the current member's data until it is read
        self._header_at = 0  # byte offset of the current member's header, for messages

    def __iter__(self) -> Iterator[str]:
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            self._skip(self._left)
            self._left = 0
            at = self._offset
            header = self._next_header()
            if header is None:
                return
            name, size, kind = _parse_header(header, at)
            padded = size + (-size) % BLOCK
            if kind in (b"x", b"L") and size > MAX_HEADER_DATA:
                raise TarFormatError(f"an extended header of {size:,} bytes at byte {at:,} (corrupt)")
            if kind == b"x":  # pax extended header: applies to the next member
                pax.update(_pax_records(self._read_exact(size, at), at))
                self._skip(padded - size)
                continue
            if kind == b"L":  # GNU long name of the next member
                long_name = _text(self._read_exact(size, at).split(b"\0", 1)[0])
                self._skip(padded - size)
                continue
            if kind in (b"g", b"K"):  # global pax header, GNU long link name: nothing we use
                self._skip(padded)
                continue
            name = pax.get("path", long_name if long_name is not None else name)
            if "size" in pax:
                size = _pax_size(pax["size"], at)
                padded = size + (-size) % BLOCK
            pax, long_name = {}, None
            if kind in _NO_DATA:
                continue
            self._left = padded
            if kind in _REGULAR and not name.endswith("/"):
                self._unread, self._header_at = size, at
                yield name
            self._unread = None

    @property
    def size(self) -> int:
        """Bytes of the member last named (to refuse a huge one before reading it)."""
        return self._unread if self._unread is not None else 0

    def read(self) -> bytes:
        """The bytes of the member last named (once; after that the member is consumed)."""
        if self._unread is None:
            raise RuntimeError("TarReader.read: no member, or it was already read")
        size, self._unread = self._unread, None
        data = self._read_exact(size, self._header_at)
        self._left -= size
        return data

    def _next_header(self) -> bytes | None:
        """The next 512-byte header; None at the end of the archive."""
        at = self._offset
        header = self._stream.read(BLOCK)
        self._offset += len(header)
        if not header:
            if at == 0:
                raise TarFormatError("empty file")
            self._check_not_short()
            return None  # the end-of-archive blocks are missing: what was read is complete
        if len(header) < BLOCK:
            raise TarFormatError(f"unexpected end of data in the header at byte {at:,}")
        return None if header == _ZERO_BLOCK else header

    def _read_exact(self, n: int, at: int) -> bytes:
        data = self._stream.read(n)
        self._offset += len(data)
        if len(data) < n:
            raise TarFormatError(f"unexpected end of data in the member whose header is at byte {at:,}")
        return data

    def _check_not_short(self) -> None:
        """After a seek past the end (a skipped member that was cut), the end is before the offset."""
        if self._seekable and self._stream.seek(0, 2) < self._offset:
            raise TarFormatError(f"unexpected end of data before byte {self._offset:,}")

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._seekable:
            self._stream.seek(n, 1)  # the end may lie past the file: caught at the next header read
            self._offset += n
            return
        while n > 0:
            chunk = self._stream.read(min(n, 1 << 20))
            if not chunk:
                raise TarFormatError(f"unexpected end of data at byte {self._offset:,}")
            n -= len(chunk)
            self._offset += len(chunk)


def _parse_header(header: bytes, at: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a 512-byte header whose checksum holds."""
    stored = _octal(header[148:156], "checksum", at)
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned and stored != sum(struct.unpack("148b8x356b", header)) + 8 * 32:
        raise TarFormatError(f"bad header checksum at byte {at:,} (not a tar archive, or corrupt)")
    kind = header[156:157]
    name = _text(header[:100].split(b"\0", 1)[0])
    if header[257:265] == _POSIX_MAGIC:
        prefix = _text(header[345:500].split(b"\0", 1)[0])
        if prefix:
            name = f"{prefix}/{name}"
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        size = int.from_bytes(field[1:], "big") if field[0] == 0x80 else -1
    else:
        size = _octal(field, "size", at)
    if size < 0:
        raise TarFormatError(f"negative member size in the header at byte {at:,}")
    return name, size, kind


def _octal(field: bytes, what: str, at: int) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad {what} field in the header at byte {at:,} (not a tar archive, "
                             "or corrupt)") from None


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"bad pax header at byte {at:,}") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError(f"bad pax header at byte {at:,}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = _text(value)
        pos += length
    return records


def _pax_size(text: str, at: int) -> int:
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise TarFormatError(f"bad pax size {text!r} at byte {at:,}")
    return size


def _text(raw: bytes) -> str:
    """Member names as ``tarfile`` decodes them: UTF-8, undecodable bytes kept as surrogates."""
    return raw.decode("utf-8", "surrogateescape")
