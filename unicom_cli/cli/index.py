"""`unicom index`: feature files or an image folder → an index folder (faiss; auto choice, tuned recall)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Literal, Optional

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
    "unicom index feats.npy -o milvus:photos.db#photos   # Milvus (or milvus:http://host:19530#photos)",
]


@launch_options
@model_options
def index(
    inputs: Annotated[List[str], typer.Argument(help="Feature files (.npy from `unicom embed`), shard folders (embed -o feats/), or image folders / path lists (embedded first). With --add, the last one is the index to extend.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="The index folder (default: <input name>.index here), or milvus:PATH.db#NAME / milvus:http://host:19530#NAME.", show_default=False)] = None,
    add: Annotated[bool, typer.Option("--add", help="Append the inputs to an existing index (same model, dimension and normalisation).")] = False,
    kind: Annotated[str, typer.Option("--index", help="auto, flat, hnsw, ivf, ivfpq or a faiss factory string such as 'IVF4096,PQ64'.")] = "auto",
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget of the index, e.g. 8G (default: half the RAM).", show_default=False)] = None,
    target_recall: Annotated[float, typer.Option("--target-recall", min=0.0, max=1.0, help="recall@10 against exact search that the search parameters are tuned to reach.")] = 0.95,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise vectors that are not (default: on, as search compares by cosine similarity, unlike embed's raw output); --no-normalize keeps raw inner products.")] = True,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", min=1, help="Vectors read and added per step (bounds memory; process shards align to it).")] = 65536,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="IVF indexes: keep the inverted lists in index.ivfdata, memory-mapped when searching, for collections larger than RAM (--max-memory then sizes the index on disk).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index (and re-embed a folder).")] = False,
    num_feat: NumFeatOpt = None,
    backend: Annotated[Literal["faiss", "milvus"], typer.Option("--backend", help="faiss: an index folder; milvus: a Milvus collection (embedded .db file or a server).")] = "faiss",
    uri: Annotated[Optional[str], typer.Option("--uri", help="Milvus: a local .db path (embedded milvus-lite) or http(s)://host:19530 (a server or cluster).", show_default=False)] = None,
    collection: Annotated[Optional[str], typer.Option("--collection", help="Milvus: the collection (default: from the first input's name).", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="UNICOM_MILVUS_TOKEN", show_envvar=True, show_default=False, help="Milvus server credentials (user:password or an API key); never printed.")] = None,
    *,
    model_opts: ModelOptions,
    launch: LaunchConfig,
) -> None:
    """Build a search index over a collection: exact for small ones, IVF or IVF+PQ for large.

    The index is a folder (index.faiss, ids.txt, index.json; index.ivfdata with --on-disk)
    written atomically; index.json records the model, normalisation, faiss factory, tuned search
    parameters and the recall@10 measured against exact search on held-out queries. Image
    inputs are embedded into <index>.features/ beside it (feats.npy, .ids.txt, .json,
    .failures.txt): an interrupted run resumes from there and --add re-tunes with them; delete
    that folder when neither matters.
    """
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.errors import UsageError
    from unicom_cli.index.build import BuildConfig
    from unicom_cli.index.choose import parse_memory
    from unicom_cli.pipelines.embed import EmbedConfig
    from unicom_cli.index.backends.milvus import is_reference
    from unicom_cli.index.backends.milvus_build import MilvusBuildConfig
    from unicom_cli.pipelines.index import (IndexJob, features_folder, features_path, is_features,
                                            milvus_features_path, milvus_reference, run_index_job)

    names = list(inputs)
    if add and output is None and uri is None:
        if len(names) < 2:
            raise UsageError("--add needs the inputs and then the index: unicom index --add more.npy photos.index")
        output = names.pop()
    inputs = [Path(name) for name in names]
    ref = milvus_reference(output, uri, collection, inputs[0]) if backend == "milvus" or uri or \
        is_reference(output) else None
    output = Path(output) if output is not None else Path(inputs[0].with_suffix("").name + ".index")
    features, embeds = [], []
    n_sources = 0
    if ref is None and add and (output / "index.json").is_file():
        import json

        n_sources = len(json.loads((output / "index.json").read_text()).get("sources", []))
    for path in inputs:
        if is_features(path):
            features.append(path)
            continue
        feats = features_path(output, path, n_sources + len(embeds)) if ref is None else \
            milvus_features_path(ref, path, first=not add and not embeds)
        m = model_opts
        embeds.append(EmbedConfig(input=path, output=feats, model=m.model, weights=m.weights,
                                  pretrained=not m.random_init, seed=m.seed, mirror=m.mirror,
                                  cache_dir=m.cache_dir, workers=m.workers,
                                  batch_size=m.batch_size, device=m.device, precision=m.precision,
                                  normalize=normalize or num_feat is not None, num_feat=num_feat,
                                  overwrite=overwrite))
        features.append(feats)
    memory = parse_memory(max_memory) if max_memory else None
    if ref is not None:
        if on_disk:
            raise UsageError("--on-disk is for faiss index folders; Milvus keeps its own storage")
        build = MilvusBuildConfig(features=features, ref=ref, index=kind, max_memory=memory,
                                  target_recall=target_recall, normalize=normalize, overwrite=overwrite,
                                  add=add, chunk_rows=chunk_rows, token=token)
    else:
        build = BuildConfig(features=features, output=output, index=kind, max_memory=memory,
                            target_recall=target_recall, normalize=normalize, overwrite=overwrite,
                            add=add, device=model_opts.device, chunk_rows=chunk_rows, on_disk=on_disk)
    result = run_command(launch, run_index_job, IndexJob(build, embeds))
    if result is None:
        return
    from unicom_cli.cli.embed import _print_summary as print_embed_summary

    embedded, summary = result
    for item in embedded:
        print_embed_summary(item)
    _print_summary(summary, features_folder(output) if embeds else None)


def _print_summary(summary, features: Optional[Path] = None) -> None:
    from rich.table import Table

    from unicom_cli.utils.console import console, print_context

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
    console.print(table)
    print_context([f"wrote {summary.output}"]  # whole paths, never cut to the table's width
                  + ([f"features {features} (the embeddings of the images: a rerun resumes from them, "
                      "--add re-tunes with them)"] if features is not None else []))
