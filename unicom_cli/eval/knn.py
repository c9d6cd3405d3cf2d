"""Weighted kNN classification (DINOv2 protocol): T-softmax votes of the k nearest train images."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def knn_classify(neighbor_scores: np.ndarray, neighbor_labels: np.ndarray, val_labels: np.ndarray,
                 nb_knn: Iterable[int], temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 4096) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (overall and mean per class) of the weighted vote for each k.

    Each of the k nearest train images votes for its class with weight softmax(sim / T) over
    the k; a class's score is the sum of its votes. A class ranks above another on a higher
    score, or on an equal score and a smaller class index; only classes with votes count as
    predictions, so a val image whose class got no vote is a miss at every rank.

    Args:
        neighbor_scores: (V, kmax) cosine similarities, best first.
        neighbor_labels: (V, kmax) train labels of those neighbours.
        val_labels: (V,) true labels.
        nb_knn: the k values (each ≤ kmax).
        temperature: T of the softmax.
        num_classes: number of classes (default: max label + 1).

    Returns:
        {k: {"top1", "top5", "top1_per_class", "top5_per_class"}} as percentages.
    """
    scores = np.asarray(neighbor_scores, dtype=np.float64)
    labels = np.asarray(neighbor_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    n_val, kmax = scores.shape
    if num_classes is None:
        num_classes = int(max(labels.max(initial=-1), val_labels.max(initial=-1))) + 1
    results: dict[int, dict[str, float]] = {}
    for k in nb_knn:
        k = int(k)
        if k > kmax:
            raise ValueError(f"k={k} needs {k} neighbours, got {kmax}")
        rank = np.empty(n_val, dtype=np.int64)
        for start in range(0, n_val, chunk):
            stop = min(start + chunk, n_val)
            logits = scores[start:stop, :k] / temperature
            weights = np.exp(logits - logits.max(1, keepdims=True))
            weights /= weights.sum(1, keepdims=True)
            votes = np.zeros((stop - start, num_classes))
            rows = np.repeat(np.arange(stop - start), k)
            np.add.at(votes, (rows, labels[start:stop, :k].ravel()), weights.ravel())
            truth = val_labels[start:stop]
            own = votes[np.arange(stop - start), truth]
            above = (votes > own[:, None]).sum(1)
            tied_before = ((votes == own[:, None]) & (np.arange(num_classes)[None] < truth[:, None])).sum(1)
            rank[start:stop] = np.where(own > 0, above + tied_before, num_classes)
        results[k] = {
            "top1": 100.0 * float(np.mean(rank < 1)),
            "top5": 100.0 * float(np.mean(rank < 5)),
            "top1_per_class": _per_class(rank < 1, val_labels),
            "top5_per_class": _per_class(rank < 5, val_labels),
        }
    return results


def _per_class(hit: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of each class's accuracy, in percent."""
    classes, inverse = np.unique(labels, return_inverse=True)
    per = np.bincount(inverse, weights=hit.astype(np.float64)) / np.bincount(inverse)
    return 100.0 * float(per.mean()) if len(classes) else 0.0


def few_shot_subsets(train_labels: np.ndarray, n_per_class: int, n_tries: int,
                     seed: int = 0) -> list[np.ndarray]:
    """For each try, sorted train positions holding ``n_per_class`` random images of every class.

    A class with fewer images keeps them all. Seeded, so every rank draws the same subsets.
    """
    train_labels = np.asarray(train_labels)
    by_class = [np.flatnonzero(train_labels == c) for c in np.unique(train_labels)]
    subsets = []
    for t in range(n_tries):
        rng = np.random.default_rng(seed + t)
        picks = [members if len(members) <= n_per_class else
                 rng.choice(members, n_per_class, replace=False) for members in by_class]
        subsets.append(np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64))
    return subsets
