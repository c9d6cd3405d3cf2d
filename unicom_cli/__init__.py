"""unicom-cli: embed, evaluate and finetune UNICOM image-retrieval models.

Python API mirroring the original ``unicom`` package::

    import unicom_cli
    model, transform = unicom_cli.load("ViT-B/32")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from unicom_cli.models.registry import available_models

if TYPE_CHECKING:
    from unicom_cli.models.vit import UnicomViT

__version__ = "0.1.0"
__all__ = ["available_models", "load", "__version__"]


def load(name_or_path: str | Path, device: str = "cpu", weights: str | Path | None = None,
         ) -> tuple["UnicomViT", Callable]:
    """Load a UNICOM model by name (downloading its weights on first use) or JSON file.

    Returns ``(model, transform)``: the model in eval mode on ``device`` and the CLIP eval
    transform for PIL images.
    """
    from unicom_cli.models.factory import create_model

    loaded = create_model(name_or_path, weights=weights, device=device)
    return loaded.model, loaded.transform
