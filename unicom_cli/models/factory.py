"""Build a ready-to-use UNICOM model from a name or JSON file: weights, input size, device, precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from unicom_cli.errors import UsageError, WeightsError
from unicom_cli.models.registry import ModelSpec, get_spec, with_input_size

if TYPE_CHECKING:
    import torch

    from unicom_cli.models.vit import UnicomViT

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class LoadedModel:
    """A model with what downstream code must record about it."""

    model: "UnicomViT"
    transform: Callable
    spec: ModelSpec
    weights_path: Path | None  # None: freshly initialised
    sha256: str | None  # of the weights file, when known
    precision: str = "fp32"  # what the blocks run in: fp32, fp16 or bf16 (autocast)


def resample_grid(state: dict, new_grid: int) -> dict:
    """Move ``pos_embed`` and ``feature.0.weight`` to a ``new_grid``×``new_grid`` patch grid.

    Linear interpolation over the two grid axes with corners aligned, which is what
    ``scipy.ndimage.zoom(order=1)`` (the reference) computes. Returns a new dict.
    """
    import torch
    import torch.nn.functional as F

    pos = state["pos_embed"]
    old_patches, width = pos.shape[1], pos.shape[2]
    old_grid = math.isqrt(old_patches)
    if old_grid * old_grid != old_patches:
        raise WeightsError(f"pos_embed has {old_patches} tokens, not a square grid")
    if old_grid == new_grid:
        return dict(state)

    def zoom(t: torch.Tensor) -> torch.Tensor:  # (C, g, g) -> (C, new, new), fp32 math
        out = F.interpolate(t.float()[None], size=(new_grid, new_grid), mode="bilinear",
                            align_corners=True)[0]
        return out.to(t.dtype)

    new_state = dict(state)
    grid_pos = pos[0].reshape(old_grid, old_grid, width).permute(2, 0, 1)
    new_state["pos_embed"] = zoom(grid_pos).permute(1, 2, 0).reshape(1, new_grid * new_grid, width)
    head = state.get("feature.0.weight")  # (width_out, patches * width_in)
    if head is None:  # not a UNICOM checkpoint: the strict load names what is missing
        return new_state
    if head.ndim != 2 or head.shape[1] != old_patches * width:
        raise WeightsError(f"feature.0.weight has shape {tuple(head.shape)}, expected "
                           f"(*, {old_patches * width}) for {old_grid}×{old_grid} patches of width {width}")
    rows = []  # a few output rows at a time: ViT-L/14 at 512 px has a 5 GB head in fp32
    for chunk in head.split(64):
        n = chunk.shape[0]
        grid_head = chunk.reshape(n, old_grid, old_grid, width).permute(0, 3, 1, 2)
        resized = zoom(grid_head.reshape(n * width, old_grid, old_grid))
        resized = resized.reshape(n, width, new_grid, new_grid).permute(0, 2, 3, 1)
        rows.append(resized.reshape(n, new_grid * new_grid * width))
    new_state["feature.0.weight"] = torch.cat(rows)
    return new_state


def load_weights_into(model: "UnicomViT", state: dict, source: str) -> None:
    """Strict load, resampling the grid if the checkpoint was made at another input size.

    fp16 tensors are cast to the module's dtype; a shape or key mismatch names the file.
    """
    if "pos_embed" in state and state["pos_embed"].shape[1] != model.spec.num_patches:
        # Resample fp16 checkpoints in fp32: the module keeps the precision.
        grid_keys = [k for k in ("pos_embed", "feature.0.weight") if k in state]
        state = resample_grid({**state, **{k: state[k].float() for k in grid_keys}}, model.spec.grid)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise WeightsError(f"{source}: does not match architecture {model.spec.name}: {detail}. "
                           f"Pick the --model that this checkpoint was trained with") from exc


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` → CUDA when available, else CPU; an unavailable CUDA request is a usage error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    return dev


def resolve_inference_precision(device: "torch.device | str", requested: str | None = "auto") -> str:
    """The precision a feature-extracting command runs the network in: fp32, fp16 or bf16.

    ``auto`` (or None): fp16 autocast on CUDA (as the reference inference), bf16 autocast on a
    CPU that multiplies bf16 natively (``utils.cpu.native_bf16``: AVX512-BF16, AMX or Arm BF16;
    about 3x faster, row cosine to fp32 above 0.9999), fp32 elsewhere. Every command that embeds
    (embed, eval-retrieval, eval-knn, index, search, serve) decides here; finetuning keeps its
    own rules (``autocast_dtype``).
    """
    from unicom_cli.utils.cpu import native_bf16

    kind = device if isinstance(device, str) else device.type
    kind = kind.split(":")[0]
    if requested in (None, "auto"):
        if kind == "cuda":
            return "fp16"
        return "bf16" if kind == "cpu" and native_bf16() else "fp32"
    autocast_dtype(requested, device)  # validates the explicit choice for this device
    return requested


def autocast_dtype(precision: str | None, device: "torch.device | str") -> "torch.dtype | None":
    """Map ``--precision`` to an autocast dtype; None/auto: fp16 on CUDA (as the original), fp32
    on CPU (finetuning's rule; inference resolves ``auto`` first, ``resolve_inference_precision``)."""
    import torch

    kind = (device if isinstance(device, str) else device.type).split(":")[0]
    if precision in (None, "auto"):
        precision = "fp16" if kind == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and kind == "cpu":
        raise UsageError("--precision fp16 is not supported on CPU; use fp32 or bf16")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def create_model(
    name_or_path: str | Path | ModelSpec,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    input_size: int | None = None,
    device: str = "cpu",
    precision: str | None = None,
    drop_path_rate: float = 0.0,
    cache: str | Path | None = None,
) -> LoadedModel:
    """Build the network, load weights and return it in eval mode with its eval transform.

    Args:
        name_or_path: a registered model name, a JSON architecture file or a ModelSpec
            (e.g. the one an index recorded).
        weights: a state-dict file; None downloads the published weights of a registered model
            (on first use) or leaves a JSON-described model freshly initialised.
        pretrained: False never loads weights (random init).
        input_size: run at another resolution; pos_embed and the head are resampled.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``/``fp16``/``bf16`` autocast for the blocks; ``auto``/None picks per
            device and CPU (``resolve_inference_precision``).
    """
    from unicom_cli.models.transforms import eval_transform
    from unicom_cli.models.vit import build_model
    from unicom_cli.models.weights import load_state_dict, sha256_file

    spec = name_or_path if isinstance(name_or_path, ModelSpec) else get_spec(name_or_path)
    if input_size and input_size != spec.input_size:
        spec = with_input_size(spec, input_size)
    dev = resolve_device(device)
    model = build_model(spec, drop_path_rate=drop_path_rate)
    path: Path | None = None
    digest: str | None = None
    if weights is not None:
        path = Path(weights)
    elif pretrained and spec.source == "registry":
        from unicom_cli.models.download import fetch_weights

        path = fetch_weights(spec, cache=cache)
    if path is not None:
        load_weights_into(model, load_state_dict(path), str(path))
        digest = sha256_file(path)
    resolved = resolve_inference_precision(dev, precision)
    model.autocast_dtype = autocast_dtype(resolved, dev)
    model = model.to(dev).eval()
    return LoadedModel(model, eval_transform(spec), spec, path, digest, resolved)


def describe_precision(loaded: LoadedModel, requested: str | None = "auto") -> str:
    """One line for the start of a run: which precision, why, and how to get the other."""
    device = next(loaded.model.parameters()).device
    name = f"{loaded.spec.name} on {device}, {loaded.precision}"
    if requested not in (None, "auto"):
        return f"{name} (--precision {requested})"
    if loaded.precision == "bf16":
        return f"{name} (native bf16 on this CPU; --precision fp32 for exact fp32)"
    if loaded.precision == "fp16":
        return f"{name} (autocast, as the reference; --precision fp32 for exact fp32)"
    return f"{name}" + (" (no native bf16 on this CPU)" if device.type == "cpu" else "")
