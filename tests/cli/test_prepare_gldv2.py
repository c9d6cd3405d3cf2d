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
