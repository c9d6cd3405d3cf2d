"""`unicom download`: fetch published weights into the cache, or re-verify what is cached."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from unicom_cli.cli.options import CacheDirOpt, MirrorOpt

EXAMPLES = [
    "unicom download ViT-B/32 MLCD-ViT-B/32   # MLCD goes into huggingface_hub's cache",
    "unicom download --all --mirror http://host/unicom",
    "unicom download --verify",
    "unicom download ViT-L/14 --stall-budget 900   # a slow link: wait up to 15 minutes of stalls",
]

_STYLE = {"downloaded": "green", "cached": "green", "ok": "green", "failed": "red",
          "corrupt": "red", "missing": "yellow", "partial": "yellow", "unverified": "yellow"}


def download(
    names: Annotated[Optional[list[str]], typer.Argument(
        metavar="NAME", help="Model names (see `unicom models`).", show_default=False)] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Every registered model.")] = False,
    cache_dir: CacheDirOpt = None,
    mirror: MirrorOpt = None,
    sha256: Annotated[Optional[str], typer.Option(
        "--sha256", help="Pin the expected SHA-256 of the one named model's file.")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Re-hash the cached files (named, or all) and report ok/corrupt/missing.")] = False,
    stall_budget: Annotated[Optional[float], typer.Option(
        "--stall-budget", min=0.001, metavar="SECONDS", show_default=False,
        help="Give up once transfers have stalled this long in all, over every retry (default 180, "
             "or $UNICOM_DOWNLOAD_STALL_BUDGET_S; other commands that download use the variable).")] = None,
) -> None:
    """Download model weights (resumable, SHA-256 verified) into the cache.

    Other commands download what they need on first use; this fetches ahead of time.
    """
    from rich.table import Table

    from unicom_cli.models.download import download_models, verify_cache
    from unicom_cli.utils.console import console, err_console, print_context

    names = names or []
    if verify:
        results = verify_cache(names, cache_dir, sha256)
        failed = [r for r in results if r.status == "corrupt" or (names and r.status != "ok")]
    else:
        results = download_models(names, all_models, cache_dir, mirror, sha256, stall_budget=stall_budget)
        failed = [r for r in results if r.status == "failed"]

    folder = next((r.path.parent for r in results if r.path), None)
    table = Table(box=None, pad_edge=False)
    for column in ("model", "status", "sha256", "file"):
        table.add_column(column, no_wrap=column != "file", overflow="fold")
    for r in results:
        style = _STYLE.get(r.status, "")
        digest = f"{r.sha256[:12]}… {r.checksum}" if r.sha256 else "-"
        table.add_row(r.name, f"[{style}]{r.status}[/]", digest, r.path.name if r.path else "-")
    if not (len(results) == 1 and failed):  # a single failure: its one-line error says it all
        console.print(table)
        if folder:
            print_context([f"cache: {folder}"])
    for r in results:
        if r.sha256 and r.checksum in ("computed", "recorded", "none") and r.status != "corrupt":
            console.print(f"{r.name} sha256 {r.sha256}", highlight=False, soft_wrap=True)
    for r in failed:
        reason = r.error or {"missing": "not cached; run `unicom download NAME`",
                             "partial": "interrupted download; run `unicom download NAME` to resume",
                             "unverified": "no checksum to compare with"}.get(r.status, r.status)
        if r.status == "corrupt":
            reason += f"; run `unicom download {r.name}` to fetch it again"
        err_console.print(f"[bold red]error:[/] {r.name}: {reason}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)
