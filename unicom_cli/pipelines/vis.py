"""Pictures of retrieval results: the one module behind every command's ``--vis``.

One layout and one labelling everywhere (eval-retrieval, search, search --duplicates): a title,
a legend and notes (such as skipped queries), then one row per query or duplicate group. A query
is framed blue; under every thumbnail stand its rank and cosine score, its name (class folder /
file) and its class when known; a result of a known class is framed green when it is a hit
(same class, or relevant) and red when a miss, grey when its class is unknown. The same rows
become a self-contained HTML page (``.html``, images inlined) or a picture (``.png``, ``.jpg``,
``.webp``, ``.bmp``). Every name is shown escaped, whatever bytes a file name holds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from unicom_cli.errors import UsageError

FORMATS = (".html", ".png", ".jpg", ".jpeg", ".webp", ".bmp")
TILE = 128  # thumbnail cell, frame included
BORDER = 6  # frame width
GAP = 8  # white space between cells
LINE = 13  # pixels per text line
RASTER_ROWS, RASTER_CELLS = 100, 21  # what a raster picture draws at most (a page shows all)
WHITE, TEXT = (255, 255, 255), (20, 20, 20)
# kind: (frame colour, legend text)
KINDS = {
    "query": ((40, 90, 220), "query"),
    "hit": ((30, 170, 60), "hit: same class"),
    "miss": ((210, 40, 40), "miss: other class"),
    "result": ((150, 150, 150), "result (class unknown)"),
}
LABELS = "under each image: #rank · cosine score, then class folder/file, then its class when known"


@dataclass
class Cell:
    """One thumbnail and its labels."""

    name: str  # class folder / file (see ``cell_name``), or a vector query's name
    path: Path | None = None  # the image shown; None: nothing to show (a vector query)
    kind: str = "result"  # a key of KINDS
    rank: int | None = None  # 1-based
    score: float | None = None  # cosine similarity
    label: str | None = None  # the class, when known

    def lines(self, with_labels: bool) -> list[str]:
        """The text under the thumbnail, one string per line."""
        head = "query" if self.kind == "query" else " · ".join(
            part for part in (f"#{self.rank}" if self.rank else "",
                              f"{self.score:.4f}" if self.score is not None else "") if part)
        return [head, self.name] + ([f"class {self.label}" if self.label is not None else ""]
                                    if with_labels else [])


@dataclass
class Row:
    """A query (or a group of near duplicates) and its cells, best first."""

    title: str
    cells: list[Cell]


@dataclass
class Picture:
    """Everything drawn: a title, notes under the legend, and the rows."""

    title: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def kinds(self) -> list[str]:
        present = {cell.kind for row in self.rows for cell in row.cells}
        if present & {"hit", "miss"}:  # both colours explained, even when all are hits
            present |= {"hit", "miss"}
        return [kind for kind in KINDS if kind in present]

    def has_labels(self) -> bool:
        return any(cell.label is not None for row in self.rows for cell in row.cells)


def printable(text: str) -> str:
    """A name as valid text: the bytes of a non-UTF-8 file name (held as surrogates) as \\xNN."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def cell_name(path: str) -> str:
    """What a cell is called: its class folder and file name (``cat/001.jpg``)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def check_format(path: Path | None, option: str = "--vis") -> None:
    """Refuse, before any work, a picture type no renderer writes."""
    from unicom_cli.utils.files import check_output_file

    check_output_file(path, option, FORMATS, overwrite=True)  # the type only: callers check existence


def save_picture(out: Path, picture: Picture) -> Path:
    """Write ``picture`` as an HTML page or a raster image, by the suffix of ``out``, atomically."""
    from unicom_cli.utils.files import atomic_path, check_writable_folder

    out = Path(out)
    check_format(out)
    check_writable_folder(out.parent)  # created when missing, as every output's folder
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".html":
            Path(tmp).write_text(_page(picture), encoding="utf-8")
        else:
            _raster(_capped(picture)).save(tmp, format=_pil_format(out), quality=90)
    return out


def _capped(picture: Picture) -> Picture:
    """At most RASTER_ROWS rows of RASTER_CELLS cells (a picture of 10,000 queries would be
    two million pixels tall), with a note saying what was left out."""
    rows = [Row(row.title, row.cells[:RASTER_CELLS]) for row in picture.rows[:RASTER_ROWS]]
    cut = len(picture.rows) > RASTER_ROWS or any(len(row.cells) > RASTER_CELLS for row in picture.rows)
    note = [f"drawn: the first {RASTER_ROWS} rows of {RASTER_CELLS} images at most "
            f"({len(picture.rows):,} rows in all); a .html page shows everything"] if cut else []
    return Picture(picture.title, rows, picture.notes + note)


def _pil_format(out: Path) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:  # a Pillow built without the codec
        raise UsageError(f"--vis {out}: this Pillow cannot write {out.suffix}; use .html or .png")
    return fmt


# --------------------------------------------------------------------------- thumbnails


def _open_rgb(path: Path | None, box: int):
    """The image fitted into ``box`` pixels, or None when it cannot be read."""
    from PIL import Image, ImageOps

    if path is None:
        return None
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            scale = box / max(im.width, im.height)
            resample = Image.NEAREST if scale > 1 else Image.BICUBIC  # a 32-px digit stays crisp
            return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _thumbnail_uri(path: Path | None) -> str:
    """A JPEG data URI of the image (the page needs no other file), or "" when unreadable."""
    import base64
    import io

    im = _open_rgb(path, TILE * 2)
    if im is None:
        return ""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _tile(path: Path | None, colour: tuple[int, int, int]):
    """A framed thumbnail; a grey square when there is no image or it cannot be read."""
    from PIL import Image

    inner = TILE - 2 * BORDER
    im = _open_rgb(path, inner) or Image.new("RGB", (inner, inner), (200, 200, 200))
    tile = Image.new("RGB", (TILE, TILE), colour)
    tile.paste(im, (BORDER + (inner - im.width) // 2, BORDER + (inner - im.height) // 2))
    return tile


# --------------------------------------------------------------------------- the HTML page


def _page(picture: Picture) -> str:
    """A self-contained page; every name is escaped, so a file name cannot inject markup."""
    esc = lambda text: html.escape(printable(text), quote=True)  # noqa: E731
    labels = picture.has_labels()

    def figure(cell: Cell) -> str:
        uri = _thumbnail_uri(cell.path)
        img = (f'<img src="{uri}" alt="{esc(cell.name)}">' if uri
               else f'<div class="missing">{"no image" if cell.path is None else "not readable"}</div>')
        caption = "<br>".join(esc(line) for line in cell.lines(labels))
        return f'<figure class="{cell.kind}" title="{esc(cell.name)}">{img}<figcaption>{caption}</figcaption></figure>'

    legend = "".join(f'<span class="key {kind}"></span>{esc(KINDS[kind][1])} ' for kind in picture.kinds())
    notes = "".join(f"<p class=note>{esc(note)}</p>" for note in picture.notes)
    rows = "".join(f'<section><h2>{esc(row.title)}</h2><div class="row">{"".join(map(figure, row.cells))}</div>'
                   "</section>" for row in picture.rows)
    side = f"{TILE * 1.3:.0f}px"
    colours = "".join(f"figure.{kind} img, figure.{kind} .missing, .key.{kind} {{ border-color: rgb{rgb}; }}\n"
                      for kind, (rgb, _) in KINDS.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(picture.title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h2 {{ font-size: 14px; font-weight: 600; margin: 1.2em 0 .4em; word-break: break-all; }}
.legend {{ margin: .3em 0; }} .note {{ margin: .2em 0; color: #555; word-break: break-all; }}
.key {{ display: inline-block; width: 10px; height: 10px; border: 3px solid; margin: 0 .3em 0 1em;
  vertical-align: middle; }}
.row {{ display: flex; gap: 10px; overflow-x: auto; }}
figure {{ margin: 0; width: {side}; flex: none; text-align: center; }}
figure img, .missing {{ width: {side}; height: {side}; object-fit: contain;
  background: #f2f2f2; border: 3px solid; box-sizing: border-box; }}
.missing {{ display: flex; align-items: center; justify-content: center; color: #888; }}
{colours}figcaption {{ font-size: 12px; word-break: break-all; }}
</style></head><body>
<h1>{esc(picture.title)}</h1>
<p class="legend">{legend}<br>{esc(LABELS)}</p>
{notes}{rows}
</body></html>
"""


