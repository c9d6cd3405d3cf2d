"""`unicom search` job: resolve queries (images, folders, lists, .npy), embed, search an index, write results."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError, UsageError

RESULT_FORMATS = (".csv", ".jsonl", ".parquet")
VIS_FORMATS = (".html", ".png")


@dataclass
class SearchConfig:
    """Everything ``unicom search`` needs; filled by the CLI."""

    index: Path
    queries: list[Path] = field(default_factory=list)
    k: int = 10
    exclude_self: bool = False
    output: Path | None = None  # .csv, .jsonl or .parquet
    vis: Path | None = None  # .html or .png
    device: str = "cpu"
    weights: Path | None = None
    params: dict | None = None  # search parameters instead of the tuned ones
    overwrite: bool = True


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
    for path, allowed, option in ((cfg.output, RESULT_FORMATS, "-o"), (cfg.vis, VIS_FORMATS, "--vis")):
        if path is None:
            continue
        if Path(path).suffix.lower() not in allowed:
            raise UsageError(f"{option} {path}: choose a file ending in {', '.join(allowed)}")
        if not Path(path).parent.is_dir():
            raise InputError(f"{Path(path).parent}: the output folder does not exist")
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
    if src.meta and src.meta.get("num_feat") != index.meta.get("num_feat"):
        raise InputError(f"{npy}: num_feat {src.meta.get('num_feat')} but the index was built "
                         f"with num_feat {index.meta.get('num_feat')}; embed the queries the same way")
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
    from unicom_cli.index.store import Index

    _check_outputs(cfg)
    index = Index.load(cfg.index)
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
        from unicom_cli.pipelines.vis import save_search_html, save_search_png

        paths = [[index.path_of(r) if r >= 0 else None for r in row] for row in rows]
        save = save_search_html if Path(cfg.vis).suffix.lower() == ".html" else save_search_png
        outcome.written.append(save(cfg.vis, outcome.names, outcome.files, outcome.ids, paths,
                                    outcome.scores))
    return outcome


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
