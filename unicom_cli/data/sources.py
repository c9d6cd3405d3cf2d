"""Image sources cut into units of work: folders, path lists, tables and WebDataset tar shards.

Every source is a list of :class:`Unit` in a stable order; a unit yields :class:`Item` (id,
bytes or path, metadata) in a stable order, so that any process can take any unit and two runs
over the same source see the same items in the same batches. A tar shard is one unit and is
read front to back as a stream (``data.tar_stream``), never unpacked to disk; folders and tables are cut into
units of ``shard_size`` images.

WebDataset layout (the convention of the format, as img2dataset writes it): the members of one
sample are adjacent and share a key, the member's path up to the first dot of its base name
(``000/abc.jpg`` and ``000/abc.json`` are sample ``000/abc``, with extensions ``jpg``, ``json``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from unicom_cli.data.images import PathList, list_images
from unicom_cli.data.tar_stream import TarFormatError, TarReader, open_decompressed
from unicom_cli.errors import InputError, UsageError
from unicom_cli.utils.files import human_bytes

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
DEFAULT_SHARD_SIZE = 10_000  # images per output shard for folders, lists and tables
DEFAULT_PATH_COLUMN = "path"
MAX_METADATA_BYTES = 16 << 20  # a sample's json/txt member above this is left out of its metadata
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass
class Item:
    """One row to embed: ``data`` (encoded bytes) or ``path``; ``failure`` says why it cannot be."""

    id: str
    data: bytes | None = None
    path: str | None = None
    meta: dict = field(default_factory=dict)
    failure: str = ""


class Unit:
    """A piece of a source that one process embeds into one output shard."""

    name: str  # the output shard's name (ids of tar samples are ``<name>/<key>``)

    def items(self, want: Callable[[int], bool] = lambda i: True,
              max_bytes: int | None = None) -> Iterator[tuple[int, Item]]:
        """(position in the unit, item) for every position ``want`` accepts, in order; an image
        of more than ``max_bytes`` is a failure item, its bytes never read into memory."""
        raise NotImplementedError


class PathUnit(Unit):
    """Image files: a slice of a folder, a path list or a table (one metadata dict per row)."""

    def __init__(self, name: str, root: Path, paths: Sequence[str], metas: Sequence[dict] | None = None) -> None:
        self.name, self.root, self.paths, self.metas = name, root, paths, metas

    def __len__(self) -> int:
        return len(self.paths)

    def items(self, want: Callable[[int], bool] = lambda i: True,
              max_bytes: int | None = None) -> Iterator[tuple[int, Item]]:
        # max_bytes: load_pixels checks the size of each file itself, before reading it
        for i, rel in enumerate(self.paths):
            if want(i):
                path = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
                yield i, Item(rel, path=path, meta=dict(self.metas[i]) if self.metas else {})


def split_key(member: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``): WebDataset's sample key and extension."""
    folder, base = os.path.split(member)
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarUnit(Unit):
    """One WebDataset tar shard, read front to back as a stream."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, Path(path)

    def items(self, want: Callable[[int], bool] = lambda i: True,
              max_bytes: int | None = None) -> Iterator[tuple[int, Item]]:
        """Samples in member order. A sample without an image member, a key seen before in the
        shard and the unreadable rest of a truncated or corrupt shard come as failure items;
        members of samples ``want`` rejects are skipped unread."""
        seen: set[str] = set()
        reader = _SampleReader(self, want, max_bytes)
        try:
            with open(self.path, "rb") as handle:
                tar = TarReader(open_decompressed(handle))
                for name in tar:
                    yield from reader.add(name, tar, seen)
        except (TarFormatError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            # The sample being read when the stream broke may lack members: it goes with the rest.
            key, position = reader.key or reader.last_key, reader.position
            if want(position):
                where = f"at sample {key!r}" if key else "at its start"
                yield position, Item(f"{self.name}/{key or '<start>'}", failure=(
                    f"the tar shard {self.path} is truncated or corrupt {where} "
                    f"({str(exc) or type(exc).__name__}); the samples before it were kept, "
                    "the rest of the shard cannot be read"))
            return
        yield from reader.flush(seen)


class _SampleReader:
    """Groups adjacent members by key into samples; reads member bytes only for wanted samples."""

    def __init__(self, unit: TarUnit, want: Callable[[int], bool], max_bytes: int | None) -> None:
        self.unit, self.want = unit, want
        self.max_bytes = max_bytes
        self.oversized: dict[str, int] = {}  # extension → size of members left unread for their size
        self.position = 0  # of the next sample
        self.key: str | None = None
        self.last_key: str | None = None
        self.members: dict[str, bytes | None] = {}

    def add(self, name: str, tar: TarReader, seen: set[str]) -> Iterator[tuple[int, Item]]:
        if os.path.basename(name).startswith("."):
            return
        key, ext = split_key(name)
        if key != self.key:
            yield from self.flush(seen)
            self.key = key
        if ext in self.members:
            return  # the same extension twice in one sample: the first one counts
        wanted = self.want(self.position) and (ext in TAR_IMAGE_EXTENSIONS or ext in ("json", "txt"))
        limit = self.max_bytes if ext in TAR_IMAGE_EXTENSIONS else MAX_METADATA_BYTES
        if wanted and limit is not None and tar.size > limit:
            self.oversized[ext], wanted = tar.size, False
        self.members[ext] = tar.read() if wanted else None

    def flush(self, seen: set[str]) -> Iterator[tuple[int, Item]]:
        if self.key is None:
            return
        key, members, position, oversized = self.key, self.members, self.position, self.oversized
        self.key, self.members, self.last_key, self.oversized = None, {}, key, {}
        self.position += 1
        duplicate = key in seen
        seen.add(key)
        if not self.want(position):
            return
        item_id = f"{self.unit.name}/{key}"
        if "\n" in key or "\r" in key:  # cannot be one line of the ids file
            escaped = key.replace("\n", "\\n").replace("\r", "\\r")
            yield position, Item(f"{self.unit.name}/{escaped}", failure="the key contains a line break, "
                                 "which cannot be one line of the ids file")
            return
        if duplicate:
            yield position, Item(item_id, failure=f"duplicate key {key!r} in {self.unit.path} "
                                                  "(its first sample was kept)")
            return
        image = next((ext for ext in TAR_IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            found = ", ".join(sorted(members)) or "none"
            yield position, Item(item_id, failure=f"no image member ({', '.join(TAR_IMAGE_EXTENSIONS)}) "
                                                  f"in the sample; its members: {found}")
            return
        if image in oversized:
            yield position, Item(item_id, failure=f"the {image} member is {human_bytes(oversized[image])}, "
                                 "more than an image within --max-pixels can take; raise --max-pixels "
                                 "to accept it")
            return
        yield position, Item(item_id, data=members[image], meta=_sample_meta(members))


def _sample_meta(members: dict[str, bytes | None]) -> dict:
    """A sample's ``.json`` fields (an object) and ``.txt`` caption, carried into the metadata."""
    meta: dict = {}
    raw = members.get("json")
    if raw:
        try:
            parsed = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            parsed = None
        if isinstance(parsed, dict):
            meta.update(parsed)
    if members.get("txt") is not None:
        meta["txt"] = members["txt"].decode("utf-8", "replace")
    return meta


