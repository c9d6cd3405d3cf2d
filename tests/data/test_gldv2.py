"""GLDv2 preparation on a tiny tree: list format, labels, determinism, geometry, resume, verify, DALI."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.data.gldv2_tree import make_tree
from unicom_cli.data.gldv2 import read_train_csv
from unicom_cli.pipelines.prepare import PrepareConfig, prepare_gldv2
from unicom_cli.pipelines.prepare_verify import verify_output
from unicom_cli.data.recordio import RecordReader, RecordWriter
from unicom_cli.errors import InputError, UsageError

R = 48  # shorter side used in these tests (small, fast)
OUT_FILES = ("train.lst", "train.rec", "train.idx", "labels.csv")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("gldv2"))


def run(tree, out: Path, **kw):
    cfg = PrepareConfig(csv=tree.csv, out=out, resize=kw.pop("resize", R), workers=kw.pop("workers", 0),
                        progress=False, **kw)
    return prepare_gldv2(cfg)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run(tree, out), out


def lst_lines(out: Path) -> list[tuple[int, float, str]]:
    rows = []
    for line in (out / "train.lst").read_text().splitlines():
        assert re.fullmatch(r"\d+\t\d+\.000000\t[0-9a-f]/[0-9a-f]/[0-9a-f]/[0-9a-f]{16}\.jpg", line), line
        index, label, rel = line.split("\t")
        rows.append((int(index), float(label), rel))
    return rows


def test_list_labels_and_report(tree, built):
    result, out = built
    rows = lst_lines(out)
    # labels: contiguous by first appearance among landmarks with an image on disk
    present = [(lm, img) for lm, imgs in _csv(tree) for img in imgs if img not in tree.missing]
    order = list(dict.fromkeys(lm for lm, _ in present))
    assert order == ["500", "20", "7", "9"]  # landmark 3 has no image on disk
    expected_label = {img: order.index(lm) for lm, img in present}
    good = [img for _, img in present if img not in tree.bad]
    assert sorted(rel for _, _, rel in rows) == sorted(good)
    assert [i for i, _, _ in rows] == list(range(len(good)))
    assert all(label == expected_label[rel] for _, label, rel in rows)
    # the order is the seeded shuffle of the planned list (bad files drop out, order kept)
    planned = [(order.index(lm), img) for lm, img in present]
    random.Random(0).shuffle(planned)
    assert [rel for _, _, rel in rows] == [img for _, img in planned if img not in tree.bad]
    assert (out / "labels.csv").read_text() == "landmark_id,label,count\n500,0,3\n20,1,1\n7,2,2\n9,3,1\n"
    report = json.loads((out / "report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert {p for p, r in reasons.items() if r == "missing"} == set(tree.missing)
    assert {p for p, r in reasons.items() if r != "missing"} == set(tree.bad)
    assert all("decodable" in reasons[p] for p in tree.bad)
    assert report["counts"].items() >= {"csv_images": 11, "missing": 2, "failed": 2, "written": 7, "classes": 4}.items()
    assert result.records == 7 and result.skipped == 4
    # records: one per .lst line, same id and label, in order
    reader = RecordReader(out / "train.rec", out / "train.idx")
    assert [(h.id, h.label) for h, _ in reader] == [(i, label) for i, label, _ in rows]
    assert reader.keys == list(range(7))
    assert not (out / ".train.partial").exists()


def _csv(tree):
    return [(row.landmark_id, [f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in row.image_ids])
            for row in read_train_csv(tree.csv)]


def test_resize_geometry_shorter_side_and_upscaling(tree, built):
    _, out = built
    reader = RecordReader(out / "train.rec", out / "train.idx")
    rows = lst_lines(out)
    for (_header, image), (_, _, rel) in zip(reader, rows):
        w, h = tree.sizes[rel]  # displayed size (EXIF orientation applied)
        want = (R, h * R // w) if h > w else (w * R // h, R)
        img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 3 and (img.shape[1], img.shape[0]) == want, (rel, img.shape, want)
        # content matches a plain full-size decode + resize (the DCT-reduced path included)
        src = cv2.imdecode(np.fromfile(tree.images / rel, np.uint8), cv2.IMREAD_COLOR)
        ref = cv2.resize(src, want, interpolation=cv2.INTER_AREA if min(w, h) >= 2 * R else cv2.INTER_LINEAR)
        assert np.abs(img.astype(int) - ref).mean() < 6, rel
    sizes = {rel: tree.sizes[rel] for _, _, rel in rows}
    assert (40, 30) in sizes.values() and (300, 400) in sizes.values()  # upscaled; reduced + EXIF-turned


def test_same_seed_same_bytes_whatever_the_workers(tree, built, tmp_path):
    _, out = built
    run(tree, tmp_path / "two", workers=2)
    for name in OUT_FILES:
        assert (tmp_path / "two" / name).read_bytes() == (out / name).read_bytes(), name
    run(tree, tmp_path / "seed1", seed=1)
    assert (tmp_path / "seed1" / "train.lst").read_text() != (out / "train.lst").read_text()


def test_pass_through_limit_and_min_images(tree, tmp_path):
    run(tree, tmp_path / "pt", pass_through=True)
    reader = RecordReader(tmp_path / "pt" / "train.rec")
    for (_, image), (_, _, rel) in zip(reader, lst_lines(tmp_path / "pt")):
        assert image == (tree.images / rel).read_bytes()
    result = run(tree, tmp_path / "lim", limit=5, min_images_per_class=2)
    # the first 5 CSV images: 3 of landmark 500, 1 present + 1 missing of landmark 20 (dropped: < 2)
    assert result.report["counts"].items() >= {"after_limit": 5, "dropped_min_images": 1, "classes": 1,
                                                "written": 3}.items()
    assert (tmp_path / "lim" / "labels.csv").read_text() == "landmark_id,label,count\n500,0,3\n"


def test_malformed_csv_names_the_line(tmp_path):
    bad = tmp_path / "train_clean.csv"
    bad.write_text("landmark_id,images\n1,abcdef0123456789\n2\n")
    with pytest.raises(InputError, match=r"train_clean.csv line 3"):
        read_train_csv(bad)
    bad.write_text("landmark_id,images\n1,abcdef0123456789 ../../etc\n")
    with pytest.raises(InputError, match=r"line 2: bad image id '\.\./\.\./etc'"):
        read_train_csv(bad)
    bad.write_text("id,urls\n")
    with pytest.raises(InputError, match="line 1: expected the header"):
        read_train_csv(bad)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import unicom_cli.pipelines.prepare as g
    from unicom_cli.data.recordio import RecordWriter
    g.CHECKPOINT_SECONDS = 0.0  # checkpoint after every image
    original = RecordWriter.write_payload
    def write_payload(self, key, payload):
        if key == 4:  # half of the 5th record reaches the disk, then the process dies
            self._rec.write(payload[: len(payload) // 2]); self._rec.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key, payload)
    RecordWriter.write_payload = write_payload
    g.prepare_gldv2(g.PrepareConfig(csv=Path(sys.argv[1]), out=Path(sys.argv[2]), resize=48, workers=0,
                                    progress=False))
""")


