"""Folder scanning, path lists and robust decoding on real photos and every bad-file kind."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unicom_cli.data.images import (
    ImageDataset,
    ImageList,
    PathList,
    list_images,
    load_image,
    load_pixels,
    resize_center_crop,
    scan_class_folders,
    scan_folder,
)
from unicom_cli.errors import BadImage, InputError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo (scikit-image's coffee cup), 400x600 RGB."""
    from skimage import data

    return data.coffee()


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def test_scan_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/z.JPG", "a.png", "b/a/x.webp", "c.txt", ".hidden/h.jpg", "d.tiff", "e.gif",
                "f.bmp", "g.jpeg", "h.tif", "notes.jpg.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert scan_folder(tmp_path) == ["a.png", "b/a/x.webp", "b/z.JPG", "d.tiff", "e.gif",
                                     "f.bmp", "g.jpeg", "h.tif"]


def test_class_folders_one_rule_for_eval_knn_and_finetune(tmp_path):
    from unicom_cli.data.benchmarks import load_benchmark
    from unicom_cli.train.data import scan_image_folder

    for rel in ["dog/b.png", "cat/x/a.jpg", "cat/.thumbs/t.jpg", ".ipynb_checkpoints/c.jpg",
                "cat/notes.txt", "loose.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert scan_class_folders(tmp_path) == (["cat/x/a.jpg", "dog/b.png"], ["cat", "dog"])
    train = scan_image_folder(tmp_path)  # finetune's reader
    assert (train.paths, train.labels, train.num_classes) == (
        [tmp_path / "cat/x/a.jpg", tmp_path / "dog/b.png"], [0, 1], 2)
    split = load_benchmark(f"folder:{tmp_path}").test  # eval-retrieval's reader
    assert (split.paths, split.labels.tolist()) == (["cat/x/a.jpg", "dog/b.png"], [0, 1])


def test_path_list_file_relative_to_its_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimgs/b.jpg\n\n/abs/a.png\n")
    images = list_images(listing)
    assert list(images.relative) == ["imgs/b.jpg", "/abs/a.png"]
    assert images.path(0) == tmp_path / "imgs/b.jpg"
    assert images.path(1) == Path("/abs/a.png")


def test_path_list_is_compact_and_indexable():
    names = [f"dir{i % 7}/ünï-{i}.jpg" for i in range(1000)]
    compact = PathList(names)
    assert len(compact) == 1000 and compact[0] == names[0] and compact[-1] == names[-1]
    assert compact[10:13] == names[10:13]
    assert PathList(names).digest() == compact.digest() != PathList(names[:-1]).digest()


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "empty_list", "image"])
def test_list_images_errors(tmp_path, kind):
    source = {"missing": tmp_path / "nope", "empty_dir": tmp_path,
              "empty_list": tmp_path / "l.txt", "image": tmp_path / "one.jpg"}[kind]
    if kind in ("empty_list", "image"):
        source.write_text("\n")
    with pytest.raises(InputError, match=str(source.name) if kind != "empty_dir" else "no image"):
        list_images(source)


def test_rgb_photo_decodes_exactly(tmp_path, photo):
    path = _save(Image.fromarray(photo), tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_image(path)), photo)


def test_zero_byte_file(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="empty file"):
        load_image(tmp_path / "z.jpg")


def test_text_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("this is not a picture\n")
    with pytest.raises(BadImage, match="not an image"):
        load_image(tmp_path / "t.jpg")


