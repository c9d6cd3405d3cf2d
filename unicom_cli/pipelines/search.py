"""`unicom search` job: resolve queries (images, folders, lists, .npy), embed, search an index, write results."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError, UsageError

RESULT_FORMATS = (".csv", ".jsonl", ".parquet")


@dataclass
class SearchConfig:
    """Everything ``unicom search`` needs; filled by the CLI."""

    index: Path | str  # an index folder or a milvus:URI#collection reference
    queries: list[Path] = field(default_factory=list)
    k: int = 10
    exclude_self: bool = False
    output: Path | None = None  # .csv, .jsonl or .parquet
    vis: Path | None = None  # a picture: pipelines.vis.FORMATS
    device: str = "auto"
    weights: Path | None = None
    params: dict | None = None  # search parameters instead of the tuned ones
    overwrite: bool = False  # replace existing -o / --vis files
    verify: bool = False  # hash the index files again (Index.load)


@dataclass
class Queries:
    """Resolved queries in order: a name per query, its file (None for vectors), and the
    .npy vectors given directly."""

    names: list[str] = field(default_factory=list)
    files: list[Path | None] = field(default_factory=list)
    vectors: list[np.ndarray | None] = field(default_factory=list)  # per query, None: embed the file
    self_rows: list[int] = field(default_factory=list)  # the query's own row in the index, or -1


@dataclass
class SearchOutcome:
    """What the CLI prints: per query its neighbours; skipped files; files written."""

    names: list[str]
    files: list[Path | None]
    scores: np.ndarray
    rows: np.ndarray
    ids: list[list[str]]
    failures: list[tuple[str, str]]
    written: list[Path] = field(default_factory=list)
    metadata: list[list[dict]] | None = None  # per hit, the columns of its source's .meta.jsonl
    metadata_columns: list[str] = field(default_factory=list)


def _check_outputs(cfg: SearchConfig) -> None:
    from unicom_cli.pipelines.vis import check_format
    from unicom_cli.utils.files import check_output_file

    check_format(cfg.vis)
    for path, option in ((cfg.output, "-o"), (cfg.vis, "--vis")):
        if path is None:
            continue
        if option == "-o" and Path(path).suffix.lower() not in RESULT_FORMATS:
            raise UsageError(f"{option} {path}: choose a file ending in {', '.join(RESULT_FORMATS)}")
        if not Path(path).parent.is_dir():
            raise InputError(f"{Path(path).parent}: the output folder does not exist")
        check_output_file(path, option, overwrite=cfg.overwrite)  # exists, /proc, read-only: before the search
    if cfg.output is not None and Path(cfg.output).suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("-o .parquet needs pyarrow: pip install pyarrow "
                             "(or write .csv / .jsonl)") from None


def resolve_queries(index, paths: list[Path], exclude_self: bool) -> Queries:
    """Expand every QUERY argument: an image file, a folder, a text file of paths, a .npy."""
    from unicom_cli.data.images import is_image_file, list_images

    out = Queries()
    if not paths:
        raise UsageError("give at least one QUERY (an image, a folder, a text file of paths or a .npy)")
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such query file or folder")
        if path.suffix.lower() == ".npy":
            _add_vectors(out, index, path, exclude_self)
            continue
        if path.is_file() and is_image_file(path.name):
            files = [path]
        else:
            images = list_images(path)
            files = [images.path(i) for i in range(len(images))]
        for f in files:
            out.names.append(str(f))
            out.files.append(Path(f))
            out.vectors.append(None)
            row = index.row_of(f) if exclude_self else None
            out.self_rows.append(-1 if row is None else row)
    return out


def _add_vectors(out: Queries, index, npy: Path, exclude_self: bool) -> None:
    from unicom_cli.index.source import open_source

    # Rows are L2-normalised as the index's were (a bare .npy or an un-normalised embed output).
    src = open_source(npy, normalize=bool(index.meta.get("normalized")))
    if src.dim != index.dim:
        raise InputError(f"{npy}: {src.dim}-dim vectors, but {index.path} holds {index.dim}-dim "
                         f"vectors; embed the queries with {index.meta.get('model') or 'the same model'}")
    if src.meta:  # an embed output: embedded as the index was (model, weights, crop, num_feat …)?
        from unicom_cli.index.manifest import MODEL_LABELS, check_compatible

        check_compatible(src.model_fields(), {key: index.meta.get(key) for key in MODEL_LABELS}, str(npy),
                         f"the index {index.path}", "embed the queries with the index's model and options")
    vectors = src.rows(0, src.count)
    for i in range(src.count):
        name = src.ids[i] if src.root is None else str(src.root / src.ids[i])
        out.names.append(name if src.root is not None else f"{npy.name}:{i}")
        out.files.append(src.root / src.ids[i] if src.root is not None else None)
        out.vectors.append(vectors[i])
        row = index.row_of(src.root / src.ids[i]) if exclude_self and src.root is not None else None
        out.self_rows.append(-1 if row is None else row)


def run_search(cfg: SearchConfig) -> SearchOutcome:
    """Search every query; unreadable query images are skipped and reported (like ``embed``)."""
    from unicom_cli.index.manifest import check_search_params
    from unicom_cli.index.store import Index

    _check_outputs(cfg)
    index = Index.load(cfg.index, verify=cfg.verify)
    if cfg.params:  # refused before any query is embedded
        check_search_params(index.faiss_index, cfg.params, index.meta["factory"])
    limit = len(index) - (1 if cfg.exclude_self else 0)
    if cfg.k < 1 or cfg.k > limit:
        raise UsageError(f"-k {cfg.k}: the index holds {len(index):,} vectors; use 1 ≤ k ≤ {limit:,}")
    queries = resolve_queries(index, cfg.queries, cfg.exclude_self)
    failures: list[tuple[str, str]] = []
    todo = [i for i, v in enumerate(queries.vectors) if v is None]
    if todo:
        embedder = index.embedder(cfg.device, cfg.weights)
        embedded = embedder.embed_paths([queries.files[i] for i in todo])
        failed = {path for path, _ in embedded.failures}
        failures = embedded.failures
        good = iter(embedded.vectors)
        for i in todo:
            if str(queries.files[i]) not in failed:
                queries.vectors[i] = next(good)
    keep = [i for i, v in enumerate(queries.vectors) if v is not None]
    if not keep:
        raise InputError(f"no query could be read: {failures[0][0]}: {failures[0][1]}"
                         if failures else "no queries")
    vectors = np.stack([queries.vectors[i] for i in keep]).astype(np.float32)
    exclude = np.array([queries.self_rows[i] for i in keep]) if cfg.exclude_self else None
    scores, rows = index.search(vectors, cfg.k, exclude=exclude, params=cfg.params)
    outcome = SearchOutcome(
        names=[queries.names[i] for i in keep], files=[queries.files[i] for i in keep],
        scores=scores, rows=rows,
        ids=[[index.ids[r] if r >= 0 else "" for r in row] for row in rows], failures=failures)
    _attach_metadata(outcome, index)
    if cfg.output is not None:
        outcome.written.append(write_results(cfg.output, outcome))
    if cfg.vis is not None:
        from unicom_cli.pipelines.vis import save_picture

        outcome.written.append(save_picture(cfg.vis, search_picture(index, outcome, len(queries.names))))
    return outcome


def _index_name(index) -> str:
    """How a picture names the index: a folder's name, or a Milvus reference as given."""
    return index.path.name if isinstance(index.path, Path) else str(index.path)


