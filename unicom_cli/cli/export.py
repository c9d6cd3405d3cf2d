"""`unicom export`: a model → model.onnx + model.json, or model.safetensors + model.arch.json, self-checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from unicom_cli.cli.options import CacheDirOpt, MirrorOpt, NumFeatOpt, RandomInitOpt, SeedOpt, WeightsOpt
from unicom_cli.export.graph import OPSET_DEFAULT, OPSET_MAX, OPSET_MIN

EXAMPLES = [
    "unicom export ViT-B/32 -o vit-b32.onnx --normalize",
    "unicom export runs/sop/model.pt -o sop.onnx --precision fp16",
    "unicom export ViT-B/32 -o b32.safetensors   # use: --model b32.arch.json --weights b32.safetensors",
]


def export(
    model: Annotated[str, typer.Argument(help="Model name (see `unicom models`), a JSON architecture (with --weights), or a checkpoint with arch.json beside it (a finetune run's model.pt).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="model.onnx (ONNX graph + model.json) or model.safetensors (weights + model.arch.json).", show_default=False)],
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="ONNX: L2-normalise inside the graph (default: off, on with --num-feat).", show_default=False)] = None,
    num_feat: NumFeatOpt = None,
    opset: Annotated[int, typer.Option("--opset", help=f"ONNX opset, {OPSET_MIN} to {OPSET_MAX}.")] = OPSET_DEFAULT,
    precision: Annotated[Literal["fp32", "fp16", "int8"], typer.Option("--precision", help="fp16: ONNX blocks in half precision for GPU runtimes; safetensors half the size. int8 (ONNX): dynamic quantisation, ~1.5x faster on CPUs.")] = "fp32",
    input_dtype: Annotated[Literal["uint8", "float32"], typer.Option("--input", help="ONNX input: uint8 pixels (normalisation inside the graph) or float32 (already normalised).")] = "uint8",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    cache_dir: CacheDirOpt = None,
    mirror: MirrorOpt = None,
) -> None:
    """Export a model for deployment and check the file against PyTorch on real photos.

    The ONNX graph takes a batch of any size. Nothing appears at -o unless the check passes
    (cosine with PyTorch ≥ 0.99999 on every photo in fp32, ≥ 0.999 in fp16, ≥ 0.99 in int8).
    """
    from unicom_cli.utils.console import status

    status(f"loading {model} …")
    from unicom_cli.pipelines.export import ExportConfig, export_model
    from unicom_cli.utils.console import console

    summary = export_model(ExportConfig(
        model=model, output=output, weights=weights, pretrained=not random_init, seed=seed,
        normalize=(num_feat is not None) if normalize is None else normalize, num_feat=num_feat,
        opset=opset, precision=precision, input_dtype=input_dtype, overwrite=overwrite,
        cache=cache_dir, mirror=mirror,
    ))
    parity = summary.parity
    checked = "ONNX Runtime" if summary.kind == "onnx" else "reloaded weights"
    console.print(f"self-check ({checked} vs PyTorch, {len(parity.names)} photos, {precision}):",
                  highlight=False)
    for name, cos, diff in zip(parity.names, parity.cosine, parity.max_abs):
        console.print(f"  {name:<22} cosine {cos:.8f}  max |Δ| {diff:.2e}", highlight=False)
    console.print(f"  batch of 1 ({parity.names[0]}): cosine {parity.single_cosine:.8f}; "
                  f"bound ≥ {parity.bound}: passed", highlight=False)
    for path in summary.outputs:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
