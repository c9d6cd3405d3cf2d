"""Resumable HTTP downloads into a ``.part`` file: Range, retries with back-off, stall and size
limits, SHA-256 computed as the bytes arrive. Only the standard library (urllib)."""

from __future__ import annotations

import hashlib
import http.client
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from unicom_cli.errors import DownloadError
from unicom_cli.utils.console import info, progress_bar, warn

CHUNK = 1 << 20
_WAYS_OUT = ("If this machine is offline or the server is blocked, point --mirror URL (or "
             "$UNICOM_MIRROR) at a copy of the release files, pass --weights FILE with a copy "
             "downloaded elsewhere, or put that copy in the weights cache ($UNICOM_HOME or "
             "--cache-dir; default ~/.cache/unicom).")

DRIVE_PAGE = ("{url}: Google Drive answered with a web page instead of the file (its download "
               "quota may be exceeded, or the file is no longer shared). Try later, or download it "
               "in a browser and pass --weights FILE.")

T = TypeVar("T")


STALL_MIN_BYTES = 64 << 10  # fewer bytes than this in a stall window is a stalled transfer
SIZE_MARGIN = 16 << 20  # a body without Content-Length may exceed the expected size by this much


@dataclass
class Settings:
    retries: int
    backoff: float  # seconds before the first retry; doubles each time
    timeout: float  # socket timeout per read
    progress: bool
    gdrive_url: str
    stall: float = 60.0  # seconds in which at least STALL_MIN_BYTES must arrive
    stall_budget: float = 180.0  # stalled seconds allowed over all attempts together

    @property
    def budget(self) -> int:
        """Failed attempts allowed in all, cuts that made progress included: a server that cuts
        every response is given up on instead of being asked forever."""
        return 4 * (self.retries + 1)


class Retry(Exception):
    """A transient failure (5xx, reset, cut, timeout): try again after a pause."""

    def __init__(self, cause: BaseException, progressed: bool = False, stalled: float = 0.0) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.progressed = progressed
        self.stalled = stalled  # seconds this attempt waited for bytes that did not come


