"""GLDv2's training list format: train_clean.csv rows (landmark id, image ids) and image paths.

The preparation job that turns them into RecordIO (``unicom prepare-gldv2``) is
:mod:`unicom_cli.pipelines.prepare`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from unicom_cli.errors import InputError
from unicom_cli.utils.console import warn


@dataclass(frozen=True)
class Landmark:
    """One row of train_clean.csv."""

    landmark_id: str
    image_ids: list[str]


_IMAGE_ID = re.compile(r"[0-9A-Za-z]{3,}")


def image_relpath(image_id: str) -> str:
    """GLDv2's on-disk path of an image id, relative to the images folder."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def read_train_csv(path: Path) -> list[Landmark]:
    """Rows of a ``landmark_id,images`` CSV; a malformed row raises InputError naming its line."""
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected GLDv2's train_clean.csv)")
    rows: list[Landmark] = []
    # A landmark may list tens of thousands of images: far beyond csv's default 128 KiB field.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            _read_rows(path, csv.reader(f), rows)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start:,}: {exc.reason}); save the "
                         "CSV as UTF-8") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no landmarks listed")
    return _drop_duplicate_images(path, rows)


def _drop_duplicate_images(path: Path, rows: list[Landmark]) -> list[Landmark]:
    """An image listed under two landmarks would be stored twice under two labels: keep its first
    listing (the first landmark in the CSV wins), drop the others, and say so."""
    seen: dict[str, str] = {}
    kept, dropped = [], []
    for row in rows:
        ids = []
        for image_id in row.image_ids:
            if image_id in seen:
                dropped.append((image_id, seen[image_id], row.landmark_id))
            else:
                seen[image_id] = row.landmark_id
                ids.append(image_id)
        if ids:
            kept.append(Landmark(row.landmark_id, ids))
    if dropped:
        image_id, first, other = dropped[0]
        warn(f"{path}: {len(dropped):,} image(s) listed more than once (e.g. {image_id} under "
             f"landmarks {first} and {other}); each is kept under the first landmark that lists it")
    return kept


def _read_rows(path: Path, reader, rows: list[Landmark]) -> None:
    """The landmark rows after the header; a malformed row raises InputError naming its line."""
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["landmark_id", "images"]:
        raise InputError(f"{path} line 1: expected the header 'landmark_id,images', got {','.join(header or [])!r}")
    for row in reader:
        line = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip():
            raise InputError(f"{path} line {line}: expected 'landmark_id,image_id image_id ...', "
                             f"got {','.join(row)[:80]!r}")
        ids = row[1].split()
        if not ids:
            raise InputError(f"{path} line {line}: landmark {row[0].strip()} lists no images")
        bad = next((i for i in ids if not _IMAGE_ID.fullmatch(i)), None)
        if bad is not None:  # ids become paths: nothing but letters and digits
            raise InputError(f"{path} line {line}: bad image id {bad!r} (ids are hexadecimal strings)")
        rows.append(Landmark(row[0].strip(), ids))
