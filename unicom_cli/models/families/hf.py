"""The transformers family: MLCD, CLIP vision, SigLIP/SigLIP 2 vision, DINOv2/DINOv3 and any vision
model with a pooled output, from the hub (``hf:ORG/NAME[@REV]``, registered MLCD names) or a local
``save_pretrained`` folder. AutoConfig/AutoModel/AutoImageProcessor do the work; safetensors only,
never ``trust_remote_code``.

The embedding is the model's ``pooler_output``, per family:

* MLCD and CLIP vision: the class token after the final LayerNorm (``post_layernorm``), no
  projection (SPEC 5: MLCD's published encoders drop the projection);
* SigLIP / SigLIP 2 vision (fixed-resolution checkpoints; NaFlex ones are refused): the
  attention-pooling head's output (the image embedding they are trained with; no class token);
* DINOv2 / DINOv3: the class token after the final LayerNorm (what their linear probes use).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
import torch
from torch import nn

from unicom_cli.errors import InputError, UnicomError, UnsupportedModel, UsageError
from unicom_cli.models.families.base import Built
from unicom_cli.models.families.hub_files import (
    HubFiles,
    check_folder,
    fetch,
    local_files,
    parse_hub_name,
    require_hub,
)
from unicom_cli.models.registry import EMBEDDING_CLS, ModelSpec, available_models

EMBEDDINGS = {  # model_type → what pooler_output is (recorded in every output .json)
    "siglip_vision_model": "pooler_output: the attention-pooling head's output (SigLIP has no class token)",
    "dinov2": "pooler_output: the class token after the final LayerNorm",
    "dinov3_vit": "pooler_output: the class token after the final LayerNorm",
}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def resolve(key: str, *, cache: str | Path | None = None, mirror: str | None = None) -> ModelSpec:
    """``hf:ORG/NAME[@REV]`` or a save_pretrained folder → spec (configuration only: a few kB)."""
    if key.startswith("hf:"):
        repo, revision = parse_hub_name(key)
        files = fetch(repo, revision, cache=cache, mirror=mirror, weights=False)
        return spec_from_files(files, key.split("@")[0])
    require_hub()
    return spec_from_files(local_files(Path(key)), str(Path(key)))


def resolve_registered(spec: ModelSpec, *, cache: str | Path | None = None, mirror: str | None = None) -> ModelSpec:
    """A registered MLCD name → the spec its hub configuration gives (its name kept)."""
    files = fetch(spec.repo, spec.revision, cache=cache, mirror=mirror, weights=False)
    return dataclasses.replace(spec_from_files(files, spec.name), download_bytes=spec.download_bytes)


def spec_from_files(files: HubFiles, name: str) -> ModelSpec:
    """Architecture, embedding and preprocessing from the model's own config files."""
    from transformers import AutoConfig, AutoImageProcessor

    try:
        config = AutoConfig.from_pretrained(files.folder, trust_remote_code=False)
        processor = AutoImageProcessor.from_pretrained(files.folder, trust_remote_code=False)
    except ValueError as exc:  # an unknown model_type, or a processor that needs remote code
        raise UnsupportedModel(f"{name}: transformers cannot build it without remote code "
                               f"({str(exc).splitlines()[0][:160]})") from exc
    vision = getattr(config, "vision_config", None) or config
    if vision.model_type == "siglip2_vision_model":
        raise UnsupportedModel(f"{name}: a SigLIP 2 NaFlex model takes variable-size patch sequences, not "
                               f"square crops; use a fixed-resolution SigLIP 2 checkpoint (e.g. "
                               f"hf:google/siglip2-base-patch16-224, loaded as SigLIP)")
    width = getattr(vision, "hidden_size", None) or (getattr(vision, "hidden_sizes", None) or [0])[-1]
    patch = getattr(vision, "patch_size", 0)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    heads = int(getattr(vision, "num_attention_heads", 0) or 1)  # informational; ≥ 1 for the JSON record
    return ModelSpec(
        name=name, patch_size=int(patch or 1), width=int(width),
        depth=max(1, int(getattr(vision, "num_hidden_layers", 0) or 0)),
        heads=heads if width % heads == 0 else 1, embedding_size=int(width),
        family="hf", repo=files.repo, revision=files.commit, source=str(files.folder),
        embedding=EMBEDDINGS.get(vision.model_type, EMBEDDING_CLS), **_preprocessing(processor, name))


