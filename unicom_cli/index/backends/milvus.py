"""A Milvus collection as an index: the ``milvus:URI#collection`` reference, the connection (the
embedded milvus-lite engine for a local ``.db`` path, a server or cluster for ``http(s)://``, the
same pymilvus MilvusClient code), and ``MilvusIndex``, the ``Index.load(...).search(...)`` API over it."""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from unicom_cli.errors import InputError, UnicomError, UsageError
from unicom_cli.index.store import Index, drop_excluded

PREFIX = "milvus:"
TOKEN_ENV = "UNICOM_MILVUS_TOKEN"
META_KEY, STATE_KEY, BUILD_KEY = "unicom.meta", "unicom.state", "unicom.build"
ID_FIELD, PATH_FIELD, VECTOR_FIELD = "id", "path", "vector"
PATH_MAX = 65535  # bytes of a VARCHAR (Milvus's largest)
SEARCH_QUERIES = 1024  # queries per search request (Milvus caps nq and the message size)
SERVER_SCHEMES = ("http", "https")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


class MilvusUnavailable(UnicomError):
    """A Milvus server that cannot be reached or refuses the credentials (exit 2: the user fixes it)."""

    exit_code = 2


@dataclass(frozen=True)
class MilvusRef:
    """Where a collection lives: ``uri`` (a local ``.db`` path or ``http(s)://host:port``) and its name."""

    uri: str
    collection: str

    @property
    def embedded(self) -> bool:
        return "://" not in self.uri

    def __str__(self) -> str:
        return f"{PREFIX}{self.uri}#{self.collection}"


def is_reference(value: object) -> bool:
    """True for a ``milvus:…`` reference (a str; a Path would have collapsed the ``//``)."""
    return str(value).startswith(PREFIX)


def parse_reference(text: str, collection: str | None = None) -> MilvusRef:
    """``milvus:PATH.db#name`` or ``milvus:http://host:19530#name`` (also a bare URI with
    ``collection`` given) → MilvusRef; every malformed part is a UsageError naming the fix."""
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    uri, _, name = body.partition("#")
    name = name or collection
    form = "milvus:PATH.db#collection or milvus:http://host:19530#collection"
    if not uri:
        raise UsageError(f"{text!r}: no URI; write {form}")
    if not name:
        raise UsageError(f"{text!r}: no collection name; write {form}")
    check_name(name)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    if scheme:
        if scheme.group(1).lower() not in SERVER_SCHEMES:
            raise UsageError(f"{uri}: unknown URI scheme {scheme.group(1)!r}; use a local .db path "
                             "(embedded engine) or http(s)://host:port (a Milvus server)")
        if "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            raise UsageError(f"{uri.split('://')[0]}://…: credentials in the URI would be printed; "
                             f"pass them in ${TOKEN_ENV} (user:password or an API key) instead")
        return MilvusRef(uri.rstrip("/"), name)
    if not uri.endswith(".db"):
        raise UsageError(f"{uri}: a local Milvus database is a path ending in .db "
                         "(or give http(s)://host:port for a server)")
    return MilvusRef(os.path.abspath(uri), name)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(f"collection name {name!r}: Milvus names are letters, digits and underscores, "
                         "starting with a letter or underscore (at most 255)")
    return name


