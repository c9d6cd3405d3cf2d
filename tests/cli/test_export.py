"""`unicom export` and `unicom embed --runtime onnx` end to end: same rows as PyTorch, resume,
and one-line errors (exit 2, nothing written) for bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.export.conftest import make_tiny, one_torch_thread  # noqa: F401 (autouse fixture)
from tests.pipelines.test_embed import KILL_AFTER_ROWS
from unicom_cli.cli.app import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Real photos (scikit-learn's and scikit-image's) and one broken file."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    arrays = list(load_sample_images().images) + [data.coffee(), data.chelsea(), data.rocket(),
                                                  data.astronaut()]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).reduce(4).save(root / f"{i}.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    return root


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> tuple[Path, str]:
    """The tiny model exported by the CLI (uint8 input, fp32), and what the command printed."""
    import contextlib
    import io

    spec_file, ckpt = tiny
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):  # the results console writes to whatever stdout is now
        code = main(["export", str(spec_file), "--weights", str(ckpt), "-o", str(out)])
    assert code == 0, buffer.getvalue()
    return out, buffer.getvalue()


def test_export_prints_the_self_check_figures(exported):
    out, printed = exported
    lines = [line for line in printed.splitlines() if "cosine" in line]
    assert len(lines) == 8  # seven photos, then the batch of one
    cosines = [float(line.split("cosine")[1].split()[0].rstrip(";")) for line in lines]
    assert min(cosines) >= 0.99999
    assert f"wrote {out}" in printed and f"wrote {out.with_suffix('.json')}" in printed


def _embed(src: Path, out: Path, *extra: str) -> int:
    return main(["embed", str(src), "-o", str(out), "--workers", "0", "--batch-size", "2",
                 "--no-draft", *extra])


def test_embed_onnx_equals_the_pytorch_route(exported, tiny, folder, tmp_path):
    spec_file, ckpt = tiny
    onnx_out, torch_out = tmp_path / "onnx.npy", tmp_path / "torch.npy"
    assert _embed(folder, onnx_out, "--model", str(exported[0]), "--runtime", "onnx") == 0
    assert _embed(folder, torch_out, "--model", str(spec_file), "--weights", str(ckpt),
                  "--precision", "fp32") == 0
    a, b = np.load(onnx_out), np.load(torch_out)
    assert a.shape == b.shape == (6, 16)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    for suffix in (".ids.txt", ".failures.txt"):
        assert (tmp_path / f"onnx{suffix}").read_text() == (tmp_path / f"torch{suffix}").read_text()
    meta = json.loads((tmp_path / "onnx.json").read_text())
    assert meta["runtime"] == "onnx" and meta["weights"] == str(exported[0]) and meta["failures"] == 1
    # --normalize --num-feat on top of a plain graph: the same post-processing as PyTorch's.
    n_onnx, n_torch = tmp_path / "n1.npy", tmp_path / "n2.npy"
    assert _embed(folder, n_onnx, "--model", str(exported[0]), "--num-feat", "8") == 0  # runtime implied
    assert _embed(folder, n_torch, "--model", str(spec_file), "--weights", str(ckpt),
                  "--num-feat", "8", "--precision", "fp32") == 0
    np.testing.assert_allclose(np.load(n_onnx), np.load(n_torch), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_graph_with_baked_normalisation_is_not_renormalised(tiny, folder, tmp_path):
    spec_file, ckpt = tiny
    graph = tmp_path / "n.onnx"
    assert main(["export", str(spec_file), "--weights", str(ckpt), "-o", str(graph),
                 "--num-feat", "12"]) == 0
    assert _embed(folder, tmp_path / "a.npy", "--model", str(graph), "--num-feat", "8") == 0
    assert _embed(folder, tmp_path / "b.npy", "--model", str(spec_file), "--weights", str(ckpt),
                  "--num-feat", "8", "--precision", "fp32") == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=0, atol=1e-5)
    assert _embed(folder, tmp_path / "c.npy", "--model", str(graph), "--num-feat", "13") == 2


def test_safetensors_export_is_accepted_by_weights(tiny, folder, tmp_path):
    spec_file, ckpt = tiny
    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(spec_file), "--weights", str(ckpt), "-o", str(out)]) == 0
    assert _embed(folder, tmp_path / "s.npy", "--model", str(tmp_path / "tiny.arch.json"),
                  "--weights", str(out)) == 0
    assert _embed(folder, tmp_path / "p.npy", "--model", str(spec_file), "--weights", str(ckpt)) == 0
    assert (tmp_path / "s.npy").read_bytes() == (tmp_path / "p.npy").read_bytes()


@pytest.mark.slow
def test_embed_onnx_resumes_after_kill(exported, folder, tmp_path):
    """The process SIGKILLs itself once k rows are checkpointed (hook in the test); the rerun finishes."""
    graph = exported[0]
    clean = tmp_path / "clean.npy"
    assert _embed(folder, clean, "--model", str(graph)) == 0
    out = tmp_path / "killed.npy"
    k = random.Random().randrange(1, 5)
    cmd = [sys.executable, "-c", KILL_AFTER_ROWS, "embed", str(folder), "-o", str(out), "--model",
           str(graph), "--workers", "0", "--batch-size", "2", "--no-draft"]
    proc = subprocess.run(cmd, env={**os.environ, "KILL_AFTER_ROWS": str(k), "UNICOM_TEST_CHECKPOINT_S": "0",
                                    "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and (tmp_path / "killed.npy.partial" / "run.json").exists()
    assert _embed(folder, out, "--model", str(graph)) == 0
    for suffix in (".npy", ".ids.txt", ".failures.txt"):
        assert (tmp_path / f"killed{suffix}").read_bytes() == (tmp_path / f"clean{suffix}").read_bytes()


@pytest.mark.parametrize("case", ["no_onnxruntime", "precision", "weights", "onnx_without_runtime",
                                  "no_sidecar", "other_export_sidecar", "not_onnx", "read_only_out"])
def test_embed_onnx_bad_input(case, exported, folder, tmp_path, monkeypatch, capsys):
    import shutil

    graph, extra = tmp_path / "g.onnx", []
    shutil.copy(exported[0], graph)
    shutil.copy(exported[0].with_suffix(".json"), tmp_path / "g.json")
    out = tmp_path / "f.npy"
    if case == "no_onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    elif case == "precision":
        extra = ["--precision", "fp16"]
    elif case == "weights":
        extra = ["--weights", str(exported[0])]
    elif case == "onnx_without_runtime":
        extra = ["--runtime", "torch"]
    elif case == "no_sidecar":
        (tmp_path / "g.json").unlink()
    elif case == "other_export_sidecar":
        meta = json.loads((tmp_path / "g.json").read_text())
        (tmp_path / "g.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    elif case == "not_onnx":
        graph.write_bytes(b"this is not a protobuf")
        meta = json.loads((tmp_path / "g.json").read_text())
        import hashlib

        (tmp_path / "g.json").write_text(json.dumps({**meta, "sha256": hashlib.sha256(graph.read_bytes()).hexdigest()}))
    else:
        out = Path("/proc/f.npy")  # read-only even for root
    code = _embed(folder, out, "--model", str(graph), *extra)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert {"no_onnxruntime": "pip install 'unicom-cli[onnx]'", "precision": "fixed inside an ONNX graph",
            "weights": "fixed inside an ONNX graph", "onnx_without_runtime": "--runtime onnx",
            "no_sidecar": "no g.json beside it", "other_export_sidecar": "different exports",
            "not_onnx": "ONNX Runtime cannot load it", "read_only_out": "cannot write"}[case] in err
    assert not list(tmp_path.glob("f.*"))


@pytest.mark.parametrize("case", ["opset", "no_onnxruntime", "read_only_out", "out_dir_is_a_file",
                                  "mismatch", "checkpoint_without_arch"])
def test_export_bad_input(case, tiny, tmp_path, monkeypatch, capsys):
    spec_file, ckpt = tiny
    out, args = tmp_path / "m.onnx", []
    if case == "opset":
        args = ["--opset", "13"]
    elif case == "no_onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
    elif case == "read_only_out":
        out = Path("/proc/m.onnx")
    elif case == "out_dir_is_a_file":  # a missing folder is created; a file in its way is not
        (tmp_path / "no").write_text("a file")
        out = tmp_path / "no" / "m.onnx"
    elif case == "mismatch":
        wide = tmp_path / "wide.json"
        wide.write_text(json.dumps({**json.loads(spec_file.read_text()), "depth": 3}))
        spec_file = wide
    model = [str(spec_file), "--weights", str(ckpt)]
    if case == "checkpoint_without_arch":
        lone = tmp_path / "lone.pt"
        lone.write_bytes(ckpt.read_bytes())
        model = [str(lone)]
    code = main(["export", *model, "-o", str(out), *args])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert {"opset": "--opset 13", "no_onnxruntime": "pip install 'unicom-cli[onnx]'",
            "read_only_out": "cannot write", "out_dir_is_a_file": "cannot create the output folder",
            "mismatch": "does not match architecture", "checkpoint_without_arch": "no architecture file"}[case] in err
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))
