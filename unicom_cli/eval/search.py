"""Exact top-k inner-product search (faiss or torch), chunked, with self-exclusion and a fixed tie order.

Every backend returns the same neighbours in the same order: candidates are ordered by
descending score, then by ascending gallery index. Partial selection (faiss's heaps,
``torch.topk``) picks an arbitrary member of a tie, so each row asks for a few spare
candidates; a row whose tie runs past the spares is redone over its full score row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from unicom_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "faiss", "torch")
_BUDGET_BYTES = 256 << 20  # score-matrix memory per chunk


@dataclass
class SearchResult:
    """Neighbours of each query, best first: ``scores`` float32 (Nq, k), ``indices`` int64 (Nq, k)."""

    scores: np.ndarray
    indices: np.ndarray


def l2_normalize(x: np.ndarray, num_feat: int | None = None) -> np.ndarray:
    """Row-wise L2 normalisation in float32; then keep the first ``num_feat`` dims (SPEC §2, no renormalising)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out = x / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(out[:, :num_feat] if num_feat else out)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: torch on CUDA devices, faiss on CPU (torch if faiss is missing)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "faiss" and _faiss() is None:
        raise UsageError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
    if backend != "auto":
        return backend
    if str(device).startswith("cuda"):
        return "torch"
    return "faiss" if _faiss() is not None else "torch"


def search(queries: np.ndarray, gallery: np.ndarray | None, k: int, *, exclude_self: bool = False,
           query_offset: int = 0, backend: str = "auto", device: str = "cpu",
           chunk_rows: int | None = None, gallery_on_host: bool = False,
           progress: str | None = None) -> SearchResult:
    """The ``k`` highest inner products of each query row among the gallery rows.

    Args:
        queries: (Nq, D) float32, usually L2-normalised.
        gallery: (Ng, D) float32; None searches ``queries`` against themselves.
        k: neighbours per query; clamped to the gallery size (minus one when excluding self).
        exclude_self: gallery row ``query_offset + i`` is never a neighbour of query row i
            (all-vs-all, possibly on a block of the queries), whatever its score; duplicates of
            the query are still found.
        query_offset: the gallery position of query row 0 (with ``exclude_self``).
        backend: ``faiss`` (CPU, or GPU when the installed faiss has GPUs), ``torch``, or ``auto``.
        device: where the torch backend computes (``cpu``, ``cuda``, ``cuda:N``).
        chunk_rows: queries per chunk (default: a 256 MiB score block).
        gallery_on_host: torch backend: keep the gallery in host memory and stream it to the
            device in blocks (bounded device memory for huge galleries).
        progress: a progress-bar label, or None for none.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = queries if gallery is None else np.ascontiguousarray(gallery, dtype=np.float32)
    if exclude_self and query_offset + len(queries) > len(gallery):
        raise UsageError("exclude_self needs the queries to be rows of the gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise UsageError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    k = min(int(k), len(gallery) - (1 if exclude_self else 0))
    if k < 1 or len(queries) == 0:
        return SearchResult(np.zeros((len(queries), max(k, 0)), np.float32),
                            np.zeros((len(queries), max(k, 0)), np.int64))
    backend = resolve_backend(backend, device)
    block = len(gallery)
    if backend == "faiss":
        run = _FaissSearch(gallery, device)
    else:
        block = max(k, min(len(gallery), _BUDGET_BYTES // (4 * 1024))) if gallery_on_host else block
        run = _TorchSearch(gallery, device, block)
    chunk = chunk_rows or max(1, min(len(queries), _BUDGET_BYTES // (4 * block)))
    scores = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int64)
    from unicom_cli.utils.console import progress_bar

    with progress_bar(len(queries), progress or "search", unit="queries",
                      enabled=progress is not None) as bar:
        for start in range(0, len(queries), chunk):
            stop = min(start + chunk, len(queries))
            self_ids = np.arange(start, stop) + query_offset if exclude_self else None
            s, i = run(queries[start:stop], k, self_ids)
            scores[start:stop], indices[start:stop] = s, i
            bar.advance(stop - start)
    return SearchResult(scores, indices)


def _pad(k: int) -> int:
    """Spare candidates per row so that ties at rank k rarely need the full-row fallback."""
    return max(8, k // 8)


def _order_np(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score desc, id asc) and keep k."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _row_topk_np(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one full score row under the (score desc, id asc) order."""
    thr = np.partition(row, len(row) - k)[len(row) - k]
    sel = np.flatnonzero(row >= thr)
    order = np.lexsort((sel, -row[sel]))[:k]
    return row[sel[order]], sel[order]


