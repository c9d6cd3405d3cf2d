"""Batches of decoded images → embeddings: the decode-and-forward loop shared by every embedding job."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from unicom_cli.data.images import DEFAULT_MAX_PIXELS, ImageDataset, ImageList
from unicom_cli.distributed import world_size
from unicom_cli.models.forward import PixelForward
from unicom_cli.pipelines.features import NONFINITE_REASON
from unicom_cli.utils.cpu import cores_per_process

if TYPE_CHECKING:
    import torch

    from unicom_cli.export.runtime import OnnxModel
    from unicom_cli.models.factory import LoadedModel


def default_workers(device_type: str) -> int:
    """Decoding processes per rank: this rank's share of the cores on CUDA; on CPU, where the
    forward pass needs the cores, one per two cores but at least two (on 2 cores two decoders
    gave b/a 0.88-0.90 against 0.84-0.86 for one, benchmarks/embed_throughput.py)."""
    share = cores_per_process(world_size())
    return min(share, 12) if device_type == "cuda" else max(min(share, 2), share // 2)


def is_onnx(loaded: "LoadedModel | OnnxModel") -> bool:
    from unicom_cli.export.runtime import OnnxModel  # light: onnxruntime loads on first session

    return isinstance(loaded, OnnxModel)


def iter_batches(images: ImageList, positions: Sequence[int], loaded: "LoadedModel | OnnxModel", *,
                 batch_size: int, workers: int | None, draft: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Yield (dataset positions, fp32 embeddings with failed rows zeroed, reasons) per batch.

    Batches are consecutive runs of ``positions`` of ``batch_size`` (the last may be shorter):
    the same composition on every run, which makes resumed output bitwise equal on CPU.
    ``loaded`` is a PyTorch model or an exported graph run by ONNX Runtime: only this forward
    step differs between the two.
    """
    from torch.utils.data import DataLoader

    onnx = is_onnx(loaded)
    forward = model_forward(loaded)
    if workers is None:
        workers = default_workers(forward.device.type)
    dataset = ImageDataset(images, positions, loaded.spec.input_size, max_pixels=max_pixels,
                           draft=draft, geometry=loaded.spec.geometry)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=not onnx and forward.cuda,  # ONNX Runtime reads host numpy arrays
        prefetch_factor=4 if workers else None,
        persistent_workers=False,  # one pass over the data: nothing to keep alive for
    )
    if len(dataset) == 0:  # a rank with nothing to do (more ranks than batches)
        return
    model = None if onnx else loaded.model
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        for pos, pixels, reasons in loader:
            feats, reasons = embed_pixels(forward, pixels, list(reasons))
            yield pos.numpy().astype(np.int64), feats, reasons
    finally:
        if model is not None:
            model.train(was_training)


def postprocess(feats: np.ndarray, normalize: bool, num_feat: int | None, dtype: str) -> np.ndarray:
    """L2-normalise (zero rows stay zero), keep the first ``num_feat`` dims (SPEC §2), cast."""
    if normalize:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = feats / np.maximum(norms, 1e-12)
    if num_feat is not None:
        feats = feats[:, :num_feat]
    return np.ascontiguousarray(feats, dtype=np.dtype(dtype))


def model_forward(loaded: "LoadedModel | OnnxModel"):
    """The forward step of ``loaded``: PixelForward for PyTorch, the session for an ONNX graph."""
    return loaded if is_onnx(loaded) else PixelForward(loaded)


def embed_pixels(forward, pixels: "torch.Tensor", reasons: list[str]) -> tuple[np.ndarray, list[str]]:
    """One batch: fp32 embeddings with failed and non-finite rows zeroed, and the reasons."""
    import torch

    with torch.inference_mode():
        feats = forward(pixels).numpy()
    reasons = list(reasons)
    for i in np.flatnonzero(~np.isfinite(feats).all(axis=1)):  # never a good row: a failure
        reasons[i] = reasons[i] or NONFINITE_REASON
    bad = np.array([bool(r) for r in reasons])
    if bad.any():
        feats[bad] = 0.0
    return feats, reasons
