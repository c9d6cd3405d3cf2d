"""`unicom index`: feature files or an image folder → an index folder (faiss; auto choice, tuned recall)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from unicom_cli.cli.options import (
    NumFeatOpt,
    launch_options,
    model_options,
)

if TYPE_CHECKING:
    from unicom_cli.distributed.launch import LaunchConfig
    from unicom_cli.pipelines.features import ModelOptions

EXAMPLES = [
    "unicom index ./photos -o photos.index --model ViT-B/16   # embeds first (resumable)",
    "unicom index --add more.npy photos.index",
    "unicom index feats/ -o laion.index --on-disk   # a folder of shards from `embed -o feats/`",
    "unicom index --add feats/ laion.index   # only the shards not yet in the index",
    "unicom index feats.npy -o big.index --on-disk --max-memory 200G --procs 8   # lists on disk",
]


@launch_options
@model_options
def index(
    inputs: Annotated[List[Path], typer.Argument(help="Feature files (.npy from `unicom embed`), shard folders (embed -o feats/), or image folders / path lists (embedded first). With --add, the last one is the index to extend.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The index folder (default: <input name>.index here).", show_default=False)] = None,
    add: Annotated[bool, typer.Option("--add", help="Append the inputs to an existing index (same model, dimension and normalisation).")] = False,
    kind: Annotated[str, typer.Option("--index", help="auto, flat, hnsw, ivf, ivfpq or a faiss factory string such as 'IVF4096,PQ64'.")] = "auto",
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget of the index, e.g. 8G (default: half the RAM).", show_default=False)] = None,
    target_recall: Annotated[float, typer.Option("--target-recall", min=0.0, max=1.0, help="recall@10 against exact search that the search parameters are tuned to reach.")] = 0.95,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise vectors that are not (cosine similarity); --no-normalize keeps raw inner products.")] = True,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", min=1, help="Vectors read and added per step (bounds memory; process shards align to it).")] = 65536,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="IVF indexes: keep the inverted lists in index.ivfdata, memory-mapped when searching, for collections larger than RAM (--max-memory then sizes the index on disk).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index (and re-embed a folder).")] = False,
    num_feat: NumFeatOpt = None,
    *,
    model_opts: ModelOptions,
    launch: LaunchConfig,
) -> None:
    """Build a search index over a collection: exact for small ones, IVF or IVF+PQ for large.

    The index is a folder (index.faiss, ids.txt, index.json; index.ivfdata with --on-disk)
    written atomically; index.json records the model, normalisation, faiss factory, tuned search
    parameters and the recall@10 measured against exact search on held-out queries.
    """
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.errors import UsageError
    from unicom_cli.index.build import BuildConfig
    from unicom_cli.index.choose import parse_memory
    from unicom_cli.pipelines.embed import EmbedConfig
    from unicom_cli.pipelines.index import IndexJob, features_path, is_features, run_index_job

    inputs = list(inputs)
    if add and output is None:
        if len(inputs) < 2:
            raise UsageError("--add needs the inputs and then the index: unicom index --add more.npy photos.index")
        output = inputs.pop()
    if output is None:
        output = Path(inputs[0].with_suffix("").name + ".index")
    features, embeds = [], []
    n_sources = 0
    if add and (output / "index.json").is_file():
        import json

        n_sources = len(json.loads((output / "index.json").read_text()).get("sources", []))
    for path in inputs:
        if is_features(path):
            features.append(path)
            continue
        feats = features_path(output, path, n_sources + len(embeds))
        m = model_opts
        embeds.append(EmbedConfig(input=path, output=feats, model=m.model, weights=m.weights,
                                  pretrained=not m.random_init, seed=m.seed, mirror=m.mirror,
                                  cache_dir=m.cache_dir, workers=m.workers,
                                  batch_size=m.batch_size, device=m.device, precision=m.precision,
                                  normalize=normalize or num_feat is not None, num_feat=num_feat,
                                  overwrite=overwrite))
        features.append(feats)
    build = BuildConfig(features=features, output=output, index=kind,
                        max_memory=parse_memory(max_memory) if max_memory else None,
                        target_recall=target_recall, normalize=normalize, overwrite=overwrite,
                        add=add, device=model_opts.device, chunk_rows=chunk_rows, on_disk=on_disk)
    result = run_command(launch, run_index_job, IndexJob(build, embeds))
    if result is None:
        return
    from unicom_cli.cli.embed import _print_summary as print_embed_summary

    embedded, summary = result
    for item in embedded:
        print_embed_summary(item)
    _print_summary(summary)


def _print_summary(summary) -> None:
    from rich.table import Table

    from unicom_cli.utils.console import console

    raw = summary.count * summary.dim * 4
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("index", f"{summary.choice.factory} ({summary.choice.reason})")
    table.add_row("vectors", f"{summary.count:,} × {summary.dim}"
                  + (f" ({summary.added:,} added)" if summary.added != summary.count else ""))
    params = ", ".join(f"{k}={v}" for k, v in summary.tuning.params.items()) or "none (exact)"
    table.add_row("search", params)
    mark = "" if summary.tuning.reached else " [yellow](below the target)[/]"
    table.add_row("recall@10", f"{summary.tuning.recall:.3f} against exact search on held-out "
                               f"queries{mark}")
    table.add_row("size", f"{summary.index_bytes / 2**20:,.1f} MiB "
                          f"({summary.index_bytes / raw:.2f}× the raw float32 vectors)")
    table.add_row("time", f"{summary.seconds:,.1f} s")
    table.add_row("wrote", str(summary.output))
    console.print(table)
