"""Building and querying indexes: recall of every kind against numpy exact search, --add, choices, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.index.conftest import clustered, exact_topk, write_features
from unicom_cli.errors import InputError, OutputExists, UsageError
from unicom_cli.index import Index, build_index
from unicom_cli.index.choose import choose_index, memory_of, nlist_for, parse_memory


def _recall(index: Index, x: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    truth, _ = exact_topk(x[queries], x, k, exclude=queries)
    _, rows = index.search(x[queries], k, exclude=queries)
    return float(np.mean([len(set(a) & set(b)) for a, b in zip(rows.tolist(), truth.tolist())])) / k


@pytest.mark.parametrize("kind, factory", [("flat", "Flat"), ("hnsw", "HNSW32,Flat"),
                                           ("ivf", "IVF"), ("IVF32,PQ8x4", "PQ8x4")])
def test_recall_of_each_kind_against_numpy(kind, factory, tmp_path):
    # IVF + PQ with 4-bit codes: the same family as --index ivfpq (whose 8-bit codebooks take
    # minutes of k-means on this tiny machine); auto's choice of it is tested below.
    dim = 16 if "PQ" in kind else 32
    x = clustered(3000, dim)
    npy = write_features(tmp_path / "f", "feats", x)
    summary = build_index(npy, tmp_path / f"{kind}.index", index=kind, progress=False, held_out=300)
    index = Index.load(tmp_path / f"{kind}.index")
    assert factory in index.meta["factory"] and len(index) == 3000 and index.dim == dim
    queries = np.random.default_rng(1).choice(3000, 200, replace=False)  # other rows than tuning's
    recall = _recall(index, x, queries)
    assert abs(recall - summary.tuning.recall) < 0.05  # the recorded recall is what users get
    if kind in ("flat", "hnsw", "ivf"):
        assert recall >= 0.93
    else:  # 4-byte codes lose detail: the best setting is recorded, and it is what we measure
        assert recall >= 0.3
    meta = json.loads((tmp_path / f"{kind}.index" / "index.json").read_text())
    assert meta["recall_at_10"] == round(summary.tuning.recall, 4)
    assert meta["count"] == 3000 and meta["model"] == "tiny" and meta["normalized"] is True
    if kind == "ivf":
        assert meta["search_params"]["nprobe"] >= 1 and meta["recall_reached"] is True


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "OPQ8_64,IVF16_HNSW32,PQ8"])
def test_ivfpq_skips_polysemous_training(factory):
    """faiss's factory turns on polysemous training (minutes of simulated annealing that our search
    never uses); it must be off behind every wrapper (OPQ, HNSW coarse quantizer)."""
    import faiss

    from unicom_cli.index.build import index_from_factory

    assert faiss.downcast_index(faiss.extract_index_ivf(faiss.index_factory(64, factory))).do_polysemous_training
    index = index_from_factory(factory, 64)
    assert faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training is False


def test_flat_equals_numpy_exactly(tmp_path):
    x = clustered(500, 16, seed=3)
    npy = write_features(tmp_path / "f", "feats", x)
    build_index(npy, tmp_path / "i", index="flat", progress=False)
    index = Index.load(tmp_path / "i")
    truth, sims = exact_topk(x[:50], x, 5)
    scores, rows = index.search(x[:50], 5)
    assert np.array_equal(rows, truth)
    np.testing.assert_allclose(scores, sims, atol=1e-5)
    assert index.ids[int(rows[3, 0])] == "feats/img_00003.jpg"
    assert index.root == (tmp_path / "f").resolve()


def test_non_utf8_and_control_character_names_keep_their_rows(tmp_path):
    """Ids are written as embed writes them (a Latin-1 name as its own bytes): the index reads and
    writes them the same way, so the name still opens its file and no row shifts."""
    import os

    x = clustered(60, 16, seed=5)
    npy = write_features(tmp_path / "f", "feats", x)
    names = [f"img_{i:05d}.jpg" for i in range(len(x))]
    names[7] = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8: a surrogate escape, as embed reads it
    names[8] = "form\x0cfeed\u2028.jpg"  # characters str.splitlines() would split on
    with open(tmp_path / "f" / "feats.ids.txt", "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write("".join(n + "\n" for n in names))
    for name in names[7:9]:
        (tmp_path / "f" / name).write_bytes(b"x")
    build_index(npy, tmp_path / "i", index="flat", progress=False)
    index = Index.load(tmp_path / "i")
    assert index.ids == names
    scores, rows = index.search(x[7:9], 1)
    assert [index.ids[int(r)] for r in rows[:, 0]] == names[7:9]
    assert all((index.root / index.ids[int(r)]).is_file() for r in rows[:, 0])


def test_unnormalized_features_are_normalized(tmp_path):
    x = clustered(300, 16) * np.random.default_rng(0).uniform(0.5, 3, size=(300, 1)).astype(np.float32)
    npy = write_features(tmp_path / "f", "feats", x, normalized=False)
    build_index(npy, tmp_path / "i", index="flat", progress=False)
    index = Index.load(tmp_path / "i")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    truth, sims = exact_topk(unit[:20], unit, 3)
    scores, rows = index.search(unit[:20], 3)
    assert np.array_equal(rows, truth) and index.meta["normalized"] is True
    np.testing.assert_allclose(scores, sims, atol=1e-5)


def test_add_appends_and_equals_one_build(tmp_path):
    x = clustered(1200, 16, seed=5)
    a = write_features(tmp_path / "a", "a", x[:700])
    b = write_features(tmp_path / "b", "b", x[700:])
    build_index(a, tmp_path / "i", index="flat", progress=False)
    summary = build_index(b, tmp_path / "i", index="flat", add=True, progress=False)
    assert summary.count == 1200 and summary.added == 500
    index = Index.load(tmp_path / "i")
    truth, _ = exact_topk(x[::37], x, 10)
    _, rows = index.search(x[::37], 10)
    assert np.array_equal(rows, truth)
    # ids of the added collection stay resolvable from the index root
    assert (index.root / index.ids[700]).resolve() == (tmp_path / "b" / "b" / "img_00000.jpg").resolve()
    assert [s["count"] for s in index.meta["sources"]] == [700, 500]


@pytest.mark.parametrize("change, word", [({"model": "other"}, "model"), ({"normalized": False}, "normalisation"),
                                          ({"dim": 8}, "dimension"), ({"num_feat": 8}, "num_feat"),
                                          ({"sha": "b" * 64}, "weights")])
def test_add_refuses_another_model_dim_or_normalisation(change, word, tmp_path):
    x = clustered(400, 16)
    build_index(write_features(tmp_path / "a", "a", x), tmp_path / "i", index="flat", progress=False)
    before = (tmp_path / "i" / "index.faiss").read_bytes()
    y = clustered(50, change.get("dim", 16), seed=9)
    kwargs = {k: v for k, v in change.items() if k != "dim"}
    npy = write_features(tmp_path / "b", "b", y, **kwargs)
    with pytest.raises(InputError, match=word):
        build_index(npy, tmp_path / "i", add=True, progress=False, normalize=False)
    assert (tmp_path / "i" / "index.faiss").read_bytes() == before


def test_on_disk_lists_answer_as_the_in_memory_index(tmp_path, capfd):
    """--on-disk: parts spilled under a tiny budget, merged into index.ivfdata and memory-mapped
    give the in-memory index's rows and scores exactly, after a build and after --add."""
    x = clustered(3000, 16, seed=7)
    a = write_features(tmp_path / "a", "a", x[:2000])
    b = write_features(tmp_path / "b", "b", x[2000:])
    opts = dict(index="IVF32,Flat", progress=False, chunk_rows=128, held_out=200)
    build_index(a, tmp_path / "mem", **opts)
    summary = build_index(a, tmp_path / "disk", on_disk=True, max_memory=64 << 10, **opts)
    disk_files = sorted(p.name for p in (tmp_path / "disk").iterdir())
    assert disk_files == ["ids.txt", "index.faiss", "index.ivfdata", "index.json"]
    ivfdata = (tmp_path / "disk" / "index.ivfdata").stat().st_size
    assert ivfdata == 2000 * (16 * 4 + 8)  # every vector and its id, in the lists file
    assert summary.index_bytes > ivfdata > 10 * (tmp_path / "disk" / "index.faiss").stat().st_size
    for step in ("build", "add"):
        mem, disk = Index.load(tmp_path / "mem"), Index.load(tmp_path / "disk", mmap=True)
        assert disk.meta["on_disk"] is True and mem.meta["on_disk"] is False and disk.ids == mem.ids
        for params in ({"nprobe": 1}, {"nprobe": 5}):
            s1, r1 = mem.search(x[::9], 10, params=params)
            s2, r2 = disk.search(x[::9], 10, params=params)
            assert np.array_equal(r1, r2) and np.array_equal(s1, s2)
        if step == "build":
            del mem, disk
            build_index(b, tmp_path / "mem", add=True, **opts)
            build_index(b, tmp_path / "disk", add=True, max_memory=64 << 10, **opts)  # stays on disk
    assert len(disk) == 3000 and not list(tmp_path.glob(".disk.tmp-*"))
    assert "resizing" not in capfd.readouterr().out  # faiss's printf is kept off our output


