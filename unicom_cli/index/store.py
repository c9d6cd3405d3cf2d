"""An index folder on disk (index.faiss, ids.txt, index.json; index.ivfdata for on-disk lists) and its
query API: ``Index.load(path).search(...)``."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from unicom_cli.data.ids import read_ids
from unicom_cli.errors import InputError, UsageError
from unicom_cli.index.integrity import check_finite, verify_files
from unicom_cli.index.manifest import check_search_params, validate_meta
from unicom_cli.utils.files import open_regular

if TYPE_CHECKING:
    from unicom_cli.index.embedder import QueryEmbedder

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.txt", "index.json"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an --on-disk index (faiss OnDiskInvertedLists)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise UsageError("faiss is not installed: pip install faiss-cpu") from exc
    return faiss


@contextmanager
def faiss_stdout_silenced():
    """faiss's on-disk inverted lists printf to the process's stdout ("resizing …", "updating
    ondisk filename …") with no switch to turn it off; send file descriptor 1 to /dev/null while
    they run, so the command's own output stays clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        _flush_c_stdio()  # what faiss left in the C library's buffer goes to /dev/null too
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C library to reach
        pass


def read_faiss(path: Path, on_disk: bool, mmap: bool = False):
    """Read ``index.faiss``; an on-disk index maps ``index.ivfdata`` from the same folder,
    read-only (never with IO_FLAG_MMAP as well: faiss 1.15 crashes searching such an index)."""
    faiss = _faiss()
    if on_disk:
        with faiss_stdout_silenced():
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)


def _check_ivfdata(path: Path, index) -> None:
    """A truncated lists file would be mapped past its end (SIGBUS on the first search)."""
    faiss = _faiss()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    needed = int(getattr(lists, "totsize", 0))
    if path.stat().st_size < needed:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes, the index needs {needed:,} "
                         "(truncated); rebuild the index with `unicom index --on-disk`")


def release_mapped_lists(index) -> None:
    """Let go of the pages of an on-disk lists file that searches have touched: madvise
    MADV_DONTNEED on faiss's shared map of it. The data stay in the file and in the page cache;
    the process just stops holding them. Recall tuning calls it between batches of queries, so
    that searching a lists file larger than RAM does not count against the build's memory
    (12.7 GiB of mapped pages at 10M x 512 before; benchmarks/index_shards.py)."""
    if not sys.platform.startswith("linux"):
        return
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists) or not lists.totsize:
        return
    import ctypes

    madv_dontneed = 4
    ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(int(lists.ptr)), ctypes.c_size_t(lists.totsize),
                                              madv_dontneed)


def apply_search_params(index, params: dict) -> None:
    """Set nprobe / efSearch / quantizer_efSearch … on ``index`` (through OPQ and IVF wrappers)."""
    if params:
        text = ",".join(f"{key}={value}" for key, value in params.items())
        _faiss().ParameterSpace().set_index_parameters(index, text)


