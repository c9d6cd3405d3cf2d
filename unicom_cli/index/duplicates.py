"""Groups of near-duplicate images in an index: all-vs-all neighbours above a threshold, joined."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unicom_cli.errors import UsageError

NEIGHBOURS = 32  # candidates per image; a larger group is still joined through its members' links


@dataclass
class DuplicateGroups:
    """Rows of each group (largest first; within a group, by row) and the best score linking
    each row to the rest of its group."""

    groups: list[np.ndarray]
    scores: list[np.ndarray]
    exact: bool  # True: exact all-vs-all search; False: the index's approximate search


def _vectors(index) -> tuple[np.ndarray, bool]:
    """All vectors of the collection and whether they are exact: a flat index gives them back;
    otherwise the feature files it was built from (when still there), else reconstructions."""
    import faiss

    from unicom_cli.index.build import recorded_sources

    flat = index.flat_vectors()
    if flat is not None:
        return flat, True
    sources = recorded_sources(index, bool(index.meta.get("normalized")))
    if sources is not None and sum(s.count for s in sources) == len(index):
        return np.concatenate([s.rows(0, s.count) for s in sources]), False
    if index.faiss_index is None:  # another backend (Milvus) reads its vectors back itself
        return index.all_vectors(), False
    ivf = faiss.try_extract_index_ivf(index.faiss_index)
    if ivf is not None:
        ivf.make_direct_map()
    try:
        return index.faiss_index.reconstruct_n(0, len(index)), False
    except RuntimeError as exc:
        raise UsageError(f"{index.path}: this index cannot give its vectors back and the feature "
                         "files it was built from are gone; build a flat index (--index flat) "
                         "to find duplicates") from exc


def find_duplicates(index, threshold: float, neighbours: int = NEIGHBOURS) -> DuplicateGroups:
    """Every group of images whose similarity to another member is ≥ ``threshold``.

    A flat index is searched exactly, all-vs-all, with ``eval.search`` (the search behind
    ``eval-retrieval``: symmetric blocks, fixed tie order); other indexes answer with their own
    tuned approximate search. Pairs above the threshold are joined with union-find, so a group
    is a connected component of the "near duplicate" relation.
    """
    if not -1.0 <= threshold <= 1.0 and index.meta.get("normalized"):
        raise UsageError(f"--threshold {threshold}: cosine similarities lie in [-1, 1]")
    vectors, exact = _vectors(index)
    k = min(neighbours, len(index) - 1)
    if k < 1:
        return DuplicateGroups([], [], exact)
    if exact:
        from unicom_cli.eval.search import search

        res = search(vectors, None, k, exclude_self=True, progress="duplicates")
        scores, rows = res.scores, res.indices
    else:
        scores, rows = index.search(vectors, k, exclude=np.arange(len(index)))
    src, col = np.nonzero(scores >= threshold)
    dst = rows[src, col]
    parent = np.arange(len(index))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    best = np.full(len(index), -np.inf, dtype=np.float32)
    for a, b, s in zip(src, dst, scores[src, col]):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        best[a] = max(best[a], s)
        best[b] = max(best[b], s)
    members = np.unique(np.concatenate([src, dst]))
    roots = np.array([find(int(m)) for m in members], dtype=np.int64)
    groups, group_scores = [], []
    for root in np.unique(roots):
        rows_in = np.sort(members[roots == root])
        groups.append(rows_in)
        group_scores.append(best[rows_in])
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), int(groups[g][0])))
    return DuplicateGroups([groups[g] for g in order], [group_scores[g] for g in order], exact)
