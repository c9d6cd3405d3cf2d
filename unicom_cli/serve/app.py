"""The FastAPI app: routes over one loaded index and its query embedder, nothing else.

Requests are checked (token, size, type, dimension) before they reach the model; images are
decoded in parallel threads (at most one per core at a time), then resized, embedded and
searched in micro-batches by one model thread (``batcher``), which is the only thread that
runs torch: several threads each starting torch's own thread pool would oversubscribe the CPU.
"""

import hmac
import io
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from unicom_cli.errors import BadImage
from unicom_cli.serve.batcher import MicroBatcher, QueueFull
from unicom_cli.utils.console import info

if TYPE_CHECKING:
    from fastapi import FastAPI

MB = 1024 * 1024
THUMBNAIL_MIN, THUMBNAIL_MAX = 16, 1024
# Multipart framing (boundaries, part headers, the k field) on top of the file itself.
MULTIPART_SLACK = 64 * 1024
OPEN_PATHS = frozenset({"/healthz"})


@dataclass
class ServeSettings:
    """What the service enforces; the CLI fills it from its options."""

    token: str | None = None  # Bearer token required on every route but /healthz
    max_upload: int = 20 * MB  # bytes per uploaded image (413 above)
    max_k: int = 100  # largest k a client may ask for
    default_k: int = 10
    max_batch: int = 32  # queries embedded together; 1 turns micro-batching off
    queue_size: int = 64  # waiting queries before 503
    queue_bytes: int = 1024 * MB  # decoded pixels waiting, at most (then 503)
    max_pixels: int = 64_000_000  # decoded size limit of an upload (decompression bombs)
    access_log: bool = True  # one line per request on stderr


@dataclass
class _Query:
    """One search in a batch: decoded pixels or a ready vector, and its k."""

    k: int
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None


