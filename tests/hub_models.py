"""Tiny random transformers vision models saved with save_pretrained, one per family, for offline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

CLIP_CROP = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def save_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """``kind``: mlcd, clip, siglip, dinov2, dinov3 or vitmae (no pooled output); 32 px input."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    if kind == "mlcd":  # rotary 2-D positions: any input size
        model = T.MLCDVisionModel(T.MLCDVisionConfig(**SMALL, image_size=32, patch_size=8))
        processor = T.CLIPImageProcessor(**CLIP_CROP)
    elif kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8))
        processor = T.CLIPImageProcessor(**CLIP_CROP)
    elif kind == "siglip":  # squash resize, bilinear, mean/std 0.5
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, image_size=32, patch_size=8))
        processor = T.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2)
    elif kind == "dinov2":  # BitImageProcessor: shorter side 40, crop 32, ImageNet mean/std
        model = T.Dinov2Model(T.Dinov2Config(**{**SMALL, "mlp_ratio": 2}, image_size=32, patch_size=8))
        processor = T.BitImageProcessor(**CLIP_CROP, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225])
    elif kind == "dinov3":  # rotary positions, register tokens; squash resize, bilinear
        model = T.DINOv3ViTModel(T.DINOv3ViTConfig(**SMALL, image_size=32, patch_size=8, num_register_tokens=2))
        processor = T.DINOv3ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "vitmae":
        model = T.ViTMAEModel(T.ViTMAEConfig(**SMALL, image_size=32, patch_size=8))
        processor = T.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        raise ValueError(kind)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hub_models(tmp_path_factory) -> dict[str, Path]:
    """Every family's tiny model folder, made once per session."""
    root = tmp_path_factory.mktemp("hub_models")
    return {kind: save_tiny(kind, root / kind) for kind in ("mlcd", "clip", "siglip", "dinov2", "dinov3", "vitmae")}
