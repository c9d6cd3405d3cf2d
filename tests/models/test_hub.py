"""Hub and transformers models (models/families/hf.py): downloads through a loopback hub, our
embedding against transformers' own forward, preprocessing against AutoImageProcessor, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hub_models import tiny_hub_models  # noqa: F401 - fixture
from tests.hub_server import hub_server  # noqa: F401 - fixture
from unicom_cli.errors import UnknownModel, UnsupportedModel, UsageError
from unicom_cli.models.factory import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def hub(hub_server):  # noqa: F811
    return hub_server


@pytest.fixture
def tiny(tiny_hub_models):  # noqa: F811
    return tiny_hub_models


def _reference(folder, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' own pooled output for the saved model (independent of our wrapper)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    kwargs = {}
    if "interpolate_pos_encoding" in model.forward.__code__.co_varnames and pixels.shape[-1] != 32:
        kwargs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        return model(pixel_values=pixels, **kwargs).pooler_output


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["mlcd", "clip", "siglip", "dinov2", "dinov3"])
def test_embedding_equals_transformers_pooled_output(kind, tiny):
    loaded = create_model(str(tiny[kind]), precision="fp32")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = loaded.model(pixels)
    assert ours.shape == (3, 32) and ours.dtype == torch.float32
    assert _relative(ours, _reference(tiny[kind], pixels)) < 1e-5
    assert loaded.spec.embedding.startswith("pooler_output")


@pytest.mark.parametrize("size", [32, 48])
def test_mlcd_rotary_at_two_resolutions(size, tiny):
    """MLCD computes its 2-D rotary table from the input's height and width."""
    loaded = create_model(str(tiny["mlcd"]), precision="fp32", input_size=size)
    assert loaded.spec.input_size == size and loaded.spec.resize_size == round(40 * size / 32)  # 40 → 32 crop
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded.model(pixels)
    assert _relative(ours, _reference(tiny["mlcd"], pixels)) < 1e-5


def _photos():
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"]
    images = []
    for name in names:
        image = getattr(data, name)()
        images.append(np.stack([image] * 3, -1) if image.ndim == 2 else np.ascontiguousarray(image[..., :3]))
    return images


@pytest.mark.parametrize("kind", ["mlcd", "siglip", "dinov2", "dinov3", "mlcd@224"])
def test_fast_decode_route_matches_auto_image_processor(kind, tiny, tmp_path):
    """embed's route (uint8 resize + crop, normalised on the device) against AutoImageProcessor
    on real photos: within 1/255 per pixel before normalisation, embeddings cosine >= 0.9999.
    mlcd@224: MLCD's published preprocessing (CLIPImageProcessor, 224 px) on the tiny network."""
    import shutil

    from transformers import AutoImageProcessor, CLIPImageProcessor

    from unicom_cli.data.images import resize_center_crop
    from unicom_cli.models.forward import PixelForward

    folder = tiny[kind.split("@")[0]]
    if kind == "mlcd@224":
        folder = Path(shutil.copytree(folder, tmp_path / "mlcd224"))
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    loaded = create_model(str(folder), precision="fp32")
    processor = AutoImageProcessor.from_pretrained(folder)
    photos = _photos()
    ours = torch.stack([resize_center_crop(p, loaded.spec.input_size, **loaded.spec.geometry) for p in photos])
    theirs = processor(images=photos, return_tensors="pt")["pixel_values"]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    assert ours.shape == theirs.shape
    assert float((ours.float() / 255 - (theirs * std + mean)).abs().max()) <= 1 / 255 + 1e-6
    with torch.no_grad():
        a, b = PixelForward(loaded)(ours), loaded.model(theirs)
    cosine = torch.nn.functional.cosine_similarity(a.double(), b.double())
    assert float(cosine.min()) >= 0.9999


