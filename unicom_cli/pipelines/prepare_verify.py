"""`unicom prepare-gldv2 --verify`: read every record of a finished output back and check it
against train.idx, train.lst and labels.csv."""

from __future__ import annotations

import contextlib
import csv
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from unicom_cli.errors import InputError
from unicom_cli.pipelines.prepare import (
    PARTIAL_DIR,
    PREFIX,
    _batches,
    _check_batch,
    _ordered_map,
    default_workers,
)
from unicom_cli.utils.console import progress_bar
@dataclass
class VerifyResult:
    """Outcome of :func:`verify_output`; ``problems`` holds the first ``MAX_PROBLEMS`` messages."""

    out: Path
    records: int
    classes: int
    problems: list[str]
    problem_count: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


MAX_PROBLEMS = 50


def _read_lst(path: Path, problems: list[str]) -> list[tuple[int, float, str]]:
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            try:
                if len(fields) != 3:
                    raise ValueError
                entries.append((int(fields[0]), float(fields[1]), fields[2]))
            except ValueError:
                problems.append(f"{path} line {lineno}: expected 'index<TAB>label<TAB>path', got {line[:60]!r}")
    return entries


def verify_output(out: Path, workers: int | None = None, progress: bool = True) -> VerifyResult:  # noqa: C901 (every check of a record, in order)
    """Read every record of OUT/train.rec back and check it against train.idx, train.lst and labels.csv.

    Checks: record framing, count, ids (header == .idx key == .lst index == position), .idx
    offsets, labels (header == .lst), labels.csv counts, and that every image decodes.
    """
    from unicom_cli.data.recordio import RecordIOError, iter_records, read_index, unpack_header

    t0 = time.perf_counter()
    out = Path(out)
    rec, idx, lst = (out / f"{PREFIX}.{ext}" for ext in ("rec", "idx", "lst"))
    for path in (rec, idx, lst):
        if not path.is_file():
            raise InputError(f"{path} not found: is {out} the output folder of `unicom prepare-gldv2`?")
    problems: list[str] = []
    count = 0

    def problem(message: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(message)

    if (out / PARTIAL_DIR).exists():
        problem(f"{out / PARTIAL_DIR} exists: a run was interrupted; rerun the same command to finish it")
    lst_problems: list[str] = []
    entries = _read_lst(lst, lst_problems)
    for message in lst_problems:
        problem(message)
    try:
        keys, offsets = read_index(idx)
    except RecordIOError as exc:
        problem(str(exc))
        keys, offsets = [], []

    def scanned():
        """(position, payload) of each record; framing errors become problems."""
        n = 0
        try:
            for offset, payload in iter_records(rec):
                if n < len(offsets) and offsets[n] != offset:
                    problem(f"record {n}: at byte {offset} but {idx.name} says {offsets[n]}")
                header, image = unpack_header(payload)
                if header.flag != 0:
                    problem(f"record {n}: multi-label header (flag {header.flag}); expected one label")
                elif n < len(entries):
                    index, label, rel = entries[n]
                    if header.label != label:
                        problem(f"record {n}: label {header.label:g} but {lst.name} says {label:g} for {rel}")
                    if not header.id == index == n or (n < len(keys) and keys[n] != n):
                        problem(f"record {n}: id {header.id}, {idx.name} key "
                                f"{keys[n] if n < len(keys) else '-'}, {lst.name} index {index}; expected {n}")
                n += 1
                yield n - 1, bytes(image)
        except RecordIOError as exc:
            problem(f"{exc} (after {n:,} good records)")
        for what, length in ((idx.name, len(keys)), (lst.name, len(entries))):
            if length != n:
                problem(f"{rec.name} holds {n:,} records but {what} lists {length:,}")

    workers = default_workers() if workers is None else workers
    records = 0
    with progress_bar(len(entries) or None, "verifying", enabled=progress) as bar:
        images = (image for _, image in scanned())
        with contextlib.closing(_ordered_map(_check_batch, _batches(images, 32), workers)) as checked:
            for records, failure in enumerate(checked, 1):  # closed (threads stopped) on any error
                if failure is not None:
                    problem(f"record {records - 1}: image does not decode ({failure})")
                bar.advance()
    labels_csv = out / "labels.csv"
    per_label = Counter(int(label) for _, label, _ in entries)
    classes = len(per_label)
    if labels_csv.is_file():
        with labels_csv.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows or rows[0] != ["landmark_id", "label", "count"]:
            problem(f"{labels_csv}: expected the header 'landmark_id,label,count'")
        else:
            classes = len(rows) - 1
            for lineno, row in enumerate(rows[1:], 2):
                if len(row) != 3 or row[1] != str(lineno - 2) or int(row[2]) != per_label.get(lineno - 2, 0):
                    problem(f"{labels_csv} line {lineno}: {','.join(row)!r} disagrees with {lst.name} "
                            f"(label {lineno - 2} has {per_label.get(lineno - 2, 0)} images)")
            if per_label and max(per_label) >= classes:
                problem(f"{lst.name} uses label {max(per_label)} but {labels_csv.name} lists {classes} labels")
    else:
        problem(f"{labels_csv} not found")
    return VerifyResult(out=out, records=records, classes=classes, problems=problems,
                        problem_count=count, seconds=time.perf_counter() - t0)