# --------------------------------------------------------------------------- the raster picture


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` (printable) shortened from the left with … so that it fits ``width`` pixels."""
    text = printable(text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def row_height(labels: bool) -> int:
    """A row: its title line, the tiles, two or three lines of labels, a white gap."""
    return LINE + 2 + TILE + LINE * (3 if labels else 2) + 4 + GAP


def header_height(notes: int) -> int:
    """Title, legend, the labels' key and the notes."""
    return GAP + LINE * (3 + notes) + GAP


def grid_size(rows: int, columns: int, notes: int = 0, labels: bool = False) -> tuple[int, int]:
    """(width, height) of a raster picture of ``rows`` rows of up to ``columns`` cells."""
    return max(columns, 4) * (TILE + GAP) + GAP, header_height(notes) + rows * row_height(labels) + GAP


def _raster(picture: Picture):
    """The rows drawn as one image: title, legend, notes, then per row a title line and the tiles."""
    from PIL import Image, ImageDraw

    labels = picture.has_labels()
    columns = max((len(row.cells) for row in picture.rows), default=1)
    width, height = grid_size(len(picture.rows), columns, len(picture.notes), labels)
    grid = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(grid)
    font = _font()
    y = GAP
    draw.text((GAP, y), _fit(draw, picture.title, font, width - 2 * GAP), fill=TEXT, font=font)
    x, y = GAP, y + LINE
    for kind in picture.kinds():
        colour, text = KINDS[kind]
        draw.rectangle([x, y + 1, x + 10, y + 11], fill=colour)
        draw.text((x + 14, y), text, fill=TEXT, font=font)
        x += 14 + int(draw.textlength(text, font=font)) + 16
    y += LINE
    for line in [LABELS, *picture.notes]:
        draw.text((GAP, y), _fit(draw, line, font, width - 2 * GAP), fill=TEXT, font=font)
        y += LINE
    y = header_height(len(picture.notes))
    for row in picture.rows:
        draw.text((GAP, y), _fit(draw, row.title, font, width - 2 * GAP), fill=TEXT, font=font)
        y += LINE + 2
        for col, cell in enumerate(row.cells):
            x = GAP + col * (TILE + GAP)
            grid.paste(_tile(cell.path, KINDS[cell.kind][0]), (x, y))
            for n, line in enumerate(cell.lines(labels)):
                draw.text((x, y + TILE + 2 + LINE * n), _fit(draw, line, font, TILE), fill=TEXT, font=font)
        y += row_height(labels) - LINE - 2
    return grid
