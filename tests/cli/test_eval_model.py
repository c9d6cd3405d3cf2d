"""eval-retrieval / eval-knn with a (tiny) model: features through the embed pipeline, end to end."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from unicom_cli.cli.app import app


def _reference_features(paths, loaded):
    """Independent features: PIL + the model's transform + forward, one image at a time."""
    import torch
    from PIL import Image

    rows, ok = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                x = loaded.transform(im.convert("RGB"))
            with torch.no_grad():
                rows.append(loaded.model(x[None].to(next(loaded.model.parameters()).device)).float().cpu().numpy()[0])
            ok.append(True)
        except OSError:
            rows.append(np.zeros(loaded.spec.embedding_size, np.float32))
            ok.append(False)
    return np.stack(rows).astype(np.float32), np.array(ok)


@pytest.mark.slow
def test_retrieval_and_knn_with_tiny_model(tiny_spec_file, tiny_checkpoint, tmp_path):
    from unicom_cli.data.digits import write_digits_tree
    from unicom_cli.models.factory import create_model

    tree = write_digits_tree(tmp_path / "d", size=32, limit_per_class=12)
    (tree.test / "7" / "zz_broken.png").write_bytes(b"not a png")
    model_args = ["--model", str(tiny_spec_file), "--weights", str(tiny_checkpoint), "--device", "cpu",
                  "--batch-size", "8", "--workers", "0"]
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval-retrieval", "--dataset", f"folder:{tree.test}", *model_args,
                                   "--json", str(out), "--save-features", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["model"] == "tiny" and len(r["sha256"]) == 64
    assert r["skipped"] == 1 and "zz_broken.png" in r["skipped_files"][0]
    assert r["sizes"] == {"images": 60, "classes": 5}

    loaded = create_model(str(tiny_spec_file), tiny_checkpoint, device="cpu")
    paths = sorted(p for p in tree.test.rglob("*.png") if "broken" not in p.name)
    feats, _ = _reference_features([str(p) for p in paths], loaded)
    labels = np.array([int(p.parent.name) for p in paths])
    x = feats.astype(np.float64) / np.linalg.norm(feats, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    assert r["metrics"]["recall@1"] == pytest.approx(100 * np.mean(labels[s.argmax(1)] == labels), abs=1e-9)

    # The saved features evaluate to the same numbers without a model.
    out2 = tmp_path / "r2.json"
    res = CliRunner().invoke(app, ["eval-retrieval", "--dataset", f"folder:{tree.test}", "--embeddings",
                                   str(tmp_path / "f" / "folder-test.npy"), "--json", str(out2)])
    assert res.exit_code == 0, res.output
    r2 = json.loads(out2.read_text())
    assert r2["metrics"] == r["metrics"] and r2["skipped"] == 1

    out3 = tmp_path / "k.json"
    res = CliRunner().invoke(app, ["eval-knn", "--train-dataset", str(tree.knn_train), "--val-dataset",
                                   str(tree.knn_val), "--nb-knn", "1,5", *model_args, "--json", str(out3)])
    assert res.exit_code == 0, res.output
    k = json.loads(out3.read_text())
    assert k["model"] == "tiny" and k["sizes"]["train"] == 30 and k["sizes"]["val"] == 30
    assert 0 <= k["metrics"]["5"]["top1"] <= k["metrics"]["5"]["top5"] <= 100
