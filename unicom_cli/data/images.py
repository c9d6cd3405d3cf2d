"""Image inputs: folder scanning, path lists and the worker-side Dataset (decoding: data.decode)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from unicom_cli.data.decode import (  # noqa: F401 - re-exported: the names callers import from here
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    DRAFT_MARGIN,
    _open_unchecked,
    decode_pixels,
    load_image,
    load_pixels,
    max_file_bytes,
    resize_center_crop,
    to_rgb,
)
from unicom_cli.errors import BadImage, DatasetLayout, InputError
from unicom_cli.utils.files import open_regular

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class PathList(Sequence[str]):
    """Paths stored as one UTF-8 buffer plus offsets: ~1 byte per character instead of a
    Python object per path, cheap to pickle into worker processes, still indexable."""

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._buffer[start:end].decode("utf-8", "surrogateescape")

    def digest(self) -> str:
        """SHA-256 of the list: equal lists on every rank and across resumed runs."""
        h = hashlib.sha256(self._offsets.tobytes())
        h.update(self._buffer)
        return h.hexdigest()


class ImageList:
    """The images of one run: a root folder and paths relative to it (the ids that get written)."""

    def __init__(self, root: Path, relative: PathList, unlisted: Sequence[str] = ()) -> None:
        self.root = root
        self.relative = relative
        # Image files whose names contain a line break: they cannot be one line of the ids file,
        # so they are reported as failures (names escaped as \\n) instead of embedded.
        self.unlisted = list(unlisted)

    def __len__(self) -> int:
        return len(self.relative)

    def path(self, i: int) -> Path:
        rel = self.relative[i]
        return Path(rel) if os.path.isabs(rel) else self.root / rel


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


_LINE_BREAKS = {"\n", "\r"}


LINE_BREAK_REASON = "the file name contains a line break, which cannot be one line of the ids file; rename it"


def escape_line_breaks(name: str) -> str:
    """A name with line breaks as one line (``\\n``, ``\\r``), for failure lists."""
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def scan_folder(root: Path, unlisted: list[str] | None = None) -> list[str]:
    """Image files under ``root``, recursively, as POSIX paths relative to it, sorted.

    Sorting is by the relative path string, so the order is the same on every machine and
    every rank. Hidden files and folders (leading dot) are skipped; names with line breaks
    (they cannot be one line of the ids file) go to ``unlisted`` instead, to be reported;
    symlinked folders are not followed.
    """
    found: list[str] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                rel = (name if rel_dir == "." else os.path.join(rel_dir, name)).replace(os.sep, "/")
                if _LINE_BREAKS & set(rel):
                    if unlisted is not None:
                        unlisted.append(rel)
                else:
                    found.append(rel)
    if unlisted is not None:
        unlisted.sort()
    if errors and not found:
        raise InputError(f"{root}: cannot read the folder ({errors[0].strerror}); check its permissions")
    found.sort()
    return found


def scan_class_folders(root: Path) -> tuple[list[str], list[str]]:
    """An ImageFolder tree: (image paths relative to ``root``, the class folder name of each).

    Classes are the visible sub-folders of ``root`` in sorted order (``.ipynb_checkpoints`` is
    not a class); inside each, the rules of :func:`scan_folder`. Used by eval-retrieval's
    ``folder:`` data sets, eval-knn and finetune alike, so a tree means the same to all of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; expected an ImageFolder tree (one sub-folder per class)")
    paths: list[str] = []
    names: list[str] = []
    with os.scandir(root) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    for cls in classes:
        found = scan_folder(root / cls)
        paths.extend(f"{cls}/{rel}" for rel in found)
        names.extend([cls] * len(found))
    if not paths:
        raise DatasetLayout(f"{root}: no images in class sub-folders; expected an ImageFolder tree "
                            f"{root}/<class>/<image>.jpg")
    return paths, names


def read_path_list(list_file: Path) -> tuple[Path, list[str]]:
    """Paths from a text file, one per line (blank lines and ``#`` comments skipped).

    Relative paths are taken relative to the list file's folder, which becomes the root that
    ids are written relative to. Order is kept as given.
    """
    try:
        with open_regular(list_file, what="a text file of image paths, one per line", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_file}: cannot read the path list ({exc})") from exc
    paths = [line.strip() for line in text.splitlines()]
    return list_file.parent, [p for p in paths if p and not p.startswith("#")]


def list_images(source: Path) -> ImageList:
    """The images named by ``source``: a folder (scanned) or a text file of paths.

    Raises InputError (before any work) when the source is missing, unreadable or empty.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_dir():
        if not os.access(source, os.R_OK | os.X_OK):
            raise InputError(f"{source}: cannot read the folder; check its permissions")
        unlisted: list[str] = []
        root, paths = source, scan_folder(source, unlisted)
        what = f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {source}"
        if unlisted:
            what = (f"{source}: the only image files have line breaks in their names (e.g. "
                    f"{escape_line_breaks(unlisted[0])}); rename them")
    else:
        if is_image_file(source.name):
            raise InputError(f"{source}: is an image; give its folder or a text file listing paths")
        root, paths = read_path_list(source)
        what = f"{source}: the path list is empty"
    if not paths:
        raise InputError(what)
    return ImageList(root, PathList(paths), unlisted if source.is_dir() else ())


class ImageDataset:
    """Map-style dataset for DataLoader workers: item i → (position, uint8 CHW tensor, reason).

    ``reason`` is "" for a decoded image; for a bad file it says why, and the tensor is zeros,
    so one bad file never breaks a batch and positions stay aligned with rows.
    """

    def __init__(self, images: ImageList, positions: Sequence[int], size: int, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = False,
                 geometry: dict | None = None) -> None:
        self.images = images
        self.positions = positions
        self.size = size
        self.geometry = geometry or {}  # resize/squash/interpolation of resize_center_crop
        self.max_pixels = max_pixels
        self.draft_size = size * DRAFT_MARGIN if draft else None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, "torch.Tensor", str]:
        import torch

        position = int(self.positions[i])
        try:
            pixels = load_pixels(self.images.path(position), max_pixels=self.max_pixels,
                                 draft_size=self.draft_size)
            return position, resize_center_crop(pixels, self.size, **self.geometry), ""
        except BadImage as exc:
            return position, torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(exc)

