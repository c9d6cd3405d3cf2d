"""Embedding output on disk: per-rank memory-mapped parts with resume state, and the atomic final files.

Layout while a run is in progress (``-o feats.npy``)::

    feats.npy.partial/run.json               the arguments the run was started with
    feats.npy.partial/part-00000.npy         rank 0's contiguous shard, every row (failed rows zero)
    feats.npy.partial/part-00000.state.json  rows completed, bytes of failures written
    feats.npy.partial/part-00000.failures.tsv  position<TAB>reason per bad file

Rank 0 then streams the parts into ``feats.npy`` (good rows only), ``feats.ids.txt``,
``feats.failures.txt`` and ``feats.json``, each moved into place with ``os.replace`` (the JSON
last: its presence marks a finished output), and removes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from unicom_cli.data.ids import IDS_TEXT, embed_siblings, write_ids
from unicom_cli.errors import InputError, OutputExists, UsageError
from unicom_cli.utils.files import (
    check_writable_folder,
    disk_errors,
    ensure_free_space,
    preallocate,
    write_text_atomic,
)

DTYPES = ("float32", "float16")
FORMAT_VERSION = 1
STREAM_ROWS = 16384  # rows copied per step when assembling: bounded memory


@dataclass(frozen=True)
class OutputFiles:
    """Every path that belongs to one ``-o`` output."""

    feats: Path
    ids: Path
    meta: Path
    failures: Path
    workdir: Path

    @classmethod
    def for_output(cls, output: Path) -> "OutputFiles":
        """``feats.npy`` → feats.npy, feats.ids.txt, feats.json, feats.failures.txt, feats.npy.partial/."""
        output = Path(output)
        if output.is_dir():
            output = output / "feats.npy"
        if output.suffix != ".npy":
            output = output.with_name(output.name + ".npy")
        ids, meta = embed_siblings(output)
        return cls(output, ids, meta, Path(f"{output.with_suffix('')}.failures.txt"), Path(f"{output}.partial"))

    def finals(self) -> tuple[Path, ...]:
        return (self.feats, self.ids, self.meta, self.failures)

    def check_writable(self) -> None:
        """Create the output folder if missing; fail before any work when it cannot be written."""
        check_writable_folder(self.feats.parent)

    def plan(self, overwrite: bool) -> str:
        """'fresh', 'resume' or 'overwrite'; raises OutputExists for a finished output.

        Read-only, so every rank can call it before rank 0 changes anything.
        """
        if overwrite:
            return "overwrite"
        if self.workdir.is_dir() and (self.workdir / "run.json").is_file():
            return "resume"
        existing = [path for path in self.finals() if path.exists()]
        if existing:  # name the file that is there, which need not be the .npy
            raise OutputExists(f"{existing[0]} already exists; add --overwrite to replace it "
                               "(or choose another -o)")
        return "fresh"

    def start(self, plan: str, fingerprint: dict) -> None:
        """Rank 0: create (or clear) the work folder and record the run's arguments."""
        if plan in ("fresh", "overwrite") and self.workdir.exists():
            shutil.rmtree(self.workdir)
        if plan == "overwrite":
            for path in self.finals():
                path.unlink(missing_ok=True)
        if plan != "resume":
            self.workdir.mkdir()
            write_text_atomic(self.workdir / "run.json", json.dumps(fingerprint, indent=1))

    def check_resume(self, fingerprint: dict) -> None:
        """Raise a UsageError naming every argument that differs from the interrupted run."""
        try:
            recorded = json.loads((self.workdir / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.workdir}/run.json: unreadable ({exc}); add --overwrite "
                             "to start over") from exc
        diffs = [f"{key}: was {recorded.get(key)!r}, now {value!r}"
                 for key, value in fingerprint.items() if recorded.get(key) != value]
        if recorded.get("precision") not in (None, fingerprint.get("precision")):
            # Mixing fp32 and bf16 rows in one matrix is never wanted; say which flag resumes.
            raise UsageError(f"{self.feats}: the unfinished run in {self.workdir} embedded in "
                             f"{recorded.get('precision')}, this one would use "
                             f"{fingerprint['precision']}. Rerun with --precision "
                             f"{recorded.get('precision')} to resume it, or add --overwrite to "
                             "start over")
        if diffs:
            raise UsageError(f"{self.feats}: an unfinished run with other arguments is in "
                             f"{self.workdir} ({'; '.join(diffs)}). Rerun with the same "
                             "arguments to resume it, or add --overwrite to start over")


