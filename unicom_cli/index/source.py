"""A feature matrix to index: the memory-mapped ``.npy`` of ``unicom embed`` with its ids and metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from unicom_cli.data.ids import embed_siblings, read_ids
from unicom_cli.errors import InputError
from unicom_cli.utils.files import open_regular

CHUNK_ROWS = 65536  # rows read, normalised and added per step: bounded memory for any N
# What two collections must agree on to share an index (a query is embedded one way only).
MODEL_KEYS = ("model", "revision", "weights_sha256", "input_size", "dim", "normalized", "num_feat")


@dataclass
class FeatureSource:
    """Rows of one collection, read lazily.

    ``meta`` holds the model fields of the embed ``.json`` (empty for a bare ``.npy``); ``ids``
    are paths relative to ``root`` (row numbers as text when there is no ids file).
    """

    npy: Path
    matrix: np.ndarray  # memory map, float32 or float16, (N, D)
    ids: list[str]
    root: Path | None
    meta: dict
    normalize: bool  # L2-normalise the rows while adding (their .json says they are not)
    named: bool = True  # ids come from an ids file (False: a bare .npy, ids are row numbers)

    @property
    def count(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def model_fields(self) -> dict:
        """The fields an index records and every added collection must match."""
        fields = {key: self.meta.get(key) for key in MODEL_KEYS}
        fields["dim"] = self.dim
        fields["normalized"] = bool(self.meta.get("normalized")) or self.normalize
        for key in ("model_spec", "weights", "embedding_size", "precision", "random_init_seed"):
            fields[key] = self.meta.get(key)
        if fields["weights"] and not os.path.isabs(fields["weights"]):
            fields["weights"] = os.path.abspath(fields["weights"])  # embed ran from this folder
        return fields

    def chunks(self, rows: range | None = None, chunk_rows: int = CHUNK_ROWS
               ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows ready to add) over ``rows``, ``chunk_rows`` at a time.

        Chunks start at multiples of ``chunk_rows`` whatever the range, so a shard of a
        multi-process build forms exactly the chunks one process would.
        """
        rows = range(self.count) if rows is None else rows
        start = rows.start
        while start < rows.stop:
            stop = min(rows.stop, (start // chunk_rows + 1) * chunk_rows)
            yield start, self.rows(start, stop)
            start = stop

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32, normalised if the collection needs it; finite-checked."""
        block = self._read(start, stop)
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise InputError(f"{self.npy}: row {bad} ({self.ids[bad]}) holds NaN or infinite "
                             "values; re-embed that image or drop the row")
        if self.normalize:
            from unicom_cli.eval.search import l2_normalize

            block = l2_normalize(block)
        return np.ascontiguousarray(block)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """A writable float32 copy of rows ``start:stop``. Read from the file rather than through
        the memory map: the pages then stay in the page cache instead of this process's resident
        memory, which would otherwise grow by the whole file over a pass (2 GB for 1M × 512)."""
        m = self.matrix
        if not (isinstance(m, np.memmap) and m.flags.c_contiguous and stop > start):
            return np.array(m[start:stop], dtype=np.float32)
        width = m.shape[1]
        with open(self.npy, "rb") as handle:
            handle.seek(m.offset + start * width * m.dtype.itemsize)
            block = np.fromfile(handle, dtype=m.dtype, count=(stop - start) * width)
        if block.size != (stop - start) * width:
            raise InputError(f"{self.npy}: ends before row {stop:,}; the file was cut short, re-embed it")
        return block.reshape(stop - start, width).astype(np.float32, copy=False)

    def sample(self, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``size`` distinct rows drawn uniformly (seeded), read in file order: (rows, vectors)."""
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(self.count, size=min(size, self.count), replace=False))
        out = np.empty((len(picks), self.dim), dtype=np.float32)
        for a in range(0, len(picks), CHUNK_ROWS):
            part = picks[a:a + CHUNK_ROWS]
            out[a:a + len(part)] = self.rows_at(part)
        return picks, out

    def rows_at(self, rows: np.ndarray) -> np.ndarray:
        """The rows at sorted positions ``rows``, as float32, normalised if the collection needs it."""
        rows = np.asarray(rows)
        if len(rows) > SCATTERED_ROWS:  # a training sample: one pass over the file, chunk by chunk
            block = np.empty((len(rows), self.dim), np.float32)
            for start, stop in _spans(rows, CHUNK_ROWS, self.count):
                inside = (rows >= start) & (rows < stop)
                block[inside] = self._read(start, stop)[rows[inside] - start]
        else:  # a few rows: one read each (through the map, each fault's read-ahead stays resident)
            block = np.stack([self._read(int(r), int(r) + 1)[0] for r in rows]) if len(rows) else \
                np.empty((0, self.dim), np.float32)
        if self.normalize:
            from unicom_cli.eval.search import l2_normalize

            block = l2_normalize(block)
        return block


SCATTERED_ROWS = 10_000  # beyond this many rows a sample is read in one pass over the file


def _spans(rows: np.ndarray, width: int, count: int) -> Iterator[tuple[int, int]]:
    """[start, stop) windows of ``width`` rows (within ``count``) that hold some of ``rows``."""
    for start in np.unique(rows // width) * width:
        yield int(start), int(min(start + width, count))


def _embed_root(meta: dict) -> Path | None:
    """The folder the ids of an embed run are relative to: its input folder, or the folder of
    its path-list file (data.images.read_path_list)."""
    source = meta.get("input")
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        return path
    if path.is_file() or path.suffix:
        return path.parent
    return path


def _read_embed_meta(meta_path: Path) -> dict:
    """The ``.json`` beside an embed output; {} when there is none (a bare ``.npy``). A FIFO or a
    device there is refused, not taken for no file."""
    if not os.path.lexists(meta_path):
        return {}
    try:
        with open_regular(meta_path, what="the .json that `unicom embed` writes", encoding="utf-8") as handle:
            meta = json.loads(handle.read())
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path}: unreadable metadata ({exc}); re-run `unicom embed`") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: expected a JSON object; re-run `unicom embed`")
    return meta