def search_batch(index: Any, embedder: Callable, queries: list[_Query]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Embed the image queries in one forward pass, search all queries in one call.

    Returns (scores, rows) per query, each cut to that query's k.
    """
    vectors = np.empty((len(queries), index.dim), dtype=np.float32)
    images = [n for n, q in enumerate(queries) if q.pixels is not None]
    if images:
        vectors[images] = np.asarray(embedder([queries[n].pixels for n in images]), dtype=np.float32)
    for n, q in enumerate(queries):
        if q.vector is not None:
            vectors[n] = q.vector
    k = max(q.k for q in queries)
    scores, rows = index.search(vectors, k)
    return [(scores[n, :q.k], rows[n, :q.k]) for n, q in enumerate(queries)]


def create_app(index: Any, embedder: Callable, settings: ServeSettings | None = None) -> "FastAPI":
    """The service over ``index`` (an ``unicom_cli.index.Index``) and its query embedder.

    Args:
        index: provides ``ids``, ``path_of(row)``, ``meta``, ``dim``, ``len()`` and
            ``search(vectors, k) -> (scores, rows)``.
        embedder: maps a list of RGB uint8 arrays to (n, dim) float32 features, exactly as the
            index's own rows were made.
        settings: limits and the token.
    """
    import anyio
    import torch
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import FileResponse, HTMLResponse, Response
    from starlette.datastructures import UploadFile

    settings = settings or ServeSettings()
    count = len(index)
    max_k = min(settings.max_k, count)
    batcher: MicroBatcher = MicroBatcher(lambda qs: search_batch(index, embedder, qs),
                                         max_batch=settings.max_batch, queue_size=settings.queue_size,
                                         max_cost=settings.queue_bytes)
    # Decoders (libjpeg-turbo, Pillow) run one core each: more at once only holds more pixels.
    decoders = anyio.CapacityLimiter(max(1, torch.get_num_threads()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="unicom search", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=f"Image search over {count:,} images.")
    app.state.batcher = batcher
    app.state.settings = settings

    @app.get("/healthz", summary="Liveness check (no token needed)")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("unicom_cli.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        # The docs page fetches the schema itself: hand it the token it was opened with.
        token = request.query_params.get("token")
        url = "/openapi.json" + (f"?token={_quote(token)}" if token else "")
        return get_swagger_ui_html(openapi_url=url, title="unicom search API")

    @app.get("/info", summary="What is being served")
    def describe() -> dict:
        return {"count": count, "dim": index.dim, "model": index.meta.get("model"),
                "max_k": max_k, "default_k": min(settings.default_k, max_k),
                "max_upload": settings.max_upload}

    search_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "An image file."}}}},
        "application/json": {"schema": {"type": "object", "required": ["vector"], "properties": {
            "vector": {"type": "array", "items": {"type": "number"},
                       "description": f"A query feature of {index.dim} values."}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }}}

    @app.post("/search", summary="Most similar indexed images to an image or a vector",
              openapi_extra=search_body, responses={
                  400: {"description": "Not an image, or a corrupt one"},
                  413: {"description": f"Upload larger than {settings.max_upload:,} bytes"},
                  415: {"description": "Neither multipart, JSON nor an image body"},
                  422: {"description": "Bad k, or a vector of the wrong dimension"},
                  503: {"description": "Too many queued requests; retry shortly"}})
    async def search(request: Request, k: int = Query(min(settings.default_k, max_k), ge=1, le=max_k,
                                                      description=f"Number of results (1-{max_k}).")) -> dict:
        start = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "multipart body has no file field named 'image'")
            query = _Query(k, pixels=await _decode(await upload.read(settings.max_upload + 1)))
        elif kind == "application/json":
            query = _Query(k, vector=_vector(await request.body()))
        elif kind.startswith("image/") or kind == "application/octet-stream":
            query = _Query(k, pixels=await _decode(await request.body()))
        else:
            raise HTTPException(415, f"content type {kind or '(none)'}: send multipart/form-data with an "
                                     "'image' file, application/json with a 'vector', or an image body")
        try:
            cost = query.pixels.nbytes if query.pixels is not None else query.vector.nbytes
            scores, rows = await batcher.submit(query, cost)
        except QueueFull:
            raise HTTPException(503, "the service is busy (request queue full); retry shortly",
                                headers={"Retry-After": "1"}) from None
        results = [{"rank": rank, "row": int(row), "id": index.ids[row], "path": str(index.path_of(int(row))),
                    "score": float(score), "thumbnail": f"/images/{int(row)}?size=256"}
                   for rank, (score, row) in enumerate(zip(scores, rows), start=1) if row >= 0]
        return {"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 2)}

    async def _decode(data: bytes) -> np.ndarray:
        if len(data) > settings.max_upload:
            raise HTTPException(413, f"upload is larger than {settings.max_upload:,} bytes (--max-upload)")
        try:
            return await anyio.to_thread.run_sync(_decode_upload, data, settings.max_pixels,
                                                  limiter=decoders)
        except BadImage as exc:
            raise HTTPException(400, f"not a usable image: {exc}") from None

    def _vector(body: bytes) -> np.ndarray:
        try:
            payload = json.loads(body)
            values = payload["vector"]
            vector = np.asarray(values, dtype=np.float64)
        except (ValueError, TypeError, KeyError):
            raise HTTPException(422, 'expected a JSON object {"vector": [numbers...]}') from None
        if vector.shape != (index.dim,):
            raise HTTPException(422, f"vector has shape {list(vector.shape)}; this index needs "
                                     f"{index.dim} numbers")
        if not np.isfinite(vector).all():
            raise HTTPException(422, "vector contains NaN or infinite values")
        return vector.astype(np.float32)

    def _row(row: int):
        if row >= count:
            raise HTTPException(404, f"row {row} is not in the index (it has {count:,} rows)")
        path = index.path_of(row)
        if not path.is_file():
            raise HTTPException(404, f"row {row}: the indexed file is no longer on disk")
        return path

    @app.get("/images/{row:int}", summary="The indexed image of a row (never a client-named path)",
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "Unknown row"}})
    async def image(row: int, size: int | None = Query(
            None, ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX, description="Longest side of a JPEG thumbnail.")):
        path = _row(row)
        cache = {"Cache-Control": "private, max-age=3600"}
        if size is None:
            return FileResponse(path, headers=cache)
        try:
            data = await anyio.to_thread.run_sync(_thumbnail, path, size, limiter=decoders)
        except BadImage as exc:
            raise HTTPException(404, f"row {row}: the indexed file cannot be read ({exc})") from None
        return Response(data, media_type="image/jpeg", headers=cache)

    return _guard(app, settings)


def _decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    from unicom_cli.data.images import decode_pixels

    return decode_pixels(data, max_pixels=max_pixels)


def _thumbnail(path, size: int) -> bytes:
    """A JPEG whose longest side is at most ``size``, EXIF-rotated, transparency on white."""
    from PIL import Image

    from unicom_cli.data.images import load_image

    img = load_image(path, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _guard(app: Any, settings: ServeSettings) -> Any:
    """Wrap the app: access log (outermost), then the token check, then the body-size limit."""
    limit = settings.max_upload + MULTIPART_SLACK
    app.add_middleware(_BodyLimit, limit=limit)
    if settings.token:
        app.add_middleware(_TokenCheck, token=settings.token)
    if settings.access_log:
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
                    from fastapi import HTTPException

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
