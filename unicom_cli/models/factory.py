"""Build a ready-to-use model from any --model value (models/families/): input size, device, precision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from unicom_cli.errors import UsageError
from unicom_cli.models.registry import ModelSpec, with_input_size

if TYPE_CHECKING:
    import torch

    from torch import nn

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class LoadedModel:
    """A model with what downstream code must record about it."""

    model: "nn.Module"  # a family's network (families.base.Built): images → fp32 embeddings
    transform: Callable
    spec: ModelSpec
    weights_path: Path | None  # None: freshly initialised
    sha256: str | None  # of the weights file, when known
    precision: str = "fp32"  # what the blocks run in: fp32, fp16 or bf16 (autocast)
    random_init_seed: int | None = None  # set when the network was randomly initialised on request


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
    seed: int = 0,
    input_size: int | None = None,
    device: str = "cpu",
    precision: str | None = None,
    drop_path_rate: float = 0.0,
    cache: str | Path | None = None,
    mirror: str | None = None,
) -> LoadedModel:
    """Build the network, load weights and return it in eval mode with its eval transform.

    Args:
        name_or_path: a registered model name (UNICOM or MLCD), ``hf:ORG/NAME[@REV]``,
            ``timm:NAME``, a save_pretrained folder, a JSON architecture file or a ModelSpec
            (e.g. the one an index recorded); see ``models.families``.
        weights: a UNICOM state-dict file; None downloads the published weights of a registered
            model (on first use). A JSON-described model needs ``weights`` or ``pretrained=False``.
        pretrained: False never loads weights: a random init drawn from ``seed`` (announced).
        seed: seed of the random init (the same seed gives the same network in every process).
        input_size: run at another resolution; pos_embed and the head are resampled.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; in a process group ``auto``/``cuda``
            mean this rank's GPU.
        precision: ``fp32``/``fp16``/``bf16`` autocast for the blocks; ``auto``/None picks per
            device and CPU (``resolve_inference_precision``).
        mirror: where to download published weights from (see ``models.download.source_url``).
    """
    from unicom_cli.models import families

    spec = families.resolve_spec(name_or_path, cache=cache, mirror=mirror)
    if input_size and input_size != spec.input_size:
        spec = with_input_size(spec, input_size)
    # Weights first: the UNICOM family fetches (or fails offline) before torch is even imported.
    built = families.load(spec, weights, pretrained=pretrained, seed=seed, drop_path_rate=drop_path_rate,
                          cache=cache, mirror=mirror)
    from unicom_cli.distributed import device_for
    from unicom_cli.models.transforms import eval_transform

    dev = resolve_device(device_for(device))
    model, spec = built.model, built.spec
    resolved = resolve_inference_precision(dev, precision)
    model.autocast_dtype = autocast_dtype(resolved, dev)
    model = model.to(dev).eval()
    return LoadedModel(model, eval_transform(spec), spec, built.weights_path, built.sha256, resolved,
                       seed if built.weights_path is None else None)


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
