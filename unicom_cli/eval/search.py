"""Exact top-k inner-product search (faiss or torch), chunked, with self-exclusion and one fixed order.

The order is defined once, independently of the backend: by the float64 inner product of the
(float32) vectors, rounded to 12 decimals, descending, then by ascending gallery index. The
backends rank in float32 (fast sgemm); where two float32 scores are closer than their
rounding error (``_EPS``) the affected candidates are rescored in float64, so faiss, torch,
CPU, GPU and any chunking or process count return the same neighbours. Partial selection
(faiss heaps, ``torch.topk``) asks for a few spare candidates per row; a row whose k-th
score is within the error of the last spare is redone over its full score row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unicom_cli.errors import UsageError

BACKENDS = ("auto", "faiss", "torch")
_BUDGET_BYTES = 256 << 20  # score-matrix memory per chunk
_EPS = 1e-5  # bound on the float32 score error, relative to |q|·max|g|
_DECIMALS = 12  # float64 scores are rounded so that equal vectors tie whatever the summation order
_PENDING = 1 << 22  # extra candidates the symmetric search holds before merging


@dataclass
class SearchResult:
    """Neighbours of each query, best first: ``scores`` (Nq, k) float32 (float64 with
    ``exact_scores``), ``indices`` int64 (Nq, k)."""

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


def resolve_backend(backend: str, device: str, all_vs_all: bool = False) -> str:
    """``auto`` is torch: on CUDA, and on CPU too, where it matched or beat faiss's flat index
    in ``benchmarks/search.py`` and halves all-vs-all work (symmetric blocks). ``faiss`` stays
    available (on GPU when the installed faiss has GPUs)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "faiss" and _faiss() is None:
        raise UsageError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
    return "torch" if backend == "auto" else backend


