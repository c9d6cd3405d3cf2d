"""The self-check of an export: embeddings of real photos from the exported file against PyTorch's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unicom_cli.errors import UsageError

# Colour photos that ship inside scikit-image (no download): people, animals, objects, a
# microscope slide, deep space and a street scene; seven of them make the odd batch of the check.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "stereo_motorcycle")
# Per-row cosine an fp32 export must reach (rounding differences only); fp16 and int8 exports
# are compared with the fp32 PyTorch model, where their rounding shows (int8 on random ViT-B/32
# weights: ≥ 0.9992; on the tiny test model: ≥ 0.996).
BOUNDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}


def sample_photos(size: int, geometry: dict | None = None) -> tuple[list[str], np.ndarray]:
    """The photos as uint8 (N, 3, size, size), resized and cropped exactly as ``embed`` does."""
    try:
        from skimage import data
    except ImportError:
        raise UsageError("the export self-check embeds scikit-image's sample photos: "
                         "pip install 'unicom-cli[onnx]' (or pip install scikit-image)") from None
    from unicom_cli.data.images import resize_center_crop

    batch = []
    for name in PHOTOS:
        image = getattr(data, name)()
        if isinstance(image, tuple):  # stereo pairs: the left view
            image = image[0]
        batch.append(resize_center_crop(np.ascontiguousarray(image[..., :3]), size, **(geometry or {})).numpy())
    return list(PHOTOS), np.stack(batch)


@dataclass
class Parity:
    """Per-photo agreement of an exported model with PyTorch."""

    names: list[str]
    cosine: np.ndarray  # per row, float64
    max_abs: np.ndarray  # per row, largest absolute difference
    bound: float
    single_cosine: float  # photo 0 alone (batch of 1) against its PyTorch row

    @property
    def ok(self) -> bool:
        return bool(self.cosine.min() >= self.bound and self.single_cosine >= self.bound)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine in float64; two zero rows count as equal."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    return np.where((na == 0) & (nb == 0), 1.0, np.nan_to_num(cos, nan=-1.0))


def compare(names: list[str], reference: np.ndarray, batch: np.ndarray, single: np.ndarray,
            bound: float) -> Parity:
    """``batch``: all photos in one call; ``single``: photo 0 alone; both against ``reference``."""
    return Parity(names, cosine_rows(reference, batch),
                  np.abs(reference.astype(np.float64) - batch).max(axis=1), bound,
                  float(cosine_rows(reference[:1], single)[0]))
