"""Run the service: load the index and its model once, listen, stop cleanly on Ctrl-C/SIGTERM."""

from __future__ import annotations

import gc
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from unicom_cli.errors import UsageError
from unicom_cli.serve.app import ServeSettings, create_app
from unicom_cli.serve.deadlines import header_deadline_protocol
from unicom_cli.utils.console import info, warn

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACEFUL_SHUTDOWN_S = 30  # requests being served get this long after Ctrl-C/SIGTERM
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (uvicorn's own timer)


@dataclass
class ServeConfig:
    """Where to listen and what to serve (the CLI fills it)."""

    index: Path | str  # an index folder or a milvus:URI#collection reference
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    weights: Path | None = None
    precision: str | None = None
    settings: ServeSettings = field(default_factory=ServeSettings)
    verify: bool = False  # hash the index files again (Index.load)


def serve(config: ServeConfig) -> None:
    """Load, bind and serve until Ctrl-C or SIGTERM; returns normally after a clean stop."""
    from unicom_cli.index import Index
    from unicom_cli.models.factory import resolve_device

    index = Index.load(config.index, verify=config.verify)
    sock = bind(config.host, config.port)  # a busy port fails before the model loads
    try:
        device = str(resolve_device(config.device))
        embedder = index.embedder(device=device, weights=config.weights, precision=config.precision)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    app = create_app(index, embedder, config.settings)
    # What start-up made (modules, the model, the ids) lives until the end: out of the collector's
    # sight, full collections while serving stay short, and the exit skips a final pass over it all.
    gc.freeze()
    loaded = embedder.loaded
    weights = (f"{loaded.weights_path} (sha256 {loaded.sha256[:12]}…)" if loaded.sha256
               else f"randomly initialised (seed {loaded.random_init_seed}): results mean nothing"
               if loaded.random_init_seed is not None else "no weights file")
    info(f"index  {config.index}: {len(index):,} images, {index.dim} dims, "
         f"{index.meta.get('factory', '?')}")
    info(f"model  {loaded.spec.name} on {device}, {weights}")
    _announce_refused(app.state.files, len(index))
    batching = (f"micro-batches of up to {config.settings.max_batch}" if config.settings.max_batch > 1
                else "micro-batching off")
    info(f"limits k ≤ {min(config.settings.max_k, len(index))}, uploads ≤ "
         f"{config.settings.max_upload:,} bytes, {batching}, queue {config.settings.queue_size}")
    if config.host not in LOOPBACK:
        warn(f"--host {config.host}: the service is reachable from the network"
             + ("" if config.settings.token else "; anyone who can reach it can search and "
                "download the indexed images (set --token)"))
    shown = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    shown = f"[{shown}]" if ":" in shown else shown
    query = "?token=…" if config.settings.token else ""
    info(f"serving http://{shown}:{port}/{query} (API docs at /docs); Ctrl-C stops")
    protocol = header_deadline_protocol(config.settings.read_timeout)
    server = _Server(uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, lifespan="on",
                                    timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S),
                     on_stop=app.state.stop.set)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    info("stopped")


def _announce_refused(files, count: int) -> None:
    """Say at start how many rows' files will not be served (serve.files), with an example."""
    from rich.markup import escape

    if not files.refused:
        return
    where = " or ".join(files.roots) or "(no folder recorded: the index was built from bare vectors)"
    example = ascii(files.example_refused())[1:-1]  # control characters and odd bytes stay visible
    warn(escape(f"{len(files.refused):,} of {count:,} ids lead outside the collection {where} "
                f"(e.g. {example}): their files are not served (GET /images answers 404)"))


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, so that a busy port or a bad host is one clear error
    (port 0 picks a free port; the URL printed says which)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"{host}:{port}: cannot listen ({exc.strerror}); pick another --port") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's Server, except that a stop signal is the normal end of the command.

    uvicorn re-raises the signal it caught once it has shut down, which would end the process
    with "killed by SIGTERM" or a KeyboardInterrupt; here the first Ctrl-C/SIGTERM lets
    in-flight requests finish and then returns, so the command exits 0. A second Ctrl-C
    forces the stop (uvicorn's own handler). ``on_stop`` runs when the stop begins (it bounds
    the wait for request bodies still arriving: serve.deadlines).
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_stop()
        await super().shutdown(sockets)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
