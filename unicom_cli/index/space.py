"""Disk room for a build: what it will write, checked before the work, and a full (or read-only)
disk met while writing turned into the one-line DiskError that ``embed`` gives.

faiss reports a failed write as a RuntimeError whose text ends in the system's reason ("… (No
space left on device)"); Python writes raise OSError. Both become a DiskError naming the output's
folder (where the user frees space), and the build's temp folder is then removed by its caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unicom_cli.utils.files import DISK_ERRNOS, disk_error, ensure_free_space

ID_BYTES = 8  # an inverted list stores an int64 id beside each code


def bytes_per_row(factory_index) -> int:
    """Bytes one vector takes in the written index (its code, its id in an inverted list, its
    graph links in an HNSW index), from an untrained index of the factory."""
    import faiss

    ivf = faiss.try_extract_index_ivf(factory_index)
    if ivf is not None:
        return int(ivf.code_size) + ID_BYTES
    inner = faiss.downcast_index(factory_index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        links = int(inner.hnsw.nb_neighbors(0)) * 4 * 5 // 4  # level 0 and about 1/4 more above
        return bytes_per_row(inner.storage) + links + 8  # + its level and offset
    return int(inner.sa_code_size()) if hasattr(inner, "sa_code_size") else inner.d * 4


def check_room(out: Path, factory_index, rows: int, added: int, ids_bytes: int, on_disk: bool,
               shards: bool) -> None:
    """Refuse a build, before any work, that its disk cannot hold: the index (all ``rows``), its
    ids and index.json; with ``on_disk`` also the part files of the ``added`` rows that exist
    beside ``index.ivfdata`` until it is merged; with ``shards`` the shards of the other ranks."""
    per_row = bytes_per_row(factory_index)
    need = rows * per_row + ids_bytes
    if on_disk or shards:
        need += added * per_row
    ensure_free_space(Path(out).parent, need, f"the index {Path(out).name}")


@contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """A full, read-only or forbidden disk met by any write of the build (faiss or Python) is one
    DiskError naming the output's folder."""
    folder = Path(out).parent
    try:
        yield
    except OSError as exc:
        converted = disk_error(OSError(exc.errno, exc.strerror), folder) if exc.errno in DISK_ERRNOS else None
        if converted is None:
            raise
        raise converted from exc
    except RuntimeError as exc:  # faiss: "write error in …: 2097107 != 5120000 (No space left on device)"
        text = str(exc)
        code = next((code for code in DISK_ERRNOS if os.strerror(code) in text), None)
        if code is None or "writ" not in text:
            raise
        raise disk_error(OSError(code, os.strerror(code)), folder) from exc
