"""`unicom embed`: a folder or path list → feats.npy + feats.ids.txt + feats.json (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer

from unicom_cli.cli.options import (
    BatchSizeOpt,
    CacheDirOpt,
    DeviceOpt,
    InferencePrecisionOpt,
    MirrorOpt,
    ModelOpt,
    NumFeatOpt,
    RandomInitOpt,
    SeedOpt,
    WeightsOpt,
    WorkersOpt,
    launch_options,
)

if TYPE_CHECKING:
    from unicom_cli.distributed.launch import LaunchConfig

EXAMPLES = [
    "unicom embed photos/ -o feats/photos.npy --procs 2",
    "unicom embed photos/ -o mlcd.npy --model MLCD-ViT-L/14@336px   # or hf:ORG/NAME, timm:NAME, a local folder",
    "unicom embed 'shards/{00000..00099}.tar' -o feats/ --part 3/8   # one feature shard per tar; job 3 of 8",
    "unicom embed table.parquet -o feats/ --path-column filepath --shard-size 100000",
]

SHOWN_FAILURES = 10


@launch_options
def embed(
    input: Annotated[str, typer.Argument(help="Folder of images (scanned recursively), a text file with one path per line, a parquet/CSV table, or WebDataset tar shards: 'shards/{00000..00099}.tar', a folder of .tar or a text file listing them.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .npy (its folder is created; .ids.txt, .json and .failures.txt beside it), or a folder (feats/) of feature shards + manifest.json, the default for tar shards and tables.")] = "feats.npy",
    model: ModelOpt = "ViT-B/32",
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
    mirror: MirrorOpt = None,
    cache_dir: CacheDirOpt = None,
    runtime: Annotated[Optional[Literal["torch", "onnx"]], typer.Option("--runtime", help="torch, or onnx to run a graph from `unicom export` with ONNX Runtime (default: onnx for a .onnx --model).", show_default=False)] = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: InferencePrecisionOpt = "auto",
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="L2-normalise each row (default: off, so that the file keeps the model's raw output for any use; on with --num-feat, which cuts after normalising). index and eval-linear normalise by default: they compare by cosine.", show_default=False)] = None,
    num_feat: NumFeatOpt = None,
    dtype: Annotated[Literal["float32", "float16"], typer.Option("--dtype", help="Element type of the output matrix.")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished output (and discard an unfinished run).")] = False,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", min=1, help="Skip images with more pixels than this (decompression bombs; default 178,956,970).", show_default=False)] = None,
    draft: Annotated[bool, typer.Option("--draft/--no-draft", help="Decode large JPEGs at reduced scale (kept ≥ 2x the input size): faster, embeddings differ slightly from the exact decode.")] = False,
    head: Annotated[Optional[Path], typer.Option("--head", help="Classifier head (.safetensors from eval-linear --save-classifier or finetune --task classify): also write <output>.predictions.csv with each image's class and probability.")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per output shard for folders, lists and tables (-o folder/); a tar shard is always one output shard.")] = 10_000,
    path_column: Annotated[str, typer.Option("--path-column", help="The column of a parquet/CSV table that holds the image paths; the other columns are carried into <shard>.meta.jsonl.")] = "path",
    part: Annotated[Optional[str], typer.Option("--part", help="I/N: embed only the I-th of N interleaved sets of shards (independent jobs writing into one -o folder); slurm: this task of a SLURM job array.", show_default=False)] = None,
    *,
    launch: LaunchConfig,
) -> None:
    """Embed every image of a folder, list, table or tar shards, in input order.

    Bad files are skipped and listed in the .failures.txt file; rows and ids stay aligned.
    An interrupted run continues where it stopped when started again with the same arguments;
    with -o folder/ finished shards are skipped and jobs may share the folder (--part).
    """
    from unicom_cli.utils.console import status

    status(f"loading {model} …")
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.pipelines.embed import EmbedConfig, embed_images
    from unicom_cli.pipelines.sharded import parse_part

    sharded = True if output.endswith(("/", "\\")) or part is not None else None
    config = EmbedConfig(
        input=Path(input), output=Path(output), sharded=sharded,
        shard_size=shard_size, path_column=path_column, part=parse_part(part) if part else (0, 1), model=model, weights=weights, pretrained=not random_init,
        seed=seed, mirror=mirror, cache_dir=cache_dir, runtime=runtime, batch_size=batch_size,
        workers=workers, device=device, precision=precision,
        normalize=(num_feat is not None) if normalize is None else normalize,
        num_feat=num_feat, dtype=dtype, overwrite=overwrite, draft=draft, head=head,
    )
    if max_pixels is not None:
        config.max_pixels = max_pixels
    summary = run_command(launch, embed_images, config)
    if summary is None:
        return
    _print_summary(summary)


def _print_summary(summary) -> None:
    from rich.table import Table

    from unicom_cli.utils.console import console, print_context

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("embedded", f"{summary.count:,} of {summary.total:,} images "
                              f"({summary.dim} dims, {summary.dtype})")
    if summary.resumed_from:
        table.add_row("resumed", f"{summary.resumed_from:,} images were done by an earlier run")
    table.add_row("failures", f"{len(summary.failures):,}")
    table.add_row("time", f"{summary.seconds:,.1f} s ({summary.images_per_s:,.1f} images/s)")
    console.print(table)
    print_context([f"wrote {path}" for path in summary.outputs])  # whole paths, never cut
    for name, reason in summary.failures[:SHOWN_FAILURES]:
        # a non-UTF-8 file name holds surrogates, which a terminal cannot print
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        console.print(f"  skipped {name}: {reason}", highlight=False, soft_wrap=True)
    if len(summary.failures) > SHOWN_FAILURES:
        console.print(f"  … and {len(summary.failures) - SHOWN_FAILURES:,} more in "
                      f"{summary.outputs[-1]}", highlight=False)