def _request(url: str, offset: int = 0) -> urllib.request.Request:
    from unicom_cli._version import __version__

    headers = {"User-Agent": f"unicom-cli/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def open_url(opener: urllib.request.OpenerDirector, url: str, offset: int, timeout: float):
    """Open ``url``; transient failures raise Retry, permanent ones DownloadError."""
    try:
        return opener.open(_request(url, offset), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code >= 500 or exc.code in (408, 429):
            raise Retry(exc) from exc
        if exc.code == 416 and offset:
            raise  # the caller decides: the .part may already be complete
        hint = ("a mirror must hold <tag>/<file> as the GitHub releases do (Drive-only models: "
                "gldv2/<file>)" if exc.code == 404 else "check the address")
        raise DownloadError(f"{url}: {_describe(exc)}; {hint}. {_WAYS_OUT}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # no DNS: offline, retrying will not help
            raise DownloadError(f"cannot reach {url} ({exc.reason}). {_WAYS_OUT}") from exc
        if isinstance(exc.reason, (FileNotFoundError, PermissionError)):  # file:// mirror
            raise DownloadError(f"{url}: {exc.reason}. {_WAYS_OUT}") from exc
        raise Retry(exc, stalled=timeout if isinstance(exc.reason, TimeoutError) else 0.0) from exc
    except (http.client.HTTPException, OSError) as exc:
        raise Retry(exc, stalled=timeout if isinstance(exc, TimeoutError) else 0.0) from exc


def retrying(action: Callable[[], T], url: str, label: str, settings: Settings) -> T:
    """Run ``action`` until it succeeds, pausing (doubling) between transient failures.

    Attempts that made progress (received bytes) reset the failure count: a flaky link that
    keeps cutting the connection still finishes, thanks to resuming. Every failure, cuts
    included, also counts against an overall budget (``settings.budget``), and the seconds spent
    waiting on stalled transfers add up against ``settings.stall_budget``: a trickle makes
    "progress" on every attempt, and 20 stall windows of 60 s were 20 minutes.
    """
    failures = attempts = 0
    stalled = 0.0
    while True:
        try:
            return action()
        except Retry as exc:
            failures = 1 if exc.progressed else failures + 1
            attempts += 1
            stalled += exc.stalled
            if exc.stalled and stalled >= settings.stall_budget:
                raise DownloadError(f"cannot download {url}: stalled for {stalled:.1f} s in all over "
                                    f"{attempts} attempts (budget {settings.stall_budget:g} s; raise it with "
                                    f"`unicom download --stall-budget S` or $UNICOM_DOWNLOAD_STALL_BUDGET_S). "
                                    f"{_WAYS_OUT}") from exc.cause
            if failures > settings.retries or attempts >= settings.budget:
                raise DownloadError(f"cannot download {url} ({_describe(exc.cause)}; "
                                    f"{attempts} failed attempts). {_WAYS_OUT}") from exc.cause
            delay = settings.backoff * 2 ** (failures - 1)
            warn(f"{label}: {_describe(exc.cause)}; retrying in {delay:.1f} s "
                 f"({failures}/{settings.retries})")
            time.sleep(delay)


def _hash_file_into(path: Path, hasher) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)


def _full_length(content_range: str | None) -> int | None:
    """``bytes 100-199/1000`` or ``bytes */1000`` → 1000; None when absent or unknown (``/*``)."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _start_over(part: Path, why: str) -> Retry:
    part.unlink(missing_ok=True)
    return Retry(DownloadError(why))


def attempt(opener, url: str, part: Path, label: str, settings: Settings,  # noqa: C901 (one transfer's checks in order)
             known: dict) -> tuple[str, bool]:
    """One try: continue ``part`` from its current size; return (sha256 of part, resumed).

    ``known["total"]`` keeps the file's length once a server has told it (Content-Length of a
    full answer, Content-Range of a partial one): a part is final only at exactly that length.
    ``known["cap"]`` bounds a body sent without a length.
    """
    offset = part.stat().st_size if part.exists() else 0
    hasher = hashlib.sha256()
    if offset:
        _hash_file_into(part, hasher)  # resuming: the digest must cover the bytes we already have
    try:
        response = open_url(opener, url, offset, settings.timeout)
    except urllib.error.HTTPError as exc:  # 416 on a resume: nothing beyond our part?
        total = _full_length(exc.headers.get("Content-Range") if exc.headers else None)
        total = total if total is not None else known.get("total")
        if total is not None and total == offset:
            return hasher.hexdigest(), True
        # A 416 that does not say the part is the whole file: never take a part as final.
        raise _start_over(part, f"HTTP 416 to a resume at byte {offset:,} (file length "
                                f"{'unknown' if total is None else f'{total:,}'}); starting over") from exc
    with response:
        status = getattr(response, "status", None) or 200  # file:// answers have no status
        if response.headers.get_content_type() == "text/html":
            if "google" in urllib.parse.urlsplit(url).netloc or "confirm=" in url:
                raise DownloadError(DRIVE_PAGE.format(url=url))
            raise DownloadError(f"{url}: the server answered with a web page instead of the "
                                f"weights file. {_WAYS_OUT}")
        if offset and status != 206:  # Range ignored: the body is the whole file
            info(f"{label}: the server ignored the resume request; starting over")
            offset, hasher = 0, hashlib.sha256()
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            # a part we cannot line up with: start clean on the next try
            raise _start_over(part, f"unexpected Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        announced = _full_length(response.headers.get("Content-Range")) if offset else total
        if announced is not None:
            if known.get("total") not in (None, announced):  # the file changed on the server
                raise _start_over(part, f"the file's length changed from {known['total']:,} to "
                                        f"{announced:,} bytes; starting over")
            known["total"] = announced
        cap = known["cap"] if total is None else total  # a length-less body is bounded too
        read = getattr(response, "read1", None) or response.read
        received = 0
        window_start, window_bytes = time.monotonic(), 0
        try:
            handle = open(part, "ab" if offset else "wb")
        except OSError as exc:
            raise DownloadError(f"{part}: cannot write ({exc}); choose another --cache-dir") from exc
        with handle, progress_bar(total, label, unit="bytes", enabled=settings.progress,
                                  completed=offset) as bar:
            while True:
                try:
                    chunk = read(CHUNK)
                except (http.client.HTTPException, OSError) as exc:
                    waited = settings.timeout if isinstance(exc, TimeoutError) else 0.0
                    raise Retry(exc, progressed=received > 0, stalled=waited) from exc
                if not chunk:
                    break
                window_bytes += len(chunk)
                waited = time.monotonic() - window_start
                if waited >= settings.stall:
                    if window_bytes < STALL_MIN_BYTES:  # a trickle: the per-read timeout never fires
                        raise Retry(TimeoutError(
                            f"stalled: {window_bytes:,} bytes in {waited:.1f} s"),
                            progressed=received > 0, stalled=waited)
                    window_start, window_bytes = time.monotonic(), 0
                if offset + received + len(chunk) > cap:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{url}: sent more than {cap:,} bytes without announcing "
                                        f"a length (the weights are ~{known['expected']:,}); not "
                                        f"this model's weights. {_WAYS_OUT}")
                try:
                    handle.write(chunk)
                except OSError as exc:
                    raise DownloadError(f"{part}: cannot write ({exc}); free some space or "
                                        f"choose another --cache-dir") from exc
                hasher.update(chunk)
                received += len(chunk)
                bar.advance(len(chunk))
    end, expected_end = offset + received, total if total is not None else known.get("total")
    if expected_end is not None and end < expected_end:  # the server closed the connection early
        cut = http.client.IncompleteRead(b"", expected_end - end)
        raise Retry(cut, progressed=received > 0)
    if expected_end is not None and end > expected_end:
        raise _start_over(part, f"received {end:,} bytes of a {expected_end:,}-byte file")
    return hasher.hexdigest(), offset > 0
