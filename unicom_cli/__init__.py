"""unicom-cli: embed, evaluate and finetune UNICOM image-retrieval models.

Python API mirroring the original ``unicom`` package::

    import unicom_cli
    model, transform = unicom_cli.load("ViT-B/32")
    index = unicom_cli.Index.load("photos.index")   # built by `unicom index`
    scores, rows = index.search(["query.jpg"], k=10)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from unicom_cli._version import __version__
from unicom_cli.models.registry import available_models

if TYPE_CHECKING:
    from unicom_cli.models.vit import UnicomViT

__all__ = ["Index", "available_models", "embed_folder", "load", "__version__"]


def __getattr__(name: str):
    """``unicom_cli.Index`` without importing faiss and numpy at ``import unicom_cli``."""
    if name == "Index":
        from unicom_cli.index.store import Index

        return Index
    raise AttributeError(f"module 'unicom_cli' has no attribute {name!r}")


def load(name_or_path: str | Path, device: str = "cpu", weights: str | Path | None = None,
         precision: str | None = None, *, random_init: bool = False,
         seed: int = 0) -> tuple["UnicomViT", Callable]:
    """Load a model by name (downloading its weights on first use) or JSON file: a UNICOM or MLCD
    name, ``hf:ORG/NAME[@REVISION]``, ``timm:NAME`` or a save_pretrained folder.

    Returns ``(model, transform)``: the model in eval mode on ``device`` (images → embeddings)
    and its eval transform for PIL images (the CLIP one, or the model's own preprocessing).
    ``precision`` None keeps the original's behaviour (fp16 autocast
    on CUDA, exact fp32 on CPU); ``"auto"`` is what the commands use (bf16 on CPUs with native
    bf16), or ``"fp32"``, ``"fp16"``, ``"bf16"``. A JSON architecture needs ``weights``, or
    ``random_init=True`` for a network drawn from ``seed`` on purpose.
    """
    from unicom_cli.models.factory import create_model, resolve_device

    if precision is None:
        precision = "fp32" if resolve_device(device).type == "cpu" else "auto"
    loaded = create_model(name_or_path, weights=weights, device=device, precision=precision,
                          pretrained=not random_init, seed=seed)
    return loaded.model, loaded.transform


def embed_folder(input: str | Path, output: str | Path, model: str = "ViT-B/32", **options):
    """Embed a folder (or path-list file) into ``output`` (.npy + .ids.txt + .json), like
    ``unicom embed``; ``options`` are the fields of ``unicom_cli.pipelines.embed.EmbedConfig``.

    Returns the run's ``EmbedSummary``.
    """
    from unicom_cli.pipelines.embed import EmbedConfig, embed_images

    return embed_images(EmbedConfig(input=Path(input), output=Path(output), model=model, **options))
