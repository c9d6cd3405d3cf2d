"""Retrieval over your own collection with faiss: build an index folder, load it, search it.

    from unicom_cli.index import Index, build_index
    build_index("feats.npy", "photos.index")            # auto choice, tuned to 0.95 recall@10
    index = Index.load("photos.index")
    scores, rows = index.search(["query.jpg"], k=10)     # or an (n, dim) array of vectors
    [index.ids[r] for r in rows[0]]

Pure of CLI and HTTP: the `unicom index` / `unicom search` commands and the web service call this.
``Index.load("milvus:photos.db#photos")`` opens a Milvus collection instead (index/backends/milvus.py).
"""

from unicom_cli.index.build import BuildConfig, BuildSummary, build_index, run_build
from unicom_cli.index.embedder import QueryEmbedder, load_query_embedder
from unicom_cli.index.store import Index

__all__ = ["BuildConfig", "BuildSummary", "Index", "QueryEmbedder", "build_index",
           "load_query_embedder", "run_build"]
