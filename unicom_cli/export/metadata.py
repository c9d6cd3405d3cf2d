"""The JSON beside an exported file: architecture, preprocessing and provenance.

It carries the six architecture fields of a model JSON, so it works as ``--model`` wherever a
model name is accepted (with ``--weights model.safetensors``), and the exact preprocessing, so
another program can build the same input without reading this package.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from unicom_cli.errors import InputError
from unicom_cli.models.registry import HUB_FIELDS, ModelSpec, spec_from_json

FORMAT = "unicom-export/1"
RESIZE_RULE = ("resize the shorter side to input_size (bicubic, antialiased), center-crop to "
               "input_size x input_size, RGB; float input = (pixels / 255 - mean) / std, NCHW")


def sidecar_path(exported: Path) -> Path:
    """model.onnx → model.json; model.safetensors → model.arch.json (both may share a folder)."""
    exported = Path(exported)
    if exported.suffix == ".onnx":
        return exported.with_suffix(".json")
    return exported.with_suffix(".arch.json")


def describe(spec: ModelSpec, *, file: Path, file_sha256: str, weights_sha256: str | None,
             precision: str, onnx: dict | None = None) -> dict:
    """The sidecar's content; ``onnx`` holds the graph's interface for an ONNX export."""
    meta = {
        "format": FORMAT,
        "name": spec.name, "input_size": spec.input_size, "patch_size": spec.patch_size,
        "width": spec.width, "depth": spec.depth, "heads": spec.heads,
        "embedding_size": spec.embedding_size,
        "preprocessing": {"input_size": spec.input_size, "resize": RESIZE_RULE,
                          "mean": list(spec.mean), "std": list(spec.std)},
        "file": file.name, "sha256": file_sha256, "precision": precision,
        "weights_sha256": weights_sha256,  # of the checkpoint exported (None: random init)
    }
    if spec.family != "unicom":  # hub/timm: its own preprocessing and provenance (registry.HUB_FIELDS)
        meta.update({k: v for k, v in spec.to_json().items() if k in HUB_FIELDS})
        meta["preprocessing"]["resize"] = (f"the model's image processor: {spec.geometry} to "
                                           f"{spec.input_size} px, RGB; float input = (pixels / 255 - mean) / std")
    if onnx is not None:
        meta["onnx"] = onnx
    return meta


def read_onnx_metadata(path: Path) -> tuple[ModelSpec, dict]:
    """The spec (with the recorded mean/std) and the sidecar of an exported ``.onnx`` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX file not found; write one with `unicom export MODEL -o {path.name}`")
    side = sidecar_path(path)
    if not side.is_file():
        raise InputError(f"{path}: no {side.name} beside it (the preprocessing written by "
                         f"`unicom export`); export the model again")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{side}: unreadable ({exc}); export the model again") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "onnx" not in meta:
        raise InputError(f"{side}: not the description of an ONNX export ({FORMAT}); "
                         "export the model again")
    spec = spec_from_json(side)
    pre = meta.get("preprocessing", {})
    spec = replace(spec, mean=tuple(pre.get("mean", spec.mean)), std=tuple(pre.get("std", spec.std)))
    return spec, meta