def _preprocessing(processor, name: str) -> dict:
    """input_size, resize_size, squash, interpolation, mean and std of an image processor."""
    size, crop = processor.size, getattr(processor, "crop_size", None)
    resample = int(getattr(processor, "resample", 3))
    if resample not in RESAMPLE:
        raise UnsupportedModel(f"{name}: its image processor resizes with PIL filter {resample}; "
                               f"unicom's decode route has bilinear (2) and bicubic (3)")
    common = {"interpolation": RESAMPLE[resample], "mean": tuple(float(v) for v in processor.image_mean),
              "std": tuple(float(v) for v in processor.image_std)}
    if getattr(size, "shortest_edge", None):
        if not getattr(processor, "do_center_crop", False) or crop is None:
            raise UnsupportedModel(f"{name}: resizes the shorter side without a centre crop "
                                   f"(non-square inputs); unicom batches square crops")
        if crop.height != crop.width:
            raise UnsupportedModel(f"{name}: crops to {crop.height}x{crop.width}; unicom needs a square crop")
        return {"input_size": int(crop.height), "resize_size": int(size.shortest_edge), **common}
    if getattr(size, "height", None) and size.height == size.width:
        crop_side = int(crop.height) if getattr(processor, "do_center_crop", False) and crop else None
        if crop_side and crop_side != size.height:
            raise UnsupportedModel(f"{name}: resizes to {size.height}px then crops {crop_side}px; unsupported")
        return {"input_size": int(size.height), "squash": True, **common}
    raise UnsupportedModel(f"{name}: image processor size {size} is neither a shorter side nor a square")


def load(spec: ModelSpec, weights: str | Path | None = None, *, pretrained: bool = True, seed: int = 0,
         drop_path_rate: float = 0.0, cache: str | Path | None = None, mirror: str | None = None) -> Built:
    """The vision model of ``spec.repo`` at ``spec.revision`` (pinned: the commit an index recorded)."""
    if weights is not None:
        raise UsageError(f"--weights is for UNICOM state dicts; {spec.name} loads its own safetensors "
                         f"(for a finetuned copy pass its save_pretrained folder as --model)")
    files = _files_of(spec, cache, mirror)
    if spec.revision and files.commit and files.commit != spec.revision:
        raise UsageError(f"{spec.name}: revision {files.commit} is not the {spec.revision} asked for")
    resolved = spec_from_files(files, spec.name)
    # A registered name lists the published size; the model's own processor config decides it.
    # Another size asked for (create_model's input_size: the name gains @Npx) is kept.
    listed = spec.source == "registry" and spec.name in available_models()
    if not listed and spec.input_size != resolved.input_size:  # the shorter-side resize scales with it
        scale = spec.input_size / resolved.input_size
        resolved = dataclasses.replace(resolved, input_size=spec.input_size, resize_size=resolved.resize_size
                                       and round(resolved.resize_size * scale))
    resolved = dataclasses.replace(resolved, params=None, download_bytes=spec.download_bytes)
    net, sha256, path = _build(files, resolved, pretrained=pretrained, seed=seed, drop_path_rate=drop_path_rate)
    resolved = dataclasses.replace(resolved, params=sum(p.numel() for p in net.parameters()))
    encoder = HubEncoder(net, resolved)
    encoder.processor_folder = files.folder  # its preprocessor_config.json goes with a finetuned copy
    return Built(encoder, resolved, path, sha256)


def save_pretrained(encoder: "HubEncoder", folder: Path) -> None:
    """A (finetuned) network as a save_pretrained folder with its image processor, which every
    --model takes (train/hub_backbone.py writes it beside the final path and renames it there)."""
    import shutil

    encoder.net.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(Path(encoder.processor_folder) / "preprocessor_config.json", folder / "preprocessor_config.json")


def _files_of(spec: ModelSpec, cache, mirror) -> HubFiles:
    """A local folder; the cached snapshot an output recorded (its folder is named by the commit:
    no network); else the hub at ``spec.revision``."""
    if spec.repo and Path(spec.repo).is_dir():
        return local_files(Path(spec.repo))
    snapshot = Path(spec.source)
    if spec.revision and snapshot.name == spec.revision and any(snapshot.glob("*.safetensors")):
        check_folder(snapshot, spec.hub_name)
        return HubFiles(snapshot, spec.repo, spec.revision)
    return fetch(spec.repo, spec.revision, cache=cache, mirror=mirror)


