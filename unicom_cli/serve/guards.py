"""What wraps the app, outermost first: the request log, the token check, the body limits.

Each is a plain ASGI middleware, so it acts before FastAPI parses anything. The request log
also ends every request that failed: one line per request, never a traceback in the log.
"""

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from starlette.requests import ClientDisconnect

from unicom_cli.serve.deadlines import StopSignal, receive_by
from unicom_cli.utils.console import info

OPEN_PATHS = frozenset({"/healthz"})


def guard(app: Any, *, token: str | None, body_limit: int, read_timeout: float, stop: StopSignal,
          access_log: bool) -> Any:
    """Wrap the app: request log (outermost), then the token check, then the body limits."""
    app.add_middleware(_BodyGuard, limit=body_limit, read_timeout=read_timeout, stop=stop)
    if token:
        app.add_middleware(_TokenCheck, token=token)
    app.add_middleware(_RequestLog, access_log=access_log)
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


class _BodyGuard:
    """Request bodies: above ``limit`` bytes a 413, at once when Content-Length says so, else as
    soon as the streamed body passes it (nothing larger is ever buffered); not in full within
    ``read_timeout`` seconds of the headers (or ``DRAIN_S`` after a stop signal) a 408 (503).
    Both close the connection, so the rest of the body is never waited for."""

    def __init__(self, app: Any, limit: int, read_timeout: float, stop: StopSignal) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout
        self.stop = stop

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than {self.limit:,} bytes (--max-upload)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, message, {"Connection": "close"})
            return
        received = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.read_timeout

        async def guarded() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: what follows is the wait for a disconnect
                return await receive()
            event = await receive_by(receive, deadline, self.stop)
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                complete = not event.get("more_body", False)
                if received > self.limit:  # answered by the app's own handler
                    raise HTTPException(413, message, headers={"Connection": "close"})
            return event

        await self.app(scope, guarded, send)


class _RequestLog:
    """One line per request on stderr: client, method, path (never the token), status, time;
    when the request failed, why. A client gone before its request was complete is a 499 line
    (no response can reach it); an unexpected error is a 500 with a one-line cause."""

    def __init__(self, app: Any, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, reason = 500, ""

        async def record(event: dict) -> None:
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, record)
        except ClientDisconnect:
            status, reason = 499, "the client disconnected before its request was complete"
        except asyncio.CancelledError:  # a stop that outwaited its grace period: logged, not a traceback
            status, reason = 503, "cancelled: the service stopped before the request finished"
            try:
                await _send_json(send, 503, "the service stopped before the request finished")
            except Exception:  # noqa: BLE001 - the response had already started
                pass
        except Exception as exc:  # noqa: BLE001 - any other failure: one line here, a 500 to the client
            reason = _cause(exc)
            try:
                await _send_json(send, 500, "internal error; the service log has the cause")
            except Exception:  # noqa: BLE001 - the response had already started
                pass
        if self.access_log or reason:
            from rich.markup import escape

            client = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - start) * 1000
            # The path as sent (still percent-encoded: no control characters reach the terminal).
            path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            line = f"{client[0]} {scope['method']} {path} {status} {ms:.1f} ms"
            info(escape(line + (f": {reason}" if reason else "")))


def _cause(exc: BaseException) -> str:
    """``Type: message (at file:line)`` of the innermost frame, on one line."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}{where}"
