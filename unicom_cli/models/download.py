"""Fetch published weights into the cache: streaming, resumable, SHA-256 verified, mirrorable.

This module owns the cache, the addresses (release, mirror, Drive) and the public API; the
transfer itself is ``models.resumable`` (HTTP Range, retries, hashing as the bytes arrive) and
Google Drive's confirm flow is ``models.gdrive``.

Cache layout, per model: ``<file>`` (complete and verified), ``<file>.part`` (an interrupted
download, resumed next time), ``<file>.sha256`` (the digest we verified or computed, in
``sha256sum`` format) and ``<file>.lock`` (so that several processes never write one file).
"""

from __future__ import annotations

import http.client
import http.cookiejar
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

from unicom_cli.errors import ChecksumMismatch, DownloadError, UsageError, WeightsError
from unicom_cli.models import resumable
from unicom_cli.models.gdrive import GDRIVE_URL, resolve_drive
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
from unicom_cli.utils.console import info, warn

GDRIVE_MIRROR_FOLDER = "gldv2"  # where a mirror keeps the Drive-only files: <mirror>/gldv2/<file>

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


# --------------------------------------------------------------------------- downloading

def _settings(retries: int | None, backoff: float | None, progress: bool,
              gdrive_url: str | None, stall_budget: float | None = None) -> resumable.Settings:
    env = os.environ.get
    if stall_budget is None:
        try:
            stall_budget = float(env("UNICOM_DOWNLOAD_STALL_BUDGET_S", "180"))
        except ValueError:
            raise UsageError(f"$UNICOM_DOWNLOAD_STALL_BUDGET_S={env('UNICOM_DOWNLOAD_STALL_BUDGET_S')!r}: "
                             "give seconds, such as 600") from None
    if not stall_budget > 0:
        raise UsageError(f"stall budget {stall_budget:g} s: must be above 0 (--stall-budget, "
                         "$UNICOM_DOWNLOAD_STALL_BUDGET_S)")
    return resumable.Settings(
        retries=int(env("UNICOM_DOWNLOAD_RETRIES", "4")) if retries is None else retries,
        backoff=float(env("UNICOM_DOWNLOAD_BACKOFF", "1.0")) if backoff is None else backoff,
        timeout=float(env("UNICOM_DOWNLOAD_TIMEOUT", "30")),
        stall=float(env("UNICOM_DOWNLOAD_STALL_S", "60")),
        stall_budget=stall_budget,
        progress=progress,
        gdrive_url=gdrive_url or env("UNICOM_GDRIVE_URL") or GDRIVE_URL,
    )


def _download(spec: ModelSpec, url: str, part: Path, settings: resumable.Settings) -> tuple[str, bool]:
    """Stream ``url`` into ``part`` (resuming it), with retries; return (sha256, resumed)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    if _is_drive(url, spec):
        url = resumable.retrying(lambda: resolve_drive(opener, url, jar, settings), url, spec.name, settings)
    resumed = False
    # fp32 files are twice the fp16 estimate; anything far beyond that is not the weights
    known = {"total": None, "expected": spec.fp16_file_size,
             "cap": 2 * spec.fp16_file_size + resumable.SIZE_MARGIN}

    def once() -> str:
        nonlocal resumed
        digest, was_resumed = resumable.attempt(opener, url, part, spec.name, settings, known)
        resumed = resumed or was_resumed
        return digest

    return resumable.retrying(once, url, spec.name, settings), resumed


# --------------------------------------------------------------------------- public API

def fetch(spec: ModelSpec, cache: str | Path | None = None, mirror: str | None = None,
          sha256: str | None = None, progress: bool = True, *, retries: int | None = None,
          backoff: float | None = None, gdrive_url: str | None = None,
          stall_budget: float | None = None) -> FetchResult:
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
    settings = _settings(retries, backoff, progress, gdrive_url, stall_budget)
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
    specs = [get_spec(name) for name in (available_models("unicom") if all_models else names)]
    for spec in specs:
        if not spec.filename and spec.family == "unicom":
            raise UsageError(f"'{spec.name}' comes from {spec.source} and has no published "
                             f"weights to download")
    return specs


def download_models(names: list[str], all_models: bool = False, cache: str | Path | None = None,
                    mirror: str | None = None, sha256: str | None = None,
                    progress: bool = True, stall_budget: float | None = None) -> list[FetchResult]:
    """`unicom download`: fetch each model, going on with the rest when one fails."""
    specs = _specs(names, all_models)
    if sha256 and len(specs) > 1:
        raise UsageError("--sha256 pins one file: name exactly one model")
    normalise_sha256(sha256)
    results = []
    for spec in specs:
        try:
            results.append(fetch(spec, cache, mirror, sha256, progress, stall_budget=stall_budget)
                           if spec.family == "unicom" else _fetch_hub(spec, cache, mirror))
        except WeightsError as exc:
            results.append(FetchResult(spec.name, None, None, "failed", "none", str(exc)))
    return results


def _fetch_hub(spec: ModelSpec, cache: str | Path | None, mirror: str | None) -> FetchResult:
    """An MLCD model into huggingface_hub's cache (its resume and revisions; hub = LFS SHA-256)."""
    from unicom_cli.models.families.hf import _weights_digest
    from unicom_cli.models.families.hub_files import cached_weights, fetch as fetch_hub

    was_cached = cached_weights(spec.repo, cache) is not None
    files = fetch_hub(spec.repo, spec.revision, cache=cache, mirror=mirror)
    digest, path = _weights_digest(files.folder)
    return FetchResult(spec.name, path, digest, "cached" if was_cached else "downloaded", "hub")


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
        if spec.family != "unicom":  # huggingface_hub's cache: blobs named by their SHA-256
            from unicom_cli.models.families.hub_files import cached_weights

            found = cached_weights(spec.repo, cache)
            results.append(FetchResult(spec.name, found, found.resolve().name if found else None,
                                       "ok" if found else "missing", "hub"))
            continue
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
