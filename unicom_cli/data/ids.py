"""Id lists (``feats.ids.txt``, an index's ``ids.txt``): one file name per line, the one encoding.

Ids are file names, and a file name need not be UTF-8: such a name is written as its own bytes
(``surrogateescape``), so that reading it back the same way gives a path that opens the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from unicom_cli.errors import InputError
from unicom_cli.utils.files import open_regular

# How every id list is opened, for reading and for writing.
IDS_TEXT = {"encoding": "utf-8", "errors": "surrogateescape", "newline": "\n"}


def embed_siblings(npy: str | Path) -> tuple[Path, Path]:
    """``feats.npy`` → (``feats.ids.txt``, ``feats.json``): the files `unicom embed` writes beside it."""
    stem = Path(npy).with_suffix("")
    return Path(f"{stem}.ids.txt"), Path(f"{stem}.json")


def read_ids(path: str | Path) -> list[str]:
    """The ids of a list, in row order (blank lines skipped). Raises OSError as ``open`` does, and
    InputError for a path that is not a regular file (a FIFO, a device, a folder) or that holds a
    carriage return: ids never do (file names with line breaks are not listed), so one means the
    file was rewritten with CRLF line ends, and every id would silently name no file."""
    with open_regular(path, what="a list of ids, one file name per line", **IDS_TEXT) as handle:
        text = handle.read()
    if "\r" in text:
        line = text.count("\n", 0, text.index("\r")) + 1
        raise InputError(f"{path}: line {line} holds a carriage return (CRLF line ends?); ids end in "
                         "\\n only: restore the file that unicom wrote")
    return [line for line in text.split("\n") if line.strip()]


def write_ids(handle, ids: Iterable[str]) -> None:
    """Write ``ids`` to a handle opened with :data:`IDS_TEXT`, one per line."""
    for name in ids:
        handle.write(name + "\n")
