"""`unicom eval-retrieval` end to end on real digits with raw-pixel features (no model)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from unicom_cli.cli.app import app


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits tree (PNG) and a raw-pixel feature file for its test folder, ids as `embed` writes them."""
    from sklearn.datasets import load_digits

    from unicom_cli.data.digits import write_digits_tree

    root = tmp_path_factory.mktemp("digits")
    tree = write_digits_tree(root / "tree", size=16, limit_per_class=60)
    data = load_digits().data.astype(np.float32)
    ids = sorted(p.relative_to(tree.test).as_posix() for p in tree.test.rglob("*.png"))
    feats = np.stack([data[int(i.split("/")[1][:4])] for i in ids])
    np.save(root / "feats.npy", feats)
    (root / "feats.ids.txt").write_text("\n".join(ids) + "\n")
    return tree, root / "feats.npy", ids, feats


def independent_recall1(feats, labels):
    x = feats.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return 100 * np.mean(labels[s.argmax(1)] == labels)


def test_digits_recall_at_1_equals_numpy(digits, tmp_path):
    tree, npy, ids, feats = digits
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval-retrieval", "--dataset", f"folder:{tree.test}", "--embeddings", str(npy),
                                   "--recall-at", "1,2", "--recall-at", "8", "--json", str(out),
                                   "--vis", str(tmp_path / "v.jpg")])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    labels = np.array([int(i.split("/")[0]) for i in ids])
    assert r["metrics"]["recall@1"] == pytest.approx(independent_recall1(feats, labels), abs=1e-9)
    assert 80 < r["metrics"]["recall@1"] < r["metrics"]["recall@8"] <= 100
    assert set(r["metrics"]) == {"recall@1", "recall@2", "recall@8", "map@r"}
    assert r["sizes"] == {"images": 300, "classes": 5} and r["skipped"] == 0 and r["model"] is None
    assert "recall@1" in res.output
    from PIL import Image

    from unicom_cli.pipelines.vis import grid_size

    with Image.open(tmp_path / "v.jpg") as im:
        assert im.size == grid_size(6, 1 + 5, notes=1, labels=True)  # query + top 5; the class known
        px = np.asarray(im.convert("RGB"))
    green = (px[..., 1] > 140) & (px[..., 0] < 80)
    assert green.sum() > 1000  # hit borders drawn


def test_backends_equal_and_num_feat_and_save_features(digits, tmp_path):
    tree, npy, ids, feats = digits
    outs = {}
    for backend in ("faiss", "torch"):
        outs[backend] = tmp_path / f"{backend}.json"
        res = CliRunner().invoke(app, ["eval-retrieval", "--dataset", f"folder:{tree.test}", "--embeddings", str(npy),
                                       "--backend", backend, "--num-feat", "40", "--json", str(outs[backend]),
                                       "--save-features", str(tmp_path / "saved")])
        assert res.exit_code == 0, res.output
    a, b = (json.loads(p.read_text())["metrics"] for p in outs.values())
    assert a == b
    saved = np.load(tmp_path / "saved" / "folder-test.npy")
    assert saved.shape == feats.shape  # un-normalised, all dims: reusable
    np.testing.assert_array_equal(saved, feats)


def test_query_gallery_and_missing_embeddings_are_skipped(digits, tmp_path):
    tree, npy, ids, feats = digits
    # Queries from knn/val, gallery from knn/train: the features file was made from `test` and
    # lists every one of these images (same file names) except the ones we drop below.
    keep = ids[5:]
    np.save(tmp_path / "f.npy", feats[5:])
    (tmp_path / "f.ids.txt").write_text("\n".join(keep) + "\n")
    out = tmp_path / "qg.json"
    res = CliRunner().invoke(app, ["eval-retrieval", "--query", str(tree.knn_val), "--gallery", str(tree.knn_train),
                                   "--embeddings", str(tmp_path / "f.npy"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["skipped"] == 5 and r["sizes"]["queries"] + r["sizes"]["gallery"] == 295
    assert set(r["metrics"]) == {"recall@1", "recall@5", "recall@10"}


def test_errors_are_one_line_messages(tmp_path):
    from unicom_cli.cli.app import main

    assert main(["eval-retrieval", "--dataset", "sop", "--data-root", str(tmp_path), "--embeddings", "x.npy"]) == 2
    assert main(["eval-retrieval", "--dataset", "cub", "--split", "nope"]) == 2
    assert main(["eval-retrieval", "--dataset", "nope", "--embeddings", "x.npy"]) == 2


def test_gldv2_map_at_100_per_split(tmp_path):
    """GLDv2 layout on disk, random features: mAP@100 equals an independent ranking + AP."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "GLDv2"
    index_ids = [f"{i:03x}{'abcdef'[i % 6]}9" for i in range(150)]
    queries = [(f"q{j}x{j}", rng.choice(150, size=rng.integers(1, 4), replace=False), "Public" if j % 2 else "Private")
               for j in range(12)]
    rows = ["id,images,Usage"] + [f"{q},{' '.join(index_ids[i] for i in rel)},{u}" for q, rel, u in queries]
    rows.append("zzz9,None,Ignored")
    (root / "test").mkdir(parents=True)
    (root / "index").mkdir()
    (root / "test" / "retrieval_solution_v2.1.csv").write_text("\n".join(rows) + "\n")
    (root / "index" / "index.csv").write_text("id\n" + "\n".join(index_ids) + "\n")
    for q, _, _ in queries:
        path = root / "test" / q[0] / q[1] / q[2] / f"{q}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)
    g = rng.normal(size=(150, 16)).astype(np.float32)
    qf = np.stack([g[rel].mean(0) + rng.normal(scale=0.8, size=16) for _, rel, _ in queries]).astype(np.float32)
    ids = [f"test/{q[0]}/{q[1]}/{q[2]}/{q}.jpg" for q, _, _ in queries] + \
          [f"index/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in index_ids]
    np.save(tmp_path / "f.npy", 3 * np.concatenate([qf, g]))  # un-normalised on purpose
    (tmp_path / "f.ids.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "g.json"
    res = CliRunner().invoke(app, ["eval-retrieval", "--dataset", "gldv2", "--data-root", str(tmp_path),
                                   "--embeddings", str(tmp_path / "f.npy"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = {"public": [], "private": []}
    for (_q, rel, usage), v in zip(queries, qf):
        ranking = np.argsort(-(gn @ (v / np.linalg.norm(v))), kind="stable")[:100]
        hits = np.isin(ranking, rel)
        ap = sum(hits[:i + 1].sum() / (i + 1) for i in range(100) if hits[i]) / min(len(rel), 100)
        expected[usage.lower()].append(ap)
    assert r["metrics"]["map@100_public"] == pytest.approx(100 * np.mean(expected["public"]))
    assert r["metrics"]["map@100_private"] == pytest.approx(100 * np.mean(expected["private"]))
    assert 0 < r["metrics"]["map@100_public"] < 100 and r["sizes"] == {"queries": 12, "gallery": 150}
    res = CliRunner().invoke(app, ["eval-retrieval", "--dataset", "gldv2", "--data-root", str(tmp_path),
                                   "--split", "public", "--embeddings", str(tmp_path / "f.npy"), "--json", str(out),
                                   "--overwrite"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())["metrics"]) == {"map@100_public"}
