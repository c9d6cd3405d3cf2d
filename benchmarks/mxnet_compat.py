"""MXNet compatibility of `unicom prepare-gldv2` output (run with an MXNet venv, not in CI).

Set-up once: ``python3 -m venv /work/mxvenv && /work/mxvenv/bin/pip install mxnet==1.9.1
numpy==1.23.5 opencv-python-headless``. Then, from the repository root::

    /work/mxvenv/bin/python benchmarks/mxnet_compat.py OUT/ IMAGES/
    /work/mxvenv/bin/python benchmarks/mxnet_compat.py --make-fixture tests/data/fixtures

The first form (1) reads our OUT/train.rec with ``mxnet.recordio.MXIndexedRecordIO`` and
``unpack_img`` and checks ids and labels against OUT/train.lst; (2) runs MXNet's im2rec on our
train.lst with the same --resize/--quality and compares headers, image sizes and pixels; (3) reads
im2rec's files with our RecordReader; (4) writes records that contain the RecordIO magic number
(multi-part records) with both writers and checks the files are byte-identical.
The second form writes the tiny im2rec-made files our CI tests read (no MXNet needed there).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from unicom_cli.data.recordio import MAGIC_BYTES, RecordReader, RecordWriter, pack_header  # noqa: E402


def jpeg_with_magic(jpeg: bytes, prefix_len: int) -> bytes:
    """The same JPEG with a comment segment holding the magic twice at aligned payload positions
    (and once unaligned) when it follows ``prefix_len`` header bytes."""
    start = prefix_len + 2 + 4  # SOI, then FF FE + length
    body = b"p" * (-start % 4) + MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"z" + MAGIC_BYTES
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def im2rec(lst: Path, images: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "mxnet.tools.im2rec", *args, str(lst), str(images)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_with_mxnet(rec: Path, idx: Path) -> list[tuple[mx.recordio.IRHeader, bytes]]:
    reader = mx.recordio.MXIndexedRecordIO(str(idx), str(rec), "r")
    out = [mx.recordio.unpack(reader.read_idx(k)) for k in reader.keys]
    reader.close()
    return out


def check_ours(out: Path, images: Path) -> None:
    import cv2

    lst = [line.rstrip("\n").split("\t") for line in (out / "train.lst").open()]
    settings = json.loads((out / "report.json").read_text())["settings"]
    ours = read_with_mxnet(out / "train.rec", out / "train.idx")
    assert len(ours) == len(lst), (len(ours), len(lst))
    for (header, img), (index, label, _) in zip(ours, lst):
        assert header.id == int(index) and header.label == float(label), (header, index, label)
        assert cv2.imdecode(np.frombuffer(img, np.uint8), 1) is not None
    print(f"1. MXNet read {len(ours)} records of ours: ids and labels match train.lst, every image decodes")

    with tempfile.TemporaryDirectory() as tmp:
        ref_lst = Path(tmp) / "train.lst"
        ref_lst.write_bytes((out / "train.lst").read_bytes())
        args = ["--quality", str(settings["quality"]), "--num-thread", "2"]
        if settings["resize"]:
            args += ["--resize", str(settings["resize"])]
        if settings["pass_through"]:
            args += ["--pass-through"]
        im2rec(ref_lst, images, *args)
        ref = read_with_mxnet(Path(tmp) / "train.rec", Path(tmp) / "train.idx")
        assert len(ref) == len(ours)
        diffs = []
        identical = sum(a == b for (_, a), (_, b) in zip(ours, ref))
        for (h1, a), (h2, b) in zip(ours, ref):
            assert (h1.flag, h1.label, h1.id, h1.id2) == (h2.flag, h2.label, h2.id, h2.id2)
            x = cv2.imdecode(np.frombuffer(a, np.uint8), 1).astype(np.int16)
            y = cv2.imdecode(np.frombuffer(b, np.uint8), 1).astype(np.int16)
            assert x.shape == y.shape, (x.shape, y.shape)
            diffs.append(float(np.abs(x - y).mean()))
        print(f"2. im2rec on our train.lst: same headers and image sizes for all {len(ref)}; "
              f"mean |pixel difference| {np.mean(diffs):.2f} (max over images {np.max(diffs):.2f}) of 255; "
              f"{identical} of {len(ref)} JPEGs byte-identical")
        reader = RecordReader(Path(tmp) / "train.rec", Path(tmp) / "train.idx")
        for i, (h2, b) in enumerate(ref):
            header, image = reader.read(i)
            assert (header.label, header.id) == (h2.label, h2.id) and image == b
        print(f"3. our RecordReader read im2rec's {len(reader)} records identically to MXNet")
    check_multipart()


def check_multipart() -> None:
    jpeg = _tiny_jpeg(0)
    payloads = [pack_header(3.0, 0) + jpeg_with_magic(jpeg, 24),
                pack_header([1.0, 2.0], 1) + jpeg_with_magic(jpeg, 32), pack_header(5.0, 2) + jpeg]
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ours", Path(tmp) / "theirs"
        with RecordWriter(f"{ours}.rec", f"{ours}.idx") as w:
            for key, p in enumerate(payloads):
                w.write_payload(key, p)
        writer = mx.recordio.MXIndexedRecordIO(f"{theirs}.idx", f"{theirs}.rec", "w")
        for key, p in enumerate(payloads):
            writer.write_idx(key, p)
        writer.close()
        same = all(Path(f"{ours}{e}").read_bytes() == Path(f"{theirs}{e}").read_bytes() for e in (".rec", ".idx"))
        back = mx.recordio.MXIndexedRecordIO(f"{ours}.idx", f"{ours}.rec", "r")
        read_ok = all(back.read_idx(k) == p for k, p in enumerate(payloads))
        assert same and read_ok, (same, read_ok)
    print("4. records containing the magic number (multi-part): our writer's files are byte-identical "
          "to MXNet's and MXNet reads them back")


def _tiny_jpeg(seed: int, size: tuple[int, int] = (20, 14)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    img = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_fixture(dest: Path) -> None:
    """Tiny im2rec outputs: `im2rec_single` (re-encoded, one label) and `im2rec_multi`
    (--pass-through --pack-label, two labels, one image holding the magic number)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img" / "a").mkdir(parents=True)
        sizes = [(20, 14), (12, 18), (16, 16)]
        for i, size in enumerate(sizes):
            (tmp / "img" / "a" / f"{i}.jpg").write_bytes(_tiny_jpeg(i, size))
        (tmp / "img" / "a" / "m.jpg").write_bytes(jpeg_with_magic(_tiny_jpeg(7), 24 + 8))
        (tmp / "single.lst").write_text("".join(f"{i * 2 + 1}\t{float(i + 4):f}\ta/{i}.jpg\n" for i in range(3)))
        (tmp / "multi.lst").write_text("0\t1.000000\t2.500000\ta/m.jpg\n5\t3.000000\t0.000000\ta/0.jpg\n")
        im2rec(tmp / "single.lst", tmp / "img", "--resize", "12", "--quality", "90", "--num-thread", "1")
        im2rec(tmp / "multi.lst", tmp / "img", "--pass-through", "--pack-label", "--num-thread", "1")
        expected = {}
        for name in ("single", "multi"):
            records = read_with_mxnet(tmp / f"{name}.rec", tmp / f"{name}.idx")
            expected[name] = [{"flag": int(h.flag), "label": np.atleast_1d(h.label).astype(float).tolist(),
                               "id": int(h.id), "id2": int(h.id2), "image_sha256": hashlib.sha256(img).hexdigest(),
                               "image_len": len(img)} for h, img in records]
            for ext in ("rec", "idx", "lst"):
                (dest / f"im2rec_{name}.{ext}").write_bytes((tmp / f"{name}.{ext}").read_bytes())
        (dest / "im2rec_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum(f.stat().st_size for f in dest.glob("im2rec_*"))
    print(f"wrote {dest}/im2rec_* ({total} bytes), made by MXNet {mx.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder of `unicom prepare-gldv2`")
    parser.add_argument("images", nargs="?", type=Path, help="its images folder")
    parser.add_argument("--make-fixture", type=Path, help="write the tiny im2rec fixture here and exit")
    args = parser.parse_args()
    if args.make_fixture:
        make_fixture(args.make_fixture)
    elif args.out and args.images:
        check_ours(args.out, args.images)
    else:
        check_multipart()


if __name__ == "__main__":
    main()
