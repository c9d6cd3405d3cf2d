"""The JSON beside an exported file: architecture, preprocessing and provenance.

It carries the six architecture fields of a model JSON, so it works as ``--model`` wherever a
model name is accepted (with ``--weights model.safetensors``), and the exact preprocessing, so
another program can build the same input without reading this package.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

from unicom_cli.errors import InputError
from unicom_cli.export.graph import INPUT_DTYPES
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
    check_onnx_sidecar(side, meta)
    spec = spec_from_json(side)
    pre = meta["preprocessing"]
    spec = replace(spec, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    return spec, meta


def check_onnx_sidecar(side: Path, meta: dict) -> None:
    """Every field that ``embed --runtime onnx`` reads, with its type, before any is used: a
    damaged model.json gave tracebacks, and one without the digest let a bit-flipped graph
    embed with exit 0. One line naming the key."""
    def refuse(key: str, want: str, value) -> None:
        raise InputError(f"{side}: '{key}' must be {want}, got {value!r}; export the model again")

    digest = meta.get("sha256")
    if not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        raise InputError(f"{side} records no SHA-256 of the graph (got {digest!r}), so a damaged "
                         f"{meta.get('file', 'graph')} cannot be told from a sound one; export the model again")
    extra = meta.get("data_sha256")  # absent before it was recorded: then checked only if a .data exists
    if extra is not None and not (isinstance(extra, str) and re.fullmatch("[0-9a-f]{64}", extra)):
        refuse("data_sha256", "null or a SHA-256 in hex", extra)
    for key in ("onnx", "preprocessing"):
        if not isinstance(meta.get(key), dict):
            refuse(key, "an object", meta.get(key))
    graph, pre = meta["onnx"], meta["preprocessing"]
    if graph.get("input_dtype") not in INPUT_DTYPES:
        refuse("onnx.input_dtype", " or ".join(INPUT_DTYPES), graph.get("input_dtype"))
    if not isinstance(graph.get("normalized"), bool):
        refuse("onnx.normalized", "true or false", graph.get("normalized"))
    if not _positive_int(graph.get("output_dim")):
        refuse("onnx.output_dim", "a positive integer", graph.get("output_dim"))
    if graph.get("num_feat") is not None and graph.get("num_feat") != graph["output_dim"]:
        refuse("onnx.num_feat", f"null or the output_dim {graph['output_dim']}", graph.get("num_feat"))
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                for v in values)):
            refuse(f"preprocessing.{key}", "3 finite numbers" + (" above 0" if low == 0 else ""), values)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
