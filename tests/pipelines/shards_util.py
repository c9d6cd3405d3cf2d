"""WebDataset tar shards written the way img2dataset writes them, from real images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def real_images(n: int) -> list[bytes]:
    """``n`` encoded images: digits as PNG and photo crops as JPEG, alternating, all different."""
    from skimage import data
    from sklearn.datasets import load_digits

    photo = np.asarray(Image.fromarray(data.astronaut()).reduce(4))
    digits = load_digits().images
    out = []
    for i in range(n):
        buf = io.BytesIO()
        if i % 2:
            crop = photo[(i * 3) % 60:(i * 3) % 60 + 60, (i * 5) % 60:(i * 5) % 60 + 64]
            Image.fromarray(crop).save(buf, format="JPEG", quality=90)
        else:
            Image.fromarray((digits[i] * 15).astype(np.uint8), mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar of ``samples`` (key, {extension: bytes}) in order, members of a sample adjacent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path, n_shards: int, per_shard: int) -> tuple[list[Path], dict[str, bytes]]:
    """``n_shards`` shards of ``per_shard`` samples (image + json + txt); returns the shards and
    each sample's id (``<shard>/<key>``) → image bytes."""
    images = real_images(n_shards * per_shard)
    shards, by_id = [], {}
    for s in range(n_shards):
        samples = []
        for k in range(per_shard):
            n = s * per_shard + k
            key, ext = f"{n:06d}", ("jpg" if n % 2 else "png")
            samples.append((key, {ext: images[n], "json": json.dumps({"caption": f"image {n}", "n": n}).encode(),
                                  "txt": f"text {n}".encode()}))
            by_id[f"{s:05d}/{key}"] = images[n]
        shards.append(write_shard(folder / f"{s:05d}.tar", samples))
    return shards, by_id


def unpack_as_folder(by_id: dict[str, bytes], folder: Path) -> list[str]:
    """The same images as files ``<shard>/<key>.<ext>`` (the folder route's reference)."""
    names = []
    for sample_id, data in by_id.items():
        ext = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"
        path = folder / f"{sample_id}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        names.append(f"{sample_id}.{ext}")
    return names