def open_source(npy: str | Path, normalize: bool = True) -> FeatureSource:
    """Open an ``unicom embed`` output (``feats.npy`` + ``feats.ids.txt`` + ``feats.json``).

    A bare ``.npy`` (no ids, no json) also works: ids are the row numbers and queries must
    then be vectors. ``normalize``: L2-normalise rows whose ``.json`` says they are not
    (cosine similarity, what UNICOM embeddings are compared with).
    """
    npy = Path(npy)
    if os.path.lexists(npy) and not npy.is_file():  # a FIFO, a device, a folder: say what it is
        open_regular(npy, "rb", what="a .npy feature matrix from `unicom embed`").close()
    if not npy.is_file():
        raise InputError(f"{npy}: no such feature file; make one with `unicom embed FOLDER -o {npy}`")
    try:
        matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{npy}: not a readable .npy matrix ({exc})") from exc
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InputError(f"{npy}: shape {matrix.shape}; expected a non-empty 2-D matrix (rows × dims)")
    if matrix.dtype not in (np.float32, np.float16, np.float64):
        raise InputError(f"{npy}: dtype {matrix.dtype}; expected float32 or float16 vectors")
    ids_path, meta_path = embed_siblings(npy)
    meta = _read_embed_meta(meta_path)
    has_ids = os.path.lexists(ids_path)
    if has_ids:
        try:
            ids = read_ids(ids_path)
        except OSError as exc:
            raise InputError(f"{ids_path}: unreadable ({exc})") from exc
        if len(ids) != matrix.shape[0]:
            raise InputError(f"{ids_path}: {len(ids):,} ids for {matrix.shape[0]:,} rows in "
                             f"{npy.name}; the files come from different runs")
    else:
        ids = [str(i) for i in range(matrix.shape[0])]
    if meta.get("dim") not in (None, matrix.shape[1]):
        raise InputError(f"{meta_path}: says {meta['dim']} dims but {npy.name} has {matrix.shape[1]}")
    root = _embed_root(meta) if has_ids else None
    needs_norm = normalize and not meta.get("normalized", False)
    return FeatureSource(npy, matrix, ids, root.resolve() if root else None, meta, needs_norm, has_ids)


def relative_ids(ids: list[str], source_root: Path | None, index_root: Path | None) -> list[str]:
    """Ids of an added collection made relative to the index's root (paths stay resolvable)."""
    if source_root is None or index_root is None or source_root == index_root:
        return ids
    out = []
    for i in ids:
        full = i if os.path.isabs(i) else os.path.join(source_root, i)
        out.append(os.path.relpath(full, index_root).replace(os.sep, "/"))
    return out
