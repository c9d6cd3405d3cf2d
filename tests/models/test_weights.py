"""Loading weights safely: prefixes, safetensors, pickled code, wrong architectures, grid resampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import unicom_cli
from tests.conftest import TINY
from unicom_cli.errors import UnsafeCheckpoint, WeightsError
from unicom_cli.models.factory import create_model
from unicom_cli.models.families.unicom import resample_grid
from unicom_cli.models.weights import load_state_dict


def _embed(model, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32))


@pytest.fixture
def reference(tiny_spec_file, tiny_checkpoint) -> torch.Tensor:
    return _embed(create_model(tiny_spec_file, weights=tiny_checkpoint).model)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_ddp_and_compile_prefixes_are_stripped(prefix, tiny_spec_file, tiny_checkpoint, tmp_path,
                                               reference):
    state = torch.load(tiny_checkpoint, weights_only=True)
    path = tmp_path / "prefixed.pt"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    assert set(load_state_dict(path)) == set(state)
    torch.testing.assert_close(_embed(create_model(tiny_spec_file, weights=path).model), reference)


def test_finetune_checkpoint_nested_under_model_loads(tiny_spec_file, tiny_checkpoint, tmp_path,
                                                      reference):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": torch.load(tiny_checkpoint, weights_only=True), "step": 7}, path)
    torch.testing.assert_close(_embed(create_model(tiny_spec_file, weights=path).model), reference)


def test_safetensors_loads(tiny_spec_file, tiny_checkpoint, tmp_path, reference):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    state = torch.load(tiny_checkpoint, weights_only=True)
    save_file({"_orig_mod." + k: v.contiguous() for k, v in state.items()}, str(path))
    torch.testing.assert_close(_embed(create_model(tiny_spec_file, weights=path).model), reference)


class _Planted:
    """Unpickling this creates a marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_checkpoint, weights_only=True)
    path = tmp_path / "evil.pt"
    torch.save({**state, "payload": _Planted(str(marker))}, path)
    with pytest.raises(UnsafeCheckpoint, match="evil.pt.*refused"):
        load_state_dict(path)
    assert not marker.exists()
    # The plant is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_is_a_weights_error(tiny_checkpoint, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cut.pt"):
        load_state_dict(path)


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_checkpoint, tmp_path):
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY, "width": 48}))
    with pytest.raises(WeightsError, match="FP16-tiny.pt.*does not match architecture"):
        create_model(wider, weights=tiny_checkpoint)
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({**TINY, "depth": 3}))
    with pytest.raises(WeightsError, match=r"missing: blocks\.2"):
        create_model(deeper, weights=tiny_checkpoint)


def _zoom_pos(pos: np.ndarray, new: int) -> np.ndarray:
    """SPEC §1: pos_embed as a (g, g, width) image, order-1 zoom over the grid axes."""
    g = int(round(pos.shape[1] ** 0.5))
    grid = pos[0].reshape(g, g, -1)
    return ndimage.zoom(grid, (new / g, new / g, 1), order=1).reshape(1, new * new, -1)


def _zoom_head(weight: np.ndarray, width: int, new: int) -> np.ndarray:
    """SPEC §1: feature.0.weight viewed as (g, g, width, width_out), zoomed over the grid axes."""
    out_dim = weight.shape[0]
    g = int(round((weight.shape[1] // width) ** 0.5))
    grid = weight.T.reshape(g, g, width, out_dim)
    zoomed = ndimage.zoom(grid, (new / g, new / g, 1, 1), order=1)
    return zoomed.reshape(new * new * width, out_dim).T


@pytest.mark.parametrize("new_grid", [6, 3, 7])
def test_resample_grid_matches_scipy_zoom_order_1(tiny_checkpoint, new_grid):
    state = {k: v.float() for k, v in torch.load(tiny_checkpoint, weights_only=True).items()}
    out = resample_grid(state, new_grid)
    pos = state["pos_embed"].numpy().astype(np.float64)
    head = state["feature.0.weight"].numpy().astype(np.float64)
    np.testing.assert_allclose(out["pos_embed"].numpy(), _zoom_pos(pos, new_grid), atol=1e-6)
    np.testing.assert_allclose(out["feature.0.weight"].numpy(), _zoom_head(head, 32, new_grid),
                               atol=1e-6)
    assert out["blocks.0.attn.qkv.weight"] is state["blocks.0.attn.qkv.weight"]


def test_input_size_change_resamples_when_loading(tiny_spec_file, tiny_checkpoint):
    loaded = create_model(tiny_spec_file, weights=tiny_checkpoint, input_size=48)
    assert loaded.spec.input_size == 48 and loaded.spec.num_patches == 36
    state = torch.load(tiny_checkpoint, weights_only=True)
    pos = state["pos_embed"].float().numpy().astype(np.float64)
    np.testing.assert_allclose(loaded.model.pos_embed.detach().numpy(), _zoom_pos(pos, 6),
                               atol=1e-6)  # resampled in fp32, not the checkpoint's fp16
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 48, 48)).shape == (1, 16)


def test_load_api_returns_model_and_clip_transform_on_a_real_photo(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    arch = tmp_path / "arch224.json"
    arch.write_text(json.dumps({"input_size": 224, "patch_size": 32, "width": 32, "depth": 1,
                                "heads": 2, "embedding_size": 8}))
    model, transform = unicom_cli.load(str(arch), random_init=True)
    photo = Image.fromarray(load_sample_images().images[0])  # 427 × 640 RGB
    got = transform(photo)

    # SPEC §1 by hand: shorter side → 224 (bicubic), centre crop, [0, 1], CLIP mean/std.
    w, h = photo.size
    new_w, new_h = (int(224 * w / h), 224) if h < w else (224, int(224 * h / w))
    resized = np.asarray(photo.resize((new_w, new_h), Image.BICUBIC), dtype=np.float64) / 255
    top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
    crop = resized[top:top + 224, left:left + 224]
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    expected = ((crop - mean) / std).transpose(2, 0, 1)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    with torch.no_grad():
        assert model(got[None]).shape == (1, 8)
    assert "ViT-B/32" in unicom_cli.available_models()


def test_resample_grid_of_a_wide_head_matches_scipy():
    """More output rows than one resampling chunk (64): the pieces must join in order."""
    gen = torch.Generator().manual_seed(5)
    state = {"pos_embed": torch.randn(1, 25, 4, generator=gen),
             "feature.0.weight": torch.randn(130, 25 * 4, generator=gen)}
    out = resample_grid(state, 8)
    head = state["feature.0.weight"].numpy().astype(np.float64)
    np.testing.assert_allclose(out["feature.0.weight"].numpy(), _zoom_head(head, 4, 8), atol=1e-5)
