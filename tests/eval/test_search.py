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


@pytest.mark.parametrize("backend", ["faiss", "torch", "torch-bf16"])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_all_vs_all_matches_brute_force_with_ties(backend, k):
    x = tied_data()
    backend, _, precision = backend.partition("-")
    res = search(x, None, k, exclude_self=True, backend=backend, chunk_rows=64, precision=precision or "fp32")
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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_bf16_screening_resolves_differences_below_bf16_resolution(precision, symmetric):
    """Gallery rows that differ by 1e-4 (bf16 rounds them to the same vector) still come back
    in the exact float64 order, with exact scores."""
    rng = np.random.default_rng(7)
    base = l2_normalize(rng.normal(size=(40, 16)))
    x = np.concatenate([base + 1e-4 * j * rng.normal(size=base.shape).astype(np.float32) for j in range(6)])
    x = x.astype(np.float32)
    if symmetric:
        res = search(x, None, 5, exclude_self=True, backend="torch", precision=precision)
        ref = brute_force(x, x, 5, True)
        q = x
    else:
        q, g = x[:50], x[50:]
        res = search(q, g, 5, backend="torch", precision=precision, chunk_rows=16)
        ref, x = brute_force(q, g, 5, False), g
    np.testing.assert_array_equal(res.indices, ref)
    exact = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, res.indices, 1)
    np.testing.assert_allclose(res.scores, exact, rtol=0, atol=1e-6)


def test_bf16_error_bound_holds_for_every_pair():
    """The bound the bf16 path relies on, checked against the true error of torch's bf16 products."""
    import torch

    from unicom_cli.eval.search import _ErrorBound

    rng = np.random.default_rng(8)
    g = (rng.normal(size=(300, 96)) * rng.uniform(0.1, 10, size=(300, 1))).astype(np.float32)
    q = (rng.normal(size=(120, 96)) * rng.uniform(0.1, 10, size=(120, 1))).astype(np.float32)
    screened = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(g).bfloat16().T).double().numpy()
    error = np.abs(screened - q.astype(np.float64) @ g.astype(np.float64).T)
    bound = _ErrorBound(g, "bf16")(q, screened.astype(np.float32), np.full(len(q), -np.inf))
    assert (error <= bound[:, None]).all()
    assert error.max() > 0.05 * bound.max()  # and it is not uselessly loose


def test_rows_redone_over_full_scores_when_spares_run_out(monkeypatch):
    """With no spare candidates every tie at rank k needs the full-row fallback; results stay exact."""
    import unicom_cli.eval.search as S

    monkeypatch.setattr(S, "_pad", lambda k, precision="fp32": 0)
    x = tied_data(9)
    for precision in ("fp32", "bf16"):
        res = search(x, None, 4, exclude_self=True, backend="torch", precision=precision)
        np.testing.assert_array_equal(res.indices, brute_force(x, x, 4, True))
        res = search(x[:30], x, 4, backend="torch", precision=precision)
        np.testing.assert_array_equal(res.indices, brute_force(x[:30], x, 4, False))


def test_precision_choice():
    from unicom_cli.errors import UsageError
    from unicom_cli.eval.search import resolve_precision

    assert resolve_precision("bf16", "faiss", "cpu", 1) == "fp32"  # faiss screens in fp32 only
    assert resolve_precision("auto", "torch", "cpu", 1000) == "fp32"  # wide candidate bands
    assert resolve_precision("bf16", "torch", "cpu", 1000) == "bf16"
    assert resolve_precision("bf16", "torch", "cuda:0", 1) == "fp32"  # cuBLAS reductions: no bound
    with pytest.raises(UsageError, match="fp64"):
        resolve_precision("fp64", "torch", "cpu", 1)


@pytest.mark.parametrize("flags,expected", [({"avx2", "avx512f"}, "fp32"),
                                            ({"avx2", "avx512_bf16"}, "bf16"),
                                            ({"amx_bf16", "amx_tile"}, "bf16")])
def test_auto_precision_follows_the_cpu_capabilities(monkeypatch, flags, expected):
    """Decided from the CPU's flags (the seam ``cpu_flags``), never from a timing."""
    from unicom_cli.eval.search import resolve_precision
    from unicom_cli.utils import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", "torch", "cpu", 1) == expected
    assert resolve_precision("fp32", "torch", "cpu", 1) == "fp32"



def test_l2_normalize_of_huge_rows_matches_float64():
    """Issue 28 item 21: squares of 1e30 overflow float32; the rows became zeros."""
    x = np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32)
    for scale in (1.0, 1e30, 3e37):
        big = (x * np.float32(scale)).astype(np.float64)
        expected = big / np.sqrt((big ** 2).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(l2_normalize(x * np.float32(scale)), expected, rtol=0, atol=1e-6)