def test_truncated_jpeg(tmp_path, photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_cmyk_jpeg_is_converted(tmp_path, photo):
    path = _save(Image.fromarray(photo).convert("CMYK"), tmp_path / "c.jpg", quality=95)
    out = np.asarray(load_image(path), dtype=np.float64)
    assert out.shape == photo.shape
    assert np.abs(out - photo).mean() < 4.0  # JPEG loss only


def test_16bit_png_is_scaled_not_clipped(tmp_path, photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    path = _save(Image.fromarray(gray.astype(np.uint16) * 257), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (*gray.shape, 3)
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)


def test_32bit_integer_tiff(tmp_path, photo):
    gray = np.asarray(Image.fromarray(photo).convert("L")).astype(np.int32) * 257
    path = _save(Image.fromarray(gray, mode="I"), tmp_path / "i32.tif")
    out = np.asarray(load_image(path))
    assert np.abs(out[..., 1].astype(int) - gray // 257).max() <= 1


def test_palette_with_transparency_on_white(tmp_path, photo):
    pal = Image.fromarray(photo).quantize(16)
    pal.info["transparency"] = 0
    path = _save(pal, tmp_path / "p.png", transparency=0)
    index = np.asarray(Image.open(path))
    out = np.asarray(load_image(path))
    assert (out[index == 0] == 255).all()
    opaque = np.asarray(pal.convert("RGB"))[index != 0]
    assert np.array_equal(out[index != 0], opaque)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_composited_on_white(tmp_path, photo, mode):
    rgba = Image.fromarray(photo).convert(mode[:-1]).convert(mode)
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[:, : photo.shape[1] // 2] = 255
    rgba.putalpha(Image.fromarray(alpha))
    path = _save(rgba, tmp_path / f"{mode}.png")
    out = np.asarray(load_image(path))
    assert (out[:, photo.shape[1] // 2:] == 255).all()  # transparent half: white
    expected = np.asarray(rgba.convert("RGB"))[:, : photo.shape[1] // 2]
    assert np.array_equal(out[:, : photo.shape[1] // 2], expected)


def test_exif_orientation_applied(tmp_path, photo):
    img = Image.fromarray(photo)  # 400 x 600 (h x w)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = _save(img, tmp_path / "rot.jpg", quality=95, exif=exif)
    out = np.asarray(load_image(path), dtype=np.float64)
    assert out.shape == (600, 400, 3)
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert np.abs(out - expected).mean() < 3.0


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in [(200, 0, 0), (0, 0, 200)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = np.asarray(load_image(path))
    assert out.shape == (30, 40, 3) and out[..., 0].min() > 150 and out[..., 2].max() < 50


def test_pixel_limit_refuses_from_header_alone(tmp_path):
    """A PNG header claiming 100k x 100k pixels (with no pixel data) is refused before decoding."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(BadImage, match="10,000,000,000 pixels is above the limit"):
        load_image(tmp_path / "bomb.png")


def test_pixel_limit_is_configurable(tmp_path, photo):
    path = _save(Image.fromarray(photo), tmp_path / "p.png")
    with pytest.raises(BadImage, match="--max-pixels"):
        load_image(path, max_pixels=photo.shape[0] * photo.shape[1] - 1)
    assert load_image(path, max_pixels=photo.shape[0] * photo.shape[1]).size == (600, 400)


def test_draft_decodes_smaller_but_keeps_margin(tmp_path, photo):
    big = Image.fromarray(photo).resize((2400, 1600), Image.Resampling.BICUBIC)
    path = _save(big, tmp_path / "big.jpg", quality=90)
    assert load_image(path).size == (2400, 1600)
    assert load_image(path, draft_size=400).size == (600, 400)  # 1/4 scale, both sides >= 400
    assert load_image(path, draft_size=800).size == (1200, 800)
    assert load_image(path, draft_size=801).size == (2400, 1600)  # 1/2 would go below 801


def test_dataset_turns_bad_files_into_flagged_zero_rows(tmp_path, photo):
    _save(Image.fromarray(photo), tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"")
    images = ImageList(tmp_path, PathList(["a.png", "b.jpg"]))
    ds = ImageDataset(images, range(2), 32)
    pos, pixels, reason = ds[0]
    assert (pos, reason, pixels.shape, pixels.dtype.is_floating_point) == (0, "", (3, 32, 32), False)
    assert pixels.float().std() > 10
    pos, pixels, reason = ds[1]
    assert pos == 1 and "empty" in reason and int(pixels.abs().sum()) == 0


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}, {"quality": 100}])
def test_fast_jpeg_decode_equals_pillow(tmp_path, photo, options):
    """load_pixels decodes colour JPEGs through TurboJPEG: the same pixels as Pillow's decoder."""
    path = _save(Image.fromarray(photo), tmp_path / "p.jpg", **{"quality": 90, **options})
    out = load_pixels(path)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(out, np.asarray(load_image(path)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_decode_applies_every_exif_orientation(tmp_path, photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(photo[:300, :500]), tmp_path / "o.jpg", quality=90, exif=exif)
    expected = np.asarray(load_image(path))  # Pillow's ImageOps.exif_transpose
    assert expected.shape[:2] == ((500, 300) if orientation >= 5 else (300, 500))
    assert np.array_equal(load_pixels(path), expected)


def test_fast_jpeg_decode_bad_and_unusual_files(tmp_path, photo):
    (tmp_path / "z.jpg").write_bytes(b"")
    (tmp_path / "t.jpg").write_text("this is not a picture\n")
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "junk.jpg").write_bytes(buf.getvalue()[:600] + bytes(range(256)) * 40)
    for name, reason in [("z.jpg", "empty file"), ("t.jpg", "not an image"), ("cut.jpg", "truncated"),
                         ("junk.jpg", "cannot decode")]:
        with pytest.raises(BadImage, match=reason):
            load_pixels(tmp_path / name)
    with pytest.raises(BadImage, match="--max-pixels"):
        load_pixels(_save(Image.fromarray(photo), tmp_path / "p.jpg"), max_pixels=1000)
    # Pillow handles what TurboJPEG's RGB path does not: CMYK and greyscale JPEGs, PNGs.
    for name, img in [("c.jpg", Image.fromarray(photo).convert("CMYK")),
                      ("g.jpg", Image.fromarray(photo).convert("L")), ("p.png", Image.fromarray(photo))]:
        path = _save(img, tmp_path / name)
        assert np.array_equal(load_pixels(path), np.asarray(load_image(path)))


@pytest.mark.parametrize("shape", [(8, 8), (13, 7), (400, 600), (1200, 1600), (37, 1000), (224, 224)])
@pytest.mark.parametrize("size", [32, 224])
def test_resize_center_crop_matches_the_clip_transform(photo, shape, size):
    """torch's uint8 antialiased bicubic + crop vs torchvision Resize + CenterCrop on PIL images."""
    from torchvision import transforms as T

    rng = np.random.default_rng(shape[0])
    pixels = np.asarray(Image.fromarray(photo).resize(shape[::-1], Image.Resampling.BICUBIC))
    if min(shape) < 50:  # tiny images: noise, the hardest case for a resampler
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    expected = np.asarray(reference(Image.fromarray(pixels)), dtype=np.int16)
    out = resize_center_crop(pixels, size).permute(1, 2, 0).numpy().astype(np.int16)
    assert out.shape == expected.shape == (size, size, 3)
    diff = np.abs(out - expected)
    assert diff.max() <= 2 and diff.mean() < 0.02