class _FaissSearch:
    """faiss IndexFlatIP (blocked sgemm + heaps); rows with unresolved ties redone in numpy."""

    def __init__(self, gallery: np.ndarray, device: str) -> None:
        faiss = _faiss()
        self.gallery = gallery
        index = faiss.IndexFlatIP(gallery.shape[1])
        if str(device).startswith("cuda") and faiss.get_num_gpus() > 0:
            dev = int(str(device).split(":")[1]) if ":" in str(device) else 0
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, dev, index)
        index.add(gallery)
        self.index = index

    def __call__(self, q: np.ndarray, k: int, self_ids: np.ndarray | None):
        n = len(self.gallery)
        want = min(n, k + _pad(k) + (1 if self_ids is not None else 0))
        scores, ids = self.index.search(q, want)
        ids = ids.astype(np.int64)
        floor = scores[:, -1].copy()  # every item scoring above this was returned
        if self_ids is not None:
            is_self = ids == self_ids[:, None]
            scores = np.where(is_self, -np.inf, scores).astype(np.float32)
            ids = np.where(is_self, np.iinfo(np.int64).max, ids)
        scores, ids = _order_np(scores, ids, k)
        if want < n:
            for r in np.flatnonzero(scores[:, k - 1] <= floor):
                row = self.gallery @ q[r]
                if self_ids is not None:
                    row[self_ids[r]] = -np.inf
                scores[r], ids[r] = _row_topk_np(row, k)
        return scores, ids


class _TorchSearch:
    """``torch.mm`` + ``torch.topk`` per chunk, on CPU or CUDA; the gallery whole or in blocks."""

    def __init__(self, gallery: np.ndarray, device: str, block: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.block = block
        host = torch.from_numpy(gallery)
        if block >= len(gallery):
            self.gallery = host.to(self.device)
        else:  # streamed: stays in (pinned) host memory
            self.gallery = host.pin_memory() if self.device.type == "cuda" else host

    def __call__(self, q: np.ndarray, k: int, self_ids: np.ndarray | None):
        torch = self.torch
        qt = torch.from_numpy(q).to(self.device)
        best_s = best_i = None
        for start in range(0, len(self.gallery), self.block):
            part = self.gallery[start:start + self.block].to(self.device, non_blocking=True)
            sims = qt @ part.T
            if self_ids is not None:
                local = torch.from_numpy(self_ids - start).to(self.device)
                inside = (local >= 0) & (local < len(part))
                rows = torch.arange(len(q), device=self.device)[inside]
                sims[rows, local[inside]] = -float("inf")
            s, i = topk_tiebroken(sims, min(k, len(part)))
            i += start
            if best_s is None:
                best_s, best_i = s, i
            else:
                best_s, best_i = _merge_torch(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)
        return best_s.cpu().numpy(), best_i.cpu().numpy()


def _merge_torch(vals: "torch.Tensor", ids: "torch.Tensor", k: int):
    """Order candidate lists by (score desc, index asc) and keep k."""
    import torch

    by_id = ids.argsort(dim=1)
    vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals[:, :k].contiguous(), ids.gather(1, order)[:, :k].contiguous()


def topk_tiebroken(sims: "torch.Tensor", k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Row-wise top-k of a score block under the (score desc, column asc) order, exactly."""
    import torch

    n = sims.shape[1]
    want = min(n, k + _pad(k))
    vals, ids = sims.topk(want, dim=1)
    by_id = ids.argsort(dim=1)
    vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    floor = vals[:, -1]
    vals, ids = vals[:, :k].contiguous(), ids[:, :k].contiguous()
    if want < n:
        for r in torch.nonzero(vals[:, k - 1] <= floor).flatten().tolist():
            row = sims[r]
            thr = row.kthvalue(n - k + 1).values
            sel = torch.nonzero(row >= thr).flatten()
            sv, o = torch.sort(row[sel], descending=True, stable=True)
            vals[r], ids[r] = sv[:k], sel[o[:k]]
    return vals, ids


def merge_topk(scores: list[np.ndarray], indices: list[np.ndarray], k: int) -> SearchResult:
    """Merge per-shard neighbour lists (same queries, disjoint galleries) into the global top-k.

    Each shard's list must be its own exact top-k under the (score desc, index asc) order;
    the merge then equals a single search over the whole gallery.
    """
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(indices, axis=1)
    s, i = _order_np(s, i, k)
    return SearchResult(np.ascontiguousarray(s), np.ascontiguousarray(i))