def collection_name_for(stem: str) -> str:
    """A valid collection name made from a file or folder name (``my photos.npy`` → ``my_photos``)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "unicom"
    return ("_" + name if name[0].isdigit() else name)[:255]


def _quiet_logs() -> None:
    """pymilvus and milvus-lite log every failed call with a traceback; we report one line."""
    for name in ("pymilvus", "milvus_lite", "grpc"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _client_class():
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UsageError("the Milvus backend needs pymilvus and milvus-lite: "
                         "pip install 'unicom-cli[milvus]'") from None
    return MilvusClient


def connect(ref: MilvusRef, token: str | None = None, timeout: float = 10.0):
    """A MilvusClient for ``ref`` (``token``: else $UNICOM_MILVUS_TOKEN). An unreachable server,
    refused credentials or an embedded database open in another process is a one-line error
    naming the URI (never the token)."""
    client_class = _client_class()
    _quiet_logs()
    if ref.embedded:
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise UsageError(f"{ref.uri}: a local Milvus database needs milvus-lite: "
                             "pip install 'unicom-cli[milvus]'") from None
        if not Path(ref.uri).parent.is_dir():
            raise InputError(f"{Path(ref.uri).parent}: no such folder for the Milvus database {ref.uri}")
        if Path(ref.uri).exists() and not Path(ref.uri).is_dir():
            raise InputError(f"{ref.uri}: a file, not a Milvus database (milvus-lite keeps one in a "
                             "folder named *.db); choose another path")
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    try:
        client = client_class(uri=ref.uri, token=token or "", timeout=timeout)
        client.list_collections()
    except Exception as exc:  # pymilvus raises MilvusException and subclasses of it
        raise MilvusUnavailable(f"{ref.uri}: {_why(ref, exc, token)}") from None
    return client


def _why(ref: MilvusRef, exc: Exception, token: str | None = None) -> str:
    text = str(getattr(exc, "message", "") or exc)
    for secret in {token or "", os.environ.get(TOKEN_ENV, "")} - {""}:
        text = text.replace(secret, "…")  # a server message never shows the credentials
    code = getattr(exc, "code", None)
    if ref.embedded and "Open local milvus failed" in text:
        return ("cannot open the embedded database: another process has it open (one process at a "
                "time; stop it, or put the collection on a Milvus server)")
    if code == 2 or "Fail connecting" in text or "unavailable" in text.lower():
        return "no Milvus server answers there; check the address and that the server is running"
    if code in (1800, 2200) or any(w in text.lower() for w in ("auth", "credential", "password", "token")):
        return f"the server refused the credentials (set ${TOKEN_ENV} or --token)"
    return f"Milvus error: {text.splitlines()[0] if text else type(exc).__name__}"


@contextmanager
def milvus_errors(ref: MilvusRef):
    """A failed Milvus call (server gone, refused, a parameter it rejects) becomes one line naming the URI."""
    try:
        yield
    except UnicomError:
        raise
    except Exception as exc:
        from pymilvus.exceptions import MilvusException

        if not isinstance(exc, MilvusException):
            raise
        raise MilvusUnavailable(f"{ref}: {_why(ref, exc)}") from None


def release(client, ref: MilvusRef) -> None:
    """Close the client; for the embedded engine also stop its in-process server, which frees the
    database for another process (milvus-lite admits one process per .db)."""
    try:
        client.close()
    finally:
        if ref.embedded:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(ref.uri)


def read_properties(client, name: str) -> dict:
    return dict(client.describe_collection(name).get("properties") or {})


def recorded_meta(client, ref: MilvusRef, name: str | None = None) -> dict:
    """The embed record and build description `unicom index` stored with a collection."""
    props = read_properties(client, name or ref.collection)
    if META_KEY not in props:
        raise InputError(f"{ref}: not a collection made by `unicom index` (no {META_KEY} property); "
                         "build one with `unicom index FEATS -o milvus:…#name`")
    try:
        meta = json.loads(props[META_KEY])
    except ValueError as exc:
        raise InputError(f"{ref}: its {META_KEY} property is not JSON ({exc}); rebuild it") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("dim"), int):
        raise InputError(f"{ref}: its {META_KEY} property has no 'dim'; rebuild it with `unicom index`")
    return meta


def _ready_meta(client, ref: MilvusRef) -> dict:
    """The recorded meta of a finished collection, loaded for search."""
    if not client.has_collection(ref.collection):
        names = ", ".join(sorted(client.list_collections())) or "none"
        raise InputError(f"{ref}: no such collection at {ref.uri} (it has: {names})")
    props = read_properties(client, ref.collection)
    meta = recorded_meta(client, ref)
    if props.get(STATE_KEY) != "ready":
        raise InputError(f"{ref}: an unfinished build ({props.get(STATE_KEY)}); rerun the "
                         "`unicom index` command that made it, it resumes")
    client.load_collection(ref.collection)
    return meta


class _Ids:
    """Row → id (path) of a collection, read from Milvus on demand and cached (search results
    bring theirs along), so a collection of any size is never read whole."""

    def __init__(self, client, ref: MilvusRef, count: int) -> None:
        self.client, self.ref, self.name, self.count, self.known = client, ref, ref.collection, count, {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> str:
        row = int(row)
        if not 0 <= row < self.count:
            raise IndexError(row)
        if row not in self.known:
            with milvus_errors(self.ref):
                found = self.client.query(self.name, filter=f"{ID_FIELD} in [{row}]", output_fields=[PATH_FIELD])
            if not found:
                raise InputError(f"row {row} is missing from the Milvus collection {self.name}")
            self.known[row] = found[0][PATH_FIELD]
        return self.known[row]

    def __iter__(self):
        return (self[row] for row in range(self.count))


class MilvusIndex(Index):
    """A Milvus collection built by `unicom index`, with the query API of ``Index``: the same
    embedder (re-created from the recorded model), the same checks, the same search results.
    It sets its own fields: ``Index.__init__`` takes a folder (a Path collapses http://'s //)
    and a list of every id, which a collection of any size does not load."""

    def __init__(self, ref: MilvusRef, client, meta: dict) -> None:
        self.ref, self.client = ref, client
        self.path = str(ref)
        self.faiss_index = None
        self.meta = meta
        self.dim = int(meta["dim"])
        self.root = Path(meta["root"]) if meta.get("root") else None
        self.ids = _Ids(client, ref, int(meta["count"]))
        self._embedders = {}
        self._row_of = None

    @classmethod
    def load(cls, reference: str | MilvusRef, *, token: str | None = None) -> "MilvusIndex":
        """Open a collection that `unicom index` finished (``token``: else $UNICOM_MILVUS_TOKEN)."""
        ref = reference if isinstance(reference, MilvusRef) else parse_reference(str(reference))
        client = connect(ref, token)
        try:
            with milvus_errors(ref):
                return cls(ref, client, _ready_meta(client, ref))
        except BaseException:
            release(client, ref)
            raise

    def close(self) -> None:
        release(self.client, self.ref)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"MilvusIndex({self.path!r}, {len(self):,} × {self.dim}, {self.meta.get('factory')!r})"

    def row_of(self, image: str | Path) -> int | None:
        """The row of an image file that is in the collection (by its path under ``root``), or None."""
        rel = str(image) if self.root is None else os.path.relpath(os.path.abspath(image), self.root)
        rel = rel.replace(os.sep, "/")
        literal = json.dumps(rel, ensure_ascii=False)  # a quoted string with \" and \\ escaped
        with milvus_errors(self.ref):
            found = self.client.query(self.ref.collection, filter=f"{PATH_FIELD} == {literal}",
                                      output_fields=[ID_FIELD], limit=1)
        return int(found[0][ID_FIELD]) if found else None

    def search(self, queries: np.ndarray | Sequence, k: int = 10, *, exclude=None, params: dict | None = None,
               device: str = "cpu", weights=None) -> tuple[np.ndarray, np.ndarray]:
        """As ``Index.search``; ``params`` are Milvus search parameters (``nprobe``, ``ef``)."""
        vectors = self._query_vectors(queries, device, weights)
        k = int(k)
        limit = len(self) - (1 if exclude is not None else 0)
        if k < 1 or k > limit:
            raise UsageError(f"k {k}: the collection holds {len(self):,} vectors; use 1 ≤ k ≤ {limit:,}")
        want = k + (1 if exclude is not None else 0)
        scores, rows = self.raw_search(vectors, want, params)
        if exclude is not None:
            scores, rows = drop_excluded(scores, rows, np.asarray(exclude, dtype=np.int64), k)
        return scores, rows

    def raw_search(self, vectors: np.ndarray, want: int, params: dict | None = None):
        """Milvus's top-``want`` of each row of ``vectors`` (row -1 and score -inf where it found fewer)."""
        params = dict(self.meta.get("search_params") or {}) if params is None else dict(params)
        if "efSearch" in params:  # `unicom search --ef-search`, faiss's name for HNSW's ef
            params["ef"] = params.pop("efSearch")
        if "ef" in params:  # HNSW: Milvus refuses an ef below the number of results asked for
            params["ef"] = max(int(params["ef"]), want)
        rows = np.full((len(vectors), want), -1, dtype=np.int64)
        scores = np.full((len(vectors), want), -np.inf, dtype=np.float32)
        for start in range(0, len(vectors), SEARCH_QUERIES):
            with milvus_errors(self.ref):
                found = self.client.search(self.ref.collection, data=vectors[start:start + SEARCH_QUERIES].tolist(),
                                           limit=want, output_fields=[PATH_FIELD],
                                           search_params={"metric_type": "IP", "params": params})
            for n, hits in enumerate(found, start=start):
                for j, hit in enumerate(hits):
                    rows[n, j], scores[n, j] = hit["id"], hit["distance"]
                    self.ids.known[int(hit["id"])] = hit["entity"][PATH_FIELD]
        return scores, rows

    def flat_vectors(self) -> np.ndarray | None:
        """Every vector, in row order, when the collection is searched exactly (FLAT); else None."""
        return self.all_vectors() if self.meta.get("milvus_index", {}).get("index_type") == "FLAT" else None

    def all_vectors(self) -> np.ndarray:
        """The collection's vectors in row order, read back from Milvus in batches."""
        with milvus_errors(self.ref):
            return self._read_all_vectors()

    def _read_all_vectors(self) -> np.ndarray:
        out = np.empty((len(self), self.dim), dtype=np.float32)
        iterator = self.client.query_iterator(self.ref.collection, batch_size=4096, filter=f"{ID_FIELD} >= 0",
                                              output_fields=[ID_FIELD, VECTOR_FIELD])
        try:
            while batch := iterator.next():
                for hit in batch:
                    if hit[ID_FIELD] < len(out):
                        out[hit[ID_FIELD]] = hit[VECTOR_FIELD]
        finally:
            iterator.close()
        return out