def search_picture(index, outcome: SearchOutcome, given: int):
    """The ``--vis`` picture: a row per query and its results (their class is not known), with a
    note naming the queries that were skipped."""
    from unicom_cli.pipelines.vis import Cell, Picture, Row, cell_name

    rows = []
    for q, name in enumerate(outcome.names):
        cells = [Cell(cell_name(name) if outcome.files[q] is not None else name, outcome.files[q], "query")]
        for rank, (row, rel, score) in enumerate(zip(outcome.rows[q], outcome.ids[q], outcome.scores[q]), start=1):
            if row >= 0:
                cells.append(Cell(cell_name(rel), index.path_of(row), rank=rank, score=float(score)))
        rows.append(Row(name, cells))
    shown = len(outcome.names)
    notes = [f"{given:,} quer{'y' if given == 1 else 'ies'} given; {len(outcome.failures):,} skipped "
             "(unreadable): " + "; ".join(f"{path}: {reason}" for path, reason in outcome.failures[:5])
             + (" …" if len(outcome.failures) > 5 else "")] if outcome.failures else []
    return Picture(f"unicom search {_index_name(index)}: {shown:,} quer{'y' if shown == 1 else 'ies'}", rows, notes)


def duplicates_picture(index, found, threshold: float):
    """The ``--vis`` picture of ``search --duplicates``: one row per group, each image with its
    best similarity to another member of the group."""
    from unicom_cli.pipelines.vis import Cell, Picture, Row, cell_name

    rows = [Row(f"group {g}: {len(members)} images", [
        Cell(cell_name(index.ids[row]), index.path_of(row), rank=n, score=float(score))
        for n, (row, score) in enumerate(zip(members, scores), start=1)])
        for g, (members, scores) in enumerate(zip(found.groups, found.scores), start=1)]
    groups = f"{len(rows):,} group{'' if len(rows) == 1 else 's'}"
    return Picture(f"unicom search {_index_name(index)} --duplicates: {groups} of near duplicates "
                   f"(similarity ≥ {threshold})", rows,
                   ["the score under an image is its highest similarity to another image of its group"])


