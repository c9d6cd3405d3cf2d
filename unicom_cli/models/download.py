"""Fetch published weights into the cache: streaming, resumable, SHA-256 verified, mirrorable.

Only the standard library (urllib): resuming with HTTP Range while hashing as the bytes arrive
is the part that matters here, and neither pooch nor requests gives it for free.

Cache layout, per model: ``<file>`` (complete and verified), ``<file>.part`` (an interrupted
download, resumed next time), ``<file>.sha256`` (the digest we verified or computed, in
``sha256sum`` format) and ``<file>.lock`` (so that several processes never write one file).
"""

from __future__ import annotations

import hashlib
import http.client
import http.cookiejar
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from unicom_cli.errors import ChecksumMismatch, DownloadError, UsageError, WeightsError
from unicom_cli.models.registry import GITHUB_RELEASES, ModelSpec, available_models, get_spec
from unicom_cli.models.weights import (
    SHA256_HEX,
    cache_dir,
    read_sidecar,
    file_digest,
    sha256_file,
    sidecar,
    write_sidecar,
)
from unicom_cli.utils.console import info, progress_bar, warn

GDRIVE_URL = "https://drive.google.com"
GDRIVE_MIRROR_FOLDER = "gldv2"  # where a mirror keeps the Drive-only files: <mirror>/gldv2/<file>
CHUNK = 1 << 20
_WAYS_OUT = ("If this machine is offline or the server is blocked, point --mirror URL (or "
             "$UNICOM_MIRROR) at a copy of the release files, pass --weights FILE with a copy "
             "downloaded elsewhere, or put that copy in the weights cache ($UNICOM_HOME or "
             "--cache-dir; default ~/.cache/unicom).")

_DRIVE_PAGE = ("{url}: Google Drive answered with a web page instead of the file (its download "
               "quota may be exceeded, or the file is no longer shared). Try later, or download it "
               "in a browser and pass --weights FILE.")

T = TypeVar("T")


@dataclass
class FetchResult:
    """What happened to one model's weights (a row of `unicom download`)."""

    name: str
    path: Path | None
    sha256: str | None
    status: str  # downloaded | cached | failed | ok | corrupt | missing | partial | unverified
    checksum: str  # published | pinned | computed | recorded | none
    error: str | None = None


STALL_MIN_BYTES = 64 << 10  # fewer bytes than this in a stall window is a stalled transfer
SIZE_MARGIN = 16 << 20  # a body without Content-Length may exceed the expected size by this much


@dataclass
class _Settings:
    retries: int
    backoff: float  # seconds before the first retry; doubles each time
    timeout: float  # socket timeout per read
    progress: bool
    gdrive_url: str
    stall: float = 60.0  # seconds in which at least STALL_MIN_BYTES must arrive

    @property
    def budget(self) -> int:
        """Failed attempts allowed in all, cuts that made progress included: a server that cuts
        every response is given up on instead of being asked forever."""
        return 4 * (self.retries + 1)


