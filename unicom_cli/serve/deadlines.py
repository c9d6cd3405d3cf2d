"""How long a client may take to send its request, and how long a stop waits for one.

A client that sends half a request and goes silent, or trickles a line every few seconds, would
otherwise hold its connection (and, during a stop, the whole shutdown) for as long as it likes.
uvicorn closes idle keep-alive connections itself (``timeout_keep_alive``) but has no deadline
for a request's headers or body, so:

- ``header_deadline_protocol``: uvicorn's own HTTP/1.1 protocol (h11) with a deadline for the
  headers, counted from the connection (or from the first byte after a previous response);
- ``receive_by``: the body must arrive by a deadline, which a stop signal shortens to
  ``DRAIN_S`` from the signal; requests whose body is in are served to the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from unicom_cli.utils.console import info

DRAIN_S = 5.0  # after a stop signal, a request still sending its body gets this long to finish it
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass
class StopSignal:
    """Set by the server when it starts to stop; read by the body deadlines."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    at: float | None = None  # loop time of the signal

    def set(self) -> None:
        self.at = asyncio.get_running_loop().time()
        self.event.set()


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``seconds`` after they began (a 408 is written first, one line logged)."""

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._header_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()  # a new request begins (no-op while its deadline already runs)
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in: the body has its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            client = self.client[0] if self.client else "-"
            info(f"{client} request headers not complete within {seconds:g} s (--read-timeout): "
                 "408, connection closed")
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return HeaderDeadline


async def receive_by(receive: Callable, deadline: float, stop: StopSignal) -> dict:
    """``receive()``, unless ``deadline`` (loop time) or ``DRAIN_S`` after a stop comes first:
    then an HTTPException (408, or 503 while stopping) that also closes the connection."""
    loop = asyncio.get_running_loop()
    pending = asyncio.ensure_future(receive())
    stopping = asyncio.ensure_future(stop.event.wait())
    try:
        while not pending.done():
            if stop.at is not None:
                deadline = min(deadline, stop.at + DRAIN_S)
            left = deadline - loop.time()
            if left <= 0:
                raise _late(stop)
            waiting = {pending} if stopping.done() else {pending, stopping}
            await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        return pending.result()
    finally:
        pending.cancel()
        stopping.cancel()


def _late(stop: StopSignal) -> HTTPException:
    close = {"Connection": "close"}
    if stop.at is not None:
        return HTTPException(503, f"the service is stopping and the request body did not arrive within "
                                  f"{DRAIN_S:g} s", headers=close)
    return HTTPException(408, "the request body did not arrive in time (--read-timeout)", headers=close)