def test_on_disk_refusals_and_damage(tmp_path):
    npy = write_features(tmp_path / "f", "feats", clustered(1000, 16))
    with pytest.raises(UsageError, match="HNSW32,Flat has no inverted lists"):
        build_index(npy, tmp_path / "h", index="hnsw", on_disk=True, progress=False)
    small = write_features(tmp_path / "s", "small", clustered(100, 16))
    with pytest.raises(UsageError, match="too few for an IVF index"):
        build_index(small, tmp_path / "s.index", on_disk=True, progress=False)
    assert choose_index(5_000, 512, 8 << 30, on_disk=True).kind == "ivf"  # never flat on disk
    summary = build_index(npy, tmp_path / "i", on_disk=True, progress=False, held_out=100)
    assert summary.choice.kind == "ivf"
    folder = tmp_path / "i"
    data = (folder / "index.ivfdata").read_bytes()
    (folder / "index.ivfdata").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="index.ivfdata: .* bytes, the index needs .*truncated"):
        Index.load(folder)
    (folder / "index.ivfdata").unlink()
    with pytest.raises(InputError, match="index.ivfdata: missing"):
        Index.load(folder)


def test_gpu_route_builds_the_same_index(tmp_path, monkeypatch):
    """The faiss-gpu route (k-means and list assignment on a GPU index) with a CPU index standing
    in for the GPU copy: the same lists as the CPU route, and the real quantizer is put back."""
    import faiss

    import unicom_cli.index.fill as fill

    x = clustered(3000, 16, seed=2)
    npy = write_features(tmp_path / "f", "feats", x)
    build_index(npy, tmp_path / "cpu", index="IVF32,Flat", progress=False, held_out=100)
    moved = []
    monkeypatch.setattr(fill, "_gpu", lambda device: (object(), 0))
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: moved.append(index) or index,
                        raising=False)  # faiss-cpu has no GPU functions
    build_index(npy, tmp_path / "gpu", index="IVF32,Flat", progress=False, held_out=100, device="cuda")
    assert len(moved) == 2  # the k-means index, then the centroids for the assignment
    cpu, gpu = Index.load(tmp_path / "cpu"), Index.load(tmp_path / "gpu")
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(gpu.faiss_index).quantizer)
    assert isinstance(quantizer, faiss.IndexFlatIP) and quantizer.ntotal == 32
    for nprobe in (1, 3):
        s1, r1 = cpu.search(x[::11], 10, params={"nprobe": nprobe})
        s2, r2 = gpu.search(x[::11], 10, params={"nprobe": nprobe})
        assert np.array_equal(r1, r2) and np.array_equal(s1, s2)


