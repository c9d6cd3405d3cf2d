"""A real HTTP server on 127.0.0.1 for download tests: Range, scripted faults, a fake Google Drive.

Import the ``weights_server`` fixture into a test module to use it.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Served:
    """What the server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)  # path -> body
    faults: dict[str, list[str]] = field(default_factory=dict)  # path -> queue of faults
    drive: dict[str, str] = field(default_factory=dict)  # Drive id -> served path
    drive_quota: set[str] = field(default_factory=set)  # Drive ids answered by a "quota" page
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    base: str = ""

    def fault(self, path: str, *kinds: str) -> None:
        """Queue faults for the next requests of ``path``: 500, cut, ignore-range, corrupt, html,
        416 (to a resume, with no length), trickle (1 byte every 50 ms), endless (no
        Content-Length, bytes until the client hangs up)."""
        self.faults.setdefault(path, []).extend(kinds)

    def requested(self, path: str) -> list[str | None]:
        """The Range headers of the requests of ``path`` (None: no Range)."""
        return [rng for p, rng in self.requests if p == path]


def _handler(served: Served):  # noqa: C901 (one handler class: Range, faults, fake Drive)
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            served.requests.append((parsed.path, self.headers.get("Range")))
            if parsed.path == "/uc" and query.get("id") in served.drive_quota:
                return self._plain(200, b"<html><p>Too many users have viewed or downloaded "
                                   b"this file recently.</p></html>", "text/html")
            if parsed.path == "/uc" and query.get("id") in served.drive:
                return self._drive_page(query["id"])
            if parsed.path == "/download":  # Drive's usercontent address, after "confirm"
                if query.get("confirm") != "t" or query.get("uuid") != "u-123":
                    return self._plain(403, b"missing confirm token")
                return self._file(served.drive[query["id"]])
            self._file(parsed.path)

        def _plain(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _drive_page(self, file_id: str) -> None:
            page = (f'<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
                    f'<form id="download-form" action="{served.base}/download" method="get">'
                    f'<input type="submit" id="uc-download-link" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{file_id}">'
                    f'<input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="u-123"></form></body></html>')
            self._plain(200, page.encode(), "text/html; charset=utf-8")

        def _file(self, path: str) -> None:  # noqa: C901 - one branch per scripted fault
            queue = served.faults.get(path) or []
            fault = queue.pop(0) if queue else None
            if fault == "500":
                return self._plain(500, b"server error")
            if fault == "html":
                return self._plain(200, b"<html>quota exceeded</html>", "text/html")
            if path not in served.files:
                return self._plain(404, b"not found")
            body = served.files[path]
            if fault == "corrupt":
                body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
            start = 0
            rng = self.headers.get("Range")
            if rng and fault == "416":  # "nothing beyond your part", without saying the length
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if fault == "endless":
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.close_connection = True
                try:
                    while True:
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    return
            if rng and fault != "ignore-range":
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if fault == "cut":  # promise everything, send half, hang up
                self.wfile.write(body[start:start + (len(body) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault == "trickle":
                self.close_connection = True
                try:
                    for byte in body[start:]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def weights_server(monkeypatch):
    """A ThreadingHTTPServer on 127.0.0.1 (port 0); downloads retry without pausing."""
    served = Served()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    monkeypatch.setenv("UNICOM_DOWNLOAD_BACKOFF", "0")
    monkeypatch.setenv("UNICOM_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("UNICOM_MIRROR", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
