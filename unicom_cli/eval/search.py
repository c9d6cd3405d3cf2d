"""Exact top-k inner-product search (faiss or torch), chunked, with self-exclusion and one fixed order.

This module owns the order and the error bounds; ``search_backends`` generates the candidates.
The order is defined once, independently of the backend: by the float64 inner product of the
(float32) vectors, rounded to 12 decimals, descending, then by ascending gallery index. The
backends rank in float32 (fast sgemm), or, with the torch backend for small k on CPUs with
fast bfloat16 products (AVX512-BF16/AMX), in bfloat16 at several times the speed. Each score
comes with a proven bound on its error (``_ErrorBound``); where two scores are closer than that,
the affected candidates are rescored in float64, so faiss, torch, fp32, bf16, CPU, GPU and any
chunking or process count return the same neighbours. Partial selection (faiss heaps,
``torch.topk``) asks for spare candidates per row; rows whose k-th score is within the error of
the last spare are redone over their full score rows in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unicom_cli.errors import UsageError
from unicom_cli.eval.search_backends import FaissSearch, SymmetricSearch, TorchSearch, faiss_module

BACKENDS = ("auto", "faiss", "torch")
PRECISIONS = ("auto", "fp32", "bf16")
_BUDGET_BYTES = 256 << 20  # score-matrix memory per chunk
_EPS = 1e-5  # bound on the float32 score error, relative to |q|·max|g|
_DECIMALS = 12  # float64 scores are rounded so that equal vectors tie whatever the summation order
_PENDING = 1 << 22  # extra candidates the symmetric search holds before merging
_BF16_MAX_K = 64  # beyond this the band of candidates to rescore costs more than bf16 saves
_BF16_UNIT = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
_F32_UNIT = 2.0 ** -24


@dataclass
class SearchResult:
    """Neighbours of each query, best first: ``scores`` (Nq, k) float32 (float64 with
    ``exact_scores``), ``indices`` int64 (Nq, k)."""

    scores: np.ndarray
    indices: np.ndarray


def l2_normalize(x: np.ndarray, num_feat: int | None = None) -> np.ndarray:
    """Row-wise L2 normalisation in float32; then keep the first ``num_feat`` dims (SPEC §2, no renormalising)."""
    x = np.asarray(x, dtype=np.float32)
    if num_feat is not None and not 1 <= num_feat <= x.shape[1]:
        raise UsageError(f"--num-feat {num_feat}: the features have {x.shape[1]} dimensions; "
                         f"choose 1 to {x.shape[1]}")
    # Squares summed in float64: a float32 sum of squares overflows from values of ~1e19 (the
    # row then became zeros). A norm past float32's range divides in float64 (rare: values ~1e37).
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]
    norms = np.maximum(norms, 1e-12)
    if norms.max(initial=0) < np.finfo(np.float32).max:
        out = x / norms.astype(np.float32)
    else:
        out = (x / norms).astype(np.float32)
    return np.ascontiguousarray(out[:, :num_feat] if num_feat else out)


def resolve_backend(backend: str, device: str, all_vs_all: bool = False) -> str:
    """``auto`` is torch: on CUDA, and on CPU too, where it matched or beat faiss's flat index
    in ``benchmarks/search.py`` and halves all-vs-all work (symmetric blocks). ``faiss`` stays
    available (on GPU when the installed faiss has GPUs)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "faiss" and faiss_module() is None:
        raise UsageError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
    return "torch" if backend == "auto" else backend