def test_resume_after_kill_gives_identical_bytes(tree, built, tmp_path):
    _, out = built
    killed = subprocess.run([sys.executable, "-c", KILLER, str(tree.csv), str(tmp_path)], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    partial = tmp_path / ".train.partial"
    state = json.loads((partial / "state.json").read_text())
    assert state["records"] == 4 and (partial / "train.rec").stat().st_size > state["rec_bytes"]
    with pytest.raises(UsageError, match="other settings"):
        run(tree, tmp_path, resize=64)
    cut = tmp_path / "cut"  # a checkpoint that promises more than the disk holds is refused
    shutil.copytree(partial, cut / ".train.partial")
    os.truncate(cut / ".train.partial" / "train.rec", state["rec_bytes"] - 1)
    with pytest.raises(InputError, match="cannot resume: the partial files are shorter"):
        run(tree, cut)
    result = run(tree, tmp_path, workers=2)
    assert result.resumed_from == state["done"]
    for name in OUT_FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert verify_output(tmp_path, workers=0, progress=False).ok


def test_verify_accepts_good_output_and_finds_damage(built, tmp_path):
    _, out = built
    good = verify_output(out, workers=2, progress=False)
    assert good.ok and good.records == 7 and good.classes == 4

    def damaged(name, change):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        change(copy)
        return verify_output(copy, workers=0, progress=False)

    offsets = RecordReader(out / "train.rec", out / "train.idx").offsets

    def break_jpeg(d):  # keep the framing, destroy the image's start-of-image marker
        with open(d / "train.rec", "r+b") as f:
            f.seek(offsets[3] + 8 + 24)
            f.write(b"\0\0\0\0")

    result = damaged("jpeg", break_jpeg)
    assert result.problem_count == 1 and "record 3: image does not decode" in result.problems[0]
    def relabel(d):  # the first line's label becomes 9
        lines = (out / "train.lst").read_text().splitlines(keepends=True)
        index, _, rel = lines[0].split("\t")
        (d / "train.lst").write_text("".join([f"{index}\t9.000000\t{rel}"] + lines[1:]))

    result = damaged("label", relabel)
    assert any(re.match(r"record 0: label \d but train.lst says 9 ", p) for p in result.problems), result.problems
    result = damaged("trunc", lambda d: os.truncate(d / "train.rec", offsets[5] + 100))
    assert any("truncated" in p for p in result.problems) and any("holds 5 records" in p for p in result.problems)
    result = damaged("idx", lambda d: (d / "train.idx").write_text(
        (out / "train.idx").read_text().replace(f"\t{offsets[2]}\n", f"\t{offsets[2] + 4}\n")))
    assert any(f"record 2: at byte {offsets[2]}" in p for p in result.problems)
    result = damaged("labels", lambda d: (d / "labels.csv").write_text("landmark_id,label,count\n500,0,3\n"))
    assert any("labels.csv lists 1 labels" in p for p in result.problems)


def test_dali_cpu_pipeline_reads_the_output(built, tmp_path):
    dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is the optional GPU extra: pip install -e '.[dali]'")
    from nvidia.dali import fn

    _, out = built
    # also a file whose records hold the magic number (DALI must join the parts)
    magic_rec = tmp_path / "magic.rec"
    reader = RecordReader(out / "train.rec", out / "train.idx")
    _, jpeg = reader.read(0)
    com = b"\xff\xfe" + (2 + 2 + 12).to_bytes(2, "big") + b"pp" + b"\x0a\x23\xd7\xce" * 3  # aligned in payload
    with RecordWriter(magic_rec, tmp_path / "magic.idx") as w:
        w.write(0, 3.0, jpeg[:2] + com + jpeg[2:])
        w.write(1, 1.0, jpeg)
    assert (magic_rec.read_bytes()[4:8][3] >> 5) == 1  # first frame is a multi-part start (cflag 1)
    for rec, idx, n in ((out / "train.rec", out / "train.idx", 7), (magic_rec, tmp_path / "magic.idx", 2)):
        @dali.pipeline_def(batch_size=n, num_threads=1, device_id=None)
        def pipe():
            # built and run within this iteration, so the loop variables are the current ones
            jpegs, labels = fn.readers.mxnet(path=[str(rec)], index_path=[str(idx)],  # noqa: B023
                                             random_shuffle=False)
            return fn.decoders.image(jpegs, device="cpu", output_type=dali.types.BGR), labels

        p = pipe()
        p.build()
        images, labels = p.run()
        ours = RecordReader(rec, idx)
        for i in range(n):
            header, data = ours.read(i)
            assert float(np.array(labels.at(i))[0]) == header.label
            ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            got = np.array(images.at(i))
            assert got.shape == ref.shape and np.abs(got.astype(int) - ref).mean() < 1.5


def test_large_jpegs_are_decoded_reduced_in_the_dct_domain(tree, monkeypatch):
    from unicom_cli.data import reencode

    calls = []
    original = reencode.decode
    monkeypatch.setattr(reencode, "decode", lambda data, reduce=1: calls.append(reduce) or original(data, reduce))
    big = (tree.images / "0/f/0/0f0e0d0c0b0a0003.jpg").read_bytes()  # 400x300
    assert reencode.jpeg_size(big) == (400, 300)
    for resize, factor, size in ((48, 4, (64, 48)), (100, 2, (133, 100)), (160, 1, (213, 160)), (600, 1, (800, 600))):
        out = cv2.imdecode(np.frombuffer(reencode.reencode(big, resize, 90), np.uint8), cv2.IMREAD_COLOR)
        assert calls[-1] == factor and (out.shape[1], out.shape[0]) == size