@dataclass
class Source:
    """What ``embed`` reads: its units, and what ids and paths mean."""

    kind: str  # "folder", "list", "table" or "tar"
    input: str  # as given
    units: list[Unit]
    root: Path | None  # paths in ids are relative to it (None: ids are ``<shard>/<key>``)
    unlisted: list[str] = field(default_factory=list)  # folder files whose names cannot be ids

    def digest(self) -> str:
        """SHA-256 of the unit list: jobs writing into one folder must read the same units."""
        h = hashlib.sha256(self.kind.encode())
        for unit in self.units:
            h.update(unit.name.encode("utf-8", "surrogateescape") + b"\0")
            if isinstance(unit, TarUnit):
                h.update(str(unit.path.resolve()).encode("utf-8", "surrogateescape") + b"\0")
            else:
                h.update(PathList(unit.paths).digest().encode())
        return h.hexdigest()


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00003}.tar`` → the four names, zero padding kept; nested ranges multiply."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    low, high = match.group(1), match.group(2)
    if int(high) < int(low):
        raise UsageError(f"{pattern}: the range {{{low}..{high}}} runs backwards")
    width = len(low) if low.startswith("0") and len(low) > 1 else 0
    out: list[str] = []
    for n in range(int(low), int(high) + 1):
        out.extend(expand_braces(pattern[:match.start()] + str(n).zfill(width) + pattern[match.end():]))
    return out


def is_tar(path: str | Path) -> bool:
    return str(path).lower().endswith((".tar", ".tar.gz", ".tgz"))


