"""The UNICOM network: timm's VisionTransformer (no class token, no qkv bias, ReLU6 MLP) plus
the UNICOM feature head. No I/O here: weights are loaded by ``models.factory``."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unicom_cli.models.registry import ModelSpec


class UnicomViT(VisionTransformer):
    """A plain ViT whose embedding is computed from all patch tokens.

    State-dict keys equal the published checkpoints: ``patch_embed.proj``, ``pos_embed``,
    ``blocks.{i}.…``, ``norm`` and ``feature.{0..3}``.
    """

    def __init__(self, spec: ModelSpec, drop_path_rate: float = 0.0) -> None:
        super().__init__(
            img_size=spec.input_size,
            patch_size=spec.patch_size,
            embed_dim=spec.width,
            depth=spec.depth,
            num_heads=spec.heads,
            mlp_ratio=4.0,
            qkv_bias=False,
            class_token=False,
            global_pool="",
            num_classes=0,
            act_layer=nn.ReLU6,
            # PyTorch's LayerNorm default, as the reference network (timm's own default is 1e-6).
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
            drop_path_rate=drop_path_rate,
        )
        self.spec = spec
        self.feature = nn.Sequential(
            nn.Linear(spec.num_patches * spec.width, spec.width, bias=False),
            nn.BatchNorm1d(spec.width, eps=2e-5),
            nn.Linear(spec.width, spec.embedding_size, bias=False),
            nn.BatchNorm1d(spec.embedding_size, eps=2e-5),
        )
        # timm initialises pos_embed with std 0.02; keep that, and a sane init for the head.
        for layer in (self.feature[0], self.feature[2]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
        self.autocast_dtype: torch.dtype | None = None

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final LayerNorm (computed in fp32), shape (B, patches, width)."""
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.norm(x.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Un-normalised embeddings, shape (B, embedding_size), always fp32.

        When ``autocast_dtype`` is set the blocks run under autocast (fp16 on CUDA, as the
        reference does); the final norm and the feature head always run in fp32.
        """
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype):
                tokens = self.forward_tokens(images)
        else:
            tokens = self.forward_tokens(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.feature(tokens.float().flatten(1))


def build_model(spec: ModelSpec, drop_path_rate: float = 0.0) -> UnicomViT:
    """A freshly initialised UNICOM network for ``spec`` (use the meta device to skip allocation)."""
    return UnicomViT(spec, drop_path_rate=drop_path_rate)
