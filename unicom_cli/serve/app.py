"""The FastAPI app: routes over one loaded index and its query embedder, nothing else.

Requests are checked (token, size, type, dimension) before they reach the model; images are
decoded in parallel threads (at most one per core at a time), then resized, embedded and
searched in micro-batches by one model thread (``batcher``), which is the only thread that
runs torch: several threads each starting torch's own thread pool would oversubscribe the CPU.
"""

import io
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from unicom_cli.errors import BadImage
from unicom_cli.serve.batcher import MicroBatcher, QueueFull
from unicom_cli.serve.files import CollectionFiles
from unicom_cli.serve.deadlines import StopSignal
from unicom_cli.serve.guards import guard

MB = 1024 * 1024
THUMBNAIL_MIN, THUMBNAIL_MAX = 16, 1024
# Multipart framing (boundaries, part headers, the k field) on top of the file itself.
MULTIPART_SLACK = 64 * 1024
JSON_BYTES_PER_VALUE = 64  # a JSON vector may spend this many bytes per number (digits, spaces)
FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    access_log: bool = True  # one line per request on stderr (failed requests are logged regardless)
    read_timeout: float = 30.0  # seconds for a request's headers, and again for its body (then 408)


class NameSafeJSON(JSONResponse):
    """JSON in ASCII: a file name that is not UTF-8 (its bytes kept as lone surrogates, as
    ``data.ids`` reads it) cannot be encoded as UTF-8 and answered 500; as a ``\\udcXX``
    escape it reaches every client, which gets the name's bytes back with
    ``name.encode("utf-8", "surrogateescape")``."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


@dataclass
class _Query:
    """One search in a batch: decoded pixels or a ready vector, and its k."""

    k: int
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None


def parse_vector(body: bytes, dim: int) -> np.ndarray:
    """The float32 query of a JSON ``{"vector": [dim numbers]}`` body, or a 422 saying why not.

    Checked here, before the query joins a batch: a value that is finite as float64 but not as
    float32 (1e39), an integer too long for a float, nesting deep enough to exhaust the parser's
    stack or a body far larger than dim numbers need would otherwise fail inside the model thread.
    """
    shape = 'expected a JSON object {"vector": [numbers...]}'
    if len(body) > JSON_BYTES_PER_VALUE * dim + 1024:
        raise HTTPException(422, f"JSON body of {len(body):,} bytes; {dim} numbers need at most "
                                 f"{JSON_BYTES_PER_VALUE * dim + 1024:,} bytes")
    try:
        values = json.loads(body, parse_int=float)["vector"]  # a 400-digit integer becomes inf
    except RecursionError:
        raise HTTPException(422, "JSON body nests too deeply; send a flat list of numbers") from None
    except (ValueError, TypeError, KeyError, IndexError):
        raise HTTPException(422, shape) from None
    if isinstance(values, list) and any(isinstance(v, (bool, str)) for v in values):
        raise HTTPException(422, f"{shape}: the vector holds values that are not numbers")
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise HTTPException(422, shape) from None
    if vector.shape != (dim,):
        raise HTTPException(422, f"vector has shape {list(vector.shape)}; this index needs {dim} numbers")
    if not np.isfinite(vector).all():
        raise HTTPException(422, "vector contains NaN or infinite values")
    if np.abs(vector).max() > FLOAT32_MAX:
        raise HTTPException(422, f"vector values beyond ±{FLOAT32_MAX:.4g} are infinite as float32")
    return vector.astype(np.float32)


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


class _Service:
    """What the routes share: the index, the embedder, the limits, the batcher, decoder slots."""

    def __init__(self, index: Any, embedder: Callable, settings: ServeSettings) -> None:
        import anyio
        import torch

        self.index = index
        self.embedder = embedder
        self.settings = settings
        self.files = CollectionFiles(index)
        self.count = len(index)
        self.max_k = min(settings.max_k, self.count)
        self.default_k = min(settings.default_k, self.max_k)
        self.batcher: MicroBatcher = MicroBatcher(
            lambda queries: search_batch(index, embedder, queries), max_batch=settings.max_batch,
            queue_size=settings.queue_size, max_cost=settings.queue_bytes)
        # Decoders (libjpeg-turbo, Pillow) run one core each: more at once only holds more pixels.
        self.decoders = anyio.CapacityLimiter(max(1, torch.get_num_threads()))
        from unicom_cli.index.metadata import RowMetadata  # a hit's table columns / tar sample json

        self.metadata = RowMetadata.of(getattr(index, "meta", None) or {})

    def info(self) -> dict:
        loaded = getattr(self.embedder, "loaded", None)
        seed = getattr(loaded, "random_init_seed", None)
        digest = getattr(loaded, "sha256", None)
        weights = (f"random initialisation, seed {seed} (no trained weights)" if seed is not None
                   else f"sha256 {digest}" if digest else None)
        return {"count": self.count, "dim": self.index.dim, "model": self.index.meta.get("model"),
                "weights": weights, "random_init": seed is not None, "random_init_seed": seed,
                "max_k": self.max_k, "default_k": self.default_k, "max_upload": self.settings.max_upload}

    def hit(self, rank: int, score: float, row: int) -> dict:
        """One result: a refused row (its file is outside the collection) has no path or thumbnail."""
        path = self.files.shown_path(row)
        return {"rank": rank, "row": row, "id": self.index.ids[row], "path": path, "score": score,
                "thumbnail": None if path is None else f"/images/{row}?size=256",
                **({"metadata": self.metadata.get(row)} if self.metadata else {})}

    async def search(self, request: Request, k: int) -> dict:
        start = time.perf_counter()
        query = await self.parse(request, k)
        try:
            cost = (query.pixels if query.pixels is not None else query.vector).nbytes
            scores, rows = await self.batcher.submit(query, cost)
        except QueueFull:
            raise HTTPException(503, "the service is busy (request queue full); retry shortly",
                                headers={"Retry-After": "1"}) from None
        results = [self.hit(rank, float(score), int(row))
                   for rank, (score, row) in enumerate(zip(scores, rows), start=1) if row >= 0]
        return {"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 2)}

    async def parse(self, request: Request, k: int) -> _Query:
        """The query of a request, by its content type."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "multipart body has no file field named 'image'")
            return _Query(k, pixels=await self.decode(await upload.read(self.settings.max_upload + 1)))
        if kind == "application/json":
            return _Query(k, vector=self.vector(await request.body()))
        if kind.startswith("image/") or kind == "application/octet-stream":
            return _Query(k, pixels=await self.decode(await request.body()))
        raise HTTPException(415, f"content type {kind or '(none)'}: send multipart/form-data with an "
                                 "'image' file, application/json with a 'vector', or an image body")

    async def decode(self, data: bytes) -> np.ndarray:
        import anyio

        if len(data) > self.settings.max_upload:
            raise HTTPException(413, f"upload is larger than {self.settings.max_upload:,} bytes (--max-upload)")
        try:
            return await anyio.to_thread.run_sync(_decode_upload, data, self.settings.max_pixels,
                                                  limiter=self.decoders)
        except BadImage as exc:
            raise HTTPException(400, f"not a usable image: {exc}") from None

    def vector(self, body: bytes) -> np.ndarray:
        return parse_vector(body, self.index.dim)

    async def image(self, row: int, size: int | None) -> Response:
        import anyio

        if row >= self.count:
            raise HTTPException(404, f"row {row} is not in the index (it has {self.count:,} rows)")
        path = self.files.file_of(row)
        if path is None:
            raise HTTPException(404, f"row {row}: its file is outside the collection; not served")
        if not path.is_file():
            raise HTTPException(404, f"row {row}: the indexed file is no longer on disk")
        cache = {"Cache-Control": "private, max-age=3600"}
        if size is None:
            return FileResponse(path, headers=cache)
        try:
            data = await anyio.to_thread.run_sync(_thumbnail, path, size, limiter=self.decoders)
        except BadImage as exc:
            raise HTTPException(404, f"row {row}: the indexed file cannot be read ({exc})") from None
        return Response(data, media_type="image/jpeg", headers=cache)

    def openapi_search_body(self) -> dict:
        """/search takes three body types; the schema says so (FastAPI sees only ``Request``)."""
        binary = {"type": "string", "format": "binary"}
        return {"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {**binary, "description": "An image file."}}}},
            "application/json": {"schema": {"type": "object", "required": ["vector"], "properties": {
                "vector": {"type": "array", "items": {"type": "number"},
                           "description": f"A query feature of {self.index.dim} values, processed "
                                          "as the index's rows."}}}},
            "image/*": {"schema": binary},
        }}}


