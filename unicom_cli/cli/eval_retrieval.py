"""`unicom eval-retrieval`: Recall@K, MAP@R or GLDv2 mAP@100 on a retrieval benchmark or your own folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Literal, Optional

import typer

from unicom_cli.cli.options import (
    BackendOpt, JsonOutOpt,
    OverwriteOpt, NumFeatOpt, int_list, launch_options, model_options,
)

if TYPE_CHECKING:
    from unicom_cli.distributed.launch import LaunchConfig
    from unicom_cli.pipelines.features import ModelOptions

EXAMPLES = [
    "unicom eval-retrieval --dataset sop --data-root data --json results/sop.json",
    "unicom eval-retrieval --dataset folder:photos/ --vis results/top5.jpg",
    "unicom eval-retrieval --query queries/ --gallery gallery/ --embeddings feats.npy",
]


@launch_options
@model_options
def eval_retrieval(
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="cub, cars, sop, inshop, inat, gldv2 or folder:PATH (ImageFolder, all-vs-all; a PATH holding train/ and test/ is read from test/).")] = None,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding the data sets in their usual layouts.")] = Path("data"),
    split: Annotated[Optional[Literal["public", "private"]], typer.Option("--split", help="GLDv2 queries (default both).", show_default=False)] = None,
    query: Annotated[Optional[Path], typer.Option("--query", help="ImageFolder of queries (label = class folder).")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", help="ImageFolder of the gallery searched by --query.")] = None,
    recall_at: Annotated[Optional[List[str]], typer.Option("--recall-at", help="K for Recall@K (comma-separated or repeated; default: the data set's usual list).")] = None,
    num_feat: NumFeatOpt = None,
    embeddings: Annotated[Optional[Path], typer.Option("--embeddings", help="Precomputed features (feats.npy + feats.ids.txt from `unicom embed`): no model.")] = None,
    save_features: Annotated[Optional[Path], typer.Option("--save-features", help="Keep the extracted features in this folder (reusable with --embeddings).")] = None,
    json_out: JsonOutOpt = None,
    overwrite: OverwriteOpt = False,
    vis: Annotated[Optional[Path], typer.Option("--vis", help="Save a picture of a few queries and their top-k: names, ranks and scores; hits green, misses red.")] = None,
    vis_queries: Annotated[int, typer.Option("--vis-queries", min=1, help="Queries (rows) in the --vis picture.")] = 6,
    vis_k: Annotated[int, typer.Option("--vis-k", min=1, help="Results per query in the --vis picture.")] = 5,
    backend: BackendOpt = "auto",
    *,
    model_opts: ModelOptions,
    launch: LaunchConfig,
) -> None:
    """Evaluate retrieval exactly as the papers do, on CPU or GPUs, 1 process or many.

    Metrics are percentages (0-100), as in the papers.
    """
    from unicom_cli.utils.console import status

    status(f"loading {'features' if embeddings else model_opts.model} …")
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.pipelines.retrieval import RetrievalConfig, run_retrieval

    cfg = RetrievalConfig(
        dataset=dataset, data_root=data_root, query=query, gallery=gallery,
        gldv2_splits=(split,) if split else ("public", "private"),
        model=model_opts,
        recall_at=int_list(recall_at, "--recall-at"), num_feat=num_feat, embeddings=embeddings,
        save_features=save_features, backend=backend, json_out=json_out, overwrite=overwrite, vis=vis,
        vis_queries=vis_queries, vis_k=vis_k)
    results = run_command(launch, run_retrieval, cfg)
    if results is not None:
        print_results(results)


def print_results(results: dict) -> None:
    """A Rich table of the metrics (percentages), then the context on its own lines."""
    from rich.table import Table

    from unicom_cli.utils.console import print_context, print_table

    source = results["model"] or results["embeddings"]
    table = Table()
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for name, value in results["metrics"].items():
        table.add_row(name, f"{value:.2f}")
    print_table(table, f"{results['dataset']} · {source}")
    sizes = ", ".join(f"{v:,} {k}" for k, v in results["sizes"].items())
    print_context([
        f"{sizes}; {results['skipped']} skipped",
        f"{results['backend']} on {results['device']} · {results['processes']} process(es) · "
        f"{results['timings']['total']:.1f} s",
        *(f"wrote {path}" for path in results.get("written", [])),
    ])
