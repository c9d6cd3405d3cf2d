"""Which indexed files the service may send: only those inside the collection's own folders.

An index folder is a shared artifact and its ids become file paths here, so an id such as
``/etc/passwd`` or ``../../etc/hostname``, or a symlink inside the collection that leads out of
it, must never become a download. The collection is the folder the index was built from
(``root`` in index.json) and the folder of every source added to it with ``--add``; a row is
served when its file, with every symlink resolved, lies inside one of them. Clients see paths
relative to that folder, never the server's layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def collection_roots(meta: dict) -> list[str]:
    """The folders the index's ids were recorded under (absolute, as recorded at build time)."""
    sources = meta.get("sources") if isinstance(meta.get("sources"), list) else []
    roots = [meta.get("root")] + [s.get("root") for s in sources if isinstance(s, dict)]
    found: list[str] = []
    for root in roots:
        if isinstance(root, str) and os.path.isabs(root) and root not in found:
            found.append(os.path.normpath(root))
    return found


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


class CollectionFiles:
    """The file of each row, when it may be served, and the path a client is shown for it."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self._base = os.path.normpath(str(index.root)) if index.root is not None else ""
        self._prefix = self._base.rstrip("/") + "/"
        self.roots = collection_roots(index.meta) if index.root is not None else []
        self.real_roots = [os.path.realpath(root) for root in self.roots]
        self.refused = self._scan()

    def _lexical(self, row: int) -> str:
        rel = self.index.ids[row]
        if rel[:1] not in ("/", ".") and "/." not in rel and "//" not in rel and not rel.endswith("/"):
            return self._prefix + rel  # already normal (most ids): normpath is the slow part of a scan
        return os.path.normpath(os.path.join(self._base, rel))

    def _contained(self, real: str) -> bool:
        return any(_inside(real, root) for root in self.real_roots)

    def _scan(self) -> set[int]:
        """Rows whose file lies outside the collection. Each folder of the ids is resolved and
        listed once (which of its entries are symlinks); a row then costs no system call."""
        if not self.roots:
            return set(range(len(self.index.ids)))
        folders: dict[str, tuple[str, frozenset[str], bool]] = {}
        refused: set[int] = set()
        for row in range(len(self.index.ids)):
            folder, _, name = self._lexical(row).rpartition("/")
            folder = folder or "/"
            if folder not in folders:
                folders[folder] = self._folder(folder)
            real_folder, links, inside = folders[folder]
            if name in links:
                inside = self._contained(os.path.realpath(os.path.join(real_folder, name)))
            if not inside:
                refused.add(row)
        return refused

    def _folder(self, folder: str) -> tuple[str, frozenset[str], bool]:
        """(the folder resolved, the names of its symlinks, whether it is inside the collection)."""
        real = os.path.realpath(folder)
        try:
            with os.scandir(real) as entries:
                links = frozenset(entry.name for entry in entries if entry.is_symlink())
        except OSError:  # missing or unreadable: its files cannot be sent anyway
            links = frozenset()
        return real, links, self._contained(os.path.join(real, "x"))

    def file_of(self, row: int) -> Path | None:
        """The real file of ``row``, resolved now (a file swapped for a symlink since the start
        is caught too); None when it is outside the collection."""
        if row in self.refused:
            return None
        real = os.path.realpath(self._lexical(row))
        return Path(real) if self._contained(real) else None

    def shown_path(self, row: int) -> str | None:
        """The row's path relative to the collection folder it is in (an added source's folder
        is named first); None for a row that is not served."""
        if row in self.refused:
            return None
        path = self._lexical(row)
        for n, root in enumerate(self.roots):
            if _inside(path, root):
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                return rel if n == 0 else f"{os.path.basename(root)}/{rel}"
        return self.index.ids[row]  # inside only through a symlinked folder: the id as recorded

    def example_refused(self) -> str | None:
        """One refused id, for the start-up message."""
        return self.index.ids[min(self.refused)] if self.refused else None