class Index:
    """A built index: the faiss index, the ids of its rows and what it was built with.

    Attributes:
        path: the index folder.
        ids: one id per row, in row order (image paths relative to ``root``).
        root: the folder the ids are relative to (None for a collection of bare vectors).
        meta: the parsed ``index.json`` (model, normalisation, factory, search parameters,
            measured recall …).
        dim: vector dimension.
    """

    def __init__(self, path: Path, faiss_index, ids: list[str], meta: dict) -> None:
        self.path = Path(path)
        self.faiss_index = faiss_index
        self.ids = ids
        self.meta = meta
        self.dim = int(meta["dim"])
        self.root = Path(meta["root"]) if meta.get("root") else None
        self._embedders: dict[tuple, "QueryEmbedder"] = {}
        self._row_of: dict[str, int] | None = None

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False, verify: bool = False) -> "Index":
        """Open an index folder written by ``unicom index``; every inconsistency is an InputError.

        ``mmap``: map the index file instead of reading it (large indexes, several processes).
        A ``milvus:URI#collection`` reference (a str) opens a Milvus collection instead
        (``index.backends.milvus``), with the same query API. ``verify``: hash every file again
        even where a fresh record of its digest says it is unchanged (see index.integrity).
        """
        if str(path).startswith("milvus:"):
            from unicom_cli.index.backends.milvus import MilvusIndex

            return MilvusIndex.load(str(path))
        folder = Path(path)
        if not folder.is_dir():
            hint = " (an index is a folder made by `unicom index`)" if folder.exists() else ""
            raise InputError(f"{folder}: no such index folder{hint}")
        meta = read_meta(folder)
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            raise InputError(f"{index_path}: missing; rebuild the index with `unicom index`")
        on_disk = bool(meta.get("on_disk"))
        if on_disk and not (folder / IVFDATA_FILE).is_file():
            raise InputError(f"{folder / IVFDATA_FILE}: missing (this index keeps its inverted lists "
                             "there); rebuild the index with `unicom index --on-disk`")
        names = {INDEX_FILE, IDS_FILE} | ({IVFDATA_FILE} if on_disk else set())
        cached = verify_files(folder, meta, names, verify)  # before faiss parses a damaged file
        try:
            index = read_faiss(index_path, on_disk, mmap)
        except (RuntimeError, MemoryError) as exc:
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{index_path}: not a readable faiss index ({detail}); "
                             "rebuild it with `unicom index`") from exc
        if on_disk:
            _check_ivfdata(folder / IVFDATA_FILE, index)
        ids = _read_ids(folder / IDS_FILE)
        if len(ids) != index.ntotal:
            raise InputError(f"{folder / IDS_FILE}: {len(ids):,} ids for {index.ntotal:,} vectors "
                             f"in {INDEX_FILE}; the folder was changed by hand, rebuild it")
        if index.d != meta.get("dim"):
            raise InputError(f"{folder / META_FILE}: says {meta.get('dim')} dims but "
                             f"{INDEX_FILE} has {index.d}")
        if meta.get("count", index.ntotal) != index.ntotal:
            raise InputError(f"{folder / META_FILE}: says {meta['count']:,} vectors but {INDEX_FILE} "
                             f"has {index.ntotal:,}; the folder was changed by hand, rebuild it")
        if not cached:
            check_finite(index, index_path, ids)
        check_search_params(index, meta.get("search_params") or {}, meta["factory"], str(folder / META_FILE))
        apply_search_params(index, meta.get("search_params") or {})
        return cls(folder, index, ids, meta)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}, {len(self):,} × {self.dim}, "
                f"{self.meta.get('factory')!r}, model={self.meta.get('model')!r})")

    def path_of(self, row: int) -> Path:
        """The image file of a row (ids are relative to ``root``)."""
        rel = self.ids[row]
        return Path(rel) if self.root is None or os.path.isabs(rel) else self.root / rel

    def row_of(self, image: str | Path) -> int | None:
        """The row of an image file that is in the index (by its path under ``root``), or None."""
        if self._row_of is None:
            self._row_of = {rel: n for n, rel in enumerate(self.ids)}
        if self.root is None:
            return self._row_of.get(str(image))
        try:
            rel = os.path.relpath(os.path.abspath(image), self.root).replace(os.sep, "/")
        except ValueError:  # pragma: no cover - another drive on Windows
            return None
        return self._row_of.get(rel)

    def embedder(self, device: str = "cpu", weights: str | Path | None = None,
                 precision: str | None = None) -> "QueryEmbedder":
        """The model this index was built with, loaded once per (device, weights, precision):
        a callable from images (PIL, RGB uint8 arrays or encoded bytes) to query vectors."""
        from unicom_cli.index.embedder import load_query_embedder

        key = (device, str(weights) if weights else None, precision)
        if key not in self._embedders:
            self._embedders[key] = load_query_embedder(self.meta, device=device, weights=weights,
                                                       precision=precision)
        return self._embedders[key]

    def search(self, queries: np.ndarray | Sequence[str | Path], k: int = 10, *,
               exclude: Sequence[int] | np.ndarray | None = None, params: dict | None = None,
               device: str = "cpu", weights: str | Path | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query, best first.

        Args:
            queries: (n, dim) vectors, already processed as ``meta`` says (normalised, cut
                to ``num_feat``), or a list of image paths, PIL images, RGB uint8 arrays or
                encoded image bytes, embedded with the index's model (``embedder``).
            k: neighbours per query (1 ≤ k ≤ len(self)).
            exclude: per query a row never to return (its own entry; -1 for none).
            params: search parameters for this call instead of the tuned ones, e.g.
                ``{"nprobe": 64}``.
        Returns:
            ``(scores, rows)``: float32 inner products and int64 rows, both (n, k). An
            approximate index may find fewer than k rows for a query: those slots hold row
            -1 and score -inf.
        """
        if params:  # before any work, and before the exact route that has none to apply
            check_search_params(self.faiss_index, params, self.meta["factory"])
        vectors = self._query_vectors(queries, device, weights)
        k = int(k)
        limit = len(self) - (1 if exclude is not None else 0)
        if k < 1:
            raise UsageError(f"k {k}: must be at least 1")
        if k > limit:
            raise UsageError(f"k {k} is larger than the index ({len(self):,} vectors"
                             f"{', minus the excluded query' if exclude is not None else ''}); "
                             f"use k ≤ {limit:,}")
        want = k + (1 if exclude is not None else 0)
        flat = self.flat_vectors()
        if flat is not None:  # exact: the search of eval-retrieval, with its fixed tie order
            from unicom_cli.eval.search import search as exact_search

            found = exact_search(vectors, flat, want)
            scores, rows = found.scores, found.indices
        else:
            if params:
                apply_search_params(self.faiss_index, params)
            try:
                scores, rows = self.faiss_index.search(vectors, want)
            finally:
                if params:
                    apply_search_params(self.faiss_index, self.meta.get("search_params") or {})
        rows = rows.astype(np.int64, copy=False)
        scores = scores.astype(np.float32, copy=False)
        scores[rows < 0] = -np.inf
        if exclude is not None:
            scores, rows = drop_excluded(scores, rows, np.asarray(exclude, dtype=np.int64), k)
        return scores, rows

    def flat_vectors(self) -> np.ndarray | None:
        """The rows of a flat (exact) index as an (N, dim) float32 view without a copy; None for
        other indexes."""
        faiss = _faiss()
        inner = faiss.downcast_index(self.faiss_index)
        if not isinstance(inner, faiss.IndexFlat) or inner.ntotal == 0:
            return None
        return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)

    def _query_vectors(self, queries, device: str, weights) -> np.ndarray:
        if isinstance(queries, np.ndarray):
            vectors = queries
        elif len(queries) and isinstance(queries[0], (str, Path)):
            embedded = self.embedder(device, weights).embed_paths(list(queries))
            if embedded.failures:
                path, reason = embedded.failures[0]
                raise InputError(f"{path}: {reason}")
            vectors = embedded.vectors
        elif len(queries) and not np.isscalar(queries[0]) and not isinstance(queries[0], (list, tuple)):
            vectors = self.embedder(device, weights)(list(queries))  # PIL images, arrays, bytes
        else:
            vectors = np.asarray(queries, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"query vectors of shape {tuple(vectors.shape)}: this index holds "
                             f"{self.dim}-dim vectors")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise InputError("query vectors hold NaN or infinite values")
        return vectors


def drop_excluded(scores: np.ndarray, rows: np.ndarray, exclude: np.ndarray, k: int):
    """Remove each query's excluded row (or, when it is not among them, its last candidate) from
    lists of k + 1 candidates and keep k."""
    if len(exclude) != len(rows):
        raise UsageError(f"exclude has {len(exclude)} rows for {len(rows)} queries")
    hit = rows == exclude[:, None]
    drop = np.where(hit.any(axis=1), hit.argmax(axis=1), rows.shape[1] - 1)
    keep = np.ones(rows.shape, bool)
    keep[np.arange(len(rows)), drop] = False
    return scores[keep].reshape(len(rows), -1)[:, :k], rows[keep].reshape(len(rows), -1)[:, :k]


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not os.path.lexists(path):
        raise InputError(f"{path}: missing; is {folder} an index made by `unicom index`?")
    try:
        with open_regular(path, what="the index.json that `unicom index` writes", encoding="utf-8") as handle:
            meta = json.loads(handle.read())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); rebuild the index") from exc
    return validate_meta(meta, path)


def _read_ids(path: Path) -> list[str]:
    if path.exists() and not path.is_file():  # a FIFO would block the open, /dev/zero never end
        raise InputError(f"{path}: not a regular file; rebuild the index with `unicom index`")
    try:
        return read_ids(path)
    except FileNotFoundError:
        raise InputError(f"{path}: missing; rebuild the index with `unicom index`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); rebuild the index") from exc