def _model_class(config):
    """The vision tower's class: the model itself, or the vision half of a two-tower repository."""
    from transformers import MODEL_MAPPING

    vision = getattr(config, "vision_config", None) or config
    try:
        return MODEL_MAPPING[type(vision)], vision
    except KeyError as exc:
        raise UnsupportedModel(f"{config.model_type}: transformers has no vision model for it") from exc


def _build(files: HubFiles, spec: ModelSpec, *, pretrained: bool, seed: int, drop_path_rate: float):
    """(module, SHA-256 of the single weights file or None, its path), in fp32 on the CPU."""
    from transformers import AutoConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress output only
    transformers_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(files.folder, trust_remote_code=False)
    cls, vision = _model_class(config)
    if drop_path_rate and hasattr(vision, "drop_path_rate"):
        vision.drop_path_rate = drop_path_rate
    _refuse_unpooled(cls, spec.name)
    if not pretrained:
        from unicom_cli.utils.console import info

        info(f"{spec.name}: random initialisation with seed {seed} (no trained weights)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(vision).float().eval(), None, None
    if not any(files.folder.glob("*.safetensors")):
        raise InputError(f"{files.folder}: no safetensors weights beside config.json; add them, or pass "
                         f"--random-init for a randomly initialised network")
    try:
        net, loading = cls.from_pretrained(files.folder, config=vision, use_safetensors=True,
                                           trust_remote_code=False, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files, shapes that do not fit the config
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{files.folder}: its weights do not load into {cls.__name__} ({first}); "
                         f"download the model again (a hub snapshot: delete it from the cache)") from exc
    missing = [k for k in loading.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        what = "pooled output" if "pool" in missing[0] else "network"
        raise UnsupportedModel(f"{spec.name}: its weights lack {len(missing)} tensors of {cls.__name__} "
                               f"(e.g. {missing[0]}): no trained {what}")
    return net.float().eval(), *_weights_digest(files.folder)


def _refuse_unpooled(cls, name: str) -> None:
    annotation = str(inspect.signature(cls.forward).return_annotation)
    if "Pooling" not in annotation:
        raise UnsupportedModel(f"{name}: {cls.__name__} gives no pooled output (pooler_output); unicom "
                               f"embeds with a model's pooled image embedding")


def _weights_digest(folder: Path) -> tuple[str | None, Path | None]:
    """SHA-256 of model.safetensors: the hub cache names LFS blobs by it; else hashed here."""
    path = folder / "model.safetensors"
    if not path.is_file():
        return None, None  # sharded: the commit pins the weights
    blob = path.resolve().name
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob, path
    from unicom_cli.models.weights import file_digest

    return file_digest(path), path


class HubEncoder(nn.Module):
    """A transformers vision model (or a timm model built with ``num_classes=0``) as a unicom
    network: normalised images → fp32 ``pooler_output`` (timm: its pre-logits features)."""

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.autocast_dtype: torch.dtype | None = None
        self._transformers = hasattr(net, "config") and hasattr(net.config, "model_type")
        self.processor_folder: Path | None = None
        params = inspect.signature(net.forward).parameters
        native = getattr(getattr(net, "config", None), "image_size", spec.input_size)
        native = native[0] if isinstance(native, (list, tuple)) else native
        # CLIP/SigLIP interpolate their position table only when asked; MLCD's rotary and
        # DINOv2 adapt to any input size by themselves.
        self._extra = ({"interpolate_pos_encoding": True}
                       if "interpolate_pos_encoding" in params and native != spec.input_size else {})

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order (layer-wise learning-rate decay)."""
        if isinstance(getattr(self.net, "blocks", None), nn.Sequential):  # timm ViTs
            return self.net.blocks
        lists = [m for m in self.net.modules() if isinstance(m, nn.ModuleList)]
        depth = getattr(getattr(self.net, "config", None), "num_hidden_layers", None)
        return next((m for m in lists if len(m) == depth), lists[0] if lists else nn.ModuleList())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype):
                out = self._pooled(images)
        else:
            out = self._pooled(images)
        return out.float()

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        if not self._transformers:
            return self.net(images)
        pooled = getattr(self.net(pixel_values=images, **self._extra), "pooler_output", None)
        if pooled is None:
            raise UnicomError(f"{self.spec.name}: the model returned no pooler_output")
        return pooled
