"""`unicom eval-linear`: linear-probe accuracy (logistic regression on frozen features)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from unicom_cli.cli.options import (
    JsonOutOpt,
    OverwriteOpt,
    launch_options,
    model_options,
)

if TYPE_CHECKING:
    from unicom_cli.distributed.launch import LaunchConfig
    from unicom_cli.pipelines.features import ModelOptions

EXAMPLES = [
    "unicom eval-linear --train-dataset imagenet/train --val-dataset imagenet/val -m ViT-B/32 --gpus 8",
    "unicom eval-linear --dataset cars --data-root data --C 0.601 --no-normalize   # the original example",
    "unicom eval-linear --train-dataset tr --val-dataset va --train-embeddings tr.npy --val-embeddings va.npy "
    "--save-classifier head.safetensors",
]


@launch_options
@model_options
def eval_linear(
    train_dataset: Annotated[Path | None, typer.Option("--train-dataset", help="ImageFolder tree of the training images.", show_default=False)] = None,
    val_dataset: Annotated[Path | None, typer.Option("--val-dataset", help="ImageFolder tree of the images to classify.", show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Instead of the trees: cars or cub, by their official classification split (every class in train and test).", show_default=False)] = None,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding cars196/ or CUB_200_2011/ (with --dataset).")] = Path("data"),
    C: Annotated[float | None, typer.Option("--C", help="Inverse regularisation strength (scikit-learn's C). Default: searched on a held-out part of the train set.", show_default=False)] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise features before fitting (default: on, as every evaluation here uses the embeddings' direction, cosine, unlike embed's raw output; the original UNICOM example does not).")] = True,
    holdout: Annotated[float, typer.Option("--holdout", help="Share of the train images held out to choose C.")] = 0.1,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="L-BFGS iterations per fit (scikit-learn's max_iter).")] = 1000,
    save_classifier: Annotated[Path | None, typer.Option("--save-classifier", help="Write the fitted head (.safetensors) for `unicom embed --head`.")] = None,
    train_embeddings: Annotated[Path | None, typer.Option("--train-embeddings", help="Precomputed train features (.npy + .ids.txt): no model.")] = None,
    val_embeddings: Annotated[Path | None, typer.Option("--val-embeddings", help="Precomputed val features (.npy + .ids.txt).")] = None,
    json_out: JsonOutOpt = None,
    overwrite: OverwriteOpt = False,
    *,
    model_opts: ModelOptions,
    launch: LaunchConfig,
) -> None:
    """Fit a multinomial logistic regression (L-BFGS) on frozen features; top-1/top-5 on the val set.

    Without --C the regularisation is chosen on a held-out 10% of the train set (a coarse sweep
    over 1e-6…1e6, then a binary search), then refitted on the whole train set. Accuracies are
    percentages (0-100). The images are two ImageFolder trees, or --dataset cars (the test flag of
    cars_annos.mat) or cub (train_test_split.txt).
    """
    from unicom_cli.utils.console import status

    status(f"loading {'features' if train_embeddings else model_opts.model} …")
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.pipelines.linear import LinearConfig, run_linear

    cfg = LinearConfig(
        train_dataset=train_dataset, val_dataset=val_dataset, dataset=dataset, data_root=data_root,
        C=C, normalize=normalize, holdout=holdout, max_iter=max_iter, model=model_opts,
        train_embeddings=train_embeddings, val_embeddings=val_embeddings, save_classifier=save_classifier,
        json_out=json_out, overwrite=overwrite)
    results = run_command(launch, run_linear, cfg)
    if results is not None:
        print_results(results)


def print_results(results: dict) -> None:
    """One table: top-1, top-5, C (and how it was chosen), time; then the files written."""
    from rich.table import Table

    from unicom_cli.utils.console import print_context, print_table

    source = results["model"] or "precomputed features"
    table = Table()
    for col in ("top-1 (%)", "top-5 (%)", "C", "time"):
        table.add_column(col, justify="right")
    how = "searched" if results["C_search"] else "given"
    m = results["metrics"]
    table.add_row(f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{results['C']:.4g} ({how})",
                  f"{results['timings']['total']:.1f} s")
    print_table(table, f"linear probe · {source}")
    s = results["sizes"]
    print_context([f"{s['train']:,} train, {s['val']:,} val, {s['classes']} classes · "
                   f"{'L2-normalised' if results['normalize'] else 'raw'} features · "
                   f"{results['processes']} process(es)",
                   *(f"wrote {path}" for path in results["outputs"])])
