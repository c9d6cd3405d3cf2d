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


# --------------------------------------------------------------------------- `unicom search --vis`

CAPTION = 30  # pixels of text under each tile of the search picture


def _thumbnail_uri(path: Path | None) -> str:
    """A JPEG data URI of the image (the page needs no other file), or "" when unreadable."""
    import base64
    import io

    from PIL import Image, ImageOps

    if path is None:
        return ""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((TILE * 2, TILE * 2))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except (OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _atomic_save(out: Path, write) -> Path:
    from unicom_cli.utils.files import atomic_path

    with atomic_path(out) as tmp:
        write(tmp)
    return Path(out)


def save_search_html(out: Path, names: list[str], files: list[Path | None], ids: list[list[str]],
                     paths: list[list[Path | None]], scores: np.ndarray) -> Path:
    """A self-contained page: one row per query, its thumbnail then its results (thumbnail,
    file name, score); images are embedded as data URIs so the page can be mailed or moved."""
    from html import escape

    def cell(uri: str, title: str, caption: str, cls: str) -> str:
        img = (f'<img src="{uri}" alt="{escape(title)}">' if uri
               else '<div class="missing">not readable</div>')
        return (f'<figure class="{cls}" title="{escape(title)}">{img}'
                f"<figcaption>{caption}</figcaption></figure>")

    rows = []
    for q, name in enumerate(names):
        cells = [cell(_thumbnail_uri(files[q]), name, f"<b>query</b><br>{escape(Path(name).name)}", "query")]
        for rank, (rel, path, score) in enumerate(zip(ids[q], paths[q], scores[q]), start=1):
            if not rel:
                continue
            cells.append(cell(_thumbnail_uri(path), rel,
                              f"{rank}. {escape(Path(rel).name)}<br>{score:.4f}", "hit"))
        rows.append(f'<section><h2>{escape(name)}</h2><div class="row">{"".join(cells)}</div></section>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unicom search results</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h2 {{ font-size: 14px; font-weight: 600; margin: 1.2em 0 .4em; word-break: break-all; }}
.row {{ display: flex; gap: 10px; overflow-x: auto; }}
figure {{ margin: 0; width: {TILE * 1.3:.0f}px; flex: none; text-align: center; }}
figure img, .missing {{ width: {TILE * 1.3:.0f}px; height: {TILE * 1.3:.0f}px; object-fit: contain;
  background: #f2f2f2; border: 3px solid #ccc; box-sizing: border-box; }}
.missing {{ display: flex; align-items: center; justify-content: center; color: #888; }}
figure.query img {{ border-color: rgb{QUERY}; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
</style></head><body>
<h1>unicom search: {len(names)} quer{"y" if len(names) == 1 else "ies"}</h1>
{"".join(rows)}
</body></html>
"""
    return _atomic_save(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def save_search_png(out: Path, names: list[str], files: list[Path | None], ids: list[list[str]],
                    paths: list[list[Path | None]], scores: np.ndarray) -> Path:
    """The same as a picture: one row per query (blue frame), its results with name and score."""
    from PIL import Image, ImageDraw

    k = max((len(r) for r in ids), default=0)
    height = TILE + CAPTION
    grid = Image.new("RGB", ((k + 1) * TILE + BORDER, max(1, len(names)) * height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)

    def put(path: Path | None, colour, x: int, y: int, lines: list[str]) -> None:
        grid.paste(_tile(path if path is not None else Path(""), colour), (x, y))
        for n, line in enumerate(lines):
            text = line if len(line) <= 20 else line[:9] + "…" + line[-10:]
            draw.text((x + 4, y + TILE + 2 + 12 * n), text, fill=(0, 0, 0))

    for q, name in enumerate(names):
        y = q * height
        put(files[q], QUERY, 0, y, ["query", Path(name).name])
        for col, (rel, path, score) in enumerate(zip(ids[q], paths[q], scores[q])):
            if rel:
                put(path, (200, 200, 200), (col + 1) * TILE + BORDER, y,
                    [Path(rel).name, f"{col + 1}. {score:.4f}"])
    return _atomic_save(out, lambda tmp: grid.save(tmp, format="PNG"))