def _attach_metadata(outcome: SearchOutcome, index) -> None:
    """Each hit's metadata (the table columns or tar sample json/txt it was embedded with)."""
    from unicom_cli.index.metadata import RowMetadata

    found = RowMetadata.of(index.meta)
    if found is None:
        return
    outcome.metadata = [[found.get(int(r)) if r >= 0 else {} for r in row] for row in outcome.rows]
    keys = dict.fromkeys(k for hits in outcome.metadata for meta in hits for k in meta)
    outcome.metadata_columns = list(keys)


RESULT_COLUMNS = ["query", "rank", "id", "row", "score"]


def _column(key: str) -> str:
    """A metadata key as a results column (``meta_`` before a key that is one of ours)."""
    return f"meta_{key}" if key in RESULT_COLUMNS else key


def result_records(outcome: SearchOutcome):
    """One record per (query, rank): query, rank (1-based), id, row, score, then metadata columns."""
    for q, name in enumerate(outcome.names):
        for rank, (row, score) in enumerate(zip(outcome.rows[q], outcome.scores[q]), start=1):
            if row < 0:
                continue
            record = {"query": name, "rank": rank, "id": outcome.ids[q][rank - 1], "row": int(row),
                      "score": float(score)}
            if outcome.metadata is not None:
                meta = outcome.metadata[q][rank - 1]
                record.update({_column(k): _cell(meta.get(k)) for k in outcome.metadata_columns})
            yield record


def _cell(value):
    """Nested metadata values as JSON text, so every format holds them."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def write_results(path: Path, outcome: SearchOutcome) -> Path:
    """Write the results table as .csv, .jsonl or .parquet, atomically."""
    return write_table(path, list(result_records(outcome)),
                       RESULT_COLUMNS + [_column(k) for k in outcome.metadata_columns])


def write_table(path: Path, records: list[dict], columns: list[str]) -> Path:
    """Records → .csv / .jsonl / .parquet at ``path`` via a temp file and one rename.

    A file name that is not UTF-8 is written as its own bytes in .csv and .jsonl (as ids.txt
    holds it, so it still opens the file); Parquet strings must be UTF-8, so there its odd
    bytes become ``\\xNN`` escapes.
    """
    import csv

    from unicom_cli.data.ids import IDS_TEXT
    from unicom_cli.utils.files import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    text = {"encoding": "utf-8", "errors": IDS_TEXT["errors"]}
    with atomic_path(path) as tmp:
        if suffix == ".jsonl":
            with open(tmp, "w", newline="\n", **text) as handle:
                for rec in records:
                    handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
        elif suffix == ".csv":
            with open(tmp, "w", newline="", **text) as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                writer.writerows(records)
        else:
            import pandas as pd

            utf8 = [{k: _utf8(v) for k, v in rec.items()} for rec in records]
            pd.DataFrame.from_records(utf8, columns=columns).to_parquet(tmp, index=False)
    return path


def _utf8(value):
    """A str with surrogate-escaped bytes (a non-UTF-8 file name) as valid UTF-8 with \\xNN escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value
