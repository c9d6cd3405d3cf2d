"""What every model family hands back: the network, its (resolved) spec and where its weights came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from unicom_cli.models.registry import ModelSpec


@dataclass
class Built:
    """A family's network on the CPU in fp32, ready for ``models.factory`` to place and wrap.

    ``model(images)`` takes normalised (B, 3, H, W) float images and returns (B, embedding_size)
    fp32 embeddings; it has an ``autocast_dtype`` attribute (None: plain fp32) and ``blocks``,
    its transformer blocks in order (layer-wise learning-rate decay).
    """

    model: "nn.Module"
    spec: "ModelSpec"  # with what loading resolved: hub commit, preprocessing, embedding size
    weights_path: Path | None  # None: random init
    sha256: str | None  # of the weights file, when known
