"""`unicom demo` in a reduced setting (few digits, one epoch), and the digits tree it writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_digits_tree_splits_by_class_and_is_seeded(tmp_path):
    from unicom_cli.data.digits import write_digits_tree

    tree = write_digits_tree(tmp_path / "a", size=24, limit_per_class=6, shift=2, noise=0.3, seed=1)
    assert sorted(p.name for p in tree.train.iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in tree.test.iterdir()) == ["5", "6", "7", "8", "9"]
    assert tree.count == 60
    assert len(list(tree.test.rglob("*.png"))) == 30
    # kNN halves partition the test classes: 3 + 3 images per class.
    assert len(list(tree.knn_train.rglob("*.png"))) == len(list(tree.knn_val.rglob("*.png"))) == 15
    image = Image.open(next(tree.train.rglob("*.png")))
    assert image.size == (24, 24) and image.mode == "L"
    again = write_digits_tree(tmp_path / "b", size=24, limit_per_class=6, shift=2, noise=0.3, seed=1)
    for a, b in zip(sorted(tree.root.rglob("*.png")), sorted(again.root.rglob("*.png"))):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def _recall_at_1(arch: Path, weights: Path | None, folder: Path, precision: str):
    """Independent Recall@1 in percent: one image at a time, float64 cosine, the query excluded.
    ``weights`` None: the demo's seeded random init (seed 0, its default)."""
    from tests.cli.test_eval_model import _reference_features
    from unicom_cli.models.factory import create_model

    loaded = create_model(str(arch), weights, pretrained=weights is not None, seed=0, device="cpu",
                          precision=precision)
    paths = sorted(folder.glob("*/*.png"))
    feats, ok = _reference_features([str(p) for p in paths], loaded)
    assert ok.all()
    labels = np.array([int(p.parent.name) for p in paths])
    x = feats.astype(np.float64) / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return pytest.approx(100 * np.mean(labels[sims.argmax(1)] == labels), abs=1e-9)


@pytest.mark.slow
def test_demo_runs_every_step_and_reports_before_and_after(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "unicom_cli", "demo", "-o", str(out), "--epochs", "1",
         "--limit-per-class", "12", "--batch-size", "16"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Each step is shown as the exact command it runs.
    for command in ("$ unicom eval-retrieval", "$ unicom eval-knn", "$ unicom finetune", "$ unicom embed",
                    "$ unicom index", "$ unicom search"):
        assert command in proc.stdout
    for tag, weights in (("before", None), ("after", out / "finetune" / "model.pt")):
        retrieval = json.loads((out / f"retrieval-{tag}.json").read_text())
        assert retrieval["metrics"]["recall@1"] == _recall_at_1(
            out / "demo-vit.json", weights, out / "digits" / "test", retrieval["precision"])
        knn = json.loads((out / f"knn-{tag}.json").read_text())
        assert set(knn["metrics"]) == {"10", "20"}
    assert (out / "finetune" / "model.pt").is_file()
    features = np.load(out / "features" / "test.npy")
    assert features.shape == (60, 64)  # 12 images of each of the digits 5-9, 64-dim demo ViT
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    assert Image.open(out / "retrieval.jpg").size[0] > 0
    assert "Recall@1" in proc.stdout and "gain" in proc.stdout
    _check_index_and_search(out, features, proc.stdout)


def _check_index_and_search(out: Path, features: np.ndarray, stdout: str) -> None:
    """The index holds every embedded digit; each query (a test digit, so itself in the index)
    finds itself first, and every score is the float64 cosine of the embed rows."""
    meta = json.loads((out / "digits.index" / "index.json").read_text())
    assert meta["count"] == features.shape[0]
    ids = (out / "features" / "test.ids.txt").read_text().splitlines()
    row_of = {name: row for row, name in enumerate(ids)}
    x = features.astype(np.float64)
    with open(out / "search.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    queries = sorted({r["query"] for r in records})
    # One query per unseen class, the first image of its folder.
    assert [Path(q).parent.name for q in queries] == ["5", "6", "7", "8", "9"]
    for query in queries:
        mine = sorted((r for r in records if r["query"] == query), key=lambda r: int(r["rank"]))
        assert [int(r["rank"]) for r in mine] == [1, 2, 3, 4, 5]
        own = Path(query).relative_to(out / "digits" / "test").as_posix()
        assert mine[0]["id"] == own
        assert float(mine[0]["score"]) == pytest.approx(1.0, abs=1e-4)
        sims = x @ x[row_of[own]]
        expected = np.sort(sims)[::-1][:5]
        got = [float(r["score"]) for r in mine]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        for r in mine:
            assert float(r["score"]) == pytest.approx(sims[row_of[r["id"]]], abs=1e-4)
    page = (out / "search.html").read_text()
    assert page.count("data:image") >= len(queries) * 6  # each query and its 5 neighbours
    summary = stdout[stdout.rindex("Recall@1"):]  # the final summary, after the before/after table
    for name in ("retrieval.jpg", "digits.index", "search.csv", "search.html"):
        assert f"wrote {out / name}" in summary