class PartWriter:
    """One rank's shard as a memory-mapped .npy, written batch by batch and resumable.

    ``rows_done`` only moves forward at :meth:`checkpoint`, which first flushes the rows (msync)
    and the failures, then atomically replaces the state file: after a kill at any moment the
    state never claims rows that are not on disk.
    """

    def __init__(self, workdir: Path, rank: int, rows: int, dim: int, dtype: str,
                 checkpoint_every_s: float = 5.0) -> None:
        self.name = workdir / f"part-{rank:05d}"
        self.npy = Path(f"{self.name}.npy")
        self.state_path = Path(f"{self.name}.state.json")
        self.failures_path = Path(f"{self.name}.failures.tsv")
        self.rows, self.dim, self.dtype = rows, dim, np.dtype(dtype)
        # Tests ask for a checkpoint after every batch to kill the process in between.
        self.checkpoint_every_s = float(os.environ.get("UNICOM_TEST_CHECKPOINT_S", checkpoint_every_s))
        state = self._read_state()
        if state is None:
            self.rows_done, failures_bytes = 0, 0
            ensure_free_space(workdir, rows * dim * self.dtype.itemsize, "the embeddings")
            with disk_errors(workdir):
                self.array = np.lib.format.open_memmap(self.npy, mode="w+", dtype=self.dtype,
                                                       shape=(rows, dim))
        else:
            self.rows_done, failures_bytes = state["rows_done"], state["failures_bytes"]
            self.array = np.lib.format.open_memmap(self.npy, mode="r+")
            if self.array.shape != (rows, dim) or self.array.dtype != self.dtype:
                raise InputError(f"{self.npy}: shape {self.array.shape} {self.array.dtype} does "
                                 f"not match ({rows}, {dim}) {self.dtype}; add --overwrite")
        preallocate(self.npy, workdir)  # a full disk now is a message, not a SIGBUS mid-run
        self._failures = open(self.failures_path, "ab")
        self._failures.truncate(failures_bytes)  # drop lines written after the last checkpoint
        self._failures.seek(failures_bytes)
        self._pending = self.rows_done
        self._last = time.monotonic()

    def _read_state(self) -> dict | None:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cannot happen with atomic writes, but never trust a file
            return None
        if not self.npy.is_file():
            return None
        return state

    def write(self, start: int, rows: np.ndarray, failures: list[tuple[int, str]]) -> None:
        """Store ``rows`` at shard rows ``start…``; ``failures`` are (dataset position, reason)."""
        self.array[start:start + len(rows)] = rows
        if failures:
            text = "".join(f"{pos}\t{_one_line(reason)}\n" for pos, reason in failures)
            self._failures.write(text.encode("utf-8", "surrogateescape"))
        self._pending = start + len(rows)
        if time.monotonic() - self._last >= self.checkpoint_every_s or self._pending == self.rows:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make everything written so far durable, then record it as done."""
        done = self._pending
        self.array.flush()
        self._failures.flush()
        os.fsync(self._failures.fileno())
        state = {"rows_done": done, "failures_bytes": self._failures.tell(), "rows": self.rows}
        write_text_atomic(self.state_path, json.dumps(state))
        self.rows_done = done
        self._last = time.monotonic()

    def close(self) -> None:
        self.checkpoint()
        self._failures.close()
        del self.array


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_failures(workdir: Path, world: int) -> dict[int, str]:
    """Dataset position → reason, from every rank's failures file (up to its checkpoint)."""
    found: dict[int, str] = {}
    for rank in range(world):
        name = workdir / f"part-{rank:05d}"
        state = json.loads(Path(f"{name}.state.json").read_text())
        with open(f"{name}.failures.tsv", "rb") as handle:
            data = handle.read(state["failures_bytes"]).decode("utf-8", "surrogateescape")
        for line in data.splitlines():
            pos, reason = line.split("\t", 1)
            found[int(pos)] = reason
    return found


