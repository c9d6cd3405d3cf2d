"""A picture of retrieval results: query rows with their top-k, hits framed green and misses red."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TILE = 128
BORDER = 6
QUERY, HIT, MISS = (40, 90, 220), (30, 170, 60), (210, 40, 40)


def _tile(path: Path, colour: tuple[int, int, int]):
    """A bordered thumbnail fitted to the tile (small images are enlarged, nearest-neighbour, so
    that a 32-px digit stays legible); a grey square when the image cannot be read."""
    from PIL import Image, ImageOps

    inner = TILE - 2 * BORDER
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            scale = inner / max(im.width, im.height)
            resample = Image.NEAREST if scale > 1 else Image.BICUBIC
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
    except (OSError, ValueError):
        im = Image.new("RGB", (inner, inner), (128, 128, 128))
    tile = Image.new("RGB", (TILE, TILE), colour)
    tile.paste(im, (BORDER + (inner - im.width) // 2, BORDER + (inner - im.height) // 2))
    return tile


PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def save_retrieval_grid(out: Path, root: Path, split, neighbours: np.ndarray,
                        n_queries: int = 6, k: int = 5, seed: int = 0) -> Path:
    """Write a JPEG grid: one row per query (blue frame), then its top-k (green hit, red miss).

    Queries are drawn at random (seeded) from the split.
    """
    from PIL import Image

    n_total = len(neighbours)
    k = min(k, neighbours.shape[1])
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n_total, size=min(n_queries, n_total), replace=False))
    q_pos = np.arange(n_total) if split.all_vs_all else split.query
    g_pos = np.arange(len(split.paths)) if split.all_vs_all else split.gallery
    grid = Image.new("RGB", ((k + 1) * TILE + BORDER, len(picks) * TILE), (255, 255, 255))
    for row, q in enumerate(picks):
        grid.paste(_tile(Path(root) / split.paths[q_pos[q]], QUERY), (0, row * TILE))
        for col in range(k):
            g = neighbours[q, col]
            if split.relevant is not None:
                hit = g in set(split.relevant[q].tolist())
            else:
                hit = split.labels[g_pos[g]] == split.labels[q_pos[q]]
            grid.paste(_tile(Path(root) / split.paths[g_pos[g]], HIT if hit else MISS),
                       ((col + 1) * TILE + BORDER, row * TILE))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    grid.save(tmp, quality=90)
    os.replace(tmp, out)
    return out
