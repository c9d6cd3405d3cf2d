"""`unicom serve`: a search service and web page over an index built by `unicom index`."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from unicom_cli.cli.options import DeviceOpt, Precision, WeightsOpt

EXAMPLES = [
    "unicom serve photos.index     # open http://127.0.0.1:8000/ or: curl -F image=@cat.jpg '…/search?k=5'",
    "unicom serve photos.index --host 0.0.0.0 --port 8080   # reachable: set UNICOM_TOKEN first",
]

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``20MB``, ``512KiB``, ``1.5GB`` or plain bytes → bytes."""
    from unicom_cli.errors import UsageError

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UsageError(f"--max-upload {text}: expected a size such as 20MB, 500KB or 1048576")
    return int(float(match.group(1)) * _UNITS[unit])


def serve(
    index: Annotated[str, typer.Argument(help="Index folder written by `unicom index`, or a Milvus collection: milvus:PATH.db#NAME or milvus:http://host:19530#NAME (credentials in $UNICOM_MILVUS_TOKEN).", show_default=False)],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 makes the service reachable from the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free port).")] = 8000,
    token: Annotated[str | None, typer.Option("--token", envvar="UNICOM_TOKEN", show_default=False, help="Require 'Authorization: Bearer TOKEN' on every route but /healthz.")] = None,
    max_upload: Annotated[str, typer.Option("--max-upload", help="Largest image upload (413 above).")] = "20MB",
    max_k: Annotated[int, typer.Option("--max-k", min=1, help="Largest k a client may ask for.")] = 100,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Queries embedded together while the model is busy (1: micro-batching off).")] = 32,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Waiting queries before the service answers 503.")] = 64,
    read_timeout: Annotated[float, typer.Option("--read-timeout", min=0.1, help="Seconds a client has to send a request's headers, and again its body; slower clients get 408 and are disconnected.")] = 30.0,
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    precision: Annotated[Precision | None, typer.Option("--precision", show_default=False, help="Precision the queries are embedded in (default: the one recorded in the index, which its collection was embedded in, so that queries match their neighbours).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every file of the index again, even where a fresh record of its digest says it is unchanged (a load otherwise trusts that record).")] = False,
) -> None:
    """Serve an index: POST /search, GET /images/{row}, a web page at / and API docs at /docs.

    The model is loaded once at start; one log line per request follows. Only files inside the
    collection the index was built from are served. Ctrl-C or SIGTERM stops: requests being
    served finish (30 s at most), uploads still arriving get 5 s more (then 503), idle
    connections close at once.
    """
    from unicom_cli.errors import UsageError

    try:
        from unicom_cli.serve.server import ServeConfig, ServeSettings
        from unicom_cli.serve.server import serve as run_server
    except ImportError as exc:
        raise UsageError(f"unicom serve needs FastAPI and uvicorn ({exc.name} is missing): "
                         "pip install 'unicom-cli[serve]'") from None

    settings = ServeSettings(token=token or None, max_upload=parse_size(max_upload), max_k=max_k,
                             max_batch=max_batch, queue_size=queue_size, read_timeout=read_timeout)
    run_server(ServeConfig(index=index, host=host, port=port, device=device, weights=weights,
                           precision=precision, settings=settings, verify=verify))