class _Retry(Exception):
    """A transient failure (5xx, reset, cut, timeout): try again after a pause."""

    def __init__(self, cause: BaseException, progressed: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.progressed = progressed


# --------------------------------------------------------------------------- addresses

def normalise_sha256(value: str | None) -> str | None:
    """Lower-case a ``--sha256`` pin and check it is 64 hex digits."""
    if value is None:
        return None
    value = value.strip().lower()
    if not SHA256_HEX.match(value):
        raise UsageError(f"--sha256 {value!r}: expected 64 hexadecimal digits")
    return value


def _mirror_base(mirror: str | None) -> str | None:
    mirror = mirror or os.environ.get("UNICOM_MIRROR") or None
    if mirror is None:
        return None
    if "://" not in mirror:  # a local folder (air-gapped sites): serve it as file:// URLs
        return Path(mirror).expanduser().resolve().as_uri()
    return mirror.rstrip("/")


def source_url(spec: ModelSpec, mirror: str | None = None, gdrive_url: str | None = None) -> str:
    """Where ``spec``'s weights are fetched from, after applying a mirror.

    A mirror (``--mirror`` or ``$UNICOM_MIRROR``, a URL or a local folder) replaces the GitHub
    releases prefix, so it holds ``<tag>/<file>``; Drive-only models are looked up at
    ``<mirror>/gldv2/<file>``.
    """
    base = _mirror_base(mirror)
    if spec.url:
        if base and spec.url.startswith(GITHUB_RELEASES):
            return base + spec.url[len(GITHUB_RELEASES):]
        return spec.url
    if spec.gdrive_id:
        if base:
            return f"{base}/{GDRIVE_MIRROR_FOLDER}/{spec.filename}"
        drive = (gdrive_url or os.environ.get("UNICOM_GDRIVE_URL") or GDRIVE_URL).rstrip("/")
        return f"{drive}/uc?export=download&id={spec.gdrive_id}"
    raise UsageError(f"model '{spec.name}' has no published weights ({spec.source}); "
                     f"pass --weights FILE")


def _is_drive(url: str, spec: ModelSpec) -> bool:
    return bool(spec.gdrive_id) and f"id={spec.gdrive_id}" in url


# --------------------------------------------------------------------------- cache files

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<file>.lock`` so that concurrent processes (ranks) download a file only once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent downloads are then the user's call
        yield
        return
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:  # a read-only shared cache: nothing will be written there anyway
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info(f"waiting for another process that is downloading {path.name}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- HTTP

def _settings(retries: int | None, backoff: float | None, progress: bool,
              gdrive_url: str | None) -> _Settings:
    env = os.environ.get
    return _Settings(
        retries=int(env("UNICOM_DOWNLOAD_RETRIES", "4")) if retries is None else retries,
        backoff=float(env("UNICOM_DOWNLOAD_BACKOFF", "1.0")) if backoff is None else backoff,
        timeout=float(env("UNICOM_DOWNLOAD_TIMEOUT", "30")),
        stall=float(env("UNICOM_DOWNLOAD_STALL_S", "60")),
        progress=progress,
        gdrive_url=gdrive_url or env("UNICOM_GDRIVE_URL") or GDRIVE_URL,
    )


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


def _open(opener: urllib.request.OpenerDirector, url: str, offset: int, timeout: float):
    """Open ``url``; transient failures raise _Retry, permanent ones DownloadError."""
    try:
        return opener.open(_request(url, offset), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(exc) from exc
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
        raise _Retry(exc) from exc
    except (http.client.HTTPException, OSError) as exc:
        raise _Retry(exc) from exc


def _retrying(action: Callable[[], T], url: str, label: str, settings: _Settings) -> T:
    """Run ``action`` until it succeeds, pausing (doubling) between transient failures.

    Attempts that made progress (received bytes) reset the failure count: a flaky link that
    keeps cutting the connection still finishes, thanks to resuming. Every failure, cuts
    included, also counts against an overall budget (``settings.budget``).
    """
    failures = attempts = 0
    while True:
        try:
            return action()
        except _Retry as exc:
            failures = 1 if exc.progressed else failures + 1
            attempts += 1
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


def _start_over(part: Path, why: str) -> _Retry:
    part.unlink(missing_ok=True)
    return _Retry(DownloadError(why))


def _attempt(opener, url: str, part: Path, label: str, settings: _Settings,  # noqa: C901 (split planned: issue 16)
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
        response = _open(opener, url, offset, settings.timeout)
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
                raise DownloadError(_DRIVE_PAGE.format(url=url))
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
                    raise _Retry(exc, progressed=received > 0) from exc
                if not chunk:
                    break
                window_bytes += len(chunk)
                if time.monotonic() - window_start >= settings.stall:
                    if window_bytes < STALL_MIN_BYTES:  # a trickle: the per-read timeout never fires
                        raise _Retry(TimeoutError(
                            f"stalled: {window_bytes:,} bytes in {settings.stall:.0f} s"),
                            progressed=received > 0)
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
        raise _Retry(cut, progressed=received > 0)
    if expected_end is not None and end > expected_end:
        raise _start_over(part, f"received {end:,} bytes of a {expected_end:,}-byte file")
    return hasher.hexdigest(), offset > 0


class _DriveForm(HTMLParser):
    """Collects the download form (action + hidden inputs) and confirm links of a Drive page."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.confirm_link: str | None = None
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and (self.action is None or values.get("id") == "download-form"):
            self.action, self.fields, self._in_form = values.get("action", ""), {}, True
        elif tag == "input" and self._in_form and values.get("name"):
            self.fields[values["name"]] = values.get("value", "")
        elif tag == "a" and "confirm=" in values.get("href", "") and self.confirm_link is None:
            self.confirm_link = values["href"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _resolve_drive(opener, url: str, jar: http.cookiejar.CookieJar, settings: _Settings) -> str:
    """Follow Google Drive's flow to the address that serves the file itself.

    Small files come straight back. Large ones get an HTML "can't scan for viruses" page whose
    form (hidden ``id``/``confirm``/``uuid`` fields) points at the usercontent download address;
    older pages carry a ``confirm=`` link or a ``download_warning`` cookie instead.
    """
    response = _open(opener, url, 0, settings.timeout)
    with response:
        if response.headers.get_content_type() != "text/html":
            return url  # the file itself: download it with the same address (and Range)
        page_url = response.geturl()
        try:
            page = response.read(4 << 20).decode("utf-8", "replace")
        except (http.client.HTTPException, OSError) as exc:
            raise _Retry(exc) from exc
    form = _DriveForm()
    form.feed(page)
    if form.action is not None and ("confirm" in form.fields or "id" in form.fields):
        action = urllib.parse.urljoin(page_url, form.action or "")
        return f"{action}?{urllib.parse.urlencode(form.fields)}"
    if form.confirm_link:
        return urllib.parse.urljoin(page_url, form.confirm_link)
    for cookie in jar:
        if cookie.name.startswith("download_warning"):
            return f"{url}&confirm={urllib.parse.quote(cookie.value)}"
    if "confirm=" not in url:  # a page we do not know: Drive accepts confirm=t for large files
        return f"{url}&confirm=t"
    raise DownloadError(_DRIVE_PAGE.format(url=url))


def _download(spec: ModelSpec, url: str, part: Path, settings: _Settings) -> tuple[str, bool]:
    """Stream ``url`` into ``part`` (resuming it), with retries; return (sha256, resumed)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    if _is_drive(url, spec):
        url = _retrying(lambda: _resolve_drive(opener, url, jar, settings), url, spec.name, settings)
    resumed = False
    # fp32 files are twice the fp16 estimate; anything far beyond that is not the weights
    known = {"total": None, "expected": spec.fp16_file_size,
             "cap": 2 * spec.fp16_file_size + SIZE_MARGIN}

    def attempt() -> str:
        nonlocal resumed
        digest, was_resumed = _attempt(opener, url, part, spec.name, settings, known)
        resumed = resumed or was_resumed
        return digest

    return _retrying(attempt, url, spec.name, settings), resumed


# --------------------------------------------------------------------------- public API

def fetch(spec: ModelSpec, cache: str | Path | None = None, mirror: str | None = None,
          sha256: str | None = None, progress: bool = True, *, retries: int | None = None,
          backoff: float | None = None, gdrive_url: str | None = None) -> FetchResult:
    """Make sure ``spec``'s weights are in the cache and verified; download them if needed.

    The expected digest is ``sha256`` (a pin) or the published one. A cached file that does
    not match it (or, for unpublished checksums, the digest recorded at download) is downloaded
    again. Unpublished checksums are computed, reported and recorded in ``<file>.sha256``.
    """
    if not spec.filename:
        raise UsageError(f"model '{spec.name}' has no published weights ({spec.source}); "
                         f"pass --weights FILE")
    pinned = normalise_sha256(sha256)
    expected = pinned or spec.sha256
    checksum = "pinned" if pinned else ("published" if spec.sha256 else "computed")
    settings = _settings(retries, backoff, progress, gdrive_url)
    root = cache_dir(cache)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{root}: cannot create the weights cache ({exc}); set "
                            f"$UNICOM_HOME or pass --cache-dir") from exc
    path = root / spec.filename
    part = path.with_name(path.name + ".part")
    with _locked(path):
        if path.is_file():
            digest = file_digest(path)  # a fresh record is trusted; --verify re-hashes
            reference = expected or read_sidecar(path)
            if reference is None or digest == reference:
                write_sidecar(path, digest)
                return FetchResult(spec.name, path, digest, "cached",
                                   checksum if expected or reference is None else "recorded")
            warn(f"{path}: SHA-256 {digest[:12]}… does not match the expected {reference[:12]}… "
                 f"(corrupt or replaced); downloading it again")
            path.unlink()
        url = source_url(spec, mirror, settings.gdrive_url)
        info(f"downloading {spec.name} from {url}")
        digest, resumed = _download(spec, url, part, settings)
        if expected and digest != expected and resumed:
            warn(f"{spec.name}: the resumed download does not verify; starting over")
            part.unlink(missing_ok=True)
            digest, _ = _download(spec, url, part, settings)
        if expected and digest != expected:
            received = part.stat().st_size if part.exists() else 0
            part.unlink(missing_ok=True)
            advice = ("the mirror holds another file than the published one: replace it there"
                      if _mirror_base(mirror) else
                      "Retry, or use --mirror if this server serves a different file")
            raise ChecksumMismatch(
                f"{url}: the {_size(received)} received (SHA-256 {digest[:12]}…) do not match "
                f"the expected {expected[:12]}… ({checksum}; the published file is about "
                f"{_size(spec.fp16_file_size)}); the download was deleted and nothing was cached. "
                f"{advice[0].upper()}{advice[1:]}")
        os.replace(part, path)
        write_sidecar(path, digest)
    if not expected:
        info(f"{spec.name}: no published checksum; computed SHA-256 {digest} "
             f"(recorded in {sidecar(path).name}; pin it with --sha256)")
    return FetchResult(spec.name, path, digest, "downloaded", checksum)


def _size(n: int) -> str:
    """Bytes in a human unit: 5.0 KB, 351.7 MB."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fetch_weights(spec: ModelSpec, cache: str | Path | None = None, mirror: str | None = None,
                  sha256: str | None = None, progress: bool = True, **kwargs) -> Path:
    """Path of ``spec``'s verified weights in the cache, downloading them on first use."""
    return fetch(spec, cache, mirror, sha256, progress, **kwargs).path  # type: ignore[return-value]


def _specs(names: list[str], all_models: bool) -> list[ModelSpec]:
    if all_models and names:
        raise UsageError("pass model names or --all, not both")
    if not names and not all_models:
        raise UsageError("name at least one model (see `unicom models`) or pass --all")
    specs = [get_spec(name) for name in (available_models() if all_models else names)]
    for spec in specs:
        if not spec.filename:
            raise UsageError(f"'{spec.name}' comes from {spec.source} and has no published "
                             f"weights to download")
    return specs


def download_models(names: list[str], all_models: bool = False, cache: str | Path | None = None,
                    mirror: str | None = None, sha256: str | None = None,
                    progress: bool = True) -> list[FetchResult]:
    """`unicom download`: fetch each model, going on with the rest when one fails."""
    specs = _specs(names, all_models)
    if sha256 and len(specs) > 1:
        raise UsageError("--sha256 pins one file: name exactly one model")
    normalise_sha256(sha256)
    results = []
    for spec in specs:
        try:
            results.append(fetch(spec, cache, mirror, sha256, progress))
        except WeightsError as exc:
            results.append(FetchResult(spec.name, None, None, "failed", "none", str(exc)))
    return results


def verify_cache(names: list[str], cache: str | Path | None = None,
                 sha256: str | None = None) -> list[FetchResult]:
    """`unicom download --verify`: re-hash cached files against the published/pinned/recorded digest.

    No names means every registered model. Statuses: ok, corrupt, missing, partial (an
    interrupted ``.part``), unverified (no digest to compare with: the computed one is shown).
    """
    specs = _specs(names, all_models=not names)
    pinned = normalise_sha256(sha256)
    if pinned and len(specs) > 1:
        raise UsageError("--sha256 pins one file: name exactly one model")
    root = cache_dir(cache)
    results = []
    for spec in specs:
        path = root / spec.filename  # type: ignore[operator]
        part = path.with_name(path.name + ".part")
        if not path.is_file():
            status = "partial" if part.is_file() else "missing"
            results.append(FetchResult(spec.name, path, None, status, "none"))
            continue
        recorded = read_sidecar(path)
        reference, checksum = ((pinned, "pinned") if pinned else (spec.sha256, "published")
                               if spec.sha256 else (recorded, "recorded"))
        digest = sha256_file(path)
        if reference is None:
            results.append(FetchResult(spec.name, path, digest, "unverified", "none"))
            continue
        ok = digest == reference
        if ok:
            write_sidecar(path, digest)
        results.append(FetchResult(spec.name, path, digest, "ok" if ok else "corrupt", checksum,
                                   None if ok else f"expected {reference}"))
    return results
