"""Exact search: brute force with the (score desc, index asc) order, ties, duplicates, backends."""

import numpy as np
import pytest

from unicom_cli.eval.search import l2_normalize, merge_topk, search


def brute_force(q, g, k, exclude_self):
    """Independent reference: full float64 score matrix, full sort per row."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    out = []
    for i, row in enumerate(s):
        ids = [j for j in range(len(g)) if not (exclude_self and j == i)]
        ids.sort(key=lambda j: (-row[j], j))
        out.append(ids[:k])
    return np.array(out)


def tied_data(seed=0, n=300, d=8):
    """Low-precision vectors (many exact score ties) plus groups of exact duplicates."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)  # small ints: exact float32 dots
    x[50:60] = x[5]  # a block of 11 identical rows, more than the spare candidates
    x[100] = x[200]
    return x


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_all_vs_all_matches_brute_force_with_ties(backend, k):
    x = tied_data()
    res = search(x, None, k, exclude_self=True, backend=backend, chunk_rows=64)
    np.testing.assert_array_equal(res.indices, brute_force(x, x, k, True))
    assert not (res.indices == np.arange(len(x))[:, None]).any()
    exact = np.take_along_axis(x @ x.T, res.indices, 1)
    np.testing.assert_allclose(res.scores, exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_query_vs_gallery_and_duplicates_of_query_are_found(backend):
    x = tied_data(1)
    q, g = x[:40], x[40:]
    res = search(q, g, 7, backend=backend, chunk_rows=16)
    np.testing.assert_array_equal(res.indices, brute_force(q, g, 7, False))
    # Row 5's duplicates (rows 50..59, gallery 10..19) tie at the top and come in index order.
    assert list(res.indices[5, :7]) == list(range(10, 17))


def test_self_excluded_by_index_not_by_rank():
    x = np.zeros((4, 3), np.float32)
    x[:, 0] = 1  # all identical: the query itself is not necessarily ranked first
    res = search(x, None, 3, exclude_self=True, backend="torch")
    assert [list(r) for r in res.indices] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_backends_agree_on_random_unit_vectors_and_k_clamps():
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(500, 32)))
    x[10] = x[400]
    a = search(x, None, 50, exclude_self=True, backend="faiss")
    b = search(x, None, 50, exclude_self=True, backend="torch", chunk_rows=77)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    small = search(x[:5], None, 10, exclude_self=True, backend="faiss")
    assert small.indices.shape == (5, 4)


def test_merge_of_shards_equals_one_search():
    x = tied_data(2)
    q = x[:60]
    whole = search(q, x, 9, backend="torch")
    parts = [(x[:100], 0), (x[100:170], 100), (x[170:], 170)]
    s, i = [], []
    for g, off in parts:
        r = search(q, g, 9, backend="faiss", exact_scores=True)
        s.append(r.scores)
        i.append(r.indices + off)
    merged = merge_topk(s, i, 9)
    np.testing.assert_array_equal(merged.indices, whole.indices)


def test_normalize_then_truncate():
    x = np.array([[3.0, 4.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x, 2), [[0.6, 0.8]])
    np.testing.assert_allclose(l2_normalize(np.zeros((1, 3))), [[0, 0, 0]])


def test_query_block_with_offset_and_streamed_gallery(monkeypatch):
    import unicom_cli.eval.search as S

    x = tied_data(4)
    whole = search(x, None, 12, exclude_self=True, backend="faiss")
    block = search(x[100:180], x, 12, exclude_self=True, query_offset=100, backend="faiss")
    np.testing.assert_array_equal(block.indices, whole.indices[100:180])
    monkeypatch.setattr(S, "_BUDGET_BYTES", 4 * 1024 * 40)  # gallery blocks of 40 rows
    streamed = search(x, None, 12, exclude_self=True, backend="torch", gallery_on_host=True)
    np.testing.assert_array_equal(streamed.indices, whole.indices)


@pytest.mark.parametrize("block_rows", [74, 128])
def test_symmetric_blocks_equal_brute_force(monkeypatch, block_rows):
    """All-vs-all with torch computes each off-diagonal block once; small blocks exercise it."""
    import unicom_cli.eval.search as S

    monkeypatch.setattr(S, "_BUDGET_BYTES", 4 * block_rows * block_rows)
    monkeypatch.setattr(S, "_PENDING", -10**9 if block_rows == 128 else 1 << 22)  # merge after every block
    x = tied_data(5)
    for k in (1, 6, 30):
        res = search(x, None, k, exclude_self=True, backend="torch")
        np.testing.assert_array_equal(res.indices, brute_force(x, x, k, True))
    rng = np.random.default_rng(6)
    u = l2_normalize(rng.normal(size=(333, 24)))
    a = search(u, None, 10, exclude_self=True, backend="torch")
    b = search(u, None, 10, exclude_self=True, backend="faiss")
    np.testing.assert_array_equal(a.indices, b.indices)
    c = search(u, None, 10, backend="torch")  # the query itself included
    assert (c.indices[:, 0] == np.arange(len(u))).all()
