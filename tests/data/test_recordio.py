"""RecordIO: byte layout checked with struct, dmlc multi-part records, and files made by MXNet's im2rec."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest

from unicom_cli.data.recordio import (
    MAGIC_BYTES,
    RecordIOError,
    RecordReader,
    RecordWriter,
    iter_records,
    pack_header,
    unpack_header,
)

FIXTURES = Path(__file__).parent / "fixtures"
MAGIC = 0xCED7230A


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(offset, cflag, length, part bytes) of every frame, parsed without our module."""
    out, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        out.append((pos, cflag, length, data[pos + 8: pos + 8 + length]))
        padded = (length + 3) // 4 * 4
        assert data[pos + 8 + length: pos + 8 + padded] == b"\0" * (padded - length)
        pos += 8 + padded
    assert pos == len(data)
    return out


def test_record_layout_matches_the_spec(tmp_path):
    images = [b"\xff\xd8" + bytes(range(7)), b"abcd" * 3, b"", b"xyz"]  # lengths 9, 12, 0, 3
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for i, img in enumerate(images):
            w.write(i, float(i * 10 + 1), img)
        w.write(4, [1.5, -2.0], b"multi")
    data = (tmp_path / "a.rec").read_bytes()
    parsed = frames(data)
    assert [cflag for _, cflag, _, _ in parsed] == [0] * 5
    assert [length for _, _, length, _ in parsed] == [24 + 9, 24 + 12, 24, 24 + 3, 24 + 8 + 5]
    for i, (_, _, _, part) in enumerate(parsed[:4]):
        assert struct.unpack_from("<IfQQ", part) == (0, float(i * 10 + 1), i, 0)
        assert part[24:] == images[i]
    multi = parsed[4][3]
    assert struct.unpack_from("<IfQQ", multi) == (2, 0.0, 4, 0)
    assert struct.unpack_from("<2f", multi, 24) == (1.5, -2.0) and multi[32:] == b"multi"
    # record sizes on disk: 8 + payload rounded up to 4
    assert [o for o, _, _, _ in parsed] == [0, 44, 88, 120, 156]
    idx = (tmp_path / "a.idx").read_text()
    assert idx == "0\t0\n1\t44\n2\t88\n3\t120\n4\t156\n"


def test_magic_inside_a_payload_splits_the_record_like_dmlc(tmp_path):
    # header (24 bytes) + image: magic at image offsets 0 and 8 (payload 24, 32: aligned) and 13 (not)
    image = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"z" + MAGIC_BYTES + b"tail"
    with RecordWriter(tmp_path / "m.rec", tmp_path / "m.idx") as w:
        w.write(0, 1.0, image)
        w.write(1, 2.0, b"plain")
    parsed = frames((tmp_path / "m.rec").read_bytes())
    assert [(cflag, length) for _, cflag, length, _ in parsed] == [(1, 24), (2, 4), (3, 1 + 4 + 4), (0, 29)]
    assert parsed[1][3] == b"abcd" and parsed[2][3] == b"z" + MAGIC_BYTES + b"tail"
    reader = RecordReader(tmp_path / "m.rec", tmp_path / "m.idx")
    assert reader.read(0) == (unpack_header(pack_header(1.0, 0))[0], image)
    assert reader.read(1)[1] == b"plain"
    assert reader.offsets == [0, parsed[3][0]]
    assert RecordReader(tmp_path / "m.rec").offsets == reader.offsets  # found without the .idx
    assert [p for _, p in iter_records(tmp_path / "m.rec", chunk_size=16)] == [
        pack_header(1.0, 0) + image, pack_header(2.0, 1) + b"plain"]


