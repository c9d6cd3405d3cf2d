"""`embed -o feats/` (issue 25): tar shards and tables in, one feature shard per unit out,
resumable, split over independent processes; bad shards are failures, not crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import one_error_line
from tests.pipelines.shards_util import real_images, unpack_as_folder, write_shard, write_shards
from unicom_cli.cli.app import main


def _embed(src, out, spec, ckpt, *extra) -> list[str]:
    return ["embed", str(src), "-o", str(out), "--model", str(spec), "--weights", str(ckpt),
            "--precision", "fp32", "--batch-size", "4", *extra]


def _rows(folder: Path) -> dict[str, np.ndarray]:
    """id → row over every shard of a feature folder, through its manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        x = np.load(folder / shard["features"])
        ids = (folder / shard["ids"]).read_text().splitlines()
        assert len(ids) == len(x)
        out.update(zip(ids, x))
    return out


def _claims(folder: Path) -> list[Path]:
    """Lock files naming a process (shards and parts), not the manifest's flock file."""
    return [p for p in folder.glob("*.lock") if p.name != ".manifest.lock"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds")
    return folder, *write_shards(folder, 3, 7)


def test_tar_shards_give_the_rows_of_the_same_images_as_a_folder(shards, tmp_path, tiny_spec_file,
                                                                  tiny_checkpoint, capsys):
    """Each sample's row equals the row of its image embedded from a folder into one .npy; ids are
    <shard>/<key>, the json/txt members are carried into the metadata, the manifest counts them."""
    folder, _, by_id = shards
    out = tmp_path / "feats"
    assert main(_embed(f"{folder}/{{00000..00002}}.tar", f"{out}/", tiny_spec_file, tiny_checkpoint,
                       "--workers", "2")) == 0
    assert f"wrote {out / 'manifest.json'}" in " ".join(capsys.readouterr().out.split())
    pictures = tmp_path / "pictures"
    names = unpack_as_folder(by_id, pictures)
    assert main(_embed(pictures, tmp_path / "ref.npy", tiny_spec_file, tiny_checkpoint, "--workers", "0")) == 0
    ref = np.load(tmp_path / "ref.npy")
    ref_ids = (tmp_path / "ref.ids.txt").read_text().splitlines()
    assert sorted(ref_ids) == sorted(names)
    rows = _rows(out)
    assert sorted(rows) == sorted(by_id)
    for name, row in zip(ref_ids, ref):
        np.testing.assert_allclose(rows[name.rsplit(".", 1)[0]], row, rtol=1e-5, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["complete"], manifest["count"], manifest["failures"], manifest["dim"]) == (True, 21, 0, 16)
    assert [s["name"] for s in manifest["shards"]] == ["00000", "00001", "00002"]
    meta = [json.loads(line) for line in (out / "00001.meta.jsonl").read_text().splitlines()]
    ids = (out / "00001.ids.txt").read_text().splitlines()
    assert [m["n"] for m in meta] == [int(i.split("/")[1]) for i in ids] == list(range(7, 14))
    assert meta[0]["caption"] == "image 7" and meta[0]["txt"] == "text 7"
    assert not list(out.glob("*.partial")) and not _claims(out)


def test_bad_shards_keep_their_readable_samples_and_list_the_rest(tmp_path, tiny_spec_file,
                                                                  tiny_checkpoint, capsys):
    """A truncated shard keeps the samples before the cut; a sample with no image member, an image
    member that is not an image, and a key seen twice are failures naming the sample."""
    images = real_images(8)
    good = [(f"k{i}", {"jpg" if i % 2 else "png": images[i]}) for i in range(8)]
    cut = write_shard(tmp_path / "in" / "cut.tar", good)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 5 // 8])  # inside a later member
    odd = [good[0], ("caption-only", {"txt": b"no picture"}), ("notimage", {"jpg": b"plain text"}),
           good[1], ("k0", {"png": images[2]})]
    write_shard(tmp_path / "in" / "odd.tar", odd)
    out = tmp_path / "feats"
    assert main(_embed(tmp_path / "in", f"{out}/", tiny_spec_file, tiny_checkpoint, "--workers", "0")) == 0
    capsys.readouterr()
    cut_ids = (out / "cut.ids.txt").read_text().splitlines()
    assert 2 <= len(cut_ids) < 8 and cut_ids == [f"cut/k{i}" for i in range(len(cut_ids))]
    cut_fail = (out / "cut.failures.txt").read_text().splitlines()
    assert len(cut_fail) == 1 and cut_fail[0].startswith(f"cut/k{len(cut_ids)}\t")
    assert "cut.tar is truncated or corrupt at sample" in cut_fail[0]
    assert (out / "odd.ids.txt").read_text().splitlines() == ["odd/k0", "odd/k1"]
    failures = dict(line.split("\t") for line in (out / "odd.failures.txt").read_text().splitlines())
    assert "no image member" in failures["odd/caption-only"]
    assert "not an image" in failures["odd/notimage"] or "cannot decode" in failures["odd/notimage"]
    assert "duplicate key 'k0'" in failures["odd/k0"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(cut_ids) + 2 and manifest["failures"] == 4


def test_missing_shard_is_named_before_any_work(shards, tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    folder = shards[0]
    out = tmp_path / "feats"
    assert main(_embed(f"{folder}/{{00000..00004}}.tar", f"{out}/", tiny_spec_file, tiny_checkpoint)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "00003.tar: no such tar shard (and 1 more of 5)" in err
    assert not out.exists() or not any(out.iterdir())


def test_parquet_table_carries_its_columns(shards, tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    """A table's path column names the images (relative to the table), the others become
    metadata; --shard-size cuts it into output shards; a missing column is one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = unpack_as_folder(shards[2], tmp_path / "pictures")
    table = pa.table({"filepath": [f"pictures/{n}" for n in names], "label": list(range(len(names))),
                      "caption": [f"c{i}" for i in range(len(names))]})
    pq.write_table(table, tmp_path / "t.parquet")
    out = tmp_path / "feats"
    assert main(_embed(tmp_path / "t.parquet", out, tiny_spec_file, tiny_checkpoint, "--workers", "0",
                       "--path-column", "filepath", "--shard-size", "8")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 5]
    ids = (out / "part-00002.ids.txt").read_text().splitlines()
    meta = [json.loads(line) for line in (out / "part-00002.meta.jsonl").read_text().splitlines()]
    assert ids == [f"pictures/{n}" for n in names[16:]]
    assert [m["label"] for m in meta] == list(range(16, 21)) and meta[0]["caption"] == "c16"
    capsys.readouterr()
    assert main(_embed(tmp_path / "t.parquet", tmp_path / "other", tiny_spec_file, tiny_checkpoint)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "t.parquet: no column 'path' (columns: filepath, label, caption)" in err and "--path-column" in err


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unicom_cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))} | \
           {p.name: p.read_bytes() for p in sorted(folder.glob("*.ids.txt"))}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds6")
    write_shards(folder, 6, 6)
    return folder


@pytest.fixture(scope="module")
def clean_run(many_shards, tmp_path_factory):
    """One uninterrupted single-process run: the bytes every other way of running must give."""
    from tests.conftest import TINY, write_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("clean")
    spec = tmp / "tiny.json"
    spec.write_text(json.dumps(TINY))
    ckpt = write_tiny_checkpoint(spec, tmp / "FP16-tiny.pt")
    out = tmp / "feats"
    done = subprocess.run([sys.executable, "-m", "unicom_cli",
                           *_embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return spec, ckpt, _shard_bytes(out)


@pytest.mark.slow
def test_two_parts_as_separate_processes_fill_one_folder(many_shards, clean_run, tmp_path):
    """--part 0/2 and --part 1/2 run at once into one folder: neither blocks the other, the
    manifest lists every shard whichever finishes last, and the bytes are those of one run."""
    spec, ckpt, expected = clean_run
    out = tmp_path / "feats"
    jobs = [_cli(*_embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0", "--part", f"{i}/2"))
            for i in range(2)]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards_done"] == 6 and manifest["count"] == 36
    assert _shard_bytes(out) == expected


@pytest.mark.slow
def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(many_shards, clean_run, tmp_path):
    """SIGKILL in the middle of a shard (checkpoints after every batch), three times at different
    points; the fourth run finishes with the bytes of the clean run."""
    spec, ckpt, expected = clean_run
    out = tmp_path / "feats"
    args = _embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0")
    for attempt in range(3):
        proc = _cli(*args, env={"UNICOM_TEST_CHECKPOINT_S": "0"})
        deadline = time.monotonic() + 120
        wanted = attempt + 1  # stop once this many shards are finished and the next one is under way
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(out.glob("*.json"))) >= wanted + 1 and list(out.glob("*.partial/state.json")):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert _claims(out)  # the killed run left its claims behind: taken over below
    done = subprocess.run([sys.executable, "-m", "unicom_cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _shard_bytes(out) == expected
    assert not _claims(out) and not list(out.glob("*.partial"))


@pytest.mark.slow
def test_a_second_run_of_the_same_part_is_refused_naming_the_holder(many_shards, clean_run, tmp_path, capsys):
    spec, ckpt, _ = clean_run
    out = tmp_path / "feats"
    lock = out / ".part-1-of-3.lock"
    for _ in range(20):  # the first run is frozen while it holds its claim; it may finish first: again
        shutil.rmtree(out, ignore_errors=True)
        first = _cli(*_embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0", "--part", "1/3"),
                     env={"UNICOM_TEST_CHECKPOINT_S": "0"})
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)
        if first.poll() is None and lock.exists():
            break
        first.kill()
        first.communicate()
    try:
        assert main(_embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0", "--part", "1/3")) == 1
        err = one_error_line(capsys.readouterr().err)
        assert f"part 1/3 is being embedded by pid {first.pid} on " in err
        assert main(_embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0", "--part", "0/3")) == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()


def test_search_and_serve_resolve_hits_to_shard_keys_and_metadata(shards, tmp_path, tiny_spec_file,
                                                                   tiny_checkpoint, capsys):
    """tar shards → embed -o feats/ → index feats/ → search: each hit is <shard>/<key> with the
    json/txt of its sample; the service's JSON carries the same metadata."""
    import csv

    from fastapi.testclient import TestClient

    from unicom_cli.index import Index
    from unicom_cli.serve.app import create_app

    folder = shards[0]
    out = tmp_path / "feats"
    assert main(_embed(folder, f"{out}/", tiny_spec_file, tiny_checkpoint, "--workers", "0")) == 0
    assert main(["index", str(out), "-o", str(tmp_path / "i.index"), "--index", "flat"]) == 0
    rows = _rows(out)
    query = np.stack([rows["00002/000015"], rows["00000/000003"]])
    np.save(tmp_path / "q.npy", query)
    assert main(["search", str(tmp_path / "i.index"), str(tmp_path / "q.npy"), "-k", "3",
                 "-o", str(tmp_path / "r.csv")]) == 0
    capsys.readouterr()
    with open(tmp_path / "r.csv", newline="") as handle:
        hits = list(csv.DictReader(handle))
    assert [h["id"] for h in hits if h["rank"] == "1"] == ["00002/000015", "00000/000003"]
    for hit in hits:
        n = int(hit["id"].split("/")[1])
        assert (hit["caption"], hit["n"], hit["txt"]) == (f"image {n}", str(n), f"text {n}")
    with TestClient(create_app(Index.load(tmp_path / "i.index"), embedder=None)) as client:
        answer = client.post("/search?k=2", json={"vector": query[0].tolist()}).json()
    top = answer["results"][0]
    assert top["id"] == "00002/000015" and top["metadata"] == {"caption": "image 15", "n": 15, "txt": "text 15"}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_count_and_batch_numbering_do_not_change_the_bytes(shards, tmp_path, tiny_spec_file,
                                                                  tiny_checkpoint, capsys):
    """Batches are numbered across shards and dealt to the decoders in turn: 0, 1 or 3 decoders
    (7 samples a shard, batches of 4: the shards end mid-batch) write the same bytes."""
    folder = shards[0]
    results = []
    for workers in ("0", "1", "3"):
        out = tmp_path / f"w{workers}"
        assert main(_embed(folder, f"{out}/", tiny_spec_file, tiny_checkpoint, "--workers", workers)) == 0
        results.append(_shard_bytes(out))
    capsys.readouterr()
    assert len(results[0]) == 6 and results[0] == results[1] == results[2]


def test_index_from_tar_shards_embeds_into_a_shard_folder_first(shards, tmp_path, tiny_spec_file,
                                                                tiny_checkpoint, capsys):
    from unicom_cli.index import Index

    folder, _, by_id = shards
    out = tmp_path / "i.index"
    assert main(["index", f"{folder}/{{00000..00002}}.tar", "-o", str(out), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint), "--precision", "fp32", "--workers", "0",
                 "--index", "flat"]) == 0
    capsys.readouterr()
    assert (tmp_path / "i.index.features" / "feats" / "manifest.json").is_file()
    assert sorted(Index.load(out).ids) == sorted(by_id)


def test_no_image_at_all_and_a_fifo_shard_are_one_line(tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    """Shards with no embeddable sample: exit 2 naming the first failure (an exit 0 with an empty
    collection would be wrong). A FIFO given as a shard: named before any work, nothing read."""
    write_shard(tmp_path / "in" / "a.tar", [("x", {"txt": b"caption"}), ("y\nz", {"png": real_images(1)[0]})])
    assert main(_embed(tmp_path / "in", f"{tmp_path / 'feats'}/", tiny_spec_file, tiny_checkpoint,
                       "--workers", "0")) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "none of its 2 items could be embedded (first: a/x: no image member" in err
    assert "a/y\\nz\tthe key contains a line break" in (tmp_path / "feats" / "a.failures.txt").read_text()
    os.mkfifo(tmp_path / "pipe.tar")
    assert main(_embed(tmp_path / "pipe.tar", f"{tmp_path / 'f2'}/", tiny_spec_file, tiny_checkpoint)) == 2
    assert "pipe.tar: not a regular file; fix the pattern or list" in one_error_line(capsys.readouterr().err)


def test_a_folder_of_another_run_is_refused_naming_what_differs(shards, tmp_path, tiny_spec_file,
                                                                tiny_checkpoint, capsys):
    folder = shards[0]
    out = f"{tmp_path / 'feats'}/"
    assert main(_embed(f"{folder}/00000.tar", out, tiny_spec_file, tiny_checkpoint, "--workers", "0")) == 0
    before = _shard_bytes(tmp_path / "feats")
    capsys.readouterr()
    assert main(_embed(f"{folder}/00000.tar", out, tiny_spec_file, tiny_checkpoint, "--workers", "0",
                       "--num-feat", "8")) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "holds shards of another run (" in err and "dim: was 16, now 8" in err and "--overwrite" in err
    assert _shard_bytes(tmp_path / "feats") == before


@pytest.mark.slow
def test_two_ranks_of_one_run_take_whole_shards(many_shards, clean_run, tmp_path):
    """--procs 2: each rank takes every other shard; the folder equals the 1-process run's."""
    spec, ckpt, expected = clean_run
    out = tmp_path / "feats"
    done = subprocess.run([sys.executable, "-m", "unicom_cli",
                           *_embed(many_shards, f"{out}/", spec, ckpt, "--workers", "0", "--procs", "2")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert _shard_bytes(out) == expected
    assert json.loads((out / "manifest.json").read_text())["shards_done"] == 6
