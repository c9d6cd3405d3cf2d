"""Writing an index folder: a build folder beside the output, the files flushed to disk, then one
atomic swap into place (a reader sees the old index or the new one, never half of one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from unicom_cli.data.ids import IDS_TEXT, write_ids
from unicom_cli.errors import InputError, OutputExists
from unicom_cli.index.integrity import FILES_KEY, record_digests
from unicom_cli.index.manifest import FORMAT
from unicom_cli.index.store import IDS_FILE, INDEX_FILE, IVFDATA_FILE, META_FILE, _faiss
from unicom_cli.utils.files import write_json_atomic


def temp_folder(out: Path) -> Path:
    """A fresh build folder beside ``out`` (same file system, so the final rename is atomic);
    leftovers of killed runs for the same output are removed first."""
    out = Path(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def check_output(out: Path, overwrite: bool) -> None:
    """Before any work: the parent exists and is writable, and a finished index is not replaced
    without ``overwrite``."""
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: the output folder does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"{out.parent}: cannot write there; pick another -o")
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} already exists; add --overwrite to replace it, or "
                           f"`unicom index --add FEATS {out}` to add to it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not an index folder; choose another -o")


def write_folder(tmp: Path, index, ids: Sequence[str], meta: dict) -> None:
    """Write the index, its ids and index.json (with the digests of the others) into the build
    folder ``tmp``, each flushed to disk."""
    faiss = _faiss()
    faiss.write_index(index, str(tmp / INDEX_FILE))
    with open(tmp / IDS_FILE, "w", **IDS_TEXT) as handle:
        write_ids(handle, ids)
    data_files = [name for name in (INDEX_FILE, IDS_FILE, IVFDATA_FILE) if (tmp / name).exists()]
    for name in data_files:
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    files = record_digests(tmp, data_files)  # checked on every load (index.integrity)
    write_json_atomic(tmp / META_FILE, {"format": FORMAT, **meta, FILES_KEY: files})


def publish(tmp: Path, out: Path) -> None:
    """Move the finished build folder to ``out`` atomically. An existing index (replaced with
    --overwrite, or the one --add extended) is swapped with it in one step where the system
    can (Linux renameat2), so ``out`` always holds a complete index; the old one is removed."""
    out = Path(out)
    if out.exists():
        if not _exchange(tmp, out):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0
