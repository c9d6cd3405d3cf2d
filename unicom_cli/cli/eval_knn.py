"""`unicom eval-knn`: weighted kNN classification accuracy (DINOv2 protocol) on ImageFolder trees."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from unicom_cli.cli.options import (
    BackendOpt, JsonOutOpt,
    OverwriteOpt, NumFeatOpt, int_list, launch_options, model_options,
)

if TYPE_CHECKING:
    from unicom_cli.distributed.launch import LaunchConfig
    from unicom_cli.pipelines.features import ModelOptions

EXAMPLES = [
    "unicom eval-knn --train-dataset data/train --val-dataset data/val --json results/knn.json",
    "unicom eval-knn --train-dataset data/train --val-dataset data/val --nb-knn 10,20 --n-per-class 5 --n-tries 3",
    "unicom eval-knn --train-dataset data/train --val-dataset data/val --train-embeddings train.npy --val-embeddings val.npy",
]


@launch_options
@model_options
def eval_knn(
    train_dataset: Annotated[Path, typer.Option("--train-dataset", help="ImageFolder tree of the train (memory) images.")],
    val_dataset: Annotated[Path, typer.Option("--val-dataset", help="ImageFolder tree of the images to classify.")],
    nb_knn: Annotated[Optional[List[str]], typer.Option("--nb-knn", help="Numbers of neighbours (comma-separated or repeated; default 10 20 100 200).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of the votes.")] = 0.07,
    per_class: Annotated[bool, typer.Option("--per-class", help="Also report mean per-class accuracy.")] = False,
    n_per_class: Annotated[Optional[int], typer.Option("--n-per-class", min=1, help="Few-shot: keep N random train images per class.")] = None,
    n_tries: Annotated[int, typer.Option("--n-tries", min=1, help="Few-shot: repeat with this many random draws (mean ± std).")] = 1,
    train_embeddings: Annotated[Optional[Path], typer.Option("--train-embeddings", help="Precomputed train features (.npy + .ids.txt): no model.")] = None,
    val_embeddings: Annotated[Optional[Path], typer.Option("--val-embeddings", help="Precomputed val features (.npy + .ids.txt).")] = None,
    num_feat: NumFeatOpt = None,
    gather_on_cpu: Annotated[bool, typer.Option("--gather-on-cpu", help="Keep train features in host memory and stream them to the GPU (huge train sets).")] = False,
    backend: BackendOpt = "auto",
    json_out: JsonOutOpt = None,
    overwrite: OverwriteOpt = False,
    *,
    model_opts: ModelOptions,
    launch: LaunchConfig,
) -> None:
    """Classify val images by a T-softmax vote of their nearest train images; top-1/top-5 per k.

    Accuracies are percentages (0-100).
    """
    from unicom_cli.utils.console import status

    status(f"loading {'features' if train_embeddings else model_opts.model} …")
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.pipelines.knn import KnnConfig, run_knn

    cfg = KnnConfig(
        train_dataset=train_dataset, val_dataset=val_dataset, nb_knn=int_list(nb_knn, "--nb-knn"),
        temperature=temperature, per_class=per_class, n_per_class=n_per_class, n_tries=n_tries,
        model=model_opts,
        train_embeddings=train_embeddings, val_embeddings=val_embeddings, gather_on_cpu=gather_on_cpu,
        backend=backend, num_feat=num_feat, json_out=json_out, overwrite=overwrite)
    results = run_command(launch, run_knn, cfg)
    if results is not None:
        print_results(results)


def print_results(results: dict) -> None:
    """A Rich table: one row per k, top-1/top-5 in % (± std over few-shot tries), then the context."""
    from rich.table import Table

    from unicom_cli.utils.console import print_context, print_table

    source = results["model"] or "precomputed features"
    table = Table()
    table.add_column("k", justify="right")
    keys = [k for k in next(iter(results["metrics"].values())) if not k.endswith("_std")]
    for key in keys:
        table.add_column(key.replace("top", "top-", 1).replace("_", " ") + " (%)", justify="right")  # as eval-linear
    for k, entry in results["metrics"].items():
        cells = [f"{entry[key]:.2f}" + (f" ± {entry[key + '_std']:.2f}" if key + "_std" in entry else "")
                 for key in keys]
        table.add_row(k, *cells)
    print_table(table, f"kNN · {source} · T={results['temperature']}")
    s = results["sizes"]
    few = results["few_shot"]
    print_context([
        f"{s['train']:,} train, {s['val']:,} val, {s['classes']} classes"
        + (f" · {few['n_per_class']} per class × {few['n_tries']} tries" if few else ""),
        f"{results['processes']} process(es) · {results['timings']['total']:.1f} s",
        *(f"wrote {path}" for path in results.get("written", [])),
    ])
