"""Index backends other than the faiss folder (index/store.py, index/build.py): milvus.py."""
