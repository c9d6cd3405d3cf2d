"""The Milvus backend against the real embedded engine (milvus-lite): build, search by vector and by
image with exactly the neighbours of exact search (FLAT) or the recorded recall (IVF), resume after a
kill during inserts, --add, and every refusal as one line with exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.index.conftest import clustered, exact_topk, write_features
from unicom_cli.cli.app import main

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")


@pytest.fixture(autouse=True)
def free_databases(monkeypatch):
    """milvus-lite admits one process per .db: stop this process's embedded servers after each test
    (a search leaves its collection open, as a CLI process does until it exits)."""
    monkeypatch.setenv("UNICOM_NO_PROGRESS", "1")
    yield
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_all()


def _one_line_exit_2(code: int, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _load(ref: str):
    from unicom_cli.index import Index

    return Index.load(ref)


def test_flat_collection_searches_exactly_by_vector(tmp_path, capsys):
    x = clustered(3000, 32, seed=1)
    npy = write_features(tmp_path, "feats", x)
    ref = f"milvus:{tmp_path}/photos.db#photos"
    assert main(["index", str(npy), "--backend", "milvus", "--uri", str(tmp_path / "photos.db"),
                 "--collection", "photos", "--index", "flat"]) == 0
    out = capsys.readouterr().out
    assert "FLAT" in out and "wrote milvus:" in out
    index = _load(ref)
    assert len(index) == 3000 and index.dim == 32 and index.meta["backend"] == "milvus"
    assert index.meta["model"] == "tiny" and index.meta["weights_sha256"] == "a" * 64
    assert index.meta["recall_at_10"] == 1.0 and index.meta["milvus_index"]["index_type"] == "FLAT"
    queries = clustered(50, 32, seed=9)
    scores, rows = index.search(queries, 10)
    truth_rows, truth_scores = exact_topk(queries, x, 10)
    assert np.array_equal(rows, truth_rows)
    assert np.allclose(scores, truth_scores, atol=1e-5)
    own = np.arange(0, 3000, 60)  # --exclude-self: the collection's own rows as queries
    scores, rows = index.search(x[own], 5, exclude=own)
    assert np.array_equal(rows, exact_topk(x[own], x, 5, exclude=own)[0])
    assert [index.ids[r] for r in rows[0]] == [f"feats/img_{r:05d}.jpg" for r in rows[0]]
    assert index.row_of(tmp_path / "feats" / "img_00007.jpg") == 7


@pytest.mark.parametrize("kind,milvus_index", [
    ("ivf", {"index_type": "IVF_FLAT", "params": {"nlist": 64}}),
    ("hnsw", {"index_type": "HNSW", "params": {"M": 32, "efConstruction": 128}}),
    ("ivfpq", {"index_type": "IVF_SQ8", "params": {"nlist": 64}}),  # milvus-lite has no IVF_PQ
])
def test_approximate_collections_reach_their_recorded_recall(kind, milvus_index, tmp_path, capsys):
    from unicom_cli.index.source import open_source
    from unicom_cli.index.tune import held_out_queries

    x = clustered(4000, 32, seed=3)
    npy = write_features(tmp_path, "feats", x)
    ref = f"milvus:{tmp_path}/v.db#vecs"
    assert main(["index", str(npy), "-o", ref, "--index", kind, "--target-recall", "0.9"]) == 0
    index = _load(ref)
    meta = index.meta
    assert meta["milvus_index"] == milvus_index
    assert meta["recall_reached"] and meta["recall_at_10"] >= 0.9
    assert {k: v for k, v in meta["tuning"][-1].items() if k != "recall"} == meta["search_params"]
    # The same held-out rows, their exact neighbours computed here in float64.
    held = held_out_queries([open_source(npy)], 1000, 10, seed=0)
    truth = exact_topk(held.vectors, x, 10, exclude=held.rows)[0]
    _, rows = index.search(held.vectors, 10, exclude=held.rows)
    recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(rows, truth)]) / 10
    assert recall == pytest.approx(meta["recall_at_10"], abs=1e-4)
    if kind != "ivf":
        return
    # More lists probed than tuned: recall rises to exact search.
    _, rows = index.search(held.vectors, 10, exclude=held.rows, params={"nprobe": 64})
    assert np.array_equal(rows, truth)


def test_index_images_then_search_by_image_as_the_faiss_index(tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    from PIL import Image
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, arr in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea()),
                      ("rocket", data.rocket()), ("camera", data.camera()), ("coins", data.coins())):
        img = Image.fromarray(arr).convert("RGB")
        img.thumbnail((96, 96))
        img.save(photos / f"{name}.jpg", quality=95)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / f"{name}-mirror.png")
    model = ["--model", str(tiny_spec_file), "--weights", str(tiny_checkpoint), "--precision", "fp32"]
    db = tmp_path / "m.db"
    assert main(["index", str(photos), "--backend", "milvus", "--uri", str(db), *model]) == 0
    feats = tmp_path / "photos.feats.npy"  # the embeddings, kept beside the .db
    assert feats.is_file() and "wrote milvus:" in capsys.readouterr().out
    assert main(["index", str(feats), "-o", str(tmp_path / "f.index"), "--index", "flat"]) == 0
    results = {}
    for name, ref in (("milvus", f"milvus:{db}#photos"), ("faiss", str(tmp_path / "f.index"))):
        csv = tmp_path / f"{name}.csv"
        assert main(["search", ref, str(photos / "coffee.jpg"), str(photos / "rocket-mirror.png"),
                     "-k", "4", "--exclude-self", "-o", str(csv), "--vis", str(tmp_path / f"{name}.html")]) == 0
        results[name] = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    assert [r[:4] for r in results["milvus"]] == [r[:4] for r in results["faiss"]]
    assert np.allclose([float(r[4]) for r in results["milvus"]], [float(r[4]) for r in results["faiss"]], atol=1e-5)
    assert results["milvus"][0][2] == "coffee-mirror.png"  # its own row excluded, its mirror first
    assert "coffee-mirror.png" in (tmp_path / "milvus.html").read_text()
    more = tmp_path / "more"  # --add a second folder, embedded with the same model first
    more.mkdir()
    Image.open(photos / "coffee.jpg").rotate(90).save(more / "coffee-turned.jpg")
    assert main(["index", "--add", str(more), "-o", f"milvus:{db}#photos", *model]) == 0
    assert (tmp_path / "photos.feats-more.npy").is_file()
    index = _load(f"milvus:{db}#photos")
    assert len(index) == 13 and index.ids[12] == "../more/coffee-turned.jpg"
    assert index.path_of(12).resolve() == (more / "coffee-turned.jpg").resolve()


def test_add_then_duplicates(tmp_path, capsys):
    x = clustered(1200, 16, seed=4)
    x[1100] = x[5]  # an exact duplicate across the two parts
    first = write_features(tmp_path / "a", "first", x[:1000])
    second = write_features(tmp_path / "b", "second", x[1000:])
    ref = f"milvus:{tmp_path}/d.db#dups"
    assert main(["index", str(first), "-o", ref, "--index", "flat"]) == 0
    assert main(["index", "--add", str(second), "-o", ref]) == 0
    index = _load(ref)
    assert len(index) == 1200 and len(index.meta["sources"]) == 2
    assert np.array_equal(index.search(x[:40], 8)[1], exact_topk(x[:40], x, 8)[0])
    assert index.ids[1100] == "../b/second/img_00100.jpg" and index.ids[5] == "first/img_00005.jpg"
    assert np.array_equal(index.all_vectors(), x)
    capsys.readouterr()
    assert main(["search", ref, "--duplicates", "--threshold", "0.9999", "-o", str(tmp_path / "d.csv")]) == 0
    lines = (tmp_path / "d.csv").read_text().splitlines()[1:]
    assert sorted(int(line.split(",")[3]) for line in lines) == [5, 1100]


@pytest.mark.slow
def test_resume_after_a_kill_during_inserts(tmp_path):
    from unicom_cli.index.backends.milvus import MilvusRef, connect, release

    x = clustered(20000, 32, seed=5)
    npy = write_features(tmp_path, "feats", x)
    db = tmp_path / "k.db"
    args = [sys.executable, "-m", "unicom_cli", "index", str(npy), "-o", f"milvus:{db}#big", "--index", "flat",
            "--chunk-rows", "200"]
    env = dict(os.environ, OMP_NUM_THREADS="1", UNICOM_NO_PROGRESS="1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    staging = db / "collections" / "big__unicom_build"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and \
            sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) < 300_000:
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ref = MilvusRef(str(db), "big")
    client = connect(ref)
    try:
        assert not client.has_collection("big")  # the name only ever holds a finished collection
        inserted = client.query("big__unicom_build", filter="id >= 0", output_fields=["count(*)"])[0]["count(*)"]
    finally:
        release(client, ref)
    assert 0 < inserted < 20000
    again = args[:-1] + ["4000"]  # other batches: the resume checks ids, not batch boundaries
    done = subprocess.run(again, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming the unfinished build" in done.stderr
    assert f"{inserted:,} of 20,000 vectors were already in big__unicom_build" in done.stderr
    index = _load(f"milvus:{db}#big")
    assert len(index) == 20000
    count = index.client.query("big", filter="id >= 0", output_fields=["count(*)"])[0]["count(*)"]
    assert count == 20000  # no row twice
    assert np.array_equal(index.all_vectors(), x)
    assert not index.client.has_collection("big__unicom_build")


def test_refusals_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    x = clustered(500, 16, seed=6)
    npy = write_features(tmp_path, "feats", x)
    ref = f"milvus:{tmp_path}/r.db#taken"
    assert main(["index", str(npy), "-o", ref, "--index", "flat"]) == 0
    capsys.readouterr()
    err = _one_line_exit_2(main(["index", str(npy), "-o", ref]), capsys)
    assert "already exists" in err and "--overwrite" in err
    other_model = write_features(tmp_path / "o", "other", x, model="other")
    err = _one_line_exit_2(main(["index", "--add", str(other_model), "-o", ref]), capsys)
    assert "model 'other' differs from 'tiny'" in err
    other_dim = write_features(tmp_path / "w", "wide", clustered(100, 24))
    err = _one_line_exit_2(main(["index", "--add", str(other_dim), "-o", ref]), capsys)
    assert "24 differs from 16" in err
    err = _one_line_exit_2(main(["search", ref, str(other_dim)]), capsys)
    assert "24-dim vectors" in err and "16-dim" in err
    err = _one_line_exit_2(main(["index", str(npy), "-o", "milvus:ftp://host:19530#c"]), capsys)
    assert "unknown URI scheme 'ftp'" in err
    err = _one_line_exit_2(main(["search", f"milvus:{tmp_path}/r.db#nope", str(npy)]), capsys)
    assert "no such collection" in err and "taken" in err
    err = _one_line_exit_2(main(["search", f"milvus:{tmp_path}/r.txt#c", str(npy)]), capsys)
    assert "ending in .db" in err
    (tmp_path / "sqlite.db").write_bytes(b"SQLite format 3\x00")
    err = _one_line_exit_2(main(["index", str(npy), "-o", f"milvus:{tmp_path}/sqlite.db#c"]), capsys)
    assert "sqlite.db: a file, not a Milvus database" in err
    err = _one_line_exit_2(main(["index", str(npy), "-o", f"milvus:{tmp_path}/r.db#bad-name"]), capsys)
    assert "'bad-name'" in err and "letters, digits and underscores" in err
    monkeypatch.setenv("UNICOM_MILVUS_TOKEN", "root:s3cret-password")
    for cmd in (["index", str(npy), "--backend", "milvus", "--uri", "http://127.0.0.1:9"],
                ["search", "milvus:http://127.0.0.1:9#c", str(npy)]):
        err = _one_line_exit_2(main(cmd), capsys)
        assert "http://127.0.0.1:9" in err and "no Milvus server answers" in err and "s3cret" not in err
    err = _one_line_exit_2(main(["search", "milvus:http://root:pw@127.0.0.1:9#c", str(npy)]), capsys)
    assert "UNICOM_MILVUS_TOKEN" in err and "pw" not in err


def test_an_embedded_database_open_in_another_process_is_refused(tmp_path, capsys):
    x = clustered(300, 16, seed=7)
    npy = write_features(tmp_path, "feats", x)
    ref = f"milvus:{tmp_path}/l.db#c"
    assert main(["index", str(npy), "-o", ref, "--index", "flat"]) == 0
    capsys.readouterr()
    holder = _load(ref)  # this process holds the database open
    try:
        done = subprocess.run([sys.executable, "-m", "unicom_cli", "search", ref, str(npy), "-k", "2"],
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.close()
    assert done.returncode == 2 and "another process has it open" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_missing_extra_is_named(tmp_path, capsys, monkeypatch):
    npy = write_features(tmp_path, "feats", clustered(50, 8))
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if `pip install unicom-cli` without [milvus]
    err = _one_line_exit_2(main(["index", str(npy), "-o", f"milvus:{tmp_path}/x.db#c"]), capsys)
    assert "unicom-cli[milvus]" in err


def test_odd_file_names_are_found_by_path(tmp_path):
    x = clustered(40, 8, seed=8)
    npy = write_features(tmp_path, "feats", x)
    names = [f"feats/img_{i:05d}.jpg" for i in range(40)]
    names[3], names[4], names[5] = 'feats/a "quoted" é.jpg', "feats/back\\slash.jpg", "feats/it's.png"
    (tmp_path / "feats.ids.txt").write_text("".join(n + "\n" for n in names))
    assert main(["index", str(npy), "-o", f"milvus:{tmp_path}/n.db#names", "--index", "flat"]) == 0
    index = _load(f"milvus:{tmp_path}/n.db#names")
    for row in (3, 4, 5, 6):
        assert index.row_of(tmp_path / names[row]) == row and index.ids[row] == names[row]
    assert index.row_of(tmp_path / "feats" / "missing.jpg") is None


def test_a_collection_dropped_under_a_reader_is_one_error_naming_it(tmp_path):
    from unicom_cli.index.backends.milvus import MilvusUnavailable

    x = clustered(100, 8, seed=10)
    npy = write_features(tmp_path, "feats", x)
    ref = f"milvus:{tmp_path}/g.db#gone"
    assert main(["index", str(npy), "-o", ref, "--index", "flat"]) == 0
    index = _load(ref)
    index.client.drop_collection("gone")  # as another client of the same database would
    with pytest.raises(MilvusUnavailable, match="g.db#gone: Milvus error"):
        index.search(x[:2], 3)


def test_the_server_route_builds_adds_and_searches(tmp_path, capsys, monkeypatch):
    """http:// to a Milvus server: the same code as the embedded engine, several clients at once."""
    from tests.milvus_server import milvus_server

    x = clustered(3000, 32, seed=11)
    first = write_features(tmp_path / "a", "first", x[:2500])
    second = write_features(tmp_path / "b", "second", x[2500:])
    monkeypatch.setenv("UNICOM_MILVUS_TOKEN", "root:Milvus")
    with milvus_server(tmp_path / "server-data") as uri:
        ref = f"milvus:{uri}#remote"
        assert main(["index", str(first), "--backend", "milvus", "--uri", uri, "--collection", "remote",
                     "--index", "ivf", "--target-recall", "0.9"]) == 0
        assert main(["index", "--add", str(second), ref]) == 0
        reader, other = _load(ref), _load(ref)  # two clients of one server (no per-file lock)
        assert len(reader) == 3000 and reader.meta["milvus_index"]["index_type"] == "IVF_FLAT"
        assert reader.meta["recall_reached"] and len(reader.meta["sources"]) == 2
        queries = clustered(30, 32, seed=12)
        _, rows = reader.search(queries, 10, params={"nprobe": reader.meta["milvus_index"]["params"]["nlist"]})
        assert np.array_equal(rows, exact_topk(queries, x, 10)[0])  # every list probed: exact
        assert np.array_equal(other.search(queries, 5)[1], reader.search(queries, 5)[1])
        reader.close()
        other.close()
        capsys.readouterr()
        err = _one_line_exit_2(main(["index", str(first), "-o", ref]), capsys)
        assert f"{ref} already exists" in err and "root:Milvus" not in err
