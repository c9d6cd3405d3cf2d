"""The HTTP tests of test_http.py, unchanged, against `unicom serve` over a Milvus collection (the
embedded engine) instead of a faiss index folder.

milvus-lite admits one process per .db, while those tests run several servers (and an in-process
app) at once over one collection; each use of ``collection.index`` here gets its own copy of the
database. A Milvus server would be shared by all of them instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.serve.test_http import *  # noqa: F401,F403 - the same tests, collected again here

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytestmark = pytest.mark.slow


class _MilvusCollection:
    """The served collection, with ``index`` a fresh copy of the built Milvus database each time."""

    def __init__(self, base, db: Path, name: str) -> None:
        self._base, self._db, self._name, self._copies = base, db, name, 0

    def __getattr__(self, attr: str):
        return getattr(self._base, attr)

    @property
    def index(self) -> str:
        self._copies += 1
        copy = self._db.with_name(f"copy{self._copies}.db")
        shutil.copytree(self._db, copy, ignore=shutil.ignore_patterns("LOCK"))
        return f"milvus:{copy}#{self._name}"


@pytest.fixture(scope="module")
def collection(collection, tmp_path_factory):
    """The faiss fixture's `unicom embed` output, built into a FLAT Milvus collection."""
    from milvus_lite.server_manager import server_manager_instance

    from unicom_cli.index.backends.milvus import parse_reference
    from unicom_cli.index.backends.milvus_build import MilvusBuildConfig, run_milvus_build

    db = tmp_path_factory.mktemp("milvus") / "photos.db"
    feats = collection.index.parent / "feats.npy"
    ref = parse_reference(f"milvus:{db}#photos")
    run_milvus_build(MilvusBuildConfig(features=[feats], ref=ref, index="flat", progress=False))
    server_manager_instance.release_all()
    return _MilvusCollection(collection, db, "photos")


def test_the_collection_is_served_from_milvus(server, auth, collection):
    import httpx

    info = httpx.get(server.url + "/info", headers=auth).json()
    assert info["count"] == len(collection.ids) and info["model"] == "tiny"
    assert any("milvus:" in line and "FLAT" in line for line in server.lines)
