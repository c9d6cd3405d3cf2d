"""What wraps the app, outermost first: the access log, the token check, the body-size limit.

Each is a plain ASGI middleware, so it acts before FastAPI parses anything.
"""

import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from unicom_cli.utils.console import info

OPEN_PATHS = frozenset({"/healthz"})


def guard(app: Any, *, token: str | None, body_limit: int, access_log: bool) -> Any:
    """Wrap the app: access log (outermost), then the token check, then the body-size limit."""
    app.add_middleware(_BodyLimit, limit=body_limit)
    if token:
        app.add_middleware(_TokenCheck, token=token)
    if access_log:
        app.add_middleware(_AccessLog)
    return app


async def _send_json(send: Callable, status: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TokenCheck:
    """Requires ``Authorization: Bearer <token>`` (or ``?token=``, which is how a browser opens
    the page) on every route except /healthz; compared in constant time."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                         {"WWW-Authenticate": "Bearer"})

    def _allowed(self, scope: dict) -> bool:
        from urllib.parse import parse_qs

        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return hmac.compare_digest(auth[7:].strip(), self.token)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [""])[-1].encode("utf-8", "surrogateescape")
        return bool(given) and hmac.compare_digest(given, self.token)


class _BodyLimit:
    """Refuses request bodies above ``limit`` bytes with 413: at once when Content-Length says
    so, otherwise as soon as the streamed body passes it (nothing larger is ever buffered)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than {self.limit:,} bytes (--max-upload)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, message)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, message)  # answered by the app's own handler
            return event

        await self.app(scope, counted, send)


class _AccessLog:
    """One line per request on stderr: method, path (never the token), status, time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record(event: dict) -> None:
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, record)
        finally:
            from rich.markup import escape

            client = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - start) * 1000
            # The path as sent (still percent-encoded: no control characters reach the terminal).
            path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            info(escape(f"{client[0]} {scope['method']} {path} {status} {ms:.1f} ms"))
