"""`unicom serve` over HTTP on loopback: every route, the token, every bad input, a full queue,
path traversal attempts, and a clean stop on SIGTERM / Ctrl-C with a request in flight."""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import MAX_UPLOAD, TOKEN, start_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _check_exact(collection, body: dict, row: int, k: int) -> None:
    """The service's results equal an exact float64 search written from the definition:
    cosine similarity of the `unicom embed` rows to the row of the query image."""
    feats = _unit(collection.feats)
    truth = feats @ feats[row]
    results = body["results"]
    rows = np.array([r["row"] for r in results])
    scores = np.array([r["score"] for r in results])
    assert [r["rank"] for r in results] == list(range(1, k + 1))
    assert np.allclose(scores, np.sort(truth)[::-1][:k], atol=1e-4)  # the k best scores, in order
    assert np.allclose(scores, truth[rows], atol=1e-4)  # and each belongs to its row
    assert len(set(rows.tolist())) == k
    for r in results:
        assert r["id"] == collection.ids[r["row"]]
        assert r["path"].endswith(collection.ids[r["row"]])
        assert r["thumbnail"] == f"/images/{r['row']}?size=256"
    assert body["took_ms"] > 0


def _jpeg_bytes(collection, name="astronaut.jpg") -> tuple[int, bytes]:
    return collection.ids.index(name), (collection.images / name).read_bytes()


def test_healthz_needs_no_token(server):
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/info"), ("POST", "/search"),
                                         ("GET", "/images/0"), ("GET", "/docs"),
                                         ("GET", "/openapi.json"), ("GET", "/no-such-route")])
