"""Hub models in export, eval-linear, eval-knn and multi-process embed (a tiny MLCD, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli.test_eval_knn import digits_knn  # noqa: F401 - fixture
from tests.hub_models import tiny_hub_models  # noqa: F401 - fixture
from unicom_cli.cli.app import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def mlcd(tiny_hub_models):  # noqa: F811
    return str(tiny_hub_models["mlcd"])


def test_export_onnx_parity_and_embed_through_onnx_runtime(mlcd, digits_knn, tmp_path, capsys):  # noqa: F811
    onnx = tmp_path / "mlcd.onnx"
    assert main(["export", mlcd, "-o", str(onnx)]) == 0
    printed = capsys.readouterr().out
    assert "bound ≥ 0.99999: passed" in printed
    sidecar = json.loads(onnx.with_suffix(".json").read_text())
    assert sidecar["family"] == "hf" and sidecar["embedding"].startswith("pooler_output")
    folder = digits_knn["val"][0]
    assert main(["embed", str(folder), "-o", str(tmp_path / "onnx.npy"), "--model", str(onnx), "-j", "0"]) == 0
    assert main(["embed", str(folder), "-o", str(tmp_path / "torch.npy"), "--model", mlcd, "--precision", "fp32",
                 "-j", "0"]) == 0
    a, b = np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy")
    assert a.shape == b.shape == (200, 32)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_hub_model_refuses_safetensors_export(mlcd, tmp_path, capsys):
    assert main(["export", mlcd, "-o", str(tmp_path / "w.safetensors")]) == 2
    assert "save_pretrained folder" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()


def _run(command, args, tmp_path, capsys, name):
    code = main([command, *args, "--json", str(tmp_path / name)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads((tmp_path / name).read_text())


def test_eval_linear_on_mlcd_features_matches_sklearn(mlcd, digits_knn, tmp_path, capsys):  # noqa: F811
    from sklearn.linear_model import LogisticRegression

    (tf, *_), (vf, *_) = digits_knn["train"], digits_knn["val"]
    model = ["-m", mlcd, "--workers", "0", "--device", "cpu", "--precision", "fp32"]
    for name, folder in (("tr", tf), ("va", vf)):
        assert main(["embed", str(folder), "-o", str(tmp_path / f"{name}.npy"), *model]) == 0
    capsys.readouterr()
    a = _run("eval-linear", ["--train-dataset", str(tf), "--val-dataset", str(vf), "--C", "10", *model],
             tmp_path, capsys, "a.json")
    saved = ["--train-embeddings", str(tmp_path / "tr.npy"), "--val-embeddings", str(tmp_path / "va.npy")]
    b = _run("eval-linear", ["--train-dataset", str(tf), "--val-dataset", str(vf), "--C", "10", *saved],
             tmp_path, capsys, "b.json")
    assert a["model"] == mlcd and a["metrics"]["top1"] == pytest.approx(b["metrics"]["top1"], abs=0.51)

    def load(name):
        feats = np.load(tmp_path / f"{name}.npy").astype(np.float64)
        ids = (tmp_path / f"{name}.ids.txt").read_text().split()
        return feats / np.linalg.norm(feats, axis=1, keepdims=True), np.array([i.split("/")[0] for i in ids])

    (x, y), (vx, vy) = load("tr"), load("va")
    sk = LogisticRegression(C=10, max_iter=5000).fit(x, y)
    assert b["metrics"]["top1"] == pytest.approx(100 * (sk.predict(vx) == vy).mean(), abs=1.0)
    assert b["metrics"]["top1"] > 20  # above chance (5 classes) even for a random tiny network


def test_eval_knn_model_route_equals_embeddings_route(mlcd, digits_knn, tmp_path, capsys):  # noqa: F811
    (tf, *_), (vf, *_) = digits_knn["train"], digits_knn["val"]
    model = ["-m", mlcd, "--workers", "0", "--device", "cpu", "--precision", "fp32"]
    for name, folder in (("tr", tf), ("va", vf)):
        assert main(["embed", str(folder), "-o", str(tmp_path / f"{name}.npy"), *model]) == 0
    capsys.readouterr()
    a = _run("eval-knn", ["--train-dataset", str(tf), "--val-dataset", str(vf), *model], tmp_path, capsys, "a.json")
    b = _run("eval-knn", ["--train-dataset", str(tf), "--val-dataset", str(vf), "--train-embeddings",
                          str(tmp_path / "tr.npy"), "--val-embeddings", str(tmp_path / "va.npy")],
             tmp_path, capsys, "b.json")
    assert a["metrics"] == b["metrics"]


@pytest.mark.slow
def test_embed_two_processes_equal_one_and_resume_fingerprint_has_the_model(mlcd, digits_knn, tmp_path):  # noqa: F811
    folder = digits_knn["val"][0]
    args = ["--model", mlcd, "--precision", "fp32", "-j", "0", "--batch-size", "16"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "one.npy"), *args]) == 0
    assert main(["embed", str(folder), "-o", str(tmp_path / "two.npy"), "--procs", "2", *args]) == 0
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))
    meta = json.loads((tmp_path / "two.json").read_text())
    assert meta["world_size"] == 2 and meta["model_spec"]["family"] == "hf"


@pytest.mark.slow
def test_embed_killed_then_resumed_is_bitwise_identical(mlcd, digits_knn, tmp_path):  # noqa: F811
    """kill -9 after a checkpoint (the hook lives in the test), rerun: the same bytes as a clean run."""
    import os
    import signal
    import subprocess
    import sys

    from tests.pipelines.test_embed import KILL_AFTER_ROWS

    folder = digits_knn["val"][0]
    args = ["--model", mlcd, "--precision", "fp32", "-j", "0", "--batch-size", "16"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "clean.npy"), *args]) == 0
    killed = tmp_path / "killed.npy"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_ROWS, "embed", str(folder), "-o", str(killed), *args],
                          env={**os.environ, "KILL_AFTER_ROWS": "64", "UNICOM_TEST_CHECKPOINT_S": "0"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((tmp_path / "killed.npy.partial" / "part-00000.state.json").read_text())
    assert 64 <= state["rows_done"] < 200
    assert main(["embed", str(folder), "-o", str(killed), *args]) == 0
    for suffix in (".npy", ".ids.txt", ".failures.txt"):
        assert (tmp_path / f"killed{suffix}").read_bytes() == (tmp_path / f"clean{suffix}").read_bytes(), suffix


def test_eval_retrieval_model_route_equals_its_embed_features(mlcd, digits_knn, tmp_path, capsys):  # noqa: F811
    """eval-retrieval extracting with the MLCD model == eval-retrieval over `unicom embed`'s rows."""
    folder = digits_knn["val"][0]
    model = ["-m", mlcd, "--workers", "0", "--device", "cpu", "--precision", "fp32"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "f.npy"), *model]) == 0
    capsys.readouterr()
    a = _run("eval-retrieval", ["--dataset", f"folder:{folder}", *model], tmp_path, capsys, "a.json")
    b = _run("eval-retrieval", ["--dataset", f"folder:{folder}", "--embeddings", str(tmp_path / "f.npy")],
             tmp_path, capsys, "b.json")
    assert a["model"] == mlcd and a["metrics"] == pytest.approx(b["metrics"], abs=1e-9)
    assert a["embedding"].startswith("pooler_output") and "revision" in a  # None: a local folder
