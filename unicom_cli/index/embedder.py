"""Query images → vectors made exactly as the index's collection was (model, weights, crop, normalisation, num_feat)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from unicom_cli.errors import BadImage, InputError, UsageError, WeightsError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from unicom_cli.models.factory import LoadedModel

ImageLike = Union["PILImage.Image", np.ndarray, bytes]


@dataclass
class EmbeddedPaths:
    """Vectors of the query files that could be read, and why the others could not."""

    vectors: np.ndarray  # (len(ok paths), dim) float32
    paths: list[str]  # the files that were embedded, in order
    failures: list[tuple[str, str]]  # (path, reason)


class QueryEmbedder:
    """Callable: a list of images (PIL images, RGB uint8 (H, W, 3) arrays or encoded bytes) →
    (n, dim) float32 vectors comparable with the index's rows.

    The pixels go through the embed pipeline's own steps: the same decoder for bytes and files
    (EXIF orientation, modes, TurboJPEG), the same resize + centre crop, the same forward pass
    and then the L2 normalisation and ``num_feat`` cut recorded in ``index.json``. PIL images and
    arrays are used as given (apply EXIF orientation first, or pass the file's bytes).
    """

    def __init__(self, loaded: "LoadedModel", normalized: bool, num_feat: int | None,
                 batch_size: int = 32) -> None:
        from unicom_cli.models.forward import PixelForward

        self.loaded = loaded
        self.normalized = normalized
        self.num_feat = num_feat
        self.batch_size = batch_size
        self._forward = PixelForward(loaded)
        self.dim = num_feat or loaded.spec.embedding_size

    def __call__(self, images: Sequence[ImageLike]) -> np.ndarray:
        pixels = [self._pixels(image) for image in images]
        return self._embed_pixels(pixels)

    def embed_paths(self, paths: Sequence[str | Path], max_pixels: int | None = None) -> EmbeddedPaths:
        """Embed image files; unreadable ones are skipped and reported, like ``unicom embed``."""
        from unicom_cli.data.images import DEFAULT_MAX_PIXELS, load_pixels

        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        good, pixels, failures = [], [], []
        for path in paths:
            try:
                pixels.append(load_pixels(path, max_pixels=limit))
                good.append(str(path))
            except BadImage as exc:
                failures.append((str(path), str(exc)))
        return EmbeddedPaths(self._embed_pixels(pixels), good, failures)

    def _pixels(self, image: ImageLike) -> np.ndarray:
        from unicom_cli.data.images import decode_pixels, to_rgb

        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_pixels(bytes(image))
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise UsageError(f"image array of shape {image.shape} and dtype {image.dtype}: "
                                 "expected RGB uint8 (H, W, 3)")
            return image
        return np.asarray(to_rgb(image))

    def _embed_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        import torch

        from unicom_cli.data.images import resize_center_crop
        from unicom_cli.eval.search import l2_normalize

        size = self.loaded.spec.input_size
        out = np.zeros((len(pixels), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                batch = torch.stack([resize_center_crop(p, size, **self.loaded.spec.geometry)
                                     for p in pixels[start:start + self.batch_size]])
                feats = self._forward(batch).numpy()
                if self.normalized:
                    feats = l2_normalize(feats, self.num_feat)
                out[start:start + len(feats)] = feats
        return out


def load_query_embedder(meta: dict, *, device: str = "cpu", weights: str | Path | None = None,
                        precision: str | None = None, cache: str | Path | None = None,
                        batch_size: int = 32) -> QueryEmbedder:
    """The model an index was built with, ready to embed queries (``meta`` is its index.json).

    Weights: ``weights`` if given, else the file recorded at build time, else the published
    weights from the cache (downloaded on first use), else the recorded random-init seed. Their
    SHA-256 must equal the recorded one: different weights would return confident but wrong
    neighbours. The precision defaults to the one the collection was embedded in.
    """
    from unicom_cli.models.factory import create_model

    if not meta.get("model"):
        raise UsageError("this index was built from vectors without a model (no .json beside "
                         "the .npy); query it with a .npy of vectors")
    model = _recorded_spec(meta)
    if model.family != "unicom":
        model, weights = _pinned_hub_model(model, weights, meta, cache), None
    expected = meta.get("weights_sha256")
    seed = meta.get("random_init_seed")
    path = weights
    if path is None and model.family == "unicom" and meta.get("weights") and Path(meta["weights"]).is_file():
        path = meta["weights"]
    if path is None and expected is None and seed is None:
        raise UsageError(f"this index was built with unrecorded {meta['model']} weights; pass "
                         "the same weights file with --weights, or query with a .npy of vectors")
    random_init = path is None and expected is None  # --random-init: the same seed, the same network
    # The collection's precision (bf16 on CPUs with native bf16 …): queries must match it.
    loaded = create_model(model, weights=path, pretrained=not random_init, seed=seed or 0,
                          device=device, precision=precision or meta.get("precision"), cache=cache)
    if expected is not None and loaded.sha256 != expected:
        source = loaded.weights_path or "the weights"
        raise WeightsError(f"{source}: SHA-256 {str(loaded.sha256)[:12]}… differs from the "
                           f"{expected[:12]}… this index was built with; pass the same weights "
                           "with --weights")
    if loaded.spec.embedding_size != meta.get("embedding_size", loaded.spec.embedding_size):
        raise InputError(f"{meta['model']}: embeds {loaded.spec.embedding_size} dims but the index "
                         f"recorded {meta['embedding_size']}")
    return QueryEmbedder(loaded, bool(meta.get("normalized")), meta.get("num_feat"), batch_size)


def _pinned_hub_model(recorded, other: str | Path | None, meta: dict, cache):
    """The recorded hub model, or ``--weights`` naming the same model (hf:ORG/NAME@REV or a local
    save_pretrained copy); another revision is refused, naming both."""
    if other is None:
        return recorded
    from unicom_cli.models.families import resolve_spec
    from unicom_cli.models.families.hub_files import is_commit, parse_hub_name

    if str(other).startswith("hf:"):
        repo, revision = parse_hub_name(str(other))
        if repo != recorded.repo:
            raise UsageError(f"{other}: this index was built with {recorded.hub_name}, another model")
        if revision and is_commit(revision) and revision != recorded.revision:  # no network needed
            raise UsageError(f"{other}: revision {revision} differs from the {recorded.revision} this "
                             f"index was built with ({recorded.hub_name}); query with that revision")
    given = resolve_spec(str(other), cache=cache)
    if given.revision and recorded.revision and given.revision != recorded.revision:
        raise UsageError(f"{other}: revision {given.revision} differs from the {recorded.revision} this "
                         f"index was built with ({recorded.hub_name}); query with that revision")
    return given if given.revision is None else recorded  # a local copy: its SHA-256 is checked


def _hub_snapshot(weights: str | None, revision: str | None) -> str:
    """The hub cache's snapshot folder of the recorded weights (``models--ORG--NAME/blobs/<sha256>``
    → ``…/snapshots/<commit>``): loaded from there, with no network. "index.json" when unknown."""
    if not weights or not revision:
        return "index.json"
    path = Path(weights)
    return str(path.parent.parent / "snapshots" / revision if path.parent.name == "blobs" else path.parent)


def _recorded_spec(meta: dict):
    """The network an index was embedded with: the registered model of that name when its
    architecture matches the recorded one, else the recorded architecture (a JSON model)."""
    from unicom_cli.models.registry import ModelSpec, available_models, get_spec

    fields = meta.get("model_spec") or {}
    if fields.get("family", "unicom") != "unicom":  # hub/timm: the recorded commit, exactly
        fields = {**fields, **{k: tuple(fields[k]) for k in ("mean", "std") if k in fields}}
        return ModelSpec(**{**fields, "source": _hub_snapshot(meta.get("weights"), fields.get("revision"))})
    if meta["model"] in available_models():
        spec = get_spec(meta["model"])
        if all(getattr(spec, key, value) == value for key, value in fields.items()):
            return spec
    if fields:
        return ModelSpec(**{**fields, "source": "index.json"})
    return get_spec(meta["model"])
