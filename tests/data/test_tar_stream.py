"""The tar stream reader against the standard library's tarfile, on every layout tarfile writes."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from unicom_cli.data.tar_stream import BLOCK, TarFormatError, TarReader, open_decompressed


def _archive(fmt: int) -> bytes:
    """Regular files with short, 100+-character, nested and non-ASCII names, empty and 512-byte
    multiple sizes, plus a directory, a symlink, a hard link and a FIFO that carry no data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        def add(name: str, data: bytes | None, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("dir", None, tarfile.DIRTYPE)
        add("000/abc.jpg", bytes(range(256)) * 7)
        add("000/abc.json", b'{"caption": "x"}')
        add("empty.txt", b"")
        add("exact.bin", b"\x01" * BLOCK * 2)
        add("a" * 120 + "/" + "b" * 90 + ".png", b"long name")  # needs the prefix, GNU or pax
        add("link", None, tarfile.SYMTYPE, link="000/abc.jpg")
        add("hard", None, tarfile.LNKTYPE, link="000/abc.jpg")
        add("fifo", None, tarfile.FIFOTYPE)
        add("photo-\u00e9\u4e2d.jpg", b"unicode name")
        add("z" * 260 + ".webp", b"very long name")
    return buf.getvalue()


def _members_by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _members(stream, read_every: int = 1) -> list[tuple[str, bytes | None]]:
    reader = TarReader(stream)
    return [(name, reader.read() if i % read_every == 0 else None) for i, name in enumerate(reader)]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_regular_files_and_their_bytes_equal_tarfiles(fmt):
    if fmt == tarfile.USTAR_FORMAT:
        with pytest.raises(ValueError):  # ustar cannot hold the 260-character name
            _archive(fmt)
        return
    data = _archive(fmt)
    expected = _members_by_tarfile(data)
    assert len(expected) == 7 and any(len(name) > 200 for name, _ in expected)
    assert _members(io.BytesIO(data)) == expected


def test_unread_members_are_skipped_on_streams_that_cannot_seek():
    data = _archive(tarfile.PAX_FORMAT)
    expected = _members_by_tarfile(data)

    class Pipe(io.RawIOBase):  # a pipe: read only, no seek
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            chunk = self.inner.read(min(len(b), 300))  # short reads, as pipes give
            b[:len(chunk)] = chunk
            return len(chunk)

    got = _members(io.BufferedReader(Pipe()), read_every=2)
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert [d for _, d in got] == [d if i % 2 == 0 else None for i, (_, d) in enumerate(expected)]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gz", "bz2", "xz"])
def test_compressed_archives_are_read_as_streams(compress):
    data = _archive(tarfile.GNU_FORMAT)
    stream = open_decompressed(io.BufferedReader(io.BytesIO(compress(data))))
    assert _members(stream) == _members_by_tarfile(data)


def test_a_base256_size_field_is_read():
    """GNU tar writes sizes of 8 GiB and more in base-256; a crafted small one must parse alike."""
    payload = b"big-member" * 100
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("big.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    raw = bytearray(buf.getvalue())
    raw[124:136] = b"\x80" + len(payload).to_bytes(11, "big")
    raw[148:156] = b" " * 8
    raw[148:156] = f"{sum(raw[:BLOCK]):06o}\0 ".encode()
    assert _members(io.BytesIO(bytes(raw))) == [("big.jpg", payload)]


def _cut_points(data: bytes) -> list[int]:
    """Inside the first header, the second header, a member's data, and the last member's data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    last = members[-1]
    return [1, BLOCK - 1, BLOCK + 10, members[1].offset_data + 7, len(data) // 4,
            last.offset_data + last.size - 5]


@pytest.mark.parametrize("seekable", [True, False], ids=["file", "pipe"])
def test_a_cut_anywhere_is_an_error_never_a_shorter_archive(seekable):
    data = _archive(tarfile.GNU_FORMAT)
    members = _members_by_tarfile(data)
    for cut in _cut_points(data):
        stream = io.BytesIO(data[:cut])
        if not seekable:
            stream.seekable = lambda: False  # type: ignore[method-assign]
        got = []
        with pytest.raises(TarFormatError, match="unexpected end of data|empty file"):
            reader = TarReader(stream)
            for i, name in enumerate(reader):
                got.append((name, reader.read() if i % 2 else None))  # skip every other member
        assert [n for n, _ in got] == [n for n, _ in members][:len(got)]


def test_a_bit_flip_in_a_later_header_is_an_error_where_tarfile_stops_quietly():
    data = bytearray(_archive(tarfile.GNU_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        second = tar.getmembers()[2].offset  # the header after the directory and one image
    data[second + 3] ^= 0x20
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r|*") as tar:
        assert len([m for m in tar if m.isfile()]) == 1  # tarfile: a two-member archive that "ended"
    reader = TarReader(io.BytesIO(bytes(data)))
    with pytest.raises(TarFormatError, match=f"bad header checksum at byte {second:,}"):
        for _ in reader:
            pass


@pytest.mark.parametrize("junk", [b"\x00" * 3, b"not a tar at all" * 64, b"\xff" * 2048],
                         ids=["short", "text", "ff"])
def test_what_is_not_a_tar_is_an_error_or_empty(junk):
    with pytest.raises(TarFormatError):
        list(TarReader(io.BytesIO(junk)))
    with pytest.raises(TarFormatError, match="empty file"):
        list(TarReader(io.BytesIO(b"")))
    assert list(TarReader(io.BytesIO(bytes(4 * BLOCK)))) == []  # only end-of-archive blocks


def test_read_twice_is_a_programming_error():
    reader = TarReader(io.BytesIO(_archive(tarfile.GNU_FORMAT)))
    next(iter(reader))
    reader.read()
    with pytest.raises(RuntimeError):
        reader.read()


def test_an_extended_header_claiming_megabytes_is_damage_not_a_name():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x" * 300 + ".jpg")  # needs a pax header
        tar.addfile(info, io.BytesIO(b""))
    raw = bytearray(buf.getvalue())
    assert raw[156:157] == b"x"
    raw[124:136] = b"%011o\0" % (64 << 20)
    raw[148:156] = b" " * 8
    raw[148:156] = f"{sum(raw[:BLOCK]):06o}\0 ".encode()
    with pytest.raises(TarFormatError, match="an extended header of 67,108,864 bytes at byte 0"):
        list(TarReader(io.BytesIO(bytes(raw))))