def create_app(index: Any, embedder: Callable, settings: ServeSettings | None = None) -> FastAPI:
    """The service over ``index`` (an ``unicom_cli.index.Index``) and its query embedder.

    Args:
        index: provides ``ids``, ``path_of(row)``, ``meta``, ``dim``, ``len()`` and
            ``search(vectors, k) -> (scores, rows)``.
        embedder: maps a list of RGB uint8 arrays to (n, dim) float32 features, exactly as the
            index's own rows were made.
        settings: limits and the token.
    """
    settings = settings or ServeSettings()
    service = _Service(index, embedder, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        yield
        await service.batcher.stop()  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="unicom search", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=NameSafeJSON, description=f"Image search over {service.count:,} images.")
    app.state.batcher = service.batcher
    app.state.files = service.files
    app.state.stop = StopSignal()  # set by the server when a stop signal comes (serve.server)

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
        url = "/openapi.json" + (f"?token={quote(token, safe='')}" if token else "")
        return get_swagger_ui_html(openapi_url=url, title="unicom search API")

    @app.get("/info", summary="What is being served")
    def info() -> dict:
        return service.info()

    @app.post("/search", summary="Most similar indexed images to an image or a vector",
              openapi_extra=service.openapi_search_body(), responses={
                  400: {"description": "Not an image, or a corrupt one"},
                  413: {"description": f"Upload larger than {settings.max_upload:,} bytes"},
                  415: {"description": "Neither multipart, JSON nor an image body"},
                  422: {"description": "Bad k, or a vector of the wrong dimension"},
                  503: {"description": "Too many queued requests; retry shortly"}})
    async def search(request: Request, k: int = Query(
            service.default_k, ge=1, le=service.max_k, description=f"Results (1-{service.max_k}).")) -> dict:
        return await service.search(request, k)

    @app.get("/images/{row:int}", summary="The indexed image of a row (never a client-named path)",
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "Unknown row"}})
    async def image(row: int, size: int | None = Query(
            None, ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX, description="Longest side of a JPEG thumbnail.")):
        return await service.image(row, size)

    return guard(app, token=settings.token, body_limit=settings.max_upload + MULTIPART_SLACK,
                 read_timeout=settings.read_timeout, stop=app.state.stop, access_log=settings.access_log)


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
