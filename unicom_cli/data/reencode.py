"""Re-encode one image the way ``im2rec --resize N --quality Q`` does, without decoding more than needed.

OpenCV (libjpeg-turbo) does the work, as in im2rec: Pillow's resampling is ~8x slower than
``cv2.resize`` and would make us slower than the tool we replace. Geometry is im2rec's exactly:
the shorter side becomes N, the other ``long * N // short`` (small images are upscaled), EXIF
orientation applied. When a JPEG is at least 2x/4x/8x larger than needed it is decoded at that
reduced scale in the DCT domain (libjpeg's scaled IDCT), which is both faster and a better
anti-aliasing filter than resampling the full image; the final resize to the exact size follows.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from unicom_cli.data.images import DEFAULT_MAX_PIXELS
from unicom_cli.errors import BadImage

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


def single_threaded() -> None:
    """One OpenCV thread per call: our callers run one image per worker thread already."""
    cv2.setNumThreads(1)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if ``data`` is not a parseable JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF and pos + 9 <= n:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return (width, height) if width and height else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone (JPEG frame header, else Pillow's lazy open, with
    Pillow's own pixel limit off: ``check_pixels`` applies ours, which may be higher or lower)."""
    size = jpeg_size(data)
    if size is not None:
        return size
    import io

    from PIL import UnidentifiedImageError

    from unicom_cli.data.images import _open_unchecked

    try:  # the header only, without Pillow's limit: its DecompressionBombError hid the size
        with _open_unchecked(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None  # the decoder then says what is wrong


def check_pixels(data: bytes, max_pixels: int | None) -> None:
    """Refuse an image with more than ``max_pixels`` pixels before decoding it (a 20000 x 20000
    PNG is 1.2 GB of pixels), as ``unicom embed`` does."""
    if max_pixels is None:
        return
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise BadImage(f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is above the limit of "
                       f"{max_pixels:,} (possible decompression bomb)")


def target_size(width: int, height: int, short: int) -> tuple[int, int]:
    """im2rec's output (width, height): the shorter side becomes ``short``."""
    if height > width:
        return short, height * short // width
    return width * short // height, short


def decode(data: bytes, reduce: int = 1) -> np.ndarray:
    """BGR uint8 array (EXIF orientation applied), optionally DCT-reduced by 2, 4 or 8."""
    if not data:
        raise BadImage("empty file")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce])
    if img is None:
        raise BadImage("not a decodable image (corrupt, truncated or unsupported format)")
    return img


def reencode(data: bytes, resize: int, quality: int,
             max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """JPEG bytes of ``data`` with the shorter side resized to ``resize`` (0 keeps the size)."""
    check_pixels(data, max_pixels)
    size = jpeg_size(data) if resize else None
    reduce = 1
    if size is not None:
        while reduce < 8 and min(size) // (reduce * 2) >= resize:
            reduce *= 2
    img = decode(data, reduce)
    if resize:
        h, w = img.shape[:2]
        if reduce > 1:  # the geometry comes from the full-size image, turned like the decoded one
            full_w, full_h = size
            if (w, h) != (-(-full_w // reduce), -(-full_h // reduce)):  # EXIF turned it by 90 degrees
                full_w, full_h = full_h, full_w
        else:
            full_w, full_h = w, h
        new_w, new_h = target_size(full_w, full_h, resize)
        if (new_w, new_h) != (w, h):
            shrink = min(w / new_w, h / new_h)
            interp = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR  # area only when not DCT-reduced
            img = cv2.resize(img, (new_w, new_h), interpolation=interp)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage("JPEG encoding failed")
    return buf.tobytes()


def check_decodable(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raise BadImage unless ``data`` decodes (at 1/8 scale for JPEG: every byte is still parsed)."""
    if not data:
        raise BadImage("empty file")
    check_pixels(data, max_pixels)
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
        raise BadImage("not a decodable image (corrupt, truncated or unsupported format)")
