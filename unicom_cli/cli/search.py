"""`unicom search`: query an index with images, folders, path lists or vectors; or list its near duplicates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from unicom_cli.cli.options import DeviceOpt, OverwriteOpt, WeightsOpt

EXAMPLES = [
    "unicom search photos.index query.jpg -k 10",
    "unicom search photos.index ./queries -k 5 -o results.csv --vis results.html",
    "unicom search photos.index --duplicates --threshold 0.95 -o dups.csv --vis dups.html",
    "unicom search milvus:photos.db#photos query.jpg -k 10   # a Milvus collection",
]
SHOWN_QUERIES = 20


def search(
    index: Annotated[str, typer.Argument(help="An index folder made by `unicom index`, or a Milvus collection: milvus:PATH.db#NAME or milvus:http://host:19530#NAME (credentials in $UNICOM_MILVUS_TOKEN).", show_default=False)],
    queries: Annotated[Optional[List[Path]], typer.Argument(help="Image files, folders, text files of paths, or .npy vectors.", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 10,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write one row per (query, rank, id, score): .csv, .jsonl or .parquet.", show_default=False)] = None,
    vis: Annotated[Optional[Path], typer.Option("--vis", help="Picture of the results (or of the --duplicates groups): .html (a self-contained page), .png, .jpg, .webp or .bmp.", show_default=False)] = None,
    exclude_self: Annotated[bool, typer.Option("--exclude-self", help="Skip a query's own entry when it is in the index.")] = False,
    duplicates: Annotated[bool, typer.Option("--duplicates", help="List every group of near duplicates in the index instead (all-vs-all).")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="--duplicates: the similarity two images need to count as near duplicates.")] = 0.95,
    nprobe: Annotated[Optional[int], typer.Option("--nprobe", min=1, help="Inverted lists to visit (IVF indexes) instead of the tuned value.", show_default=False)] = None,
    ef_search: Annotated[Optional[int], typer.Option("--ef-search", min=1, help="Graph search depth (HNSW indexes) instead of the tuned value.", show_default=False)] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every file of the index again, even where a fresh record of its digest says it is unchanged (a load otherwise trusts that record).")] = False,
) -> None:
    """Find the images of an index most similar to each query, best first.

    Images are embedded with exactly the model, weights, transform, normalisation and num_feat
    recorded in the index; unreadable query images are skipped and reported.
    """
    from unicom_cli.errors import UsageError

    if duplicates:
        if queries:
            raise UsageError("--duplicates searches the index against itself: give no QUERY")
        _duplicates(index, threshold, output, vis, overwrite, verify)
        return
    from unicom_cli.pipelines.search import SearchConfig, run_search

    params = {key: value for key, value in (("nprobe", nprobe), ("efSearch", ef_search)) if value}
    outcome = run_search(SearchConfig(index=index, queries=list(queries or []), k=k,
                                      exclude_self=exclude_self, output=output, vis=vis,
                                      device=device, weights=weights, params=params or None,
                                      overwrite=overwrite, verify=verify))
    _print_results(outcome)


def _print_results(outcome) -> None:
    from rich.markup import escape as rich_escape
    from rich.table import Table

    from unicom_cli.pipelines.vis import printable
    from unicom_cli.utils.console import console, err_console, print_table

    def escape(text: str) -> str:  # a non-UTF-8 file name's bytes as \xNN: a terminal cannot print them raw
        return rich_escape(printable(text))

    for q, name in enumerate(outcome.names[:SHOWN_QUERIES]):
        table = Table(show_edge=False)
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("path", overflow="fold")
        for rank, (rel, score) in enumerate(zip(outcome.ids[q], outcome.scores[q]), start=1):
            if rel:
                table.add_row(str(rank), f"{score:.4f}", escape(rel))
        print_table(table, printable(name))
    if len(outcome.names) > SHOWN_QUERIES:
        console.print(f"… and {len(outcome.names) - SHOWN_QUERIES:,} more queries"
                      + (" in the -o file" if outcome.written else "; add -o results.csv to keep them all"))
    for path, reason in outcome.failures:
        err_console.print(f"skipped {escape(str(path))}: {escape(reason)}", highlight=False, soft_wrap=True)
    for path in outcome.written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _duplicates(index_path: str, threshold: float, output: Optional[Path], vis: Optional[Path],
                overwrite: bool, verify: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from unicom_cli.index import Index
    from unicom_cli.index.duplicates import find_duplicates
    from unicom_cli.pipelines.search import RESULT_FORMATS, duplicates_picture, write_table
    from unicom_cli.pipelines.vis import check_format, printable, save_picture
    from unicom_cli.utils.console import console, print_table
    from unicom_cli.utils.files import check_output_file

    check_format(vis)
    if output is not None and output.suffix.lower() not in RESULT_FORMATS:
        from unicom_cli.errors import UsageError

        raise UsageError(f"-o {output}: choose a file ending in {', '.join(RESULT_FORMATS)}")
    check_output_file(output, "-o", overwrite=overwrite)
    check_output_file(vis, "--vis", overwrite=overwrite)
    index = Index.load(index_path, verify=verify)
    found = find_duplicates(index, threshold)
    how = "exact all-vs-all" if found.exact else f"the index's approximate search ({index.meta.get('factory')})"
    groups = f"{len(found.groups):,} group{'' if len(found.groups) == 1 else 's'}"
    console.print(f"{groups} of near duplicates (similarity ≥ {threshold}) in {len(index):,} "
                  f"images, by {how}", highlight=False, soft_wrap=True)
    for g, rows in enumerate(found.groups[:10], start=1):
        table = Table(show_edge=False)
        table.add_column("best score", justify="right")
        table.add_column("path", overflow="fold")
        for row, score in zip(rows, found.scores[g - 1]):
            table.add_row(f"{score:.4f}", escape(printable(index.ids[row])))
        print_table(table, f"group {g}: {len(rows)} images")
    if output is not None:
        records = [{"group": g, "size": len(rows), "id": index.ids[row], "row": int(row),
                    "score": float(score)}
                   for g, (rows, scores) in enumerate(zip(found.groups, found.scores), start=1)
                   for row, score in zip(rows, scores)]
        write_table(output, records, ["group", "size", "id", "row", "score"])
        console.print(f"wrote {output}", highlight=False, soft_wrap=True)
    if vis is not None:
        console.print(f"wrote {save_picture(vis, duplicates_picture(index, found, threshold))}",
                      highlight=False, soft_wrap=True)
