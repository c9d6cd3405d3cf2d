"""Which images a finetune run trains and evaluates on, per data set (SPEC §2 and §3 splits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unicom_cli.errors import DatasetLayout, InputError, UsageError
from unicom_cli.train.data import ImageList, relabel, scan_image_folder
from unicom_cli.utils.console import info, warn

BENCHMARKS = ("sop", "cub", "cars", "inshop", "inat")
def train_split(name: str, root: Path | None) -> ImageList:
    """The training images of a retrieval benchmark (the complement of its test classes).

    ``root`` is the folder holding the benchmark folders (default ./data), as for eval-retrieval.
    """
    if name not in BENCHMARKS:
        raise UsageError(f"--dataset {name}: choose gldv2, {', '.join(BENCHMARKS)} or folder:PATH")
    try:
        from unicom_cli.data.benchmarks import load_benchmark
    except ImportError as exc:  # the readers ship with eval-retrieval
        raise UsageError(f"--dataset {name}: benchmark readers are not available in this build; "
                         f"use --dataset folder:PATH") from exc
    bench = load_benchmark(name, Path(root) if root else Path("data"))
    if bench.train is None:
        raise DatasetLayout(f"{bench.root}: no training list for {name} (SPEC §3 train split); "
                            f"see `unicom eval-retrieval --help` for the expected layout")
    return relabel([bench.root / p for p in bench.train.paths], bench.train.labels.tolist())


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


def _test_benchmark(dataset: str, data: Path | None):
    """eval-retrieval's reader for the test split, or None where there is none."""
    from unicom_cli.data.benchmarks import load_benchmark

    if dataset.startswith("folder:"):
        root = Path(dataset[len("folder:"):])
        tests = [root / n for n in ("test", "val") if (root / n).is_dir()]
        return load_benchmark(f"folder:{tests[0]}") if tests else None
    return load_benchmark(dataset, Path(data) if data else Path("data"))


def evaluate(dataset: str, data: Path | None, model, spec, device, *, batch_size: int = 64,
             workers: int | None = None) -> dict | None:
    """``{"metric": name, name: value, ...}`` on the test split (every rank), or None if none.
    Values are percentages (0-100), the unit of eval-retrieval.

    Recall@1 all-vs-all (or query vs gallery), mAP@100 (private) for GLDv2, through the
    eval-retrieval pipeline (sharded feature extraction, exact search); a plain in-memory
    fallback when that pipeline is not installed.
    """
    try:
        import unicom_cli.pipelines.embed  # noqa: F401  (model_features needs it)
        from unicom_cli.pipelines.features import ModelOptions, model_features
        from unicom_cli.pipelines.retrieval import _metrics, _search_all
    except ImportError:
        return _evaluate_plain(dataset, model, spec, device, batch_size)
    from unicom_cli.eval.search import l2_normalize, resolve_backend
    from unicom_cli.models.factory import LoadedModel
    from unicom_cli.models.transforms import eval_transform

    try:
        bench = _test_benchmark(dataset, data if not dataset.startswith("folder:") else None)
    except InputError as exc:  # e.g. GLDv2 train set present, its test/index sets not
        warn(f"evaluation skipped: {exc}")
        return None
    if bench is None:
        info(f"no test split for --dataset {dataset}: skipping evaluation")
        return None
    split = bench.test
    loaded = LoadedModel(model, eval_transform(spec), spec, None, None)
    opts = ModelOptions(batch_size=batch_size, workers=workers)
    feats = model_features(split.paths, bench.root, opts, loaded, description="eval features")
    if not feats.ok.all():
        split = split.subset(feats.ok)
    x = l2_normalize(feats.features[feats.ok])
    dev = str(device)
    neighbours, _ = _search_all(split, x, [1], resolve_backend("auto", dev), dev)
    metrics = _metrics(split, neighbours, [1])  # percentages, as eval-retrieval prints them
    key = "map@100_private" if "map@100_private" in metrics else \
        next((k for k in metrics if k.startswith("map@100")), "recall@1")
    return {"metric": key, **metrics, "images": len(split.paths)}


def _evaluate_plain(dataset: str, model, spec, device, batch_size: int) -> dict | None:
    images = _test_images(dataset, None)
    if images is None:
        info(f"no test split for --dataset {dataset} without eval-retrieval: skipping evaluation")
        return None
    feats = _features(model, spec, images.paths, device, batch_size)
    return {"metric": "recall@1", "recall@1": 100 * recall_at_1(feats, np.asarray(images.labels)),
            "images": len(images.paths)}
