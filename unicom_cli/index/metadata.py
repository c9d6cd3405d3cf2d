"""The metadata of an index's rows: each source's ``<shard>.meta.jsonl`` (table columns, a tar sample's json/txt).

The index keeps no copy: a row is mapped to its source (index.json ``sources``, in row order)
and read from that source's metadata file, whose line offsets are indexed on first use, so a
hit costs one seek. Sources without a metadata file (folders, bare ``.npy``) give ``{}``.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path

import numpy as np


def metadata_path(features: str | Path) -> Path:
    """``feats/00001.npy`` → ``feats/00001.meta.jsonl`` (what ``embed -o feats/`` writes)."""
    return Path(f"{Path(features).with_suffix('')}.meta.jsonl")


class RowMetadata:
    """Row → metadata dict over the sources of one index."""

    def __init__(self, sources: list[dict]) -> None:
        self.files = [metadata_path(s["features"]) if s.get("features") else None for s in sources]
        self.starts = np.cumsum([0] + [int(s.get("count", 0)) for s in sources]).tolist()
        self._offsets: dict[int, np.ndarray | None] = {}

    @classmethod
    def of(cls, index_meta: dict) -> "RowMetadata | None":
        """The metadata of an index (its ``index.json``), or None when no source has any."""
        sources = index_meta.get("sources") or []
        if sum(int(s.get("count", 0)) for s in sources) != index_meta.get("count"):
            return None  # rows not accounted for by the recorded sources: cannot map them
        found = cls(sources)
        return found if any(f is not None and f.is_file() for f in found.files) else None

    def columns(self) -> list[str]:
        """Metadata keys of the first row of each source that has a metadata file, in first-seen order."""
        keys: dict[str, None] = {}
        for n, path in enumerate(self.files):
            if path is not None and path.is_file() and self.starts[n + 1] > self.starts[n]:
                keys.update(dict.fromkeys(self.get(self.starts[n])))
        return list(keys)

    def get(self, row: int) -> dict:
        """The metadata of index row ``row`` ({} when its source has none or it is unreadable)."""
        source = bisect_right(self.starts, row) - 1
        if not 0 <= source < len(self.files) or self.files[source] is None:
            return {}
        offsets = self._line_offsets(source)
        local = row - self.starts[source]
        if offsets is None or local >= len(offsets) - 1:
            return {}
        with open(self.files[source], "rb") as handle:
            handle.seek(int(offsets[local]))
            line = handle.read(int(offsets[local + 1] - offsets[local]))
        try:
            value = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def _line_offsets(self, source: int) -> np.ndarray | None:
        if source not in self._offsets:
            try:
                data = self.files[source].read_bytes()
            except OSError:
                self._offsets[source] = None
            else:
                ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
                self._offsets[source] = np.concatenate([[0], ends]).astype(np.int64)
        return self._offsets[source]
