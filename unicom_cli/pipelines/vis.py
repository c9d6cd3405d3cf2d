"""A picture of retrieval results: one row per query with its top-k, each cell labelled.

Frames: query blue, hit (same class / relevant) green, miss red. Under every thumbnail: the
rank and cosine score (results) and the name (class folder / file). A legend heads the picture
and a white gap separates the cells, so that neighbouring frames of one colour stay apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unicom_cli.errors import UsageError
from unicom_cli.utils.files import atomic_open

TILE = 128  # thumbnail cell, frame included
BORDER = 6  # frame width
GAP = 8  # white space between cells
LABEL = 30  # text band under each cell (two lines)
LEGEND = 28  # band at the top
QUERY, HIT, MISS = (40, 90, 220), (30, 170, 60), (210, 40, 40)
WHITE, TEXT = (255, 255, 255), (20, 20, 20)


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


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened from the left with … so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def cell_name(path: str) -> str:
    """What a cell is called: its class folder and file name (``cat/001.jpg``)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def grid_size(n_queries: int, k: int) -> tuple[int, int]:
    """(width, height) of a picture with ``n_queries`` rows of a query and ``k`` results."""
    return (k + 1) * (TILE + GAP) + GAP, LEGEND + n_queries * (TILE + LABEL + GAP) + GAP


def _legend(draw, font) -> None:
    x = GAP
    for colour, text in ((QUERY, "query"), (HIT, "hit: same class"), (MISS, "miss: other class")):
        draw.rectangle([x, 8, x + 14, 22], fill=colour)
        draw.text((x + 20, 8), text, fill=TEXT, font=font)
        x += 20 + int(draw.textlength(text, font=font)) + 24
    draw.text((x, 8), "#rank · cosine score, then class/file", fill=TEXT, font=font)


PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def save_retrieval_grid(out: Path, root: Path, split, neighbours: np.ndarray,
                        n_queries: int = 6, k: int = 5, seed: int = 0,
                        scores: np.ndarray | None = None) -> Path:
    """Write a JPEG grid: a legend, then one row per query (blue frame) and its top-k (green hit,
    red miss), each cell labelled with its rank, score and name. Returns the path written.

    Queries are drawn at random (seeded) from the split.
    """
    from PIL import Image, ImageDraw

    n_total = len(neighbours)
    k = min(k, neighbours.shape[1])
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n_total, size=min(n_queries, n_total), replace=False))
    q_pos = np.arange(n_total) if split.all_vs_all else split.query
    g_pos = np.arange(len(split.paths)) if split.all_vs_all else split.gallery
    grid = Image.new("RGB", grid_size(len(picks), k), WHITE)
    draw = ImageDraw.Draw(grid)
    font = _font()
    _legend(draw, font)

    def cell(row: int, col: int, path: str, colour, first_line: str) -> None:
        x, y = GAP + col * (TILE + GAP), LEGEND + row * (TILE + LABEL + GAP)
        grid.paste(_tile(Path(root) / path, colour), (x, y))
        draw.text((x, y + TILE + 2), _fit(draw, first_line, font, TILE), fill=TEXT, font=font)
        draw.text((x, y + TILE + 15), _fit(draw, cell_name(path), font, TILE), fill=TEXT, font=font)

    for row, q in enumerate(picks):
        cell(row, 0, split.paths[q_pos[q]], QUERY, "query")
        for col in range(k):
            g = neighbours[q, col]
            if split.relevant is not None:
                hit = g in set(split.relevant[q].tolist())
            else:
                hit = split.labels[g_pos[g]] == split.labels[q_pos[q]]
            score = f" · {scores[q, col]:.3f}" if scores is not None else ""
            cell(row, col + 1, split.paths[g_pos[g]], HIT if hit else MISS, f"#{col + 1}{score}")
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"--vis {out}: unknown picture type {out.suffix!r}; use .jpg or .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as handle:
        grid.save(handle, format=fmt, quality=90)
    return out