def search(queries: np.ndarray, gallery: np.ndarray | None, k: int, *, exclude_self: bool = False,
           query_offset: int = 0, backend: str = "auto", device: str = "cpu",
           chunk_rows: int | None = None, gallery_on_host: bool = False, exact_scores: bool = False,
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
        exact_scores: return float64 scores for every neighbour (lists from different
            galleries can then be merged exactly, see ``merge_topk``).
        progress: a progress-bar label, or None for none.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = queries if gallery is None else np.ascontiguousarray(gallery, dtype=np.float32)
    if exclude_self and query_offset + len(queries) > len(gallery):
        raise UsageError("exclude_self needs the queries to be rows of the gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise UsageError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    k = min(int(k), len(gallery) - (1 if exclude_self else 0))
    dtype = np.float64 if exact_scores else np.float32
    if k < 1 or len(queries) == 0:
        return SearchResult(np.zeros((len(queries), max(k, 0)), dtype), np.zeros((len(queries), max(k, 0)), np.int64))
    symmetric = gallery is queries and query_offset == 0 and not gallery_on_host
    backend = resolve_backend(backend, device, symmetric)
    symmetric = symmetric and backend == "torch"
    want = min(len(gallery), k + _pad(k) + (1 if exclude_self else 0))
    block = len(gallery)
    if backend == "faiss":
        run = _FaissSearch(gallery, device, want)
    elif symmetric:
        run = _SymmetricSearch(gallery, device, want, exclude_self, progress)
    else:
        block = max(want, min(len(gallery), _BUDGET_BYTES // (4 * 1024))) if gallery_on_host else block
        run = _TorchSearch(gallery, device, block)
    chunk = chunk_rows or max(1, min(len(queries), _BUDGET_BYTES // (4 * block)))
    g_scale = float(np.sqrt(np.einsum("ij,ij->i", gallery, gallery).max()))
    scores = np.empty((len(queries), k), dtype)
    indices = np.empty((len(queries), k), np.int64)
    from unicom_cli.utils.console import progress_bar

    with progress_bar(len(queries), progress or "search", unit="queries",
                      enabled=progress is not None and not symmetric) as bar:
        for start in range(0, len(queries), chunk):
            stop = min(start + chunk, len(queries))
            q = queries[start:stop]
            self_ids = np.arange(start, stop) + query_offset if exclude_self else None
            s, i, floor = run(q, want, self_ids) if not symmetric else run.rows(start, stop)
            eps = _EPS * np.linalg.norm(q.astype(np.float64), axis=1) * g_scale
            s, i = _finish(q, gallery, s, i, floor, eps, k, self_ids, exact_scores)
            scores[start:stop], indices[start:stop] = s, i
            bar.advance(stop - start)
    return SearchResult(scores, indices)


def _pad(k: int) -> int:
    """Spare candidates per row so that ties at rank k rarely need the full-row fallback."""
    return max(3, k // 8)


def _dots(q: np.ndarray, rows: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rounded float64 inner products ``q[rows[j]] · gallery[ids[j]]``, in bounded-memory pieces."""
    out = np.empty(len(ids), np.float64)
    step = 8192
    for a in range(0, len(ids), step):
        out[a:a + step] = np.einsum("md,md->m", gallery[ids[a:a + step]], q[rows[a:a + step]],
                                    dtype=np.float64)
    return np.round(out, _DECIMALS)


def _finish(q, gallery, s, i, floor, eps, k, self_ids, exact_scores):
    """Candidates (float32, arbitrary tie order) → the first k under the fixed order."""
    order = np.lexsort((i, -s), axis=-1)
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if exact_scores:
        near = np.ones((len(s), s.shape[1] - 1), bool)
    else:
        near = (s[:, :-1] - s[:, 1:]) < 2 * eps[:, None]
    touched = np.zeros(s.shape, bool)
    touched[:, :-1] |= near
    touched[:, 1:] |= near
    rows, cols = np.nonzero(touched & np.isfinite(s))
    key = s.astype(np.float64)
    if len(rows):
        key[rows, cols] = _dots(q, rows, gallery, i[rows, cols])
    group = np.concatenate([np.zeros((len(s), 1), np.int64), np.cumsum(~near, axis=1)], axis=1)
    order = np.lexsort((i, -key, group), axis=-1)[:, :k]
    out_s = np.take_along_axis(key if exact_scores else s, order, 1)
    out_s = out_s.astype(np.float64 if exact_scores else np.float32)
    if not exact_scores:  # report the refined values where they were computed
        out_s = np.where(np.take_along_axis(touched, order, 1),
                         np.take_along_axis(key, order, 1), out_s).astype(np.float32)
    out_i = np.take_along_axis(i, order, 1)
    unsafe = np.flatnonzero(s[:, k - 1] - floor <= 2 * eps)
    for r in unsafe:  # the k-th candidate may tie with an item that was not returned
        row = gallery @ q[r]
        if self_ids is not None:
            row[self_ids[r]] = -np.inf
        thr = np.partition(row, len(row) - k)[len(row) - k]
        sel = np.flatnonzero(row >= thr - 2 * eps[r])
        exact = _dots(q, np.full(len(sel), r), gallery, sel)
        best = np.lexsort((sel, -exact))[:k]
        out_i[r] = sel[best]
        out_s[r] = exact[best]
    return out_s, out_i


class _FaissSearch:
    """faiss IndexFlatIP: blocked sgemm + heaps, CPU or GPU."""

    def __init__(self, gallery: np.ndarray, device: str, want: int) -> None:
        faiss = _faiss()
        self.n = len(gallery)
        index = faiss.IndexFlatIP(gallery.shape[1])
        # faiss GPU indexes search at most 2,048 neighbours; beyond that stay on the CPU.
        if str(device).startswith("cuda") and faiss.get_num_gpus() > 0 and want <= 2048:
            dev = int(str(device).split(":")[1]) if ":" in str(device) else 0
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, dev, index)
        index.add(gallery)
        self.index = index

    def __call__(self, q: np.ndarray, want: int, self_ids: np.ndarray | None):
        scores, ids = self.index.search(q, want)
        ids = ids.astype(np.int64)
        # Every item scoring above the last returned one was returned.
        floor = scores[:, -1].astype(np.float64) if want < self.n else np.full(len(q), -np.inf)
        if self_ids is not None:
            is_self = ids == self_ids[:, None]
            scores = np.where(is_self, -np.inf, scores)
            ids = np.where(is_self, np.iinfo(np.int64).max, ids)
        return scores.astype(np.float32), ids, floor


class _TorchSearch:
    """``torch.mm`` + ``torch.topk`` per chunk, on CPU or CUDA; the gallery whole or in blocks."""

    def __init__(self, gallery: np.ndarray, device: str, block: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.block = block
        self.n = len(gallery)
        self._buf = None
        host = torch.from_numpy(gallery)
        if block >= len(gallery):
            self.gallery = host.to(self.device)
        else:  # streamed: stays in (pinned) host memory
            self.gallery = host.pin_memory() if self.device.type == "cuda" else host

    def __call__(self, q: np.ndarray, want: int, self_ids: np.ndarray | None):
        torch = self.torch
        qt = torch.from_numpy(q).to(self.device)
        best_s = best_i = None
        floor = torch.full((len(q),), -float("inf"), dtype=torch.float64, device=self.device)
        for start in range(0, self.n, self.block):
            part = self.gallery[start:start + self.block].to(self.device, non_blocking=True)
            size = len(qt) * len(part)
            if self._buf is None or self._buf.numel() < size:  # reused: no page faults per chunk
                self._buf = torch.empty(size, device=self.device)
            sims = self._buf[:size].view(len(qt), len(part))
            torch.mm(qt, part.T, out=sims)
            if self_ids is not None:
                local = torch.from_numpy(self_ids - start).to(self.device)
                inside = (local >= 0) & (local < len(part))
                rows = torch.arange(len(q), device=self.device)[inside]
                sims[rows, local[inside]] = -float("inf")
            take = min(want, len(part))
            s, i = sims.topk(take, dim=1)
            if take < len(part):
                floor = torch.maximum(floor, s[:, -1].double())
            i = i + start
            if best_s is not None:
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                if s.shape[1] > want:
                    s, pick = s.topk(want, dim=1)
                    i = i.gather(1, pick)
                    floor = torch.maximum(floor, s[:, -1].double())
            best_s, best_i = s, i
        return best_s.cpu().numpy(), best_i.cpu().numpy(), floor.cpu().numpy()


class _SymmetricSearch:
    """All-vs-all with torch: each off-diagonal block of X Xᵀ is computed once and serves the
    rows of both blocks, halving the sgemm work.

    Diagonal blocks seed every row's candidate list with a dense ``topk``; off-diagonal blocks
    only pass the few scores above a row's current want-th best (a comparison instead of a
    ``topk`` over the transposed block). Candidates are merged in a few large sorts, so the
    work outside sgemm is a handful of big operations, not thousands of small ones.
    """

    def __init__(self, x: np.ndarray, device: str, want: int, exclude_self: bool,
                 progress: str | None) -> None:
        import torch

        from unicom_cli.utils.console import progress_bar

        self.torch = torch
        dev = torch.device(device)
        xt = torch.from_numpy(x).to(dev)
        n = len(xt)
        self.n, self.want = n, want
        # Smaller blocks skip more of the matrix (the diagonal blocks are computed whole);
        # 4,096 rows keep sgemm at full speed.
        size = max(1, min(n, int((_BUDGET_BYTES // 4) ** 0.5) // 2))
        starts = list(range(0, n, size))
        self.vals = torch.full((n, want), -float("inf"), device=dev)
        self.ids = torch.full((n, want), -1, dtype=torch.int64, device=dev)
        self.pending: list[tuple] = []
        self.pending_count = 0
        pairs = len(starts) * (len(starts) + 1) // 2
        with progress_bar(pairs, progress or "search", unit="blocks", enabled=progress is not None) as bar:
            for a in starts:
                block = xt[a:a + size]
                sims = block @ block.T
                if exclude_self:
                    sims.fill_diagonal_(-float("inf"))
                take = min(want, sims.shape[1])
                v, i = sims.topk(take, dim=1)
                self.vals[a:a + len(block), :take] = v
                self.ids[a:a + len(block), :take] = i + a
                bar.advance(1)
            thr = self.vals[:, -1].clone()
            # Reused output buffers: fresh 64 MiB allocations cost page faults on every block.
            sims_buf = torch.empty(size * size, device=dev)
            mask_buf = torch.empty(size * size, dtype=torch.bool, device=dev)
            for ai, a in enumerate(starts):
                for b in starts[ai + 1:]:
                    xa, xb = xt[a:a + size], xt[b:b + size]
                    sims = sims_buf[:len(xa) * len(xb)].view(len(xa), len(xb))
                    torch.mm(xa, xb.T, out=sims)
                    row_thr, col_thr = thr[a:a + size], thr[b:b + size]
                    # One comparison with the lowest threshold of either side finds a small
                    # superset of the candidates; the exact per-row tests run on that.
                    low = torch.minimum(row_thr.min(), col_thr.min())
                    mask = mask_buf[:sims.numel()].view(sims.shape)
                    torch.gt(sims, low, out=mask)
                    rows, cols = torch.nonzero(mask, as_tuple=True)
                    v = sims[rows, cols]
                    for_rows = v > row_thr[rows]
                    self._add(rows[for_rows] + a, cols[for_rows] + b, v[for_rows])
                    for_cols = v > col_thr[cols]
                    self._add(cols[for_cols] + b, rows[for_cols] + a, v[for_cols])
                    if self.pending_count > 4 * n * want + _PENDING:  # bound the memory
                        self._merge()
                        thr = self.vals[:, -1].clone()
                    bar.advance(1)
        self._merge()
        complete = want >= n
        self.floor = (torch.full((n,), -float("inf"), dtype=torch.float64) if complete
                      else self.vals[:, -1].double().cpu())

    def _add(self, rows, ids, vals) -> None:
        self.pending.append((rows, ids, vals))
        self.pending_count += len(rows)

    def _merge(self) -> None:
        """Fold the pending (row, id, score) candidates into the per-row top-want lists."""
        torch = self.torch
        if not self.pending:
            return
        dev = self.vals.device
        rows = torch.cat([torch.arange(self.n, device=dev).repeat_interleave(self.want)]
                         + [p[0] for p in self.pending])
        ids = torch.cat([self.ids.flatten()] + [p[1] for p in self.pending])
        vals = torch.cat([self.vals.flatten()] + [p[2] for p in self.pending])
        self.pending, self.pending_count = [], 0
        order = torch.argsort(vals, descending=True, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
        rows, ids, vals = rows[order], ids[order], vals[order]
        counts = torch.bincount(rows, minlength=self.n)
        rank = torch.arange(len(rows), device=dev) - (torch.cumsum(counts, 0) - counts)[rows]
        keep = rank < self.want
        self.vals[rows[keep], rank[keep]] = vals[keep]
        self.ids[rows[keep], rank[keep]] = ids[keep]

    def rows(self, start: int, stop: int):
        """Candidates of query rows start..stop: (scores, ids, floor) as numpy."""
        return (self.vals[start:stop].cpu().numpy(), self.ids[start:stop].cpu().numpy(),
                self.floor[start:stop].numpy())


def merge_topk(scores: list[np.ndarray], indices: list[np.ndarray], k: int) -> SearchResult:
    """Merge per-shard lists (same queries, disjoint galleries, ``exact_scores``) into the global top-k.

    Each list must be its shard's top-k under the fixed order with float64 scores; the merge
    then equals one search over the whole gallery.
    """
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(indices, axis=1)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    return SearchResult(np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1))
