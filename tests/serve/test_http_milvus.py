"""The HTTP tests of test_http.py, unchanged, against `unicom serve` over a Milvus collection instead
of a faiss index folder: in the embedded engine (a .db path) and on a Milvus server (http://).

milvus-lite admits one process per .db, while those tests run several servers (and an in-process
app) at once over one collection; there each use of ``collection.index`` gets its own copy of the
database. The server is shared by all of them, as a real deployment would.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from tests.serve.test_http import *  # noqa: F401,F403 - the same tests, collected again here

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytestmark = pytest.mark.slow


class _MilvusCollection:
    """The served collection with ``index`` a Milvus reference: on a server the same one each time,
    in the embedded engine a fresh copy of the built database each time."""

    def __init__(self, base, uri: str, name: str) -> None:
        self._base, self._uri, self._name, self._copies = base, uri, name, 0

    def __getattr__(self, attr: str):
        return getattr(self._base, attr)

    @property
    def index(self) -> str:
        if "://" in self._uri:
            return f"milvus:{self._uri}#{self._name}"
        self._copies += 1
        copy = Path(self._uri).with_name(f"copy{self._copies}.db")
        shutil.copytree(self._uri, copy, ignore=shutil.ignore_patterns("LOCK"))
        return f"milvus:{copy}#{self._name}"


@pytest.fixture(scope="module", params=["embedded", "server"])
def collection(request, collection, tmp_path_factory):
    """The faiss fixture's `unicom embed` output, built into a FLAT Milvus collection."""
    from milvus_lite.server_manager import server_manager_instance

    from tests.milvus_server import milvus_server
    from unicom_cli.index.backends.milvus import parse_reference
    from unicom_cli.index.backends.milvus_build import MilvusBuildConfig, run_milvus_build

    folder = tmp_path_factory.mktemp("milvus")
    with contextlib.ExitStack() as stack:
        uri = str(folder / "photos.db") if request.param == "embedded" else \
            stack.enter_context(milvus_server(folder / "server-data"))
        feats = collection.index.parent / "feats.npy"
        ref = parse_reference(f"milvus:{uri}#photos")
        run_milvus_build(MilvusBuildConfig(features=[feats], ref=ref, index="flat", progress=False))
        server_manager_instance.release_all()
        yield _MilvusCollection(collection, uri, "photos")


def test_the_collection_is_served_from_milvus(server, auth, collection):
    import httpx

    info = httpx.get(server.url + "/info", headers=auth).json()
    assert info["count"] == len(collection.ids) and info["model"] == "tiny"
    assert any("milvus:" in line and "FLAT" in line for line in server.lines)