def is_collection_source(input: str | Path) -> bool:
    """Inputs that only a folder of feature shards can hold: tar shards (a pattern, a ``.tar``, a
    folder of them) and tables. Folders of images and path lists can go either way."""
    text = str(input)
    if _BRACES.search(text) or is_tar(text) or Path(text).suffix.lower() in TABLE_SUFFIXES:
        return True
    path = Path(text)
    return path.is_dir() and any(is_tar(p.name) for p in path.iterdir())


def open_source(input: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                path_column: str = DEFAULT_PATH_COLUMN) -> Source:
    """The source ``input`` names, checked before any work.

    A brace pattern, a ``.tar`` file, a folder holding ``.tar`` files or a text file listing
    them are WebDataset shards; a ``.parquet``/``.csv``/``.tsv`` file is a table with a path
    column; any other folder or text file is images as :func:`data.images.list_images` reads them.
    Raises InputError naming the first missing shard, or a table without its path column.
    """
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be at least 1")
    text = str(input)
    if _BRACES.search(text) or is_tar(text):
        return tar_source(text, expand_braces(text))
    path = Path(input)
    if path.is_dir():
        tars = sorted(p.name for p in path.iterdir() if is_tar(p.name) and not p.name.startswith("."))
        if tars:
            return tar_source(text, [str(path / name) for name in tars])
    elif path.suffix.lower() in TABLE_SUFFIXES:
        return table_source(path, path_column, shard_size)
    elif path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list", ""):
        listed = _tar_list(path)
        if listed:
            return tar_source(text, listed)
    images = list_images(path)
    units = [PathUnit(f"part-{n:05d}", images.root, images.relative[start:start + shard_size])
             for n, start in enumerate(range(0, len(images), shard_size))]
    kind = "folder" if path.is_dir() else "list"
    return Source(kind, text, units, images.root.resolve(), images.unlisted)


def _tar_list(path: Path) -> list[str]:
    """The shards of a text file listing only tar files (relative to the file's folder); [] otherwise."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError):
        return []
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines or not all(is_tar(line) for line in lines):
        return []
    return [line if os.path.isabs(line) else str(path.parent / line) for line in lines]


def tar_source(given: str, shards: list[str]) -> Source:
    """Tar shards as units, named by their path relative to their common folder, less ``.tar``."""
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1:,} more of {len(shards):,})" if len(missing) > 1 else ""
        what = "not a regular file" if os.path.exists(missing[0]) else "no such tar shard"
        raise InputError(f"{missing[0]}: {what}{more}; fix the pattern or list")
    common = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards])
    names = [re.sub(r"\.(tar|tar\.gz|tgz)$", "", os.path.relpath(os.path.abspath(s), common),
                    flags=re.IGNORECASE).replace(os.sep, "/") for s in shards]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{given}: the shard {twice} is listed twice; each shard once")
    return Source("tar", given, [TarUnit(n, Path(s)) for n, s in zip(names, shards)], None)


def table_source(path: Path, path_column: str, shard_size: int) -> Source:
    """A parquet or CSV/TSV table: ``path_column`` names the images (relative to the table's
    folder), every other column is carried to the output as metadata."""
    rows, columns = read_table(path)
    if path_column not in columns:
        raise InputError(f"{path}: no column {path_column!r} (columns: {', '.join(columns) or 'none'}); "
                         "name the image path column with --path-column")
    if not rows:
        raise InputError(f"{path}: the table has no rows")
    paths = [str(row.pop(path_column) or "") for row in rows]
    units = [PathUnit(f"part-{n:05d}", path.parent, PathList(paths[start:start + shard_size]),
                      rows[start:start + shard_size])
             for n, start in enumerate(range(0, len(paths), shard_size))]
    return Source("table", str(path), units, path.parent.resolve())


def read_table(path: Path) -> tuple[list[dict], list[str]]:
    """(rows as dicts, column names) of a parquet or CSV/TSV file; InputError when unreadable."""
    if not path.is_file():
        raise InputError(f"{path}: no such table")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UsageError("reading a parquet table needs pyarrow: pip install 'unicom-cli[parquet]'") from exc
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable parquet table ({exc})") from exc
        return [_json_safe(row) for row in table.to_pylist()], list(table.column_names)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = [dict(row) for row in reader]
            return rows, list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable {path.suffix[1:]} table ({exc})") from exc


def _json_safe(row: dict) -> dict:
    """Parquet values that JSON cannot hold (dates, bytes, decimals) as text."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
            for k, v in row.items()}
