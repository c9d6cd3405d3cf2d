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

    with Image.open(tmp_path / "v.jpg") as im:
        assert im.size == (6 * 128 + 6, 6 * 128)
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
    saved = np.load(tmp_path / "saved" / f"folder-test.npy")
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
