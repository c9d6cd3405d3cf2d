"""Retrieval metrics against independent brute force and hand-worked GLDv2 cases."""

import numpy as np
import pytest

from unicom_cli.eval.retrieval import gldv2_map_at_100, map_at_r, recall_at_k, relevant_counts
from unicom_cli.eval.search import search


def data(seed=0, n=240, d=6, classes=15):
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(n, d)).astype(np.float32)  # many exact ties
    x[30:36] = x[3]  # exact duplicates
    labels = rng.integers(0, classes, size=n)
    labels[7] = 99  # a singleton class: no relevant item
    return x, labels


def ranked(x, i, exclude):
    s = x.astype(np.float64) @ x[i].astype(np.float64)
    ids = [j for j in range(len(x)) if j != exclude]
    return sorted(ids, key=lambda j: (-s[j], j))


def test_recall_and_map_at_r_all_vs_all_vs_brute_force():
    x, labels = data()
    res = search(x, None, len(x) - 1, exclude_self=True, backend="faiss")
    nl = labels[res.indices]
    rec = recall_at_k(nl, labels, [1, 2, 4, 8])
    m = map_at_r(nl, labels, relevant_counts(labels, labels, all_vs_all=True))
    exp_rec = {k: 0.0 for k in (1, 2, 4, 8)}
    aps = []
    for i in range(len(x)):
        order = ranked(x, i, i)
        hits = [labels[j] == labels[i] for j in order]
        for k in exp_rec:
            exp_rec[k] += any(hits[:k]) / len(x)
        r = sum(hits)
        if r:
            aps.append(sum(sum(hits[:p + 1]) / (p + 1) for p in range(r) if hits[p]) / r)
    assert rec == pytest.approx(exp_rec, abs=1e-12)
    assert m == pytest.approx(np.mean(aps), abs=1e-12)
    assert 0 < rec[1] < rec[8] < 1


def test_recall_query_vs_gallery():
    x, labels = data(1)
    q, g, ql, gl = x[:50], x[50:], labels[:50], labels[50:]
    res = search(q, g, 10, backend="torch")
    rec = recall_at_k(gl[res.indices], ql, [1, 10])
    s = q.astype(np.float64) @ g.astype(np.float64).T
    orders = [sorted(range(len(g)), key=lambda j: (-s[i, j], j)) for i in range(len(q))]
    for k in (1, 10):
        hits = [any(gl[j] == ql[i] for j in orders[i][:k]) for i in range(len(q))]
        assert rec[k] == pytest.approx(np.mean(hits))


def test_map_at_r_hand_worked():
    # R = 3: hits at ranks 1 and 3 -> (1/1 + 2/3) / 3; R = 1 with a miss -> 0; R = 0 is left out.
    nl = np.array([[1, 0, 1, 1], [0, 2, 2, 2], [5, 5, 5, 5]])
    assert map_at_r(nl, np.array([1, 2, 9]), np.array([3, 1, 0])) == pytest.approx(((1 + 2 / 3) / 3 + 0) / 2)
    # Hits beyond rank R do not count.
    assert map_at_r(np.array([[0, 1, 1]]), np.array([1]), np.array([1])) == 0.0


def test_relevant_counts():
    assert list(relevant_counts(np.array([1, 2, 7]), np.array([1, 1, 2, 3]), False)) == [2, 1, 0]
    labels = np.array([4, 4, 4, 5])
    assert list(relevant_counts(labels, labels, True)) == [2, 2, 2, 0]


def test_gldv2_map_duplicates_in_predictions():
    # Relevant {a, b}. Predictions a, a, x, b: the second a is skipped but position 4 stays 4.
    assert gldv2_map_at_100({"q": ["a", "a", "x", "b"]}, {"q": {"a", "b"}}) == pytest.approx((1 / 1 + 2 / 4) / 2)


def test_gldv2_map_counts_a_repeated_solution_id_as_delf_does():
    # DELF's official metric divides by min(len(solution row), 100), the row read as a list:
    # "a a b" counts 3 relevant entries though only 2 distinct ids can be retrieved.
    assert gldv2_map_at_100({"q": ["a", "b"]}, {"q": ["a", "a", "b"]}) == pytest.approx(2 / 3)


def test_gldv2_map_fewer_than_100_relevant_and_no_hits_and_missing_query():
    sol = {"q1": ["r1", "r2", "r3"], "q2": ["z"], "q3": ["y"]}
    preds = {"q1": ["n", "r2", "n2", "r1"], "q2": ["n"] * 100}  # q3 not predicted: AP 0
    ap1 = (1 / 2 + 2 / 4) / 3
    assert gldv2_map_at_100(preds, sol) == pytest.approx(ap1 / 3)


def test_gldv2_map_more_than_100_relevant():
    relevant = [f"r{i}" for i in range(150)]
    preds = relevant[:50] + ["miss"] * 10 + relevant[50:]  # 50 hits, then 10 misses, then hits
    ap = (50 + sum((50 + j) / (60 + j) for j in range(1, 41))) / 100  # only the first 100 entries
    assert gldv2_map_at_100({"q": preds}, {"q": relevant}) == pytest.approx(ap)
    assert gldv2_map_at_100({"q": relevant}, {"q": relevant}) == pytest.approx(1.0)
