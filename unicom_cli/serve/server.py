"""Run the service: load the index and its model once, listen, stop cleanly on Ctrl-C/SIGTERM."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from unicom_cli.errors import UsageError
from unicom_cli.serve.app import ServeSettings, create_app
from unicom_cli.utils.console import info, warn

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACEFUL_SHUTDOWN_S = 30  # in-flight requests get this long after Ctrl-C/SIGTERM


@dataclass
class ServeConfig:
    """Where to listen and what to serve (the CLI fills it)."""

    index: Path
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
    loaded = embedder.loaded
    weights = f"{loaded.weights_path} (sha256 {loaded.sha256[:12]}…)" if loaded.sha256 else "no weights file"
    info(f"index  {config.index}: {len(index):,} images, {index.dim} dims, "
         f"{index.meta.get('factory', '?')}")
    info(f"model  {loaded.spec.name} on {device}, {weights}")
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
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    info("stopped")


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
    forces the stop (uvicorn's own handler).
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
