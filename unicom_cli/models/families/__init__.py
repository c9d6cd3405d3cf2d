"""Model families behind one interface: a --model string → ModelSpec (``resolve_spec``) → network (``load``).

* ``unicom``: the registered UNICOM ViTs and JSON architecture files (families/unicom.py);
* ``hf``: transformers vision models — the registered MLCD names, ``hf:ORG/NAME[@REVISION]`` and
  local ``save_pretrained`` folders (families/hf.py);
* ``timm``: ``timm:NAME`` with its pretrained weights, and local folders in timm's hub layout
  (families/timm.py).

Each family's ``load`` returns a :class:`~unicom_cli.models.families.base.Built`; the embedding
it computes is described by ``spec.embedding`` and recorded in every output .json.
"""

from __future__ import annotations

from pathlib import Path

from unicom_cli.models.families.base import Built
from unicom_cli.models.registry import ModelSpec, get_spec

__all__ = ["Built", "load", "resolve_spec"]


def resolve_spec(name_or_path: str | Path | ModelSpec, *, cache: str | Path | None = None,
                 mirror: str | None = None) -> ModelSpec:
    """The spec a --model value names. Hub and timm names read their configuration (from the
    cache, or downloaded: a few kB); registered and JSON names stay pure data."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    key = str(name_or_path)
    if _is_pretrained_folder(key):
        from unicom_cli.models.families import timm

        if timm.is_timm_folder(Path(key)):
            return timm.resolve_folder(Path(key))
    if key.startswith("hf:") or _is_pretrained_folder(key):
        from unicom_cli.models.families import hf

        return hf.resolve(key, cache=cache, mirror=mirror)
    if key.startswith("timm:"):
        from unicom_cli.models.families import timm

        return timm.resolve(key)
    spec = get_spec(key)
    if spec.family == "hf":  # a registered MLCD name: its own config decides sizes and preprocessing
        from unicom_cli.models.families import hf

        return hf.resolve_registered(spec, cache=cache, mirror=mirror)
    return spec


def _is_pretrained_folder(key: str) -> bool:
    path = Path(key)
    return path.is_dir() and (path / "config.json").is_file()


def load(spec: ModelSpec, weights: str | Path | None = None, *, pretrained: bool = True, seed: int = 0,
         drop_path_rate: float = 0.0, cache: str | Path | None = None, mirror: str | None = None) -> Built:
    """The family's network for ``spec`` on the CPU in fp32 (see ``Built``)."""
    if spec.family == "hf":
        from unicom_cli.models.families import hf as family
    elif spec.family == "timm":
        from unicom_cli.models.families import timm as family
    else:
        from unicom_cli.models.families import unicom as family
    return family.load(spec, weights, pretrained=pretrained, seed=seed, drop_path_rate=drop_path_rate,
                       cache=cache, mirror=mirror)