def test_existing_output_needs_overwrite_and_factory_errors(tmp_path):
    npy = write_features(tmp_path / "f", "feats", clustered(300, 16))
    build_index(npy, tmp_path / "i", index="flat", progress=False)
    with pytest.raises(OutputExists, match="--overwrite"):
        build_index(npy, tmp_path / "i", progress=False)
    with pytest.raises(UsageError, match="factory"):
        build_index(npy, tmp_path / "j", index="NotAnIndex", progress=False)
    with pytest.raises(UsageError, match="inverted lists"):
        build_index(npy, tmp_path / "j", index="IVF4096,Flat", progress=False)
    assert not (tmp_path / "j").exists()
    assert not list(tmp_path.glob(".j.tmp-*")) or all(not any(p.iterdir()) for p in tmp_path.glob(".j.tmp-*"))


def test_auto_choice_follows_size_and_memory():
    gib = 1 << 30
    assert choose_index(5_000, 512, 8 * gib).kind == "flat"
    mid = choose_index(1_000_000, 512, 16 * gib)
    assert mid.kind == "ivf" and mid.factory == f"IVF{nlist_for(1_000_000)},Flat"
    # the budget bounds the index: 1M full vectors with their ids and lists, 2.3 GiB, fit in 4 GiB
    assert memory_of("ivf", 1_000_000, 512, 4096) < 2.4 * gib
    assert choose_index(1_000_000, 512, 4 * gib).kind == "ivf"
    assert choose_index(1_000_000, 512, 2 * gib).kind == "ivfpq"
    big = choose_index(100_000_000, 512, 16 * gib)
    assert big.kind == "ivfpq" and big.memory_bytes <= 16 * gib and "_HNSW32" in big.factory
    m = int(big.factory.rsplit("PQ", 1)[1])
    assert memory_of("ivfpq", 100_000_000, 512, nlist_for(100_000_000), m) <= 16 * gib
    assert big.factory.startswith("OPQ") == (512 // m > 4)  # a rotation where sub-vectors are long
    tight = choose_index(100_000_000, 512, 8 * gib)
    assert int(tight.factory.rsplit("PQ", 1)[1]) < m and tight.factory.startswith("OPQ")
    with pytest.raises(UsageError, match="max-memory"):
        choose_index(100_000_000, 512, 256 << 20)
    assert parse_memory("1.5G") == int(1.5 * gib) and parse_memory("512M") == 512 << 20
    with pytest.raises(UsageError):
        parse_memory("lots")


def test_search_input_errors(tmp_path):
    x = clustered(100, 16)
    build_index(write_features(tmp_path / "f", "feats", x), tmp_path / "i", index="flat", progress=False)
    index = Index.load(tmp_path / "i")
    with pytest.raises(UsageError, match="larger than the index"):
        index.search(x[:2], 101)
    with pytest.raises(InputError, match="16-dim"):
        index.search(np.zeros((2, 8), np.float32), 3)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 16), np.nan, np.float32), 3)
    with pytest.raises(UsageError, match="unknown model .tiny."):
        index.search([tmp_path / "q.jpg"], 3)  # a model name without its architecture: cannot embed


