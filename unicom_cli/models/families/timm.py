"""The timm family: ``timm:NAME`` (a timm model with pretrained weights on the hub, e.g.
``timm:vit_base_patch16_clip_224.openai``). Weights come through huggingface_hub (safetensors only,
the same checks as hf.py); timm builds the network with ``num_classes=0``. A local folder in
timm's own hub layout (``config.json`` with ``architecture`` and ``pretrained_cfg``, beside
``model.safetensors``: what ``finetune`` writes, via ``timm.models.save_for_hf``) is a timm model too.

The embedding is timm's pre-logits output, ``forward_head(pre_logits=True)``: the model's own
pooling (class token or token average, per its ``global_pool``) after its final norm — what timm's
feature extraction and linear probes use. Preprocessing is the model's pretrained config
(input size, crop_pct → shorter-side resize, interpolation, mean/std).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path

from unicom_cli.errors import InputError, UnknownModel, UnsupportedModel, UsageError
from unicom_cli.models.families.base import Built
from unicom_cli.models.families.hub_files import check_folder, fetch
from unicom_cli.models.registry import ModelSpec

EMBEDDING_TIMM = "timm forward_head(pre_logits=True): the model's own pooling after its final norm"


def resolve(key: str) -> ModelSpec:
    """``timm:NAME`` → spec from timm's pretrained config (no download: it ships with timm)."""
    import timm

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
    return _spec(key, name, dataclasses.asdict(cfg), {}, repo=name, source=cfg.hf_hub_id)


def is_timm_folder(folder: Path) -> bool:
    """A folder in timm's hub layout: its config.json names an ``architecture`` (not a ``model_type``)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # hf.py's checks name the problem
    return isinstance(config, dict) and "architecture" in config and "model_type" not in config


def resolve_folder(folder: Path) -> ModelSpec:
    """A local timm folder (config.json + model.safetensors) → spec; no network."""
    from timm.models import is_model
    from timm.models._hub import load_model_config_from_path

    folder = Path(folder).resolve()
    check_folder(folder, str(folder), processor=False)
    cfg, arch, model_args = load_model_config_from_path(folder)
    if not is_model(arch):
        raise UnsupportedModel(f"{folder / 'config.json'}: timm {_timm_version()} has no architecture {arch!r}")
    return _spec(str(folder), arch, cfg, model_args, repo=str(folder), source=str(folder))


def _timm_version() -> str:
    import timm

    return timm.__version__


def _spec(key: str, arch: str, cfg: dict, model_args: dict, *, repo: str, source: str) -> ModelSpec:
    """Architecture (built on the meta device: no memory) and preprocessing of a pretrained config."""
    import timm
    import torch

    with torch.device("meta"):
        net = timm.create_model(arch, pretrained=False, **{**model_args, "num_classes": 0})
    size = int(cfg["input_size"][-1])
    if cfg["input_size"][-1] != cfg["input_size"][-2]:
        raise UnsupportedModel(f"'{key}': input {cfg['input_size'][-2]}x{size} is not square")
    crop_mode, interpolation = cfg.get("crop_mode") or "center", cfg.get("interpolation") or "bicubic"
    if crop_mode not in ("center", "squash") or interpolation not in ("bicubic", "bilinear"):
        raise UnsupportedModel(f"'{key}': crop mode {crop_mode!r} / {interpolation!r} resize is not "
                               f"one unicom's decode route makes (center or squash; bicubic or bilinear)")
    squash = crop_mode == "squash"
    return ModelSpec(
        name=key, input_size=size, patch_size=int(getattr(getattr(net, "patch_embed", None), "patch_size", (1,))[0]),
        width=int(net.num_features), depth=max(1, len(getattr(net, "blocks", []))), heads=1,  # informational
        embedding_size=int(net.num_features), family="timm", repo=repo,
        params=sum(p.numel() for p in net.parameters()), source=source,
        resize_size=None if squash else math.floor(size / (cfg.get("crop_pct") or 1.0)), squash=squash,
        interpolation=interpolation, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), embedding=EMBEDDING_TIMM)


def load(spec: ModelSpec, weights: str | Path | None = None, *, pretrained: bool = True, seed: int = 0,
         drop_path_rate: float = 0.0, cache: str | Path | None = None, mirror: str | None = None) -> Built:
    """timm's network with its hub weights (safetensors, pinned to ``spec.revision`` when set)."""
    import timm
    import torch

    from unicom_cli.models.families.hf import HubEncoder, _weights_digest

    if weights is not None:
        raise UsageError(f"--weights is for UNICOM state dicts; {spec.name} loads its own safetensors "
                         f"(for a finetuned copy pass its folder as --model)")
    folder = Path(spec.repo) if spec.repo and Path(spec.repo).is_dir() else None
    arch = f"local-dir:{folder}" if folder else spec.repo
    kwargs = {"num_classes": 0, "drop_path_rate": drop_path_rate} if drop_path_rate else {"num_classes": 0}
    if not pretrained:
        from unicom_cli.utils.console import info

        info(f"{spec.name}: random initialisation with seed {seed} (no trained weights)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = timm.create_model(arch, pretrained=False, **kwargs)
        return Built(HubEncoder(net.float().eval(), spec), spec, None, None)
    if folder:
        files_folder, commit = folder, None
    else:
        hub_id = timm.models.get_pretrained_cfg(spec.repo).hf_hub_id
        files = fetch(hub_id.split("@")[0], spec.revision, cache=cache, mirror=mirror, config_files=["config.json"])
        files_folder, commit = files.folder, files.commit
    path = files_folder / "model.safetensors"
    if not path.is_file():
        raise UnsupportedModel(f"{spec.name}: {files_folder} has no model.safetensors")
    try:
        # A folder: timm reads its model.safetensors, which it prefers to any other file there.
        overlay = {} if folder else {"pretrained_cfg_overlay": {"file": str(path)}}
        net = timm.create_model(arch, pretrained=True, **overlay, **kwargs)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt file, tensors that do not fit the architecture
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: its weights do not load into the timm network of {spec.name} ({first}); "
                         f"write or download the model again") from exc
    spec = dataclasses.replace(spec, revision=commit)
    sha256, _ = _weights_digest(files_folder)
    return Built(HubEncoder(net.float().eval(), spec), spec, path, sha256)


def save_folder(encoder, folder: Path) -> None:
    """A (finetuned) timm network as a folder in timm's own hub layout (config.json with its
    architecture and pretrained_cfg, model.safetensors), which every --model takes."""
    from timm.models import save_for_hf

    save_for_hf(encoder.net, str(folder), safe_serialization=True)