def test_download_records_commit_and_reloads_offline(hub, tiny, tmp_path, monkeypatch):
    commit = hub.publish("acme/tiny-mlcd", tiny["mlcd"])
    loaded = create_model("hf:acme/tiny-mlcd", precision="fp32", mirror=hub.base, cache=tmp_path)
    assert loaded.spec.revision == commit and loaded.spec.repo == "acme/tiny-mlcd"
    body = (tiny["mlcd"] / "model.safetensors").read_bytes()
    import hashlib

    assert loaded.sha256 == hashlib.sha256(body).hexdigest()
    assert (tmp_path / "huggingface").is_dir()  # --cache-dir holds the hub cache
    # Pinned to the commit (immutable) and cached: no request, online or offline; offline by branch too.
    before = len(hub.requests)
    again = create_model(f"hf:acme/tiny-mlcd@{commit}", precision="fp32", mirror=hub.base, cache=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    create_model("hf:acme/tiny-mlcd", precision="fp32", mirror=hub.base, cache=tmp_path)
    assert len(hub.requests) == before
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(pixels), again.model(pixels))


def test_cut_download_resumes_with_range(hub, tiny, tmp_path, monkeypatch):
    """The server hangs up half way; huggingface_hub asks for the rest (Range) and the file is whole."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # write-out unit: a 100 kB file resumes
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # its retry pause
    hub.publish("acme/tiny-clip", tiny["clip"])
    hub.cuts.add("model.safetensors")
    loaded = create_model("hf:acme/tiny-clip", precision="fp32", mirror=hub.base, cache=tmp_path)
    size = (tiny["clip"] / "model.safetensors").stat().st_size
    gets = hub.file_gets("model.safetensors")
    assert gets[0] is None and gets[1] == f"bytes={(size // 2) // 4096 * 4096}-"  # the second GET resumed
    assert loaded.weights_path.read_bytes() == (tiny["clip"] / "model.safetensors").read_bytes()


def test_unknown_repo_and_revision_are_named(hub, tiny, tmp_path):
    hub.publish("acme/tiny-mlcd", tiny["mlcd"])
    with pytest.raises(UnknownModel, match="acme/nothing"):
        create_model("hf:acme/nothing", mirror=hub.base, cache=tmp_path)
    with pytest.raises(UsageError, match="no revision 'v9'"):
        create_model("hf:acme/tiny-mlcd@v9", mirror=hub.base, cache=tmp_path)


def test_offline_without_cache_names_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="offline.*mirror.*local save_pretrained folder"):
        create_model("hf:acme/never-downloaded", cache=tmp_path)


def test_pickled_weights_only_are_refused_before_download(hub, tiny, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny["clip"].iterdir() if p.suffix != ".safetensors"}
    hub.publish("acme/pickled", {**files, "pytorch_model.bin": b"\x80\x04pickle"})
    with pytest.raises(UnsupportedModel, match="only pickled weights.*safetensors only"):
        create_model("hf:acme/pickled", mirror=hub.base, cache=tmp_path)
    assert not hub.file_gets("pytorch_model.bin")


def test_remote_code_is_refused(hub, tiny, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny["clip"].iterdir()}
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    hub.publish("acme/remote", {**files, "config.json": json.dumps(config).encode(),
                                       "modeling_evil.py": b"import os"})
    with pytest.raises(UnsupportedModel, match="trust_remote_code"):
        create_model("hf:acme/remote", mirror=hub.base, cache=tmp_path)
    assert not hub.file_gets("model.safetensors") and not hub.file_gets("modeling_evil.py")


def test_model_without_pooled_output_is_refused(tiny):
    with pytest.raises(UnsupportedModel, match="no pooled output"):
        create_model(str(tiny["vitmae"]))


def test_registered_mlcd_names_point_at_the_published_repositories():
    from unicom_cli.models.registry import available_models, get_spec

    names = available_models("hf")
    assert names == ["MLCD-ViT-B/32", "MLCD-ViT-L/14@336px", "MLCD-ViT-bigG/14",
                     "MLCD-ViT-bigG/14@336px", "MLCD-ViT-bigG/14@448px"]
    specs = [get_spec(n) for n in names]
    assert [s.repo.split("/")[1] for s in specs] == [
        "mlcd-vit-base-patch32-224", "mlcd-vit-large-patch14-336", "mlcd-vit-bigG-patch14-224",
        "mlcd-vit-bigG-patch14-336", "mlcd-vit-bigG-patch14-448"]
    assert [s.embedding_size for s in specs] == [768, 1024, 1664, 1664, 1664]  # SPEC 5
    assert [s.input_size for s in specs] == [224, 336, 224, 336, 448]


def test_registered_mlcd_parameter_counts_match_their_architecture():
    """The registry's counts equal the transformers networks built on the meta device."""
    import transformers as T

    from unicom_cli.models.registry import get_spec

    with torch.device("meta"):
        base = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, patch_size=32, image_size=224))
        big = T.MLCDVisionModel(T.MLCDVisionConfig(image_size=448))
    assert get_spec("MLCD-ViT-B/32").num_params == sum(p.numel() for p in base.parameters())
    assert get_spec("MLCD-ViT-bigG/14@448px").num_params == sum(p.numel() for p in big.parameters())


