"""Retrieval metrics as pure functions: Recall@K, MAP@R and GLDv2 mAP@100 (SPEC §2)."""

from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np


def recall_at_k(neighbor_labels: np.ndarray, query_labels: np.ndarray,
                ks: Iterable[int]) -> dict[int, float]:
    """Fraction of queries with at least one same-label item among their first K neighbours.

    Args:
        neighbor_labels: (Nq, kmax) labels of each query's neighbours, best first, the query
            itself already excluded (all-vs-all).
        query_labels: (Nq,) labels.
        ks: the K values; each must be ≤ kmax.
    """
    neighbor_labels = np.asarray(neighbor_labels)
    hits = neighbor_labels == np.asarray(query_labels)[:, None]
    first_hit = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
    out = {}
    for k in ks:
        if k > neighbor_labels.shape[1]:
            raise ValueError(f"Recall@{k} needs {k} neighbours, got {neighbor_labels.shape[1]}")
        out[int(k)] = float(np.mean(first_hit < k)) if len(first_hit) else 0.0
    return out


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray,
                    all_vs_all: bool) -> np.ndarray:
    """How many gallery items share each query's label (minus the query itself when all-vs-all)."""
    values, counts = np.unique(np.asarray(gallery_labels), return_counts=True)
    pos = np.searchsorted(values, query_labels)
    pos = np.clip(pos, 0, len(values) - 1)
    found = values[pos] == query_labels
    r = np.where(found, counts[pos], 0)
    return r - (1 if all_vs_all else 0)


def map_at_r(neighbor_labels: np.ndarray, query_labels: np.ndarray,
             relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020): mean over queries of (1/R) Σ_{i≤R} P@i · rel(i).

    R is each query's number of relevant gallery items (``relevant``); queries with R = 0 are
    left out. ``neighbor_labels`` needs at least max(R) columns.
    """
    neighbor_labels = np.asarray(neighbor_labels)
    relevant = np.asarray(relevant)
    keep = relevant > 0
    if not keep.any():
        return 0.0
    r_max = int(relevant.max())
    if r_max > neighbor_labels.shape[1]:
        raise ValueError(f"MAP@R needs {r_max} neighbours, got {neighbor_labels.shape[1]}")
    hits = (neighbor_labels[keep, :r_max] == np.asarray(query_labels)[keep, None])
    r = relevant[keep]
    ranks = np.arange(1, r_max + 1)
    within = ranks[None, :] <= r[:, None]
    hits &= within
    precision = np.cumsum(hits, axis=1) / ranks[None, :]
    ap = (precision * hits).sum(1) / r
    return float(ap.mean())


def gldv2_map_at_100(predictions: Mapping[Hashable, Sequence[Hashable]],
                     solution: Mapping[Hashable, Iterable[Hashable]],
                     max_predictions: int = 100) -> float:
    """Google Landmarks v2 retrieval mAP@100, as the challenge defines it.

    For each query of ``solution`` walk the first ``max_predictions`` entries of its
    prediction list (missing query: AP 0); skip an id already seen; at each 1-based position
    i holding a new relevant id add (relevant so far)/i; divide by min(#relevant, 100), where
    #relevant counts the solution row's entries as DELF's official code does (an id repeated in
    the row counts twice). Average over the queries of ``solution``.
    """
    if not solution:
        return 0.0
    total = 0.0
    for query, relevant_ids in solution.items():
        relevant_ids = list(relevant_ids)
        relevant_set = set(relevant_ids)
        if not relevant_set:
            raise ValueError(f"query {query!r} has no relevant ids")
        seen: set = set()
        correct = 0
        ap = 0.0
        for i, pred in enumerate(list(predictions.get(query, ()))[:max_predictions], start=1):
            if pred in seen:
                continue
            seen.add(pred)
            if pred in relevant_set:
                correct += 1
                ap += correct / i
        total += ap / min(len(relevant_ids), max_predictions)
    return total / len(solution)
