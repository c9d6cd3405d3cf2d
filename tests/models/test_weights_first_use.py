"""First use of weights: no silent random network, weights resolved before the network is built,
short messages for a wrong checkpoint or a file that is not one, size shown on a bad mirror file."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.conftest import TINY
from tests.weights_server import weights_server  # noqa: F401 (fixture)
from unicom_cli.errors import ChecksumMismatch, DownloadError, InputError, UsageError, WeightsError
from unicom_cli.models import registry
from unicom_cli.models.factory import create_model
from unicom_cli.models.families.unicom import describe_checkpoint
from unicom_cli.models.registry import GITHUB_RELEASES, ModelSpec


def _forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))


def test_random_init_only_on_request_and_then_seeded(tiny_spec_file):
    with pytest.raises(UsageError, match="--weights FILE.*--random-init"):
        create_model(tiny_spec_file)
    torch.manual_seed(123)  # the global stream must not matter
    a = create_model(tiny_spec_file, pretrained=False, seed=7)
    torch.manual_seed(456)
    b = create_model(tiny_spec_file, pretrained=False, seed=7)
    c = create_model(tiny_spec_file, pretrained=False, seed=8)
    assert a.random_init_seed == 7 and a.weights_path is None
    assert torch.equal(_forward(a.model), _forward(b.model))
    assert not torch.allclose(_forward(a.model), _forward(c.model))
    with pytest.raises(UsageError, match="exclude each other"):
        create_model(tiny_spec_file, weights=tiny_spec_file, pretrained=False)


def test_weights_are_resolved_before_the_network_is_built(tmp_path, monkeypatch):
    import unicom_cli.models.vit as vit

    def built(*args, **kwargs):
        raise AssertionError("the network was built before the weights were found")

    monkeypatch.setattr(vit, "build_model", built)
    with pytest.raises(DownloadError, match="UNICOM_HOME"):
        create_model("ViT-B/32", mirror=str(tmp_path / "no-mirror-here"), cache=tmp_path / "c")
    with pytest.raises(InputError, match="missing.pt: weights file not found"):
        create_model("ViT-B/32", weights=tmp_path / "missing.pt")


def test_wrong_architecture_says_what_the_checkpoint_looks_like_in_few_words(tiny_checkpoint, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY, "width": 48, "depth": 3, "patch_size": 16}))
    with pytest.raises(WeightsError) as info:
        create_model(other, weights=tiny_checkpoint)
    message = str(info.value)
    assert "looks like width 32, patch 8, 2 blocks, 32 px, 16-d embedding" in message
    assert "--model" in message and "more)" in message
    assert len(message) < 700  # torch's own message lists every key: ~3,000 characters
    assert len(str(info.value.__cause__)) > 2 * len(message)


def test_registered_look_alike_is_named():
    meta = {"patch_embed.proj.weight": torch.empty(768, 3, 32, 32, device="meta"),
            "pos_embed": torch.empty(1, 49, 768, device="meta"),
            "feature.2.weight": torch.empty(512, 768, device="meta")}
    meta.update({f"blocks.{i}.norm1.weight": torch.empty(768, device="meta") for i in range(12)})
    assert describe_checkpoint(meta) == "ViT-B/32"
    meta["pos_embed"] = torch.empty(1, 144, 768, device="meta")
    assert describe_checkpoint(meta) == "ViT-B/32 at 384 px"
    assert describe_checkpoint({"weight": torch.empty(3, device="meta")}) is None


def test_an_image_passed_as_weights_is_not_called_pickled(tiny_spec_file, tmp_path):
    from PIL import Image
    from skimage import data

    photo = tmp_path / "model.pt"
    Image.fromarray(data.astronaut()).save(photo, format="JPEG")
    with pytest.raises(WeightsError) as info:
        create_model(tiny_spec_file, weights=photo)
    assert "not a model checkpoint (it is a JPEG image)" in str(info.value)
    assert "pickle" not in str(info.value)


def test_checksum_mismatch_from_a_mirror_gives_sizes_and_no_mirror_advice(weights_server, tiny_checkpoint,  # noqa: F811
                                                                         tmp_path, monkeypatch):
    from unicom_cli.models.download import fetch

    garbage = b"not the model" * 400  # 5,200 bytes where a checkpoint belongs
    weights_server.files["/tiny/FP16-tiny.pt"] = garbage
    spec = ModelSpec("tiny-dl", 32, 8, 32, 2, 2, 16, filename="FP16-tiny.pt",
                     url=f"{GITHUB_RELEASES}/tiny/FP16-tiny.pt",
                     sha256=hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest())
    monkeypatch.setitem(registry._MODELS, spec.name, spec)
    with pytest.raises(ChecksumMismatch) as info:
        fetch(spec, cache=tmp_path / "c", mirror=weights_server.base)
    message = str(info.value)
    assert "5.2 KB received" in message and "about" in message
    assert "use --mirror" not in message and "mirror holds another file" in message
