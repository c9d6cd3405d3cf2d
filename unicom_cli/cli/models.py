"""`unicom models`: the registered models, their sizes, cache and checksum state."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

import typer

from unicom_cli.cli.options import CacheDirOpt, alias

EXAMPLES = [
    "unicom models",
    "unicom models --format json > models.json",
    "unicom models --cache-dir /shared/unicom",
]


def _human(n: float, units: tuple[str, ...], step: int = 1000) -> str:
    """3 significant digits: 116.7M, 1.66B, 233 MB."""
    for unit in units:
        if n < step or unit == units[-1]:
            return f"{n:.0f}{unit}" if n >= 100 or unit == units[0] else f"{n:.3g}{unit}"
        n /= step
    return str(n)


def _row(name: str, root, hub_cache_dir=None) -> dict:
    """One model as the JSON object `unicom models --json` prints (no hashing: stays instant)."""
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.weights import trusted_digest

    spec = get_spec(name)
    if spec.family != "unicom":
        return _hub_row(spec, hub_cache_dir)
    path = root / spec.filename
    part = path.with_name(path.name + ".part")
    cached = path.is_file()
    recorded = trusted_digest(path) if cached else None
    # Without hashing (this stays instant): a file smaller than the model's fp16 tensors alone
    # cannot be its published weights.
    corrupt = cached and path.stat().st_size < spec.fp16_file_size
    if spec.sha256:
        # A recorded digest other than the published one: a file pinned with --sha256.
        checksum = {None: "published", spec.sha256: "verified"}.get(recorded, "pinned")
    else:
        checksum = "computed" if recorded else "none"
    size = path.stat().st_size if cached else spec.fp16_file_size
    return {
        "name": spec.name, "input_size": spec.input_size, "patch_size": spec.patch_size,
        "embedding_size": spec.embedding_size, "params": spec.num_params, "file_size": size,
        "sha256": spec.sha256 or recorded, "checksum": checksum, "cached": cached,
        "corrupt": corrupt,
        "partial_bytes": part.stat().st_size if not cached and part.is_file() else 0,
        "path": str(path), "url": spec.url,
        "gdrive_id": spec.gdrive_id,
    }


def _hub_row(spec, cache) -> dict:
    """An MLCD row: its hub repository and whether huggingface_hub's cache holds its weights."""
    from unicom_cli.models.families.hub_files import cached_weights

    path = cached_weights(spec.repo, cache)
    return {
        "name": spec.name, "input_size": spec.input_size, "patch_size": spec.patch_size,
        "embedding_size": spec.embedding_size, "params": spec.num_params,
        "file_size": path.stat().st_size if path else spec.fp16_file_size,
        "sha256": path.resolve().name if path else None, "checksum": "hub",
        "cached": path is not None, "corrupt": False, "partial_bytes": 0,
        "path": str(path) if path else None, "url": f"hf:{spec.repo}", "gdrive_id": None,
    }


def models(
    output_format: Annotated[Literal["table", "json"], typer.Option("--format", help="A table, or a JSON list on stdout.")] = "table",
    as_json: Annotated[Optional[bool], alias("--json")] = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """List the published UNICOM and MLCD models: size, embedding, cache and checksum state.

    MLCD rows live in huggingface_hub's cache (<--cache-dir>/huggingface when given; checksum
    hub = the hub's LFS SHA-256, which names the cached model.safetensors); any other transformers or timm model is named hf:ORG/NAME[@REV] or
    timm:NAME in every command, or a save_pretrained folder.

    checksum: verified = cached and matched the published SHA-256; published = a SHA-256 is
    published (not yet verified here); pinned = the cached file matched a --sha256 pin instead;
    computed = none published, recorded at download; none = none published or recorded.
    cached: corrupt = a file too small to hold the model (`unicom download --verify` re-hashes,
    `unicom download NAME` replaces it).
    """
    from unicom_cli.models.registry import available_models
    from unicom_cli.models.weights import cache_dir as resolve_cache

    root = resolve_cache(cache_dir)
    rows = [_row(name, root, cache_dir) for name in available_models()]
    if as_json or output_format == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.table import Table

    from unicom_cli.utils.console import console, print_context

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True)
    for column in ("input", "dim", "params", "size"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("cached", no_wrap=True)
    table.add_column("checksum", no_wrap=True)
    for row in rows:
        if row["corrupt"]:
            cached = "[red]corrupt[/]"
        elif row["cached"]:
            cached = "[green]yes[/]"
        elif row["partial_bytes"]:
            cached = f"[yellow]{100 * row['partial_bytes'] // max(row['file_size'], 1)}%[/]"
        else:
            cached = "no"
        style = {"verified": "green", "computed": "cyan", "none": "yellow"}.get(row["checksum"], "")
        table.add_row(row["name"], str(row["input_size"]), str(row["embedding_size"]),
                      _human(row["params"], ("", "K", "M", "B")),
                      _human(row["file_size"], (" B", " KB", " MB", " GB")),
                      cached, f"[{style}]{row['checksum']}[/]" if style else row["checksum"])
    console.print(table)
    print_context([f"cache: {root}"])