def test_planted_magic_numbers_round_trip(tmp_path):
    # random payloads (odd lengths too) with the magic planted at aligned and unaligned places,
    # back to back, at the start and at the very end: split exactly where a byte-by-byte search says
    import random

    rng = random.Random(3)
    payloads = []
    for n in range(60):
        data = bytearray(rng.randbytes(rng.randrange(0, 200)))
        for _ in range(rng.randrange(0, 5)):
            pos = rng.randrange(0, len(data) + 1)
            data[pos:pos] = MAGIC_BYTES
        if n % 7 == 0:
            data += MAGIC_BYTES
        payloads.append(bytes(data))
    with RecordWriter(tmp_path / "p.rec", tmp_path / "p.idx") as w:
        for key, image in enumerate(payloads):
            w.write(key, float(key), image)
    parts = frames((tmp_path / "p.rec").read_bytes())
    position = 0
    for key, image in enumerate(payloads):
        payload = pack_header(float(key), key) + image
        cuts = [p for p in range(0, len(payload) - 3, 4) if payload[p:p + 4] == MAGIC_BYTES]
        mine = parts[position:position + len(cuts) + 1]
        position += len(cuts) + 1
        want = [0] if not cuts else [1] + [2] * (len(cuts) - 1) + [3]
        assert [cflag for _, cflag, _, _ in mine] == want
        assert MAGIC_BYTES.join(part for _, _, _, part in mine) == payload
    assert position == len(parts)
    reader = RecordReader(tmp_path / "p.rec", tmp_path / "p.idx")
    assert [image for _, image in reader] == payloads


@pytest.mark.parametrize("with_idx", [True, False])
def test_reads_files_written_by_mxnet_im2rec(with_idx):
    expected = json.loads((FIXTURES / "im2rec_expected.json").read_text())
    for name in ("single", "multi"):
        idx = FIXTURES / f"im2rec_{name}.idx" if with_idx else None
        reader = RecordReader(FIXTURES / f"im2rec_{name}.rec", idx)
        assert len(reader) == len(expected[name])
        for (header, image), want in zip(reader, expected[name]):
            label = list(header.label) if header.flag else [header.label]
            assert (header.flag, label, header.id, header.id2) == (want["flag"], want["label"], want["id"], want["id2"])
            assert hashlib.sha256(image).hexdigest() == want["image_sha256"]
            assert image[:2] == b"\xff\xd8"
    # the multi-label fixture holds a record that im2rec split around the magic number
    assert {cflag for _, cflag, _, _ in frames((FIXTURES / "im2rec_multi.rec").read_bytes())} == {0, 1, 2, 3}
    # ids are the .lst indices (not positions): 1, 3, 5
    reader = RecordReader(FIXTURES / "im2rec_single.rec", FIXTURES / "im2rec_single.idx")
    assert reader.keys == [1, 3, 5] and reader.read_key(3)[0].label == 5.0


def test_damaged_files_raise_clear_errors(tmp_path):
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(0, 0.0, b"x" * 40)
        w.write(1, 1.0, b"y" * 40)
    data = bytearray((tmp_path / "a.rec").read_bytes())
    (tmp_path / "trunc.rec").write_bytes(data[:-10])
    with pytest.raises(RecordIOError, match="truncated|past the end"):
        RecordReader(tmp_path / "trunc.rec")
    with pytest.raises(RecordIOError, match="truncated"):
        list(iter_records(tmp_path / "trunc.rec"))
    data[72] ^= 0xFF  # first byte of the second record's magic
    (tmp_path / "bad.rec").write_bytes(data)
    with pytest.raises(RecordIOError, match="bad magic .* at byte 72"):
        RecordReader(tmp_path / "bad.rec", tmp_path / "a.idx").read(1)
    (tmp_path / "bad.idx").write_text("0\tzero\n")
    with pytest.raises(RecordIOError, match="bad.idx line 1"):
        RecordReader(tmp_path / "a.rec", tmp_path / "bad.idx")


def test_reader_pickles_and_reopens(tmp_path):
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for i in range(3):
            w.write(i, float(i), bytes([i]) * (i + 5))
    reader = RecordReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert reader.read(2)[1] == b"\x02" * 7
    clone = pickle.loads(pickle.dumps(reader))
    assert [h.label for h, _ in clone] == [0.0, 1.0, 2.0]
