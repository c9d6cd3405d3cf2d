"""Which images a finetune run trains and evaluates on, per data set (SPEC §2 and §3 splits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unicom_cli.errors import UsageError
from unicom_cli.train.data import ImageList, scan_image_folder
from unicom_cli.utils.console import info

BENCHMARKS = ("sop", "cub", "cars", "inshop", "inat")
DEFAULT_ROOTS = {"sop": "Stanford_Online_Products", "cub": "CUB_200_2011", "cars": "cars196",
                 "inshop": "Inshop_Clothes", "inat": "iNaturalist", "gldv2": "GLDv2"}


def train_split(name: str, root: Path) -> ImageList:
    """The training images of a retrieval benchmark (the complement of its test classes)."""
    if name not in BENCHMARKS:
        raise UsageError(f"--dataset {name}: choose gldv2, {', '.join(BENCHMARKS)} or folder:PATH")
    raise UsageError(f"--dataset {name}: benchmark readers are not available in this build; "
                     f"use --dataset folder:PATH")


def _test_images(dataset: str, data: Path | None) -> ImageList | None:
    if dataset.startswith("folder:"):
        root = Path(dataset[len("folder:"):])
        for name in ("test", "val"):
            if (root / name).is_dir():
                return scan_image_folder(root / name)
        return None
    return None


def recall_at_1(features: np.ndarray, labels: np.ndarray) -> float:
    """All-vs-all Recall@1 on L2-normalised features, the query excluded by index."""
    feats = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sims = feats @ feats.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[sims.argmax(axis=1)] == labels))


@torch.no_grad()
def _features(model, spec, paths, device, batch_size: int) -> np.ndarray:
    from PIL import Image

    from unicom_cli.models.transforms import eval_transform

    transform = eval_transform(spec)
    out = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as img:
                batch.append(transform(img.convert("RGB")))
        out.append(model(torch.stack(batch).to(device)).float().cpu().numpy())
    return np.concatenate(out)


def evaluate(dataset: str, data: Path | None, model, spec, device, *, batch_size: int = 64,
             workers: int | None = None) -> dict | None:
    """``{"metric": name, name: value, "images": n}`` on the test split, or None if there is none."""
    images = _test_images(dataset, data)
    if images is None:
        info(f"no test split for --dataset {dataset}: skipping evaluation")
        return None
    feats = _features(model, spec, images.paths, device, batch_size)
    return {"metric": "recall@1", "recall@1": recall_at_1(feats, np.asarray(images.labels)),
            "images": len(images.paths)}
