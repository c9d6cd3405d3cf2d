"""`unicom prepare-gldv2`: GLDv2's train_clean.csv to RecordIO (.lst/.rec/.idx) in one command, no MXNet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from unicom_cli.cli.options import alias, prefer
from unicom_cli.errors import UnicomError, UsageError

EXAMPLES = [
    "unicom prepare-gldv2 data/GLDv2/train_clean.csv",
    "unicom prepare-gldv2 train_clean.csv --images /mnt/gldv2/train -o data/GLDv2 --resize 512",
    "unicom prepare-gldv2 --verify data/GLDv2",
]

PrepareWorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="Encoding threads (default: every core this process may use; 0 or 1: encode in this thread).")]


def prepare_gldv2(
    csv: Annotated[Optional[Path], typer.Argument(help="GLDv2's train_clean.csv (or the folder holding it); with --verify, the output folder to check.", show_default=False)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Images folder (default: train/ beside the CSV).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder, created if missing (default: the CSV's folder).")] = None,
    resize: Annotated[int, typer.Option("--resize", min=0, help="Shorter side in pixels (im2rec --resize); 0 keeps the size.")] = 672,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG quality of the re-encoded images.")] = 100,
    pass_through: Annotated[bool, typer.Option("--pass-through", help="Store the original image bytes (checked to decode) instead of re-encoding.")] = False,
    workers: PrepareWorkersOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the list shuffle (same seed, same bytes).")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N images of the CSV (for trials).")] = None,
    min_images: Annotated[int, typer.Option("--min-images-per-class", min=1, help="Drop landmarks with fewer images on disk.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild a finished output, or discard an unfinished one.")] = False,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", min=1, help="Skip images with more pixels than this, unread (decompression bombs; default 178,956,970).", show_default=False)] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check a finished output folder (every record) instead of preparing: the folder given, or --output.")] = False,
    out: Annotated[Optional[Path], alias("--out")] = None,
) -> None:
    """Pack GLDv2 into train.{lst,rec,idx} + labels.csv + report.json, resumably and reproducibly.

    Readable by DALI's readers.mxnet and MXNet's recordio. Run it again after a kill to continue.
    """
    from unicom_cli.utils.console import console

    out = prefer(output, out)
    if verify:
        folder = out if out is not None else csv
        if folder is None or (out is not None and csv is not None):
            raise UsageError("--verify checks one output folder: `unicom prepare-gldv2 --verify OUT/`")
        _verify(folder, workers)
        return
    if csv is None:
        raise UsageError("missing train_clean.csv (or --verify OUT/); see `unicom prepare-gldv2 --help`")
    if csv.is_dir():
        csv = csv / "train_clean.csv"
    from unicom_cli.pipelines.prepare import PrepareConfig, prepare_gldv2 as run

    result = run(PrepareConfig(csv=csv, images=images, out=out, resize=resize, quality=quality,
                               pass_through=pass_through, workers=workers, seed=seed, limit=limit,
                               min_images_per_class=min_images, overwrite=overwrite,
                               **({} if max_pixels is None else {"max_pixels": max_pixels})))
    counts = result.report["counts"]
    console.print(f"wrote {result.records:,} images of {result.classes:,} landmarks to "
                  f"{result.out / 'train.rec'} ({result.images_per_s or 0:,.1f} images/s)",
                  highlight=False, soft_wrap=True)
    for name in ("train.idx", "train.lst", "labels.csv", "report.json"):
        console.print(f"wrote {result.out / name}", highlight=False, soft_wrap=True)
    if result.skipped:
        console.print(f"[yellow]skipped {result.skipped:,}[/] ({counts['missing']:,} missing, "
                      f"{counts['failed']:,} unreadable or corrupt): see {result.out / 'report.json'}", highlight=False)


def _verify(out: Path, workers: Optional[int]) -> None:
    from unicom_cli.pipelines.prepare_verify import verify_output
    from unicom_cli.utils.console import console, err_console

    result = verify_output(out, workers=workers)
    if result.ok:
        console.print(f"[green]ok[/]: {result.records:,} records, {result.classes:,} labels in {out}; "
                      f"ids, offsets and labels agree with train.idx/train.lst/labels.csv and every image decodes",
                      highlight=False)
        return
    for message in result.problems:
        err_console.print(f"[red]problem:[/] {message}", highlight=False, soft_wrap=True)
    more = result.problem_count - len(result.problems)
    raise UnicomError(f"{result.problem_count:,} problem(s) in {out}" + (f" ({more:,} not shown)" if more else ""))