def resolve_precision(precision: str, backend: str, device: str, k: int) -> str:
    """The precision the scores are screened in (results are identical either way).

    ``auto`` is bf16 for the torch backend on CPU when k is small and the CPU multiplies bf16
    natively (``utils.cpu.native_bf16``, from its capabilities: a timing on a busy machine
    picked fp32 on an AMX CPU and made a 60k all-vs-all search 7x slower). faiss and CUDA always
    screen in fp32: cuBLAS may sum bf16 products in reduced precision (torch's
    ``allow_bf16_reduced_precision_reduction``), which the error bound does not cover.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend != "torch" or not str(device).startswith("cpu"):
        return "fp32"
    if precision == "auto":
        from unicom_cli.utils.cpu import native_bf16

        return "bf16" if k <= _BF16_MAX_K and native_bf16() else "fp32"
    return precision


def search(queries: np.ndarray, gallery: np.ndarray | None, k: int, *, exclude_self: bool = False,
           query_offset: int = 0, backend: str = "auto", device: str = "cpu",
           chunk_rows: int | None = None, gallery_on_host: bool = False, exact_scores: bool = False,
           precision: str = "auto", progress: str | None = None) -> SearchResult:
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
        precision: what the torch backend screens scores in: ``fp32``, ``bf16`` or ``auto``
            (see ``resolve_precision``); the neighbours and scores returned are the same.
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
    precision = resolve_precision(precision, backend, device, k)
    want = min(len(gallery), k + _pad(k, precision) + (1 if exclude_self else 0))
    block = len(gallery)
    if backend == "faiss":
        run = FaissSearch(gallery, device, want)
    elif symmetric:
        run = SymmetricSearch(gallery, device, want, exclude_self, precision, progress,
                              budget_bytes=_BUDGET_BYTES, pending_limit=_PENDING)
    else:
        block = max(want, min(len(gallery), _BUDGET_BYTES // (4 * 1024))) if gallery_on_host else block
        run = TorchSearch(gallery, device, block, precision)
    chunk = chunk_rows or max(1, min(len(queries), _BUDGET_BYTES // (4 * block)))
    bound = _ErrorBound(gallery, precision)
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
            s, i = _finish(q, gallery, s, i, floor, bound, k, self_ids, exact_scores)
            scores[start:stop], indices[start:stop] = s, i
            bar.advance(stop - start)
    return SearchResult(scores, indices)


def _pad(k: int, precision: str = "fp32") -> int:
    """Spare candidates per row so that ties at rank k rarely need the full-row fallback
    (bf16's wider error band needs more of them)."""
    return max(16, k // 2) if precision == "bf16" else max(3, k // 8)


class _ErrorBound:
    """A proven bound on |screened score − exact score| for each query row against any gallery row.

    fp32: ``_EPS``·|q|·max|g|. bf16: rounding the inputs moves q·g by at most
    |q−q̂|·|g| + |q̂|·|g−ĝ|; the float32 sum of the exact bf16 products adds at most
    2D·2⁻²⁴·|q̂|·|ĝ|, and rounding the result to bf16 a relative 2⁻⁸ of the largest score
    the row's selection involves (its candidates and its floor).
    """

    def __init__(self, gallery: np.ndarray, precision: str) -> None:
        self.precision = precision
        self.g_norm = float(np.sqrt(np.einsum("ij,ij->i", gallery, gallery, dtype=np.float64).max()))
        if precision == "bf16":
            g_hat = _bf16_round(gallery)
            residual = gallery - g_hat
            self.g_hat_norm = float(np.sqrt(np.einsum("ij,ij->i", g_hat, g_hat).max()))
            self.g_residual = float(np.sqrt(np.einsum("ij,ij->i", residual, residual).max()))
            self.dim = gallery.shape[1]

    def fp32(self, q: np.ndarray) -> np.ndarray:
        return _EPS * np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64)) * self.g_norm

    def __call__(self, q: np.ndarray, s: np.ndarray, floor: np.ndarray) -> np.ndarray:
        if self.precision != "bf16":
            return self.fp32(q)
        q_hat = _bf16_round(q)
        q_hat_norm = np.sqrt(np.einsum("ij,ij->i", q_hat, q_hat))
        residual = q - q_hat
        residual_norm = np.sqrt(np.einsum("ij,ij->i", residual, residual))
        inputs = (residual_norm * self.g_norm + q_hat_norm * self.g_residual
                  + 2 * self.dim * _F32_UNIT * q_hat_norm * self.g_hat_norm)
        finite = np.where(np.isfinite(s), np.abs(s), 0.0).max(axis=1, initial=0.0)
        largest = np.maximum(finite, np.where(np.isfinite(floor), np.abs(floor), 0.0))
        return 1.01 * (inputs + 1.01 * _BF16_UNIT * largest) + self.fp32(q)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 exactly as the torch backend rounds it, as float64."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).bfloat16().double().numpy()


def _dots(q: np.ndarray, rows: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rounded float64 inner products ``q[rows[j]] · gallery[ids[j]]``, in bounded-memory pieces."""
    out = np.empty(len(ids), np.float64)
    step = 8192
    for a in range(0, len(ids), step):
        out[a:a + step] = np.einsum("md,md->m", gallery[ids[a:a + step]], q[rows[a:a + step]],
                                    dtype=np.float64)
    return np.round(out, _DECIMALS)


def _finish(q, gallery, s, i, floor, bound, k, self_ids, exact_scores):
    """Candidates (float32, arbitrary tie order) → the first k under the fixed order."""
    eps = bound(q, s, floor)
    order = np.lexsort((i, -s), axis=-1)
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if exact_scores:
        near = np.ones((len(s), s.shape[1] - 1), bool)
    else:
        near = (s[:, :-1] - s[:, 1:]) < 2 * eps[:, None]
    touched = np.zeros(s.shape, bool)
    touched[:, :-1] |= near
    touched[:, 1:] |= near
    # Candidates more than 2·eps below the k-th cannot enter the top k: no need to rescore them.
    touched &= s >= (s[:, k - 1] - 2 * eps)[:, None]
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
    if bound.precision == "bf16" and not exact_scores:  # bf16 values are not worth returning
        r, c = np.nonzero(~np.take_along_axis(touched, order, 1) & np.isfinite(out_s))
        out_s[r, c] = _dots(q, r, gallery, out_i[r, c])
    unsafe = np.flatnonzero(s[:, k - 1] - floor <= 2 * eps)
    if len(unsafe):  # the k-th candidate may tie with an item that was not returned
        _redo_rows(q, gallery, unsafe, k, self_ids, bound.fp32(q), out_s, out_i)
    return out_s, out_i


def _redo_rows(q, gallery, rows, k, self_ids, eps, out_s, out_i) -> None:
    """Recompute the top-k of ``rows`` from their full float32 score rows (a few rows per sgemm)."""
    step = max(1, _BUDGET_BYTES // (4 * len(gallery)))
    for a in range(0, len(rows), step):
        part = rows[a:a + step]
        sims = q[part] @ gallery.T
        if self_ids is not None:
            sims[np.arange(len(part)), self_ids[part]] = -np.inf
        kth = np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k]
        r, c = np.nonzero(sims >= (kth - 2 * eps[part])[:, None])
        exact = _dots(q, part[r], gallery, c)
        bounds = np.searchsorted(r, np.arange(len(part) + 1))
        for j, row in enumerate(part):
            sel, val = c[bounds[j]:bounds[j + 1]], exact[bounds[j]:bounds[j + 1]]
            best = np.lexsort((sel, -val))[:k]
            out_i[row] = sel[best]
            out_s[row] = val[best]


def merge_topk(scores: list[np.ndarray], indices: list[np.ndarray], k: int) -> SearchResult:
    """Merge per-shard lists (same queries, disjoint galleries, ``exact_scores``) into the global top-k.

    Each list must be its shard's top-k under the fixed order with float64 scores; the merge
    then equals one search over the whole gallery.
    """
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(indices, axis=1)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    return SearchResult(np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1))
