"""`unicom models`: the registered models, their sizes and cache state."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from unicom_cli.cli.options import CacheDirOpt


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """List the published UNICOM models: input size, embedding size, parameters, cache state."""
    from unicom_cli.models.registry import available_models, get_spec
    from unicom_cli.models.weights import cache_dir as resolve_cache

    root = resolve_cache(cache_dir)
    rows = []
    for name in available_models():
        spec = get_spec(name)
        path = root / spec.filename if spec.filename else None
        cached = bool(path and path.is_file())
        rows.append({
            "name": spec.name, "input_size": spec.input_size, "patch_size": spec.patch_size,
            "embedding_size": spec.embedding_size, "params": spec.num_params,
            "file_size": path.stat().st_size if cached else spec.fp16_file_size,
            "sha256": spec.sha256, "cached": cached, "path": str(path) if path else None,
            "checksum": "published" if spec.sha256 else "unpublished (computed on download)",
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from unicom_cli.utils.console import console

    table = Table(title=f"UNICOM models (cache: {root})")
    for column in ("name", "input", "embedding", "parameters", "file size", "cached", "checksum"):
        table.add_column(column, justify="right" if column in ("input", "embedding", "parameters", "file size") else "left")
    for row in rows:
        table.add_row(row["name"], str(row["input_size"]), str(row["embedding_size"]),
                      f"{row['params']:,}", _human_bytes(row["file_size"]),
                      "[green]yes[/]" if row["cached"] else "no",
                      "sha256 published" if row["sha256"] else "[yellow]none published[/]")
    console.print(table)
