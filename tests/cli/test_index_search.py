"""`unicom index` and `unicom search` end to end: real photos, a tiny model, real files; bad input exits 2."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.index.conftest import clustered, exact_topk, one_thread, write_features  # noqa: F401
from unicom_cli.cli.app import main


@pytest.fixture
def photos(tmp_path):
    """Nine real photos (skimage, sklearn) in nested folders, one exact re-save, one broken file."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera(),
              *load_sample_images().images]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, arr in enumerate(arrays):
        img = Image.fromarray(arr).convert("RGB")
        img.thumbnail((96, 96))
        img.save(folder / ("sub" if i % 2 else "") / f"p{i}.jpg", quality=95)
    Image.open(folder / "p0.jpg").save(folder / "p0_copy.png")  # the same pixels, another file
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return folder


@pytest.fixture
def built(photos, tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    """An index built from the photo folder (embedded first)."""
    out = tmp_path / "photos.index"
    assert main(["index", str(photos), "-o", str(out), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Flat" in printed and "recall@10" in printed and "wrote" in printed
    return out


def _feats(index_dir):
    """The embed output the index was built from (rows in ids order)."""
    npy = index_dir.parent / f"{index_dir.name}.features" / "feats.npy"
    ids = npy.with_suffix(".ids.txt").read_text().splitlines()
    return np.load(npy), ids


def test_index_folder_then_search_images(built, photos, tmp_path, capsys):
    meta = json.loads((built / "index.json").read_text())
    assert meta["count"] == 8 and meta["factory"] == "Flat" and meta["normalized"] is True
    assert meta["root"] == str(photos.resolve()) and meta["weights_sha256"]
    for key in ("model", "dim", "num_feat", "search_params", "recall_at_10", "input_size"):
        assert key in meta
    feats, ids = _feats(built)
    assert (built / "ids.txt").read_text().splitlines() == ids and "broken.jpg" not in ids
    out = tmp_path / "r.csv"
    query = photos / "sub" / "p1.jpg"
    assert main(["search", str(built), str(query), str(photos / "broken.jpg"), "-k", "3",
                 "--exclude-self", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    rows = out.read_text().splitlines()
    assert rows[0] == "query,rank,id,row,score" and len(rows) == 4
    # independent: the query's own row from the embed output, numpy exact search without it
    own = ids.index("sub/p1.jpg")
    truth, sims = exact_topk(feats[own:own + 1], feats, 3, exclude=np.array([own]))
    got = [line.split(",") for line in rows[1:]]
    assert [g[2] for g in got] == [ids[t] for t in truth[0]]
    np.testing.assert_allclose([float(g[4]) for g in got], sims[0], atol=1e-5)
    assert "sub/p1.jpg" in captured.out or "p1.jpg" in captured.out


def test_index_a_folder_with_a_random_network(photos, tmp_path, tiny_spec_file, capsys):
    """`--random-init --seed` as in embed: the seed is recorded and search re-creates the same network."""
    out = tmp_path / "r.index"
    assert main(["index", str(photos), "-o", str(out), "--model", str(tiny_spec_file), "--random-init",
                 "--seed", "3", "--workers", "0"]) == 0
    meta = json.loads((out / "index.json").read_text())
    feats, ids = _feats(out)
    assert meta["random_init_seed"] == 3 and meta["count"] == len(ids) == len(feats) == 8  # broken.jpg skipped
    capsys.readouterr()
    assert main(["search", str(out), str(photos / "p0.jpg"), "-k", "2", "-o", str(tmp_path / "r.csv")]) == 0
    rows = (tmp_path / "r.csv").read_text().splitlines()[1:]
    assert {r.split(",")[2] for r in rows} == {"p0.jpg", "p0_copy.png"}  # itself and its re-save


def test_query_embedding_equals_the_indexed_row(built, photos):
    from unicom_cli.index import Index

    index = Index.load(built)
    feats, ids = _feats(built)
    embedder = index.embedder()
    path = photos / "p2.jpg"
    by_path = embedder.embed_paths([path]).vectors[0]
    by_bytes = embedder([path.read_bytes()])[0]
    by_array = embedder([np.asarray(Image.open(path).convert("RGB"))])[0]
    row = feats[ids.index("p2.jpg")]
    np.testing.assert_allclose(by_path, row, atol=1e-5)
    np.testing.assert_allclose(by_bytes, row, atol=1e-5)
    np.testing.assert_allclose(by_array, row, atol=1e-5)
    scores, rows = index.search([path], 2)
    assert index.ids[rows[0, 0]] == "p2.jpg" and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_html_and_png_show_every_result(built, photos, tmp_path):
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    jsonl = tmp_path / "r.jsonl"
    assert main(["search", str(built), str(photos / "sub"), "-k", "4", "--vis", str(html),
                 "-o", str(jsonl)]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    page = html.read_text()
    queries = {r["query"] for r in records}
    assert len(records) == 4 * len(queries) and len(queries) == 3
    for rec in records:
        assert rec["id"] in page and f"{rec['score']:.4f}" in page
    uris = re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', page)
    assert len(uris) == len(records) + len(queries)  # every query and result has its thumbnail
    for uri in uris:
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).verify()
    assert "http" not in page.replace("https://", "").lower() or "src=\"http" not in page
    assert main(["search", str(built), str(photos / "p0.jpg"), "-k", "2", "--vis", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 2 * 128


def test_parquet_and_vectors_query(built, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    feats, ids = _feats(built)
    q = tmp_path / "q.npy"
    np.save(q, feats[[0, 5]] * 3.0)  # un-normalised vectors: normalised like the index
    out = tmp_path / "r.parquet"
    assert main(["search", str(built), str(q), "-k", "2", "-o", str(out)]) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["query", "rank", "id", "row", "score"] and len(frame) == 4
    assert frame["id"].iloc[0] == ids[0] and frame["id"].iloc[2] == ids[5]


def test_duplicates_groups_match_connected_components(built, tmp_path, capsys):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    feats, ids = _feats(built)
    threshold = 0.999
    out = tmp_path / "d.csv"
    assert main(["search", str(built), "--duplicates", "--threshold", str(threshold), "-o", str(out)]) == 0
    sims = feats.astype(np.float64) @ feats.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    n, labels = connected_components(csr_matrix(sims >= threshold), directed=False)
    expected = sorted(sorted(ids[i] for i in np.flatnonzero(labels == c)) for c in range(n)
                      if (labels == c).sum() > 1)
    import csv

    with open(out) as handle:
        got: dict[str, list[str]] = {}
        for rec in csv.DictReader(handle):
            got.setdefault(rec["group"], []).append(rec["id"])
    assert sorted(sorted(v) for v in got.values()) == expected
    assert ["p0.jpg", "p0_copy.png"] in expected  # the re-saved photo is found
    assert "exact all-vs-all" in capsys.readouterr().out


def test_add_a_second_collection(built, photos, tmp_path, tiny_spec_file, tiny_checkpoint):
    more = tmp_path / "more"
    more.mkdir()
    Image.open(photos / "sub" / "p3.jpg").rotate(90).save(more / "r3.jpg")
    assert main(["index", "--add", str(more), str(built), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint)]) == 0
    ids = (built / "ids.txt").read_text().splitlines()
    assert len(ids) == 9 and ids[-1] == "../more/r3.jpg"
    from unicom_cli.index import Index

    index = Index.load(built)
    assert index.path_of(8).resolve() == (more / "r3.jpg").resolve()


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("case", ["missing_faiss", "corrupt_faiss", "ids_rows", "wrong_dim", "bad_images",
                                  "k_too_large", "no_index", "bad_output_suffix"])
def test_bad_input_exits_2_and_writes_nothing(case, built, photos, tmp_path, capsys):
    out = tmp_path / "r.csv"
    query = [str(photos / "p0.jpg")]
    k = "3"
    expect: tuple = ()
    if case == "missing_faiss":
        (built / "index.faiss").unlink()
        expect = ("index.faiss", "missing")
    elif case == "corrupt_faiss":
        (built / "index.faiss").write_bytes(b"\x00garbage" * 10)
        expect = ("index.faiss", "recorded at build time")
    elif case == "ids_rows":
        (built / "ids.txt").write_text("a.jpg\n")
        expect = ("ids.txt", "recorded at build time")
    elif case == "wrong_dim":
        np.save(tmp_path / "q.npy", np.ones((2, 5), np.float32))
        query = [str(tmp_path / "q.npy")]
        expect = ("q.npy", "5-dim")
    elif case == "bad_images":
        query = [str(photos / "broken.jpg")]
        expect = ("broken.jpg", "no query could be read")
    elif case == "k_too_large":
        k = "9"
        expect = ("-k 9", "8 vectors")
    elif case == "no_index":
        built = tmp_path / "nowhere.index"
        expect = ("nowhere.index", "no such index")
    else:
        out = tmp_path / "r.txt"
        expect = ("r.txt", ".csv")
    assert main(["search", str(built), *query, "-k", k, "-o", str(out)]) == 2
    _one_line_error(capsys, *expect)
    assert not out.exists() and not list(tmp_path.glob(".r.*"))


def test_index_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    assert main(["index", str(bad), "-o", str(tmp_path / "a.index")]) == 2
    _one_line_error(capsys, "bad.npy")
    x = clustered(50, 8)
    x[7, 3] = np.nan
    npy = write_features(tmp_path / "f", "nan", x)
    assert main(["index", str(npy), "-o", str(tmp_path / "b.index")]) == 2
    _one_line_error(capsys, "nan.npy", "row 7")
    good = write_features(tmp_path / "g", "g", clustered(50, 8))
    (tmp_path / "g" / "g.ids.txt").write_text("one\n")
    assert main(["index", str(good), "-o", str(tmp_path / "c.index")]) == 2
    _one_line_error(capsys, "g.ids.txt", "1 ids for 50 rows")
    assert main(["index", str(npy), "-o", str(tmp_path / "d.index"), "--max-memory", "lots"]) == 2
    _one_line_error(capsys, "--max-memory")
    assert not any(p.name.endswith(".index") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_two_processes_give_the_same_index_as_one(tmp_path):
    from unicom_cli.index import Index

    x = clustered(3000, 16, seed=11)
    npy = write_features(tmp_path / "f", "feats", x)
    common = ["--index", "IVF32,Flat", "--chunk-rows", "256"]
    assert main(["index", str(npy), "-o", str(tmp_path / "one.index"), *common]) == 0
    assert main(["index", str(npy), "-o", str(tmp_path / "two.index"), "--procs", "2", *common]) == 0
    # on disk: each process spills parts (a 64 KiB budget), the first merges them into index.ivfdata
    assert main(["index", str(npy), "-o", str(tmp_path / "disk.index"), "--procs", "2", "--on-disk",
                 "--max-memory", "64K", *common]) == 0
    one, two = Index.load(tmp_path / "one.index"), Index.load(tmp_path / "two.index")
    disk = Index.load(tmp_path / "disk.index")
    assert one.ids == two.ids == disk.ids and one.meta["search_params"] == two.meta["search_params"]
    assert disk.meta["on_disk"] and (tmp_path / "disk.index" / "index.ivfdata").is_file()
    for params in ({"nprobe": 1}, {"nprobe": 4}):
        s1, r1 = one.search(x[::7], 10, params=params)
        for other in (two, disk):
            s2, r2 = other.search(x[::7], 10, params=params)
            assert np.array_equal(r1, r2) and np.array_equal(s1, s2)


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_killed_build_leaves_no_half_index(existing, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from unicom_cli.index import Index

    x = clustered(60000, 32, seed=2)
    npy = write_features(tmp_path / "f", "feats", x)
    out = tmp_path / "p.index"
    if existing:
        small = write_features(tmp_path / "s", "small", x[:500])
        assert main(["index", str(small), "-o", str(out), "--index", "flat"]) == 0
    args = [sys.executable, "-m", "unicom_cli", "index", str(npy), "-o", str(out), "--index", "IVF256,Flat",
            "--chunk-rows", "1000", "--overwrite"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".p.index.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if existing:  # the old index is untouched and loads
        assert len(Index.load(out)) == 500
    else:
        assert not out.exists()
    assert main(["index", str(npy), "-o", str(out), "--index", "IVF64,Flat", "--overwrite"]) == 0
    assert len(Index.load(out)) == 60000
    assert not list(tmp_path.glob(".p.index.tmp-*"))
