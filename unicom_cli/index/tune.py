"""Recall against exact search on held-out queries, and the cheapest search parameters that reach a target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from unicom_cli.index.source import CHUNK_ROWS, FeatureSource

RECALL_K = 10
HELD_OUT = 1000  # queries drawn from the collection to measure recall
RECALL_BATCH = 100  # queries searched at once while measuring it
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
           1536, 2048, 4096)
EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)


@dataclass
class HeldOut:
    """Queries drawn from the collection with their exact neighbours among the other rows."""

    rows: np.ndarray  # (q,) global rows of the queries
    vectors: np.ndarray  # (q, d) float32
    truth: np.ndarray  # (q, k) exact neighbour rows, the query itself excluded


@dataclass
class Tuning:
    """The parameters chosen and every setting tried, for index.json and the screen."""

    params: dict
    recall: float
    tried: list[dict] = field(default_factory=list)
    reached: bool = True
    queries: int = 0  # held-out queries the recall was measured on


def held_out_queries(sources: Sequence[FeatureSource], count: int = HELD_OUT, k: int = RECALL_K,
                     seed: int = 0) -> HeldOut:
    """``count`` rows drawn from the collection and their exact top-k among all other rows.

    The exact search is ``eval.search.search`` (the one behind ``eval-retrieval``) over the
    collection read chunk by chunk; per-chunk float64 lists are merged exactly.
    """
    from unicom_cli.eval.search import merge_topk, search

    total = sum(s.count for s in sources)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=min(count, total), replace=False))
    offsets = np.cumsum([0] + [s.count for s in sources])
    vectors = np.empty((len(rows), sources[0].dim), np.float32)
    for n, src in enumerate(sources):
        inside = (rows >= offsets[n]) & (rows < offsets[n + 1])
        if inside.any():
            vectors[inside] = src.rows_at(rows[inside] - offsets[n])
    want = min(k + 1, total)
    scores, ids = [], []
    for n, src in enumerate(sources):
        for start, chunk in src.chunks(chunk_rows=CHUNK_ROWS):
            res = search(vectors, chunk, want, exact_scores=True)
            scores.append(res.scores)
            ids.append(res.indices + offsets[n] + start)
            if len(scores) > 8:  # keep memory flat: merge as we go
                merged = merge_topk(scores, ids, want)
                scores, ids = [merged.scores], [merged.indices]
    merged = merge_topk(scores, ids, want)
    truth = _without(merged.indices, rows, min(k, total - 1))
    return HeldOut(rows, vectors, truth)


def _without(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's list without its own row (or without its last entry), first k kept."""
    from unicom_cli.index.store import drop_excluded

    return drop_excluded(np.zeros(found.shape, np.float32), found, own, k)[1]


def recall_at(index, held: HeldOut, k: int = RECALL_K) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over the held-out queries."""
    k = min(k, held.truth.shape[1])
    if k < 1:
        return 1.0
    from unicom_cli.index.store import release_mapped_lists

    batches = []
    for start in range(0, len(held.vectors), RECALL_BATCH):
        batches.append(index.search(held.vectors[start:start + RECALL_BATCH], min(k + 1, index.ntotal))[1])
        release_mapped_lists(index)  # on-disk lists: what a batch touched is not kept resident
    found = _without(np.concatenate(batches).astype(np.int64), held.rows, k)
    hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, held.truth[:, :k])]
    return float(np.mean(hits)) / k


def parameter_grid(index) -> tuple[str, list[dict]]:
    """What to tune for this faiss index: ('nprobe', settings), ('efSearch', …) or ('', [{}])."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nlist = ivf.nlist
        hnsw_coarse = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        grid = []
        for nprobe in NPROBES:
            if nprobe > nlist:
                break
            setting = {"nprobe": nprobe}
            if hnsw_coarse:  # the coarse graph must return at least nprobe good lists
                setting["quantizer_efSearch"] = max(64, 2 * nprobe)
            grid.append(setting)
        if grid[-1]["nprobe"] != nlist and nlist <= NPROBES[-1]:
            grid.append({**grid[-1], "nprobe": nlist})
        return "nprobe", grid
    inner = index
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        return "efSearch", [{"efSearch": ef} for ef in EF_SEARCHES]
    return "", [{}]


def tune(index, held: HeldOut, target: float, k: int = RECALL_K, progress=None) -> Tuning:
    """The first (cheapest) setting of the grid whose recall@k reaches ``target``; the best
    one tried, marked ``reached=False``, when none does. Search cost grows along the grid, so
    the scan stops at the first success."""
    from unicom_cli.index.store import apply_search_params

    _, grid = parameter_grid(index)
    tried: list[dict] = []
    best: tuple[float, dict] = (-1.0, {})
    for setting in grid:
        apply_search_params(index, setting)
        recall = recall_at(index, held, k)
        tried.append({**setting, "recall": round(recall, 4)})
        if progress is not None:
            progress(setting, recall)
        if recall > best[0]:
            best = (recall, setting)
        if recall >= target:
            return Tuning(setting, recall, tried, True, len(held.rows))
    apply_search_params(index, best[1])
    return Tuning(best[1], best[0], tried, False, len(held.rows))
