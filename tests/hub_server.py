"""A loopback Hugging Face hub for download tests: the requests huggingface_hub makes, for real.

It answers ``/api/models/{repo}[/revision/{rev}]`` (model info), ``/api/models/{repo}/tree/{rev}``
(file listing) and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (metadata headers, Range), with
hub error codes for unknown repositories and revisions, and can cut a download half way.
Import the ``hub_server`` fixture into a test module to use it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

LFS = (".safetensors", ".bin")


@dataclass
class FakeHub:
    """Repositories (repo → commit → files), branch refs, and what was requested."""

    repos: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> {"main": commit}
    cuts: set[str] = field(default_factory=set)  # file names whose next GET stops half way
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    base: str = ""

    def publish(self, repo: str, folder: Path | dict[str, bytes], branch: str = "main") -> str:
        """Push a folder (or name → bytes) as a new commit of ``repo``; returns the commit."""
        files = folder if isinstance(folder, dict) else {p.name: p.read_bytes() for p in Path(folder).iterdir()}
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                              .encode() + repo.encode() + str(len(self.repos.get(repo, {}))).encode()).hexdigest()
        self.repos.setdefault(repo, {})[commit] = files
        self.refs.setdefault(repo, {})[branch] = commit
        return commit

    def file_gets(self, name: str) -> list[str | None]:
        """Range headers of the GETs of files called ``name``."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + name)]

    def commit_of(self, repo: str, revision: str | None) -> str | None:
        revision = revision or "main"
        if revision in self.repos.get(repo, {}):
            return revision
        return self.refs.get(repo, {}).get(revision)


def _entry(name: str, body: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
    if name.endswith(LFS):
        entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
    return entry


def _handler(hub: FakeHub):  # noqa: C901 - one request router
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._route(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            hub.requests.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = "/".join(parts[2:4])
                rest = parts[4:]
                if not rest:
                    return self._info(repo, None)
                if rest[0] == "revision":
                    return self._info(repo, "/".join(rest[1:]))
                if rest[0] == "tree":
                    return self._tree(repo, rest[1])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
            self._json(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

        def _json(self, code: int, data, headers: dict | None = None) -> None:
            body = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, repo: str, revision: str | None) -> str | None:
            if repo not in hub.repos:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            commit = hub.commit_of(repo, revision)
            if commit is None:
                self._json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return commit

        def _info(self, repo: str, revision: str | None) -> None:
            commit = self._resolve(repo, revision)
            if commit:
                files = hub.repos[repo][commit]
                self._json(200, {"id": repo, "modelId": repo, "sha": commit, "private": False,
                                 "siblings": [{"rfilename": name} for name in sorted(files)]})

        def _tree(self, repo: str, revision: str) -> None:
            commit = self._resolve(repo, revision)
            if commit:
                self._json(200, [_entry(n, b) for n, b in sorted(hub.repos[repo][commit].items())])

        def _file(self, repo: str, revision: str, name: str, head: bool) -> None:
            commit = self._resolve(repo, revision)
            if not commit:
                return
            body = hub.repos[repo][commit].get(name)
            if body is None:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            entry = _entry(name, body)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            start = 0
            rng = self.headers.get("Range")
            if rng and not head:
                start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if "lfs" in entry:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(body)))
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if head:
                return
            if name in hub.cuts:  # promise everything, send half, hang up
                hub.cuts.discard(name)
                self.wfile.write(body[start:start + (len(body) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def hub_server(monkeypatch):
    """A FakeHub on 127.0.0.1 (port 0), online, no token: pass ``hub.base`` as --mirror (HF_ENDPOINT
    is read once, when huggingface_hub is imported)."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
