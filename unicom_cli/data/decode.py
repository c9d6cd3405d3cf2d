"""Robust decoding of one image to RGB pixels (EXIF, modes, pixel limits, corrupt files) and the
resize + centre crop every model input goes through."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from unicom_cli.errors import BadImage

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

# Same magnitude as Pillow's own hard limit (2 x 89.5 MP); a 12 MP phone photo is far below it.
DEFAULT_MAX_PIXELS = 178_956_970
# Background for transparent pixels: what an image viewer shows on a white page.
BACKGROUND = (255, 255, 255)
# JPEG draft decoding keeps both sides >= DRAFT_MARGIN x the model input, so the final bicubic
# resize still reduces by at least this factor (benchmarks/embed_throughput.py --draft-check).
DRAFT_MARGIN = 2


def _to_8bit(img: "PILImage.Image") -> "PILImage.Image":
    """Integer/float single-channel images (16-bit PNG/TIFF, 'I', 'F') scaled to 8-bit 'L'.

    Pillow's own convert('L') clips instead of scaling, which turns most 16-bit photos white.
    """
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: "PILImage.Image") -> "PILImage.Image":
    """Any Pillow mode to RGB. Transparent pixels are composited on white (not dropped, which
    would expose whatever colour the encoder left under them); 16-bit data is scaled."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _to_8bit(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path: Path | str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> "PILImage.Image":
    """Decode one image file to an RGB PIL image with its EXIF orientation applied.

    Args:
        path: the file.
        max_pixels: refuse images with more pixels than this (decompression bombs) from the
            header alone, before decoding; None disables the check.
        draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as both
            sides stay at least this many pixels (much faster for photos far larger than the
            model input).

    Raises:
        BadImage: with a one-line reason (empty, not an image, truncated, too large…).
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror})") from exc
    return _decode_with_pillow(path, max_pixels, draft_size)


def _decode_with_pillow(source: Path | str | IO[bytes], max_pixels: int | None,
                        draft_size: int | None) -> "PILImage.Image":
    """``load_image`` after the file checks: ``source`` is a path or the file's bytes."""
    from PIL import ImageOps, UnidentifiedImageError

    try:
        img = _open_unchecked(source)
        with img:
            _check_pixels(img.size, max_pixels)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()  # first frame of animated GIF/WebP/TIFF
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError as exc:
        raise BadImage("not an image file Pillow can read (wrong extension or unknown format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, MemoryError) as exc:
        detail = str(exc) or type(exc).__name__
        raise BadImage(f"cannot decode: {detail}") from exc


_OPEN_LOCK = threading.Lock()


def _open_unchecked(path: Path | str | IO[bytes]) -> "PILImage.Image":
    """``Image.open`` (header only) with Pillow's own pixel limit off: ours, in load_image,
    replaces it, so that --max-pixels can also go above Pillow's. The global is restored at
    once; the lock keeps other threads of this process from seeing it off."""
    from PIL import Image

    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_pixels(path: Path | str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                draft_size: int | None = None) -> np.ndarray:
    """``load_image`` as an RGB uint8 (H, W, 3) array, about twice as fast for the common case.

    Colour JPEGs are decoded by libjpeg-turbo's TurboJPEG interface (simplejpeg), which gives
    the same pixels as Pillow's decoder in half the time; the EXIF orientation is applied as an
    exact flip/rotation. Everything else (PNG, CMYK, greyscale JPEGs, draft decoding) goes
    through Pillow.
    """
    try:
        nbytes = os.path.getsize(path)
        if nbytes == 0:
            raise BadImage("empty file (0 bytes)")
        limit = max_file_bytes(max_pixels)
        if limit is not None and nbytes > limit:  # before reading it whole into memory
            raise BadImage(f"the file is {nbytes / 2**20:,.0f} MiB, more than an image within "
                           f"--max-pixels can take ({limit / 2**20:,.0f} MiB); raise --max-pixels "
                           "to accept it")
        if nbytes > HEADER_FIRST_BYTES:  # a big file: its header must make sense before we read it
            _check_header(path, max_pixels)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror})") from exc
    return decode_pixels(data, max_pixels=max_pixels, draft_size=draft_size)


