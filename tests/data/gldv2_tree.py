"""A tiny GLDv2-shaped tree for the prepare-gldv2 tests: CSV, nested folders, missing and bad files."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (landmark_id, [(image_id, kind, (width, height))]); kinds: photo, exif6 (stored landscape, shown
# portrait), missing, corrupt (random bytes), truncated (first half of a JPEG), png (PNG bytes).
LAYOUT = [
    ("500", [("a1b2c3d4e5f60001", "photo", (120, 90)), ("a1b2c3d4e5f60002", "photo", (60, 90)),
             ("0f0e0d0c0b0a0003", "photo", (400, 300))]),
    ("20", [("1234567890ab0004", "photo", (40, 30)), ("1234567890ab0005", "missing", None)]),
    ("7", [("fedcba9876540006", "exif6", (120, 80)), ("fedcba9876540007", "corrupt", None),
           ("fedcba9876540008", "truncated", (200, 150)), ("fedcba9876540009", "exif6", (400, 300))]),
    ("3", [("abcabcabcabc0010", "missing", None)]),
    ("9", [("9999999999990011", "png", (64, 48))]),
]


@dataclass
class Tree:
    root: Path
    csv: Path
    images: Path
    sizes: dict[str, tuple[int, int]]  # relative path -> displayed (width, height) of the good images
    missing: list[str]
    bad: list[str]


def relpath(image_id: str) -> str:
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    from skimage import data

    src = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][seed % 4]
    h, w = src.shape[:2]
    crop = src[h // 8: h - h // 8, w // 8: w - w // 8]
    return Image.fromarray(crop).resize(size, Image.BICUBIC)


def make_tree(root: Path) -> Tree:
    """Write the tree under ``root`` (CSV at root/train_clean.csv, images in root/train/)."""
    images = root / "train"
    sizes, missing, bad = {}, [], []
    rng = np.random.default_rng(0)
    lines = ["landmark_id,images"]
    for n, (landmark, entries) in enumerate(LAYOUT):
        lines.append(f"{landmark},{' '.join(i for i, _, _ in entries)}")
        for k, (image_id, kind, size) in enumerate(entries):
            rel = relpath(image_id)
            path = images / rel
            if kind == "missing":
                missing.append(rel)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            if kind == "corrupt":
                path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
                bad.append(rel)
                continue
            img = _photo(size, n + k)
            if kind == "exif6":
                exif = Image.Exif()
                exif[0x0112] = 6  # rotate 90 degrees clockwise to display
                img.save(buf, "JPEG", quality=92, exif=exif)
                sizes[rel] = (size[1], size[0])
            elif kind == "png":
                img.convert("L").save(buf, "PNG")
                sizes[rel] = size
            else:
                img.save(buf, "JPEG", quality=92)
                sizes[rel] = size
            data = buf.getvalue()
            if kind == "truncated":
                data = data[: len(data) // 2]
                bad.append(rel)
                sizes.pop(rel)
            path.write_bytes(data)
    csv = root / "train_clean.csv"
    csv.write_text("\n".join(lines) + "\n")
    return Tree(root, csv, images, sizes, missing, bad)
