"""Weighted kNN against an independent per-image vote, and few-shot subsets."""

import numpy as np
import pytest

from unicom_cli.eval.knn import few_shot_subsets, knn_classify
from unicom_cli.eval.search import l2_normalize, search


def vote(sims, train_labels, truth, k, t, classes):
    """Plain-Python weighted vote for one val image."""
    order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
    w = np.exp(np.array([sims[j] for j in order]) / t)
    w /= w.sum()
    score = {c: 0.0 for c in range(classes)}
    for j, wj in zip(order, w):
        score[int(train_labels[j])] += wj
    ranking = sorted((c for c in score if score[c] > 0), key=lambda c: (-score[c], c))
    return ranking[:1].count(truth) > 0, truth in ranking[:5]


def test_knn_matches_independent_vote():
    rng = np.random.default_rng(0)
    classes = 12
    centers = rng.normal(size=(classes, 16))
    tl = rng.integers(0, classes, 300)
    vl = rng.integers(0, classes, 80)
    train = l2_normalize(centers[tl] + rng.normal(scale=1.5, size=(300, 16)))
    val = l2_normalize(centers[vl] + rng.normal(scale=1.5, size=(80, 16)))
    res = search(val, train, 20, backend="faiss")
    out = knn_classify(res.scores, tl[res.indices], vl, [1, 5, 20], 0.07, classes)
    sims = val.astype(np.float64) @ train.astype(np.float64).T
    for k in (1, 5, 20):
        hits = np.array([vote(sims[i], tl, vl[i], k, 0.07, classes) for i in range(len(val))])
        assert out[k]["top1"] == pytest.approx(100 * hits[:, 0].mean(), abs=1e-9)
        assert out[k]["top5"] == pytest.approx(100 * hits[:, 1].mean(), abs=1e-9)
        per = [hits[vl == c, 0].mean() for c in np.unique(vl)]
        assert out[k]["top1_per_class"] == pytest.approx(100 * np.mean(per))
    assert 0 < out[20]["top1"] < out[20]["top5"] < 100


def test_ties_go_to_the_smaller_class_and_unvoted_classes_never_hit():
    # Two neighbours with equal similarity, classes 3 and 1: tie -> class 1 wins top-1.
    scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    labels = np.array([[3, 1], [3, 1]])
    out = knn_classify(scores, labels, np.array([1, 0]), [2], 0.07, num_classes=6)
    assert out[2]["top1"] == 50.0  # val 0 (class 1) right, val 1 (class 0, no votes) wrong
    assert out[2]["top5"] == 50.0  # class 0 has no votes: a miss even though only 2 classes voted


def test_few_shot_subsets():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    subs = few_shot_subsets(labels, 3, 4)
    assert len(subs) == 4
    for s in subs:
        assert list(np.bincount(labels[s])) == [3, 2, 3]
    assert not all(np.array_equal(subs[0], s) for s in subs[1:])
    assert all(np.array_equal(a, b) for a, b in zip(subs, few_shot_subsets(labels, 3, 4)))