def decode_pixels(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  draft_size: int | None = None) -> np.ndarray:
    """An encoded image (the bytes of a file or an upload) → RGB uint8 (H, W, 3), EXIF applied;
    the decoder behind :func:`load_pixels`. Raises BadImage with a one-line reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    if not draft_size and data[:3] == b"\xff\xd8\xff":
        pixels = _decode_with_turbojpeg(data, max_pixels)
        if pixels is not None:
            return pixels
    import io

    return np.asarray(_decode_with_pillow(io.BytesIO(data), max_pixels, draft_size))


HEADER_FIRST_BYTES = 32 << 20  # files above this have their header checked before being read


def _check_header(path: Path | str, max_pixels: int | None) -> None:
    """Pillow reads only the header: an unknown format or too many pixels is refused unread."""
    from PIL import UnidentifiedImageError

    try:
        with _open_unchecked(path) as img:
            size = img.size
    except UnidentifiedImageError as exc:
        raise BadImage("not an image file Pillow can read (wrong extension or unknown format)") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"cannot decode: {exc or type(exc).__name__}") from exc
    _check_pixels(size, max_pixels)


def max_file_bytes(max_pixels: int | None) -> int | None:
    """The largest file an image within ``max_pixels`` can be: 4 bytes a pixel (uncompressed
    RGBA BMP/TIFF) plus room for metadata. Bigger files are skipped unread."""
    return None if max_pixels is None else 4 * max_pixels + (64 << 20)


def _decode_with_turbojpeg(data: bytes, max_pixels: int | None) -> np.ndarray | None:
    """An RGB-coded JPEG decoded by TurboJPEG with its EXIF orientation applied; None for
    anything else (or without simplejpeg), which Pillow then decodes or explains."""
    import io

    try:
        import simplejpeg
    except ImportError:  # optional speed-up: Pillow decodes everything too
        return None
    try:
        with _open_unchecked(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                return None
            size, orientation = img.size, img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow's own decode reports what is wrong
        return None
    _check_pixels(size, max_pixels)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, MemoryError) as exc:
        detail = "truncated JPEG (premature end of file)" if "Premature end" in str(exc) else str(exc)
        raise BadImage(f"cannot decode: {detail}") from exc
    orient = _ORIENT.get(orientation)
    return pixels if orient is None else np.ascontiguousarray(orient(pixels))


_EXIF_ORIENTATION = 0x0112
# EXIF orientation (2-8) → the flip/rotation of an (H, W, C) array that ImageOps.exif_transpose does.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(f"{width}x{height} = {width * height:,} pixels is above the limit "
                       f"of {max_pixels:,} (possible decompression bomb); raise "
                       "--max-pixels to accept it")


ASPECT_TRIM = 64  # longer than 64x the short side: trimmed first (the resize stays below 64 x size² px)


def _trim_long_side(pixels: np.ndarray, size: int) -> np.ndarray:
    """Only the central square of the short side survives the center crop. For an extreme
    aspect ratio (1 x 10,000,000 px) cut the long side to that square plus the reach of the
    antialiased bicubic filter before resizing: the resize then costs O(size²) instead of
    O(size x long side), which for such images is tens of GB. Ordinary images are untouched."""
    height, width = pixels.shape[:2]
    short, long = min(height, width), max(height, width)
    if long <= ASPECT_TRIM * short:
        return pixels
    reach = 2 * math.ceil(2 * max(1.0, short / size)) + 2  # bicubic taps, widened when shrinking
    keep = min(long, short + 2 * reach)
    start = (long - keep) // 2
    return pixels[start:start + keep] if height > width else pixels[:, start:start + keep]


def resize_center_crop(pixels: np.ndarray, size: int, *, resize: int | None = None, squash: bool = False,
                       interpolation: str = "bicubic", floor_crop: bool = False) -> "torch.Tensor":
    """Shorter side to ``resize`` (default ``size``), center crop to size x size: uint8 (3, size, size).

    The same geometry as the CLIP eval transform (torchvision Resize + CenterCrop on PIL
    images) and as transformers' image processors (``shortest_edge`` + ``crop_size``; with
    ``squash`` both sides go to ``size`` and nothing is cropped, as SigLIP's; their crop offset
    is floored, ``floor_crop``, where torchvision rounds). torch's
    antialiased uint8 bicubic reproduces Pillow's filter (within 1/255 on a few pixels) about
    ten times faster; normalisation happens later on the device.
    """
    import torch

    resize = resize or size
    pixels = pixels if squash else _trim_long_side(pixels, resize)
    height, width = pixels.shape[:2]
    if squash:
        new_w, new_h = size, size
    elif width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    if not pixels.flags.writeable:  # np.asarray of a PIL image is read-only; torch wants writable
        pixels = pixels.copy()
    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    if (new_h, new_w) != (height, width):
        image = torch.nn.functional.interpolate(image, size=(new_h, new_w), mode=interpolation,
                                                antialias=True, align_corners=False)
    offset = (lambda excess: excess // 2) if floor_crop else (lambda excess: int(round(excess / 2.0)))
    top, left = offset(new_h - size), offset(new_w - size)
    return image[0, :, top:top + size, left:left + size].contiguous()
