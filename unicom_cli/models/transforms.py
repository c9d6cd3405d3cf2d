"""Preprocessing from a ModelSpec: the CLIP eval transform (SPEC §1) and the timm train transform."""

from __future__ import annotations

from typing import Callable

from unicom_cli.models.registry import ModelSpec


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(spec: ModelSpec) -> Callable:
    """Resize shorter side (bicubic) → center crop → RGB → tensor → CLIP normalisation; for a hub
    model the resize, crop, filter and mean/std of its own image processor."""
    from torchvision import transforms as T

    mode = T.InterpolationMode.BILINEAR if spec.interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    resize = (spec.input_size, spec.input_size) if spec.squash else (spec.resize_size or spec.input_size)
    crop = _floor_crop(spec.input_size) if spec.geometry["floor_crop"] else T.CenterCrop(spec.input_size)
    return T.Compose([
        T.Resize(resize, interpolation=mode),
        crop,
        _to_rgb,
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


class _floor_crop:  # noqa: N801 - a transform, named like torchvision's
    """transformers' centre crop: the offset floored (torchvision's CenterCrop rounds it)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image):
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


def train_transform(spec: ModelSpec, augment: bool = True) -> Callable:
    """The SPEC §3 retrieval-finetuning transform (timm RandAugment recipe), or the plain CLIP one."""
    if not augment:
        return eval_transform(spec)
    from timm.data import create_transform

    transform = create_transform(
        input_size=spec.input_size,
        is_training=True,
        color_jitter=0.4,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=spec.mean,
        std=spec.std,
    )
    _guard_posterize(transform)
    return transform


def _safe_posterize(img, bits_to_keep: int, **_):
    from PIL import ImageOps

    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, bits_to_keep))


def _guard_posterize(transform) -> None:
    """timm's increasing posterize reaches 0 bits at magnitude 10, which Pillow ≥ 10 rejects
    (ValueError mid-epoch); keep at least 1 bit, which is what older Pillow did."""
    from timm.data.auto_augment import RandAugment

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _safe_posterize
