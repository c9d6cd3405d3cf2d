"""serve.files on its own: which rows' files may be sent, and the paths clients see."""

from __future__ import annotations

import os
from pathlib import Path

from unicom_cli.serve.files import CollectionFiles


class FakeIndex:
    """What CollectionFiles reads of an Index: its root, ids and index.json."""

    def __init__(self, root: Path, ids: list[str], added: list[Path] = ()) -> None:
        self.root = root
        self.ids = ids
        self.meta = {"root": str(root), "sources": [{"root": str(root)}] + [{"root": str(a)} for a in added]}


def test_only_files_inside_the_collection_are_served(tmp_path):
    root, added, outside = tmp_path / "photos", tmp_path / "more", tmp_path / "outside"
    for folder in (root / "sub", added, outside):
        folder.mkdir(parents=True)
    for path in (root / "a.jpg", root / "sub" / "b.jpg", added / "c.jpg", outside / "secret.jpg"):
        path.write_bytes(b"x")
    os.symlink(outside / "secret.jpg", root / "out-link.jpg")
    os.symlink("sub/b.jpg", root / "in-link.jpg")
    os.symlink(outside, root / "out-folder")
    ids = ["a.jpg", "sub/b.jpg", "sub/../a.jpg", "in-link.jpg", "../more/c.jpg",  # served
           "/etc/passwd", "../../../../etc/hostname", "../outside/secret.jpg", "out-link.jpg",
           "out-folder/secret.jpg", str(outside / "secret.jpg")]  # refused
    files = CollectionFiles(FakeIndex(root, ids, added=[added]))
    assert files.refused == set(range(5, len(ids)))
    assert [files.shown_path(row) for row in range(len(ids))] == [
        "a.jpg", "sub/b.jpg", "a.jpg", "in-link.jpg", "more/c.jpg"] + [None] * 6
    assert files.file_of(3) == (root / "sub" / "b.jpg").resolve()
    assert all(files.file_of(row) is None for row in range(5, len(ids)))
    # A file swapped for a symlink out after the start is refused when asked for.
    (root / "a.jpg").unlink()
    os.symlink(outside / "secret.jpg", root / "a.jpg")
    assert files.file_of(0) is None


def test_an_index_without_a_root_serves_no_file(tmp_path):
    index = FakeIndex(tmp_path, ["0", "1"])
    index.root, index.meta = None, {"root": None}
    files = CollectionFiles(index)
    assert files.refused == {0, 1} and files.file_of(0) is None and files.shown_path(1) is None