def test_every_other_route_needs_the_token(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        r = httpx.request(method, server.url + path, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.request(method, server.url + path + "?token=nope")
    assert r.status_code == 401


def test_the_token_opens_the_page_and_the_api(server, auth, collection):
    assert httpx.get(server.url + "/info", headers=auth).json()["count"] == len(collection.ids)
    page = httpx.get(server.url + f"/?token={TOKEN}")  # how the browser opens it
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(server.url + f"/images/0?size=32&token={TOKEN}").status_code == 200


def test_search_with_an_uploaded_image_is_exact(server, auth, collection):
    row, data = _jpeg_bytes(collection)
    r = httpx.post(server.url + "/search?k=5", headers=auth, files={"image": ("q.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    _check_exact(collection, body, row, 5)
    assert body["results"][0]["row"] == row and body["results"][0]["score"] == pytest.approx(1, abs=1e-4)


def test_search_with_an_image_body_or_a_vector_gives_the_same_results(server, auth, collection):
    row = collection.ids.index("more/chelsea-mirror.png")
    data = (collection.images / collection.ids[row]).read_bytes()
    upload = httpx.post(server.url + "/search?k=7", headers=auth, files={"image": ("x", data)}).json()
    raw = httpx.post(server.url + "/search?k=7", content=data,
                     headers={**auth, "Content-Type": "image/png"}).json()
    vector = _unit(collection.feats[row]).tolist()  # as the index stores its rows
    by_vector = httpx.post(server.url + "/search?k=7", headers=auth, json={"vector": vector}).json()
    for body in (upload, raw, by_vector):
        _check_exact(collection, body, row, 7)
    assert [r["row"] for r in upload["results"]] == [r["row"] for r in raw["results"]]


def test_k_is_bounded(server, auth, collection):
    _, data = _jpeg_bytes(collection)
    files = {"image": ("q.jpg", data)}
    assert len(httpx.post(server.url + "/search", headers=auth, files=files).json()["results"]) == 10
    for k in ("0", "-3", "21", "ten", "1e9"):  # --max-k 20
        r = httpx.post(server.url + f"/search?k={k}", headers=auth, files=files)
        assert r.status_code == 422, (k, r.text)
        assert r.json()["detail"][0]["loc"] == ["query", "k"]


def _bomb() -> bytes:
    """A 100 MP black PNG of a few hundred KB: a decompression bomb for a 64 MP limit."""
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("name,make,reason", [
    ("notes.jpg", lambda c: b"these are not pixels\n" * 10, "not an image file"),
    ("half.jpg", lambda c: _jpeg_bytes(c)[1][:3000], "cannot decode"),
    ("empty.jpg", lambda c: b"", "empty file"),
    ("bomb.png", lambda c: _bomb(), "decompression bomb"),
])
def test_a_bad_upload_is_a_400_with_the_reason(server, auth, collection, name, make, reason):
    r = httpx.post(server.url + "/search", headers=auth, files={"image": (name, make(collection))})
    assert r.status_code == 400, r.text
    assert reason in r.json()["detail"]


def test_a_multipart_body_without_an_image_file_is_a_400(server, auth):
    for files, data in (({"picture": ("q.jpg", b"x")}, None), ({"other": ("x.txt", b"x")}, {"image": "not a file"})):
        r = httpx.post(server.url + "/search", headers=auth, files=files, data=data)
        assert r.status_code == 400 and "'image'" in r.json()["detail"]


def test_an_upload_over_max_upload_is_a_413(server, auth):
    big = np.random.default_rng(0).integers(0, 256, MAX_UPLOAD + 1000, dtype=np.uint8).tobytes()
    r = httpx.post(server.url + "/search", headers=auth, files={"image": ("big.jpg", big)})
    assert r.status_code == 413 and "--max-upload" in r.json()["detail"]
    # No Content-Length (chunked): refused once the streamed body passes the limit.
    chunks = (big[i:i + 65536] for i in range(0, len(big) * 2, 65536))
    r = httpx.post(server.url + "/search", headers={**auth, "Content-Type": "image/jpeg"},
                   content=(c for c in chunks))
    assert r.status_code == 413
    # A multipart body within the slack for its framing but a file over the limit.
    r = httpx.post(server.url + "/search", headers=auth, files={"image": ("big.jpg", big[:MAX_UPLOAD + 10])})
    assert r.status_code == 413


@pytest.mark.parametrize("body,what", [
    ({"vector": [0.1] * 15}, "15"), ({"vector": [0.1] * 17}, "17"), ({"vector": [[0.1] * 16]}, "[1, 16]"),
    ({"vector": [float("nan")] + [0.1] * 15}, "NaN"), ({"vector": ["a"] * 16}, "JSON object"),
    ({"vectors": [0.1] * 16}, "JSON object"), ([0.1] * 16, "JSON object"),
])
def test_a_bad_vector_is_a_422(server, auth, body, what):
    r = httpx.post(server.url + "/search", headers={**auth, "Content-Type": "application/json"},
                   content=json.dumps(body))
    assert r.status_code == 422, r.text
    assert what in r.json()["detail"]


def test_a_body_that_is_not_json_is_a_422_and_other_types_a_415(server, auth):
    r = httpx.post(server.url + "/search", headers={**auth, "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 422
    r = httpx.post(server.url + "/search", headers=auth, data={"vector": "1,2"})
    assert r.status_code == 415 and "application/x-www-form-urlencoded" in r.json()["detail"]


def test_images_serves_indexed_rows_only(server, auth, collection):
    row = collection.ids.index("more/coffee #1 (alpha) é.png")
    r = httpx.get(server.url + f"/images/{row}", headers=auth)
    assert r.status_code == 200 and r.content == (collection.images / collection.ids[row]).read_bytes()
    r = httpx.get(server.url + f"/images/{row}?size=64", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    original = Image.open(collection.images / collection.ids[row])
    assert thumb.format == "JPEG" and max(thumb.size) == 64
    assert thumb.size[0] / thumb.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.05)
    for size in ("8", "5000", "big"):
        assert httpx.get(server.url + f"/images/{row}?size={size}", headers=auth).status_code == 422
    r = httpx.get(server.url + f"/images/{len(collection.ids)}", headers=auth)
    assert r.status_code == 404 and "not in the index" in r.json()["detail"]


TRAVERSALS = [
    "/images/../x", "/images/../../../../etc/passwd", "/images/..%2f..%2fetc%2fpasswd",
    "/images/%2e%2e/%2e%2e/etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/images/%252e%252e%252fetc%252fpasswd", "/images/0/../../etc/passwd", "/images//etc/passwd",
    "/images/%2fetc%2fpasswd", "/images/-1", "/images/1e3", "/images/0x1", "/images/0%00",
    "/images/..\\..\\etc\\passwd", "/images/astronaut.jpg", "/images/more/chelsea-mirror.png",
    "/images/%00", "/images/%201", "/images/1;/etc/passwd", "/static/../../etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_attempts_are_404(server, path):
    """Sent byte for byte (http.client does not normalise paths, unlike browsers and httpx)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 404, (path, body)
    assert b"root:" not in body and b"\xff\xd8" not in body


def test_page_docs_and_schema(server, auth):
    page = httpx.get(server.url + "/", headers=auth).text
    assert "<input id=\"file\" type=\"file\"" in page
    # Everything the page needs is in it or served by us: no external resource.
    for attribute in ("src=\"http", "href=\"http", "src='http", "@import", "//cdn", "url(http"):
        assert attribute not in page
    assert httpx.get(server.url + "/docs", headers=auth).status_code == 200
    schema = httpx.get(server.url + "/openapi.json", headers=auth).json()
    assert {"/search", "/images/{row}", "/healthz", "/info"} <= set(schema["paths"])
    assert {"multipart/form-data", "application/json"} <= set(
        schema["paths"]["/search"]["post"]["requestBody"]["content"])


def test_the_service_keeps_serving_and_logs_each_request(server, auth, collection):
    row, data = _jpeg_bytes(collection, "rocket.jpg")
    statuses = [
        httpx.post(server.url + "/search", headers=auth, files={"image": ("x.jpg", b"junk")}).status_code,
        httpx.post(server.url + "/search", headers=auth, content=b"x" * (MAX_UPLOAD * 2),
                   params={"token": TOKEN}).status_code,
        httpx.get(server.url + "/images/0").status_code,
        httpx.get(server.url + f"/images/0?size=32&token={TOKEN}").status_code,
    ]
    assert statuses == [400, 413, 401, 200]
    assert server.proc.poll() is None  # after every bad request of this module, the same process
    r = httpx.post(server.url + "/search?k=3", headers=auth, files={"image": ("q.jpg", data)})
    _check_exact(collection, r.json(), row, 3)
    deadline = time.monotonic() + 30  # the log line is written just after the response
    while "POST /search 200" not in "\n".join(server.lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = "\n".join(server.lines)
    for line in ("POST /search 400", "POST /search 413", "GET /images/0 401", "GET /images/0 200",
                 "POST /search 200"):
        assert line in log, line
    assert TOKEN not in log  # ?token= is never logged
    assert f"{len(collection.ids)} images" in log and "model  tiny" in log
    assert "Traceback" not in log


def test_a_full_queue_answers_503(collection):
    """In-process server with a gated embedder (the test's own wrapper): one query held in the
    model, one waiting in a queue of one; the next is refused, and both held ones finish."""
    import uvicorn

    from unicom_cli.index import Index
    from unicom_cli.serve.app import ServeSettings, create_app
    from unicom_cli.serve.server import bind

    index = Index.load(collection.index)
    real = index.embedder(device="cpu", weights=collection.weights)
    started, release = threading.Event(), threading.Event()

    class Gated:
        loaded = real.loaded

        def __call__(self, images):
            started.set()
            release.wait(timeout=60)
            return real(images)

    app = create_app(index, Gated(), ServeSettings(max_batch=1, queue_size=1, access_log=False))
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        _, data = _jpeg_bytes(collection)
        results: list = []

        def post():
            results.append(httpx.post(url + "/search?k=2", files={"image": ("q.jpg", data)}, timeout=60))

        first = threading.Thread(target=post)
        first.start()
        started.wait(timeout=60)
        second = threading.Thread(target=post)
        second.start()
        queue = app.state.batcher._queue
        while queue.qsize() < 1:
            time.sleep(0.01)
        refused = httpx.post(url + "/search?k=2", files={"image": ("q.jpg", data)}, timeout=60)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["detail"]
        release.set()
        first.join(60)
        second.join(60)
        assert [r.status_code for r in results] == [200, 200]
    finally:
        release.set()
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_request_in_flight_and_exits_0(collection, sig):
    # SIGINT: also --host 0.0.0.0 (a warning); SIGTERM: also the token from UNICOM_TOKEN.
    extra = ("--host", "0.0.0.0") if sig == signal.SIGINT else ()
    token = "from-the-environment" if sig == signal.SIGTERM else None
    server = start_server(collection, *extra, token_env=token)
    try:
        if extra:
            assert any("reachable from the network" in line for line in server.lines)
        if token:
            assert httpx.get(server.url + "/info").status_code == 401
            assert httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        row, data = _jpeg_bytes(collection, "coins.jpg")
        boundary = "unicomtestboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        conn.sendall((f"POST /search?k=4 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{auth}"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
        conn.sendall(body[:1000])  # the request is in flight: headers and part of the body
        time.sleep(0.3)
        server.proc.send_signal(sig)
        _wait_refused(server.port)  # the server is shutting down: no new connections
        conn.sendall(body[1000:])
        response = _read_response(conn)
        conn.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        _check_exact(collection, json.loads(response.split(b"\r\n\r\n", 1)[1]), row, 4)
        assert server.proc.wait(timeout=60) == 0
        time.sleep(0.2)
        assert server.lines[-1].strip() == "stopped"
        assert not any("Traceback" in line or "Error" in line for line in server.lines)
    finally:
        server.stop(signal.SIGKILL)


def _wait_refused(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError("the server still accepts connections after the stop signal")


def _read_response(conn: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:") and len(rest) >= int(line.split(b":")[1]):
                return data


HOSTILE_VECTORS = [
    ('{"vector": [' + ",".join(["1e39"] * 16) + "]}", "float32"),  # finite as float64, not as float32
    ('{"vector": [' + "9" * 400 + "," + ",".join(["0.1"] * 15) + "]}", "infinite"),  # a 400-digit integer
    ('{"vector": ' + "[" * 100_000 + "]" * 100_000 + "}", "bytes"),  # refused by its size
    ('{"vector": ' + "[" * 1000 + "]" * 1000 + "}", "nests too deeply"),  # within the size: by its depth
    ('{"vector": [' + ",".join(["0.1"] * 200_000) + "]}", "bytes"),
    ('{"vector": [' + ",".join(["true"] * 16) + "]}", "numbers"),
    ('{"vector": [' + ",".join(["Infinity"] * 16) + "]}", "infinite"),
]


@pytest.mark.parametrize("body,what", HOSTILE_VECTORS,
                         ids=["1e39", "400-digits", "deep", "deep-small", "huge", "bools", "inf"])
def test_a_hostile_vector_is_a_422(server, auth, body, what):
    r = httpx.post(server.url + "/search", headers={**auth, "Content-Type": "application/json"},
                   content=body.encode(), timeout=60)
    assert r.status_code == 422, r.text[:300]
    assert what in r.json()["detail"]


def test_bad_requests_among_good_ones_fail_alone(server, auth, collection):
    """Sent at once, so that they share micro-batches: every image query answers its exact
    results, every hostile vector its own 422."""
    import asyncio

    names = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "coins.jpg", "moon.jpg",
             "camera.jpg", "page.jpg", "retina.jpg", "hubble.jpg", "ihc.jpg"]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120) as client:
            good = [client.post("/search?k=3", files={"image": ("q.jpg", (collection.images / n).read_bytes())})
                    for n in names]
            bad = [client.post("/search?k=3", content=body.encode(), headers={"Content-Type": "application/json"})
                   for body, _ in HOSTILE_VECTORS] * 2
            return await asyncio.gather(*good, *bad)

    answers = asyncio.run(run())
    for name, r in zip(names, answers[:len(names)]):
        assert r.status_code == 200, (name, r.text)
        _check_exact(collection, r.json(), collection.ids.index(name), 3)
    assert [r.status_code for r in answers[len(names):]] == [422] * (2 * len(HOSTILE_VECTORS))