def test_timm_model_downloads_its_safetensors_and_embeds_pre_logits(hub, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model("test_vit.r160_in1k", num_classes=0).eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
    commit = hub.publish("timm/test_vit.r160_in1k", {"model.safetensors": weights.read_bytes(),
                                                     "config.json": b'{"architecture": "test_vit"}'})
    loaded = create_model("timm:test_vit.r160_in1k", precision="fp32", mirror=hub.base, cache=tmp_path / "c")
    assert loaded.spec.revision == commit and loaded.spec.family == "timm"
    assert (loaded.spec.input_size, loaded.spec.resize_size) == (160, 168)  # crop_pct 0.95
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert _relative(loaded.model(pixels), reference(pixels)) < 1e-5


def test_unknown_timm_name_suggests_one():
    with pytest.raises(UnknownModel, match="did you mean 'timm:test_vit"):
        create_model("timm:test_vitt.r160_in1k")


@pytest.mark.parametrize("missing", ["transformers", "huggingface_hub"])
def test_missing_extra_names_it(missing, tiny, monkeypatch, tmp_path, capsys):
    import sys

    from unicom_cli.cli.app import main

    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "photos" / "a.png")
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    out = tmp_path / "f.npy"
    code = main(["embed", str(tmp_path / "photos"), "-o", str(out), "--model", str(tiny["mlcd"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "pip install 'unicom-cli[hub]'" in err[-1]
    assert missing in err[-1] and not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped header", "no weights", "wrong shapes"])
def test_damaged_local_folder_is_one_line(damage, tiny, tmp_path):
    import shutil

    from unicom_cli.errors import InputError

    folder = tmp_path / "model"
    shutil.copytree(tiny["mlcd"], folder)
    weights = folder / "model.safetensors"
    body = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(body[: len(body) // 2])
    elif damage == "bit-flipped header":
        weights.write_bytes(body[:10] + bytes([body[10] ^ 0xFF]) + body[11:])
    elif damage == "no weights":
        weights.unlink()
    else:
        shutil.copyfile(tiny["clip"] / "model.safetensors", weights)
    with pytest.raises((InputError, UnsupportedModel), match=str(folder)) as error:
        create_model(str(folder))
    assert "\n" not in str(error.value) and error.value.exit_code == 2


def test_two_tower_clip_repository_gives_its_vision_tower(tmp_path):
    """A full CLIPModel folder (text + vision): the vision tower's pooled output, no projection."""
    import transformers as T

    torch.manual_seed(5)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = T.CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8},
                          projection_dim=16)
    full = T.CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "clip")
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    loaded = create_model(str(tmp_path / "clip"), precision="fp32")
    assert loaded.spec.embedding_size == 32  # the tower's width, not the 16-d projection
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = full.vision_model(pixel_values=pixels).pooler_output
        assert _relative(loaded.model(pixels), reference) < 1e-5
