"""A folder of feature shards: one features file + ids (+ metadata) per input unit, resumable, and its manifest.

Layout of ``-o feats/``::

    feats/run.json                    the model record and source every job writing here must match
    feats/<unit>.npy                  good rows of one input unit (a tar shard, or N images)
    feats/<unit>.ids.txt              their ids (``<shard>/<key>`` for tar samples, paths otherwise)
    feats/<unit>.meta.jsonl           one JSON object per row: the table's columns, the sample's json/txt
    feats/<unit>.failures.txt         id<TAB>reason of each item that could not be embedded
    feats/<unit>.json                 the unit's done-record, written last: its presence marks it finished
    feats/<unit>.partial/             an unfinished unit: appended rows, ids, metadata, failures + state.json
    feats/<unit>.lock                 the process embedding it (pid, host), made with O_EXCL
    feats/manifest.json               every finished unit, rewritten atomically from the done-records

A unit is a ``.npy`` with the siblings of a single ``unicom embed`` output, so the index reads
each as it reads one of those.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from unicom_cli.errors import InputError, UsageError
from unicom_cli.utils.files import (
    atomic_path,
    check_writable_folder,
    disk_errors,
    write_json_atomic,
    write_text_atomic,
)

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# Fields of run.json that may differ between the jobs writing into one folder (the shards
# themselves are compared by source_sha256, whatever path spelling a job was given).
PER_JOB_FIELDS = ("world_size", "part", "date", "threads_per_process", "source")  # source: as typed


class UnitFiles:
    """Every path of one unit in the folder (names may hold ``/``: units of nested tar folders)."""

    def __init__(self, folder: Path, name: str) -> None:
        base = folder / name
        self.name = name
        self.npy = Path(f"{base}.npy")
        self.ids = Path(f"{base}.ids.txt")
        self.meta = Path(f"{base}.meta.jsonl")
        self.failures = Path(f"{base}.failures.txt")
        self.record = Path(f"{base}.json")
        self.partial = Path(f"{base}.partial")
        self.lock = Path(f"{base}.lock")

    def finals(self) -> tuple[Path, ...]:
        return (self.npy, self.ids, self.meta, self.failures, self.record)

    def done(self) -> bool:
        return self.record.is_file()


class ShardFolder:
    """The ``-o`` folder of a sharded embed run."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def unit(self, name: str) -> UnitFiles:
        return UnitFiles(self.root, name)

    def check_writable(self) -> None:
        check_writable_folder(self.root)

    def claim_run(self, record: dict, overwrite: bool, names: Sequence[str]) -> None:
        """Record this run in ``run.json``, or check that it matches the run recorded there.

        The first job creates the file (hard link of a complete temp file: it appears whole or
        not at all, and only once); the others compare. ``overwrite`` removes the earlier
        run's shards first.
        """
        run = self.root / RUN_FILE
        if overwrite:
            self._clear(names)
        if run.is_file():
            self._compare(run, record)
            return
        tmp = self.root / f".{RUN_FILE}.tmp-{os.getpid()}"
        write_text_atomic(tmp, json.dumps(record, indent=1) + "\n")
        try:
            os.link(tmp, run)
        except FileExistsError:  # another job created it meanwhile
            self._compare(run, record)
        finally:
            tmp.unlink(missing_ok=True)

    def _compare(self, run: Path, record: dict) -> None:
        try:
            recorded = json.loads(run.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{run}: unreadable ({exc}); add --overwrite to start the folder over") from exc
        diffs = [f"{key}: was {recorded.get(key)!r}, now {value!r}" for key, value in record.items()
                 if key not in PER_JOB_FIELDS and recorded.get(key) != value]
        if diffs:
            raise UsageError(f"{self.root}: holds shards of another run ({'; '.join(diffs)}). Use the "
                             "same model, options and input, another -o, or --overwrite to start over")

    def _clear(self, names: Sequence[str]) -> None:
        for name in names:
            files = self.unit(name)
            for path in files.finals():
                path.unlink(missing_ok=True)
            shutil.rmtree(files.partial, ignore_errors=True)
        for name in (RUN_FILE, MANIFEST_FILE):
            (self.root / name).unlink(missing_ok=True)

    @contextmanager
    def manifest_lock(self) -> Iterator[None]:
        """Serialise manifest rewrites of concurrent jobs (blocking; the section is short)."""
        import fcntl

        with open(self.root / ".manifest.lock", "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def write_manifest(self, names: Sequence[str], source: dict) -> dict:
        """Rewrite ``manifest.json`` from the done-records of ``names``, under the manifest lock:
        whichever job writes last has seen every unit finished before it took the lock."""
        with self.manifest_lock():
            shards, model = [], None
            for name in names:
                files = self.unit(name)
                record = read_record(files.record)
                if record is None:
                    continue
                model = model or {k: v for k, v in record.items() if k not in _UNIT_FIELDS}
                shards.append({"name": name, "features": _rel(files.npy, self.root),
                               "ids": _rel(files.ids, self.root),
                               "metadata": _rel(files.meta, self.root) if record.get("metadata") else None,
                               "failures_file": _rel(files.failures, self.root),
                               "count": record["count"], "failures": record["failures"]})
            manifest = {
                "format": MANIFEST_FORMAT, "kind": "unicom-feature-shards",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": source, "units": len(names), "shards_done": len(shards),
                "complete": len(shards) == len(names),
                "count": sum(s["count"] for s in shards), "failures": sum(s["failures"] for s in shards),
                "dim": model.get("dim") if model else None, "dtype": model.get("dtype") if model else None,
                "model": model, "shards": shards,
            }
            write_json_atomic(self.root / MANIFEST_FILE, manifest)
            return manifest


# The per-unit fields of a done-record (the rest is the model record, the same for every unit).
_UNIT_FIELDS = ("shard", "count", "failures", "items", "ids", "metadata", "failures_file", "date")


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def read_record(path: Path) -> dict | None:
    """A unit's done-record, or None when the unit is not finished."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # written atomically: this is damage, not a kill
        raise InputError(f"{path}: unreadable done-record ({exc}); delete it to embed that shard again") from exc


class UnitWriter:
    """One unit's rows, ids, metadata and failures, appended batch by batch and resumable.

    ``state.json`` only moves forward at :meth:`checkpoint`, after every file is flushed to
    disk; a restarted run truncates the files to the recorded sizes and skips the recorded
    items, which always end on a batch boundary: the same batches, the same bytes.
    """

    FILES = ("rows.bin", "ids.txt", "meta.jsonl", "failures.tsv")

    def __init__(self, files: UnitFiles, dim: int, dtype: str, checkpoint_every_s: float = 5.0) -> None:
        self.files, self.dim, self.dtype = files, dim, np.dtype(dtype)
        self.checkpoint_every_s = float(os.environ.get("UNICOM_TEST_CHECKPOINT_S", checkpoint_every_s))
        files.partial.parent.mkdir(parents=True, exist_ok=True)
        with disk_errors(files.partial.parent):
            files.partial.mkdir(exist_ok=True)
            state = self._read_state()
            self.items = state.get("items", 0)
            self.handles = {}
            for name in self.FILES:
                handle = open(files.partial / name, "ab")
                handle.truncate(state.get(name, 0))  # drop what was written after the last checkpoint
                handle.seek(state.get(name, 0))
                self.handles[name] = handle
        self.resumed = self.items
        self._last = time.monotonic()

    def _read_state(self) -> dict:
        return _read_state(self.files, self.dim, self.dtype.name)

    @staticmethod
    def resume_point(files: UnitFiles, dim: int, dtype: str) -> int:
        """Items of the unit already written by an interrupted run (0 for a fresh unit)."""
        return int(_read_state(files, dim, np.dtype(dtype).name).get("items", 0))

    def write(self, rows: np.ndarray, ids: list[str], metas: list[dict], reasons: list[str]) -> None:
        """Append one batch: good rows with their ids and metadata, and the failures."""
        good = [i for i, r in enumerate(reasons) if not r]
        with disk_errors(self.files.partial):
            self.handles["rows.bin"].write(np.ascontiguousarray(rows[good], dtype=self.dtype).tobytes())
            self.handles["ids.txt"].write("".join(f"{ids[i]}\n" for i in good).encode("utf-8", "surrogateescape"))
            self.handles["meta.jsonl"].write("".join(json.dumps(metas[i], ensure_ascii=False) + "\n"
                                                     for i in good).encode("utf-8", "surrogateescape"))
            self.handles["failures.tsv"].write("".join(f"{ids[i]}\t{_one_line(r)}\n" for i, r in enumerate(reasons)
                                                       if r).encode("utf-8", "surrogateescape"))
        self.items += len(reasons)
        if time.monotonic() - self._last >= self.checkpoint_every_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make everything written durable, then record it as done."""
        state = {"items": self.items, "dim": self.dim, "dtype": self.dtype.name}
        with disk_errors(self.files.partial):
            for name, handle in self.handles.items():
                handle.flush()
                os.fsync(handle.fileno())
                state[name] = handle.tell()
            write_text_atomic(self.files.partial / "state.json", json.dumps(state))
        self._last = time.monotonic()

    def finish(self, record: dict, with_metadata: bool) -> dict:
        """Move the unit's files into place (the done-record last) and remove the partial folder."""
        self.checkpoint()
        for handle in self.handles.values():
            handle.close()
        part, files = self.files.partial, self.files
        rows = (part / "rows.bin").stat().st_size // (self.dim * self.dtype.itemsize)
        with atomic_path(files.npy) as tmp:
            _write_npy(tmp, part / "rows.bin", rows, self.dim, self.dtype)
        for name, final in (("ids.txt", files.ids), ("failures.tsv", files.failures)):
            with atomic_path(final) as tmp:
                shutil.copyfile(part / name, tmp)
        if with_metadata:
            with atomic_path(files.meta) as tmp:
                shutil.copyfile(part / "meta.jsonl", tmp)
        failures = _count_lines(part / "failures.tsv")
        done = {**record, "shard": files.name, "count": int(rows), "failures": failures,
                "items": self.items, "ids": files.ids.name,
                "metadata": files.meta.name if with_metadata else None,
                "failures_file": files.failures.name,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json_atomic(files.record, done)
        shutil.rmtree(part, ignore_errors=True)
        return done

    def close(self) -> None:
        """Stop without finishing (interrupted): keep everything up to the last checkpoint."""
        for handle in self.handles.values():
            handle.close()


def _read_state(files: UnitFiles, dim: int, dtype: str) -> dict:
    """An unfinished unit's checkpoint ({} when there is none, or it is of other rows)."""
    try:
        state = json.loads((files.partial / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("dim") != dim or state.get("dtype") != dtype:
        return {}
    return state


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def _write_npy(path: Path, raw: Path, rows: int, dim: int, dtype: np.dtype) -> None:
    """A .npy header for (rows, dim) followed by the raw rows, streamed (bounded memory)."""
    with open(path, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": (rows, dim)})
        shutil.copyfileobj(src, out, 16 << 20)


def failures_of(files: UnitFiles) -> list[tuple[str, str]]:
    """(id, reason) of a finished unit's failures."""
    try:
        text = files.failures.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return []
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if "\t" in line]  # type: ignore[misc]
