"""`unicom prepare-gldv2` end to end: default layout, -o/--images, --verify, errors and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.data.gldv2_tree import make_tree
from unicom_cli.cli.app import main


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "gldv2")


def test_csv_alone_uses_the_usual_layout(tree, capsys):
    assert main(["prepare-gldv2", str(tree.csv), "--resize", "48", "-j", "0"]) == 0
    out = capsys.readouterr().out
    assert "wrote 7 images of 4 landmarks" in out and "skipped 4" in out and "2 missing, 2 unreadable" in out
    for name in ("train.lst", "train.rec", "train.idx", "labels.csv", "report.json"):
        assert (tree.root / name).is_file(), name
    assert len((tree.root / "train.lst").read_text().splitlines()) == 7
    # a second run refuses to overwrite, --overwrite rebuilds the same bytes
    before = (tree.root / "train.rec").read_bytes()
    assert main(["prepare-gldv2", str(tree.csv), "--resize", "48", "-j", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare-gldv2", str(tree.root), "--resize", "48", "-j", "0", "--overwrite"]) == 0
    assert (tree.root / "train.rec").read_bytes() == before


def test_images_and_out_options_and_verify(tree, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "imgs"
    shutil.move(str(tree.images), moved)
    # the default images folder is gone: a clear error naming it and the option
    assert main(["prepare-gldv2", str(tree.csv), "-j", "0"]) == 2
    err = capsys.readouterr().err
    assert str(tree.images) in err and "--images" in err
    out = tmp_path / "out"
    assert main(["prepare-gldv2", str(tree.csv), "--images", str(moved), "-o", str(out),
                 "--resize", "0", "--quality", "90", "-j", "2"]) == 0
    assert (out / "train.rec").is_file() and not (tree.root / "train.rec").exists()
    capsys.readouterr()
    assert main(["prepare-gldv2", "--verify", str(out), "-j", "0"]) == 0
    assert "ok: 7 records, 4 labels" in capsys.readouterr().out
    data = bytearray((out / "train.rec").read_bytes())
    data[-40:] = b"\0" * 40  # damage the end of the last image
    (out / "train.rec").write_bytes(data[:-3])  # and cut the file
    assert main(["prepare-gldv2", "--verify", str(out), "-j", "0"]) == 1
    err = capsys.readouterr().err
    assert "problem:" in err and "truncated" in err and "holds 6 records but train.idx lists 7" in err


def test_bad_input_messages(tree, capsys):
    tree.csv.write_text("landmark_id,images\n5,abcdef0123456789\n6;fedcba\n")
    assert main(["prepare-gldv2", str(tree.csv), "-j", "0"]) == 2
    assert "train_clean.csv line 3" in capsys.readouterr().err
    assert main(["prepare-gldv2"]) == 2
    assert main(["prepare-gldv2", str(tree.csv), "--verify", str(tree.root)]) == 2
    capsys.readouterr()
    missing = tree.root / "nowhere" / "train_clean.csv"
    assert main(["prepare-gldv2", str(missing)]) == 2
    assert f"{missing}: not found" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_runs(tree):
    result = subprocess.run([sys.executable, "-m", "unicom_cli", "prepare-gldv2", str(tree.csv), "--limit", "3",
                             "--resize", "32", "-j", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 images of 1 landmarks" in result.stdout


# ----------------------------------------------------------------------------- issue 19, item 9

def _one_line(capsys) -> str:
    from tests.conftest import one_error_line

    return one_error_line(capsys.readouterr().err)


def test_a_landmark_with_ten_thousand_ids(tree, capsys):
    many = " ".join(f"{n:016x}" for n in range(10_000))  # csv's default field limit is 128 KiB
    tree.csv.write_text(tree.csv.read_text() + f"42,{many}\n")
    assert main(["prepare-gldv2", str(tree.csv), "--resize", "48", "-j", "0"]) == 0
    assert "10,002 missing" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["latin1_csv", "out_is_a_file"])
def test_bad_csv_and_output_are_one_line(tree, tmp_path, capsys, case):
    args = ["prepare-gldv2", str(tree.csv), "-j", "0"]
    if case == "latin1_csv":
        tree.csv.write_bytes(tree.csv.read_bytes() + b"caf\xe9,abcdef0123456789\n")
        expected = "not UTF-8"
    else:
        (tmp_path / "file").write_text("x")
        args += ["-o", str(tmp_path / "file")]
        expected = "is a file"
    assert main(args) == 2
    assert expected in _one_line(capsys)


@pytest.mark.parametrize("readonly", [False, True])
def test_full_or_read_only_output(tree, small_disk, capsys, readonly):
    disk = small_disk("48k", readonly=readonly)
    code = main(["prepare-gldv2", str(tree.csv), "-o", str(disk), "--resize", "0", "-j", "0"])
    line = _one_line(capsys)
    assert code == 1 and str(disk) in line
    assert ("read-only" if readonly else "full") in line
    assert not (disk / "train.rec").exists()


def test_pixel_limit_applies(tree, capsys):
    """A 20000x20000 PNG was decoded whole (2.4 GB); here a 2000x1500 one against --max-pixels."""
    from PIL import Image

    big = tree.images / "0/f/0/0f0e0d0c0b0a0003.jpg"
    Image.new("RGB", (2000, 1500), (9, 99, 199)).save(big, format="PNG")
    assert main(["prepare-gldv2", str(tree.csv), "--resize", "48", "-j", "0",
                 "--max-pixels", "2000000"]) == 0
    report = __import__("json").loads((tree.root / "report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "3,000,000 pixels is above the limit of 2,000,000" in reasons["0/f/0/0f0e0d0c0b0a0003.jpg"]


def test_duplicate_ids_and_odd_landmark_ids(tree, capsys):
    """An image under two landmarks is kept once (first landmark wins, with a warning); landmark
    ids with a comma or a line break survive labels.csv and --verify."""
    import csv as csvmod
    import io

    text = tree.csv.read_text().replace("\n500,", '\n"5,00",').replace("\n20,", '\n"2\n0",')
    text += "77,a1b2c3d4e5f60001\n"  # already listed under "5,00"
    tree.csv.write_text(text)
    assert main(["prepare-gldv2", str(tree.csv), "--resize", "48", "-j", "0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "a1b2c3d4e5f60001 under landmarks 5,00 and 77" in err and "first landmark" in err
    rows = list(csvmod.reader(io.StringIO((tree.root / "labels.csv").read_text(), newline="")))
    assert rows[1][0] == "5,00" and ["2\n0", "1", "1"] in rows and "77" not in [r[0] for r in rows]
    assert len((tree.root / "train.lst").read_text().splitlines()) == 7
    assert main(["prepare-gldv2", "--verify", str(tree.root), "-j", "0"]) == 0


def test_an_output_in_use_is_refused(tree, tmp_path, capsys):
    from tests.utils.test_files import _start_holder

    holder = _start_holder(tree.root / "train")
    try:
        assert main(["prepare-gldv2", str(tree.csv), "-j", "0"]) == 1
        assert f"in use by another unicom run (pid {holder.pid})" in _one_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert main(["prepare-gldv2", str(tree.csv), "-j", "0", "--resize", "48"]) == 0


def test_pixel_limit_applies_beyond_pillows_own(tree, capsys):
    """Issue 28 item 23: above twice Pillow's MAX_IMAGE_PIXELS its header read raises
    DecompressionBombError, which the size check swallowed: the limit never applied and a
    20000 x 20000 PNG was decoded whole. A PNG header claiming 100,000 x 100,000 pixels."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tree.images / "0/f/0/0f0e0d0c0b0a0003.jpg").write_bytes(bytes(data))
    assert main(["prepare-gldv2", str(tree.csv), "--resize", "48", "-j", "0"]) == 0
    report = __import__("json").loads((tree.root / "report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "10,000,000,000 pixels is above the limit of 178,956,970" in reasons["0/f/0/0f0e0d0c0b0a0003.jpg"]



def test_full_disk_with_worker_threads_stops_them(tmp_path, small_disk, capsys):
    """Issue 28 item 26: when the disk filled, the checkpoint in the cleanup failed too and the
    encoder pool was never shut down; the cycle collector later closed it from one of its own
    threads at exit: "cannot join current thread" traceback after the one-line error. After the
    error, no encoder thread may be left (checked before any collection can run)."""
    import threading

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = [f"{k:03x}0123456789abc" for k in range(120)]
    for image_id in ids:
        path = tmp_path / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path, quality=90)
    csv = tmp_path / "train_clean.csv"
    csv.write_text("landmark_id,images\n" + "".join(f"{n},{' '.join(ids[n::3])}\n" for n in range(3)))
    disk = small_disk("300k")
    assert main(["prepare-gldv2", str(csv), "-o", str(disk), "--resize", "0", "-j", "2"]) == 1
    assert "full" in _one_line(capsys)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("unicom-encode")]