def rows_done_total(workdir: Path, world: int) -> int:
    """Rows already recorded as done by every rank's part (0 for a fresh run)."""
    done = 0
    for rank in range(world):
        try:
            done += json.loads((workdir / f"part-{rank:05d}.state.json").read_text())["rows_done"]
        except (OSError, ValueError, KeyError):
            pass
    return done


def parts_complete(workdir: Path, world: int) -> bool:
    """True when every rank's part records all its rows as done."""
    for rank in range(world):
        try:
            state = json.loads((workdir / f"part-{rank:05d}.state.json").read_text())
        except (OSError, ValueError):
            return False
        if state["rows_done"] != state["rows"]:
            return False
    return True


def _iter_good_rows(workdir: Path, world: int, failed: np.ndarray) -> Iterator[np.ndarray]:
    """Chunks of rows in dataset order, ``failed`` positions dropped; STREAM_ROWS at a time."""
    offset = 0
    for rank in range(world):
        part = np.load(workdir / f"part-{rank:05d}.npy", mmap_mode="r")
        for start in range(0, len(part), STREAM_ROWS):
            chunk = part[start:start + STREAM_ROWS]
            positions = np.arange(offset + start, offset + start + len(chunk))
            yield np.asarray(chunk[~np.isin(positions, failed)])
        offset += len(part)
        del part


def assemble(files: OutputFiles, ids: Sequence[str], world: int, dim: int, dtype: str,
             meta: dict, unlisted: Sequence[tuple[str, str]] = ()) -> tuple[int, dict[int, str]]:
    """Rank 0: stream every part into the final files and move them into place.

    Returns (rows written, failures by position). Memory stays bounded by STREAM_ROWS rows
    plus the failure list; the parts are removed afterwards. ``unlisted`` are (name, reason)
    of files that could not be embedded at all (names with line breaks): failures too.
    """
    with disk_errors(files.feats.parent):
        return _assemble(files, ids, world, dim, dtype, meta, unlisted)


def _assemble(files: OutputFiles, ids: Sequence[str], world: int, dim: int, dtype: str,
              meta: dict, unlisted: Sequence[tuple[str, str]]) -> tuple[int, dict[int, str]]:
    failed = read_failures(files.workdir, world)
    count = len(ids) - len(failed)
    tmp = {path: files.workdir / f"final-{path.name}" for path in files.finals()}
    ensure_free_space(files.workdir, count * dim * np.dtype(dtype).itemsize, "the embeddings")
    array = np.lib.format.open_memmap(tmp[files.feats], mode="w+", dtype=np.dtype(dtype),
                                      shape=(count, dim))
    preallocate(tmp[files.feats], files.workdir)
    row = 0
    for chunk in _iter_good_rows(files.workdir, world,
                                                 np.array(sorted(failed), dtype=np.int64)):
        array[row:row + len(chunk)] = chunk
        row += len(chunk)
    if row != count:
        raise InputError(f"{files.workdir}: the parts hold {row} good rows, expected {count}; "
                         "add --overwrite to start over")
    array.flush()
    del array
    # Ids are file names, written as data.ids does (a name that is not UTF-8 as its own bytes).
    with open(tmp[files.ids], "w", **IDS_TEXT) as handle:
        write_ids(handle, (ids[pos] for pos in range(len(ids)) if pos not in failed))
    with open(tmp[files.failures], "w", **IDS_TEXT) as handle:
        for pos in sorted(failed):
            handle.write(f"{ids[pos]}\t{failed[pos]}\n")
        for name, reason in unlisted:
            handle.write(f"{name}\t{reason}\n")
    tmp[files.meta].write_text(json.dumps({**meta, "count": count,
                                           "failures": len(failed) + len(unlisted)},
                                          indent=2) + "\n")
    for path in (files.failures, files.ids, files.feats, files.meta):
        with open(tmp[path], "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp[path], path)
    shutil.rmtree(files.workdir)
    return count, failed

