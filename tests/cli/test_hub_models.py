"""Hub models through the commands: an MLCD embed → index → search → serve round trip over a
loopback hub, the recorded commit, and one line + exit 2 + nothing written for every bad model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.hub_models import tiny_hub_models  # noqa: F401 - fixture
from tests.hub_server import hub_server  # noqa: F401 - fixture
from unicom_cli.cli.app import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def hub(hub_server):  # noqa: F811
    return hub_server


@pytest.fixture
def tiny(tiny_hub_models):  # noqa: F811
    return tiny_hub_models


@pytest.fixture
def photos(tmp_path):
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        Image.fromarray(getattr(data, name)()).convert("RGB").reduce(4).save(folder / f"{name}.jpg", quality=95)
    return folder


def _embed(photos, out, model, *extra):
    return main(["embed", str(photos), "-o", str(out), "--model", model, "--precision", "fp32",
                 "--workers", "0", "--batch-size", "4", *extra])


def test_mlcd_embed_index_search_serve_round_trip(hub, tiny, photos, tmp_path, capsys, monkeypatch):
    commit = hub.publish("acme/tiny-mlcd", tiny["mlcd"])
    cache = tmp_path / "cache"
    out = tmp_path / "feats.npy"
    assert _embed(photos, out, "hf:acme/tiny-mlcd", "--mirror", hub.base, "--cache-dir", str(cache)) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["revision"] == commit and meta["model_spec"]["repo"] == "acme/tiny-mlcd"
    assert meta["embedding"].startswith("pooler_output: the class token")
    feats = np.load(out)
    assert feats.shape == (6, 32)

    # Our rows are transformers' own pooled output of AutoImageProcessor's tensors (fp32).
    import torch
    from transformers import AutoImageProcessor, AutoModel

    ids = out.with_suffix(".ids.txt").read_text().split()
    processor = AutoImageProcessor.from_pretrained(tiny["mlcd"])
    model = AutoModel.from_pretrained(tiny["mlcd"]).eval()
    pixels = processor(images=[np.asarray(Image.open(photos / i)) for i in ids], return_tensors="pt")
    with torch.no_grad():
        reference = model(**pixels).pooler_output.numpy()
    cosine = (feats * reference).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.9999

    index = tmp_path / "photos.index"
    assert main(["index", str(out), "-o", str(index)]) == 0
    recorded = json.loads((index / "index.json").read_text())
    assert recorded["revision"] == commit and recorded["model_spec"]["revision"] == commit

    # main moves on; queries still use the recorded commit, from the cache, offline.
    hub.publish("acme/tiny-mlcd", tiny["clip"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["search", str(index), str(photos / "coffee.jpg"), "-k", "3"]) == 0
    assert "coffee.jpg" in capsys.readouterr().out.split("1 │")[1].splitlines()[0]

    from fastapi.testclient import TestClient

    from unicom_cli.index import Index
    from unicom_cli.serve.app import create_app

    served = Index.load(index)
    embedder = served.embedder(device="cpu")
    with TestClient(create_app(served, embedder)) as client:
        answer = client.post("/search?k=2", content=(photos / "rocket.jpg").read_bytes(),
                             headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200
    assert answer.json()["results"][0]["path"].endswith("rocket.jpg")


def test_search_refuses_another_revision_naming_both(hub, tiny, photos, tmp_path, capsys):
    first = hub.publish("acme/tiny-mlcd", tiny["mlcd"])
    cache = tmp_path / "cache"
    out = tmp_path / "feats.npy"
    assert _embed(photos, out, f"hf:acme/tiny-mlcd@{first}", "--mirror", hub.base, "--cache-dir", str(cache)) == 0
    index = tmp_path / "photos.index"
    assert main(["index", str(out), "-o", str(index)]) == 0
    second = hub.publish("acme/tiny-mlcd", {**_files(tiny["mlcd"]), "README.md": b"v2"})
    capsys.readouterr()
    code = main(["search", str(index), str(photos / "coffee.jpg"), "-k", "2",
                 "--weights", f"hf:acme/tiny-mlcd@{second}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert first in err and second in err
    # A local save_pretrained copy of the same weights is accepted (its SHA-256 is checked) …
    assert main(["search", str(index), str(photos / "coffee.jpg"), "-k", "2", "--weights", str(tiny["mlcd"])]) == 0
    capsys.readouterr()
    # … other weights are not.
    assert main(["search", str(index), str(photos / "coffee.jpg"), "-k", "2", "--weights", str(tiny["clip"])]) != 0
    assert "differs from" in capsys.readouterr().err


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", ["unknown", "revision", "offline", "pickled", "remote-code", "unpooled"])
def test_bad_models_are_one_line_exit_2_nothing_written(case, hub, tiny, photos, tmp_path, capsys, monkeypatch):
    hub.publish("acme/tiny-mlcd", tiny["mlcd"])
    model = {"unknown": "hf:acme/nothing", "revision": "hf:acme/tiny-mlcd@v9", "offline": "hf:acme/tiny-mlcd",
             "pickled": "hf:acme/pickled", "remote-code": "hf:acme/remote", "unpooled": str(tiny["vitmae"])}[case]
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "pickled":
        files = {k: v for k, v in _files(tiny["clip"]).items() if not k.endswith(".safetensors")}
        hub.publish("acme/pickled", {**files, "pytorch_model.bin": b"\x80\x04"})
    if case == "remote-code":
        files = _files(tiny["clip"])
        config = {**json.loads(files["config.json"]), "auto_map": {"AutoModel": "evil.Model"}}
        hub.publish("acme/remote", {**files, "config.json": json.dumps(config).encode()})
    out = tmp_path / "out" / "feats.npy"
    capsys.readouterr()
    code = _embed(photos, out, model, "--mirror", hub.base, "--cache-dir", str(tmp_path / "cache"))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if not line.startswith("loading ")]  # the CLI's progress note
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err
    expected = {"unknown": "no such model", "revision": "no revision 'v9'", "offline": "local save_pretrained folder",
                "pickled": "only pickled weights", "remote-code": "trust_remote_code",
                "unpooled": "no pooled output"}[case]
    assert expected in err
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_unicom_models_lists_mlcd(capsys):
    assert main(["models", "--format", "json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    row = rows["MLCD-ViT-L/14@336px"]
    assert (row["input_size"], row["embedding_size"], row["params"]) == (336, 1024, 303_507_456)
    assert row["cached"] is False and row["url"] == "hf:DeepGlint-AI/mlcd-vit-large-patch14-336"


def test_registered_mlcd_name_downloads_lists_and_embeds(hub, tiny, photos, tmp_path, capsys):
    """MLCD-ViT-B/32 resolves to its hub repository (here the loopback hub holds a tiny stand-in)."""
    commit = hub.publish("DeepGlint-AI/mlcd-vit-base-patch32-224", tiny["clip"])
    cache = str(tmp_path / "cache")
    assert main(["download", "MLCD-ViT-B/32", "--mirror", hub.base, "--cache-dir", cache]) == 0
    capsys.readouterr()
    assert main(["models", "--format", "json", "--cache-dir", cache]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["MLCD-ViT-B/32"]["cached"] is True and rows["MLCD-ViT-B/32"]["checksum"] == "hub"
    out = tmp_path / "feats.npy"
    assert _embed(photos, out, "MLCD-ViT-B/32", "--mirror", hub.base, "--cache-dir", cache) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "MLCD-ViT-B/32" and meta["revision"] == commit and meta["input_size"] == 32


def test_index_of_a_folder_does_not_reuse_another_revisions_embeddings(hub, tiny, photos, tmp_path, capsys):
    first = hub.publish("acme/tiny-mlcd", tiny["mlcd"])
    second = hub.publish("acme/tiny-mlcd", {**_files(tiny["mlcd"]), "README.md": b"v2"})
    index = tmp_path / "photos.index"
    common = ["--mirror", hub.base, "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "-j", "0"]
    assert main(["index", str(photos), "-o", str(index), "--model", f"hf:acme/tiny-mlcd@{first}", *common]) == 0
    assert json.loads((index / "index.json").read_text())["revision"] == first
    capsys.readouterr()
    code = main(["index", str(photos), "-o", str(index), "--model", f"hf:acme/tiny-mlcd@{second}", *common])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["index", str(photos), "-o", str(index), "--model", f"hf:acme/tiny-mlcd@{second}", *common,
                 "--overwrite"]) == 0
    assert json.loads((index / "index.json").read_text())["revision"] == second
