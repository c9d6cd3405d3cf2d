"""Index tests: clustered vectors written as an embed-style output, one faiss/torch thread."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    import faiss
    import torch

    saved_torch, saved_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(saved_torch)
    faiss.omp_set_num_threads(saved_faiss)


def clustered(n: int, dim: int, clusters: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: the structure real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_features(folder, name: str, x: np.ndarray, *, model: str = "tiny", normalized: bool = True,
                   num_feat=None, root=None, sha: str = "a" * 64):
    """``name.npy`` + ``.ids.txt`` + ``.json`` as `unicom embed` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / f"{name}.npy"
    np.save(npy, x)
    (folder / f"{name}.ids.txt").write_text("".join(f"{name}/img_{i:05d}.jpg\n" for i in range(len(x))))
    (folder / f"{name}.json").write_text(json.dumps({
        "model": model, "weights_sha256": sha, "input_size": 32, "dim": x.shape[1],
        "embedding_size": x.shape[1], "normalized": normalized, "num_feat": num_feat,
        "input": str(root or folder), "count": len(x)}))
    return npy


def exact_topk(queries: np.ndarray, gallery: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """Independent exact search in float64 numpy: rows of the k largest inner products."""
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if exclude is not None:
        sims[np.arange(len(queries)), exclude] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]
