"""The timm family: ``timm:NAME`` (a timm model with pretrained weights on the hub, e.g.
``timm:vit_base_patch16_clip_224.openai``). Weights come through huggingface_hub (safetensors only,
the same checks as hf.py); timm builds the network with ``num_classes=0``.

The embedding is timm's pre-logits output, ``forward_head(pre_logits=True)``: the model's own
pooling (class token or token average, per its ``global_pool``) after its final norm — what timm's
feature extraction and linear probes use. Preprocessing is the model's pretrained config
(input size, crop_pct → shorter-side resize, interpolation, mean/std).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

from unicom_cli.errors import UnknownModel, UnsupportedModel, UsageError
from unicom_cli.models.families.base import Built
from unicom_cli.models.families.hub_files import fetch
from unicom_cli.models.registry import ModelSpec

EMBEDDING_TIMM = "timm forward_head(pre_logits=True): the model's own pooling after its final norm"


def resolve(key: str) -> ModelSpec:
    """``timm:NAME`` → spec from timm's pretrained config (no download: it ships with timm)."""
    import timm
    import torch

    name = key[len("timm:"):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True), n=1)
        hint = f"did you mean 'timm:{close[0]}'? " if close else ""
        raise UnknownModel(f"'{key}': timm has no such model; {hint}list them with "
                           f"python -c \"import timm; print(timm.list_models(pretrained=True))\"")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise UnknownModel(f"'{key}': timm has no pretrained weights for it on the hub; name a tag "
                           f"with weights, e.g. timm:{(timm.list_pretrained(name + '*') or ['NAME.TAG'])[0]}")
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False, num_classes=0)
    size = int(cfg.input_size[-1])
    if cfg.input_size[-1] != cfg.input_size[-2]:
        raise UnsupportedModel(f"'{key}': input {cfg.input_size[-2]}x{cfg.input_size[-1]} is not square")
    if cfg.crop_mode not in ("center", "squash") or cfg.interpolation not in ("bicubic", "bilinear"):
        raise UnsupportedModel(f"'{key}': crop mode {cfg.crop_mode!r} / {cfg.interpolation!r} resize is not "
                               f"one unicom's decode route makes (center or squash; bicubic or bilinear)")
    squash = cfg.crop_mode == "squash"
    return ModelSpec(
        name=key, input_size=size, patch_size=int(getattr(getattr(net, "patch_embed", None), "patch_size", (1,))[0]),
        width=int(net.num_features), depth=max(1, len(getattr(net, "blocks", []))), heads=1,  # informational
        embedding_size=int(net.num_features), family="timm", repo=name,
        params=sum(p.numel() for p in net.parameters()), source=cfg.hf_hub_id,
        resize_size=None if squash else math.floor(size / (cfg.crop_pct or 1.0)), squash=squash,
        interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std), embedding=EMBEDDING_TIMM)


def load(spec: ModelSpec, weights: str | Path | None = None, *, pretrained: bool = True, seed: int = 0,
         drop_path_rate: float = 0.0, cache: str | Path | None = None, mirror: str | None = None) -> Built:
    """timm's network with its hub weights (safetensors, pinned to ``spec.revision`` when set)."""
    import timm
    import torch

    from unicom_cli.models.families.hf import HubEncoder, _weights_digest

    if weights is not None:
        raise UsageError(f"--weights is for UNICOM state dicts; {spec.name} loads its hub weights")
    hub_id = timm.models.get_pretrained_cfg(spec.repo).hf_hub_id
    kwargs = {"num_classes": 0, "drop_path_rate": drop_path_rate} if drop_path_rate else {"num_classes": 0}
    if not pretrained:
        from unicom_cli.utils.console import info

        info(f"{spec.name}: random initialisation with seed {seed} (no trained weights)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = timm.create_model(spec.repo, pretrained=False, **kwargs)
        return Built(HubEncoder(net.float().eval(), spec), spec, None, None)
    files = fetch(hub_id.split("@")[0], spec.revision, cache=cache, mirror=mirror, config_files=["config.json"])
    path = files.folder / "model.safetensors"
    if not path.is_file():
        raise UnsupportedModel(f"{spec.name}: {hub_id} has no model.safetensors")
    net = timm.create_model(spec.repo, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    spec = dataclasses.replace(spec, revision=files.commit)
    sha256, _ = _weights_digest(files.folder)
    return Built(HubEncoder(net.float().eval(), spec), spec, path, sha256)