@pytest.mark.parametrize("damage", ["no_faiss", "corrupt_faiss", "ids_rows", "no_json", "bad_json"])
def test_load_refuses_a_damaged_folder(damage, tmp_path):
    build_index(write_features(tmp_path / "f", "feats", clustered(100, 16)), tmp_path / "i",
                index="flat", progress=False)
    folder = tmp_path / "i"
    if damage == "no_faiss":
        (folder / "index.faiss").unlink()
    elif damage == "corrupt_faiss":
        (folder / "index.faiss").write_bytes(b"IxFl" + b"\x00" * 20)
    elif damage == "ids_rows":
        (folder / "ids.txt").write_text("only-one\n")
    elif damage == "no_json":
        (folder / "index.json").unlink()
    else:
        (folder / "index.json").write_text("{not json")
    with pytest.raises(InputError, match=str(folder)):
        Index.load(folder)


def test_public_api_export():
    import unicom_cli

    assert unicom_cli.Index is Index


def test_auto_falls_back_to_flat_without_cluster_structure(tmp_path):
    """Isotropic vectors: IVF would have to scan most lists, so auto builds exact Flat instead."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((25_000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    npy = write_features(tmp_path / "f", "iso", x)
    summary = build_index(npy, tmp_path / "i", progress=False, held_out=300)
    index = Index.load(tmp_path / "i")
    assert index.meta["factory"] == "Flat" and "nprobe" in index.meta["reason"]
    assert summary.tuning.recall == 1.0 and len(index) == 25_000
    truth, _ = exact_topk(x[:20], x, 10)
    assert np.array_equal(index.search(x[:20], 10)[1], truth)


def test_result_tables_keep_a_non_utf8_name(tmp_path):
    """csv and jsonl hold the name's own bytes (it still opens the file); parquet, UTF-8 only,
    gets \\xNN escapes; all three read back with every other field intact."""
    import csv
    import os

    import pandas as pd

    from unicom_cli.pipelines.search import write_table

    name = os.fsdecode(b'caf\xe9, "x".jpg')  # not UTF-8, with a comma and quotes
    (tmp_path / name).write_bytes(b"x")
    records = [{"query": "q.jpg", "rank": 1, "id": name, "row": 3, "score": 0.25},
               {"query": "q.jpg", "rank": 2, "id": "plain.jpg", "row": 0, "score": 0.125}]
    columns = ["query", "rank", "id", "row", "score"]
    text = {"encoding": "utf-8", "errors": "surrogateescape"}
    with open(write_table(tmp_path / "r.csv", records, columns), newline="", **text) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == [name, "plain.jpg"] and (tmp_path / rows[0]["id"]).is_file()
    assert [float(r["score"]) for r in rows] == [0.25, 0.125]
    with open(write_table(tmp_path / "r.jsonl", records, columns), **text) as fh:
        assert [json.loads(line) for line in fh] == records
    frame = pd.read_parquet(write_table(tmp_path / "r.parquet", records, columns))
    assert list(frame["id"]) == ['caf\\xe9, "x".jpg', "plain.jpg"] and list(frame["row"]) == [3, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_source_rows_read_from_the_file_equal_the_matrix(dtype, tmp_path, monkeypatch):
    """Sequential reads go through the file (not the map, which would keep every page resident):
    the same rows, as float32, for either stored dtype and any range."""
    from unicom_cli.index.source import open_source

    x = np.random.default_rng(0).standard_normal((700, 24)).astype(dtype)
    np.save(tmp_path / "a.npy", x)
    src = open_source(tmp_path / "a.npy", normalize=False)
    for start, stop in [(0, 700), (100, 357), (699, 700)]:
        block = src.rows(start, stop)
        assert block.dtype == np.float32 and np.array_equal(block, x[start:stop].astype(np.float32))
    import unicom_cli.index.source as source

    picks = np.sort(np.random.default_rng(1).choice(700, 300, replace=False))
    assert np.array_equal(src.rows_at(picks), x[picks].astype(np.float32))  # few rows: through the map
    monkeypatch.setattr(source, "SCATTERED_ROWS", 10)  # a sample: one pass over the file in windows
    monkeypatch.setattr(source, "CHUNK_ROWS", 128)  # of 128 rows, the last one short
    assert np.array_equal(src.rows_at(picks), x[picks].astype(np.float32))
    chunks = list(src.chunks(chunk_rows=256))
    assert [s for s, _ in chunks] == [0, 256, 512]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), x.astype(np.float32))
