"""kNN classification job: sharded train features, per-rank top-k merged across ranks, weighted vote.

Each rank keeps only its share of the train features, searches every val image against it
and all-gathers its (score, index) top-k lists; the merge equals one search over all train
images, so the metrics do not depend on the number of processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import UsageError
from unicom_cli.pipelines.features import ModelOptions, model_fields


DEFAULT_NB_KNN = [10, 20, 100, 200]


@dataclass
class KnnConfig:
    """Everything `unicom eval-knn` needs; filled by the CLI."""

    train_dataset: Path
    val_dataset: Path
    nb_knn: list[int] | None = None  # None: DEFAULT_NB_KNN, less the values above the train size
    temperature: float = 0.07
    per_class: bool = False
    n_per_class: int | None = None
    n_tries: int = 1
    model: ModelOptions = field(default_factory=ModelOptions)
    train_embeddings: Path | None = None
    val_embeddings: Path | None = None
    gather_on_cpu: bool = False
    backend: str = "auto"
    num_feat: int | None = None
    json_out: Path | None = None
    overwrite: bool = False  # replace an existing --json file


def run_knn(cfg: KnnConfig) -> dict | None:
    """Evaluate kNN accuracy; returns the results dict on rank 0, None on other ranks."""
    from unicom_cli.distributed import device_for, is_main, world_size
    from unicom_cli.eval.knn import few_shot_subsets, knn_classify
    from unicom_cli.eval.search import l2_normalize, resolve_backend
    from unicom_cli.data.classification import ClassImages
    from unicom_cli.pipelines.features import labelled_features, write_json

    _validate(cfg)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    nb_knn: list[int] = []

    def check_k(train_names: list[str]) -> None:  # after the scan, before any feature
        nb_knn.extend(_fitting_k(cfg, train_names))

    data = labelled_features(ClassImages.scan(cfg.train_dataset), ClassImages.scan(cfg.val_dataset), cfg.model,
                             cfg.train_embeddings, cfg.val_embeddings, check_train=check_k)
    timings["features"] = time.perf_counter() - t
    train, val, loaded, classes = data.train, data.val, data.loaded, data.classes
    train_labels, train_skipped = data.train_labels, data.train_skipped
    train_x = l2_normalize(train.features[train.ok], cfg.num_feat)
    train_pos = train.positions[train.ok]
    val_x = l2_normalize(val.features[val.ok], cfg.num_feat)
    val_y = data.val_labels[val.ok]

    t = time.perf_counter()
    device = device_for(cfg.model.device)
    backend = resolve_backend(cfg.backend, device)
    k = max(nb_knn)
    subsets = few_shot_subsets(train_labels, cfg.n_per_class, cfg.n_tries) if cfg.n_per_class else [None]
    runs = []
    for subset in subsets:
        keep = np.ones(len(train_pos), bool) if subset is None else np.isin(train_pos, subset)
        scores, idx = _sharded_topk(val_x, train_x[keep], train_pos[keep], k, backend, device,
                                    cfg.gather_on_cpu)
        valid = idx < len(train_labels)
        if not valid.all():  # fewer train images than k in total
            raise UsageError(f"--nb-knn {k} is more than the {int(valid.sum(1).min())} train images available")
        runs.append((scores, train_labels[idx]))
    timings["search"] = time.perf_counter() - t
    if not is_main():
        return None

    t = time.perf_counter()
    per_try = [knn_classify(s, lab, val_y, nb_knn, cfg.temperature, len(classes)) for s, lab in runs]
    metrics = _mean_over_tries(per_try, nb_knn, cfg.per_class)
    timings["metrics"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results = {
        "command": "eval-knn",
        "train_dataset": str(cfg.train_dataset),
        "val_dataset": str(cfg.val_dataset),
        **model_fields(loaded),
        "embeddings": None if cfg.train_embeddings is None else [str(cfg.train_embeddings), str(cfg.val_embeddings)],
        "sizes": {"train": len(train_labels) - train_skipped, "val": len(val_y), "classes": len(classes)},
        "skipped": {"train": train_skipped, "val": len(val.failures)},
        "temperature": cfg.temperature,
        "few_shot": None if not cfg.n_per_class else {"n_per_class": cfg.n_per_class, "n_tries": cfg.n_tries},
        "metrics": metrics,
        "backend": backend,
        "device": device,
        "processes": world_size(),
        "timings": {k_: round(v, 3) for k_, v in timings.items()},
    }
    written = []
    if cfg.json_out is not None:
        write_json(cfg.json_out, results)
        written.append(cfg.json_out)
    results["written"] = written
    return results


def _fitting_k(cfg: KnnConfig, train_names: list[str]) -> list[int]:
    """The k values to evaluate: a k above the train images available fails here, before any work,
    when the user typed it; from the default list such values are dropped, with a note."""
    from collections import Counter

    from unicom_cli.utils.console import info

    available = len(train_names)
    what = f"{available:,} train images"
    if cfg.n_per_class:
        available = sum(min(cfg.n_per_class, n) for n in Counter(train_names).values())
        what = f"{available:,} train images in each few-shot draw (--n-per-class {cfg.n_per_class})"
    if cfg.nb_knn is not None:
        too_big = [k for k in cfg.nb_knn if k > available]
        if too_big:
            raise UsageError(f"--nb-knn {', '.join(map(str, too_big))}: more neighbours than the "
                             f"{what} in {cfg.train_dataset}; choose k ≤ {available}")
        return list(cfg.nb_knn)
    kept = [k for k in DEFAULT_NB_KNN if k <= available]
    if not kept:
        raise UsageError(f"{cfg.train_dataset}: only {what}, fewer than the smallest default "
                         f"k {DEFAULT_NB_KNN[0]}; pass --nb-knn K with K ≤ {available}")
    if len(kept) < len(DEFAULT_NB_KNN):
        dropped = ", ".join(str(k) for k in DEFAULT_NB_KNN if k > available)
        info(f"k = {dropped} left out of the default --nb-knn: more than the {what}")
    return kept


def _mean_over_tries(per_try: list[dict], nb_knn: list[int], per_class: bool) -> dict:
    """Accuracies per k averaged over the few-shot tries (``*_std`` where there are several)."""
    metrics = {}
    for kk in nb_knn:
        entry = {}
        keys = ("top1", "top5") + (("top1_per_class", "top5_per_class") if per_class else ())
        for key in keys:
            values = [r[kk][key] for r in per_try]
            entry[key] = float(np.mean(values))
            if len(values) > 1:
                entry[f"{key}_std"] = float(np.std(values))
        metrics[str(kk)] = entry
    return metrics


def _validate(cfg: KnnConfig) -> None:
    """Options that cannot work, refused before any feature is computed."""
    from unicom_cli.utils.files import check_output_file

    if cfg.nb_knn is not None and (not cfg.nb_knn or min(cfg.nb_knn) < 1):
        raise UsageError("--nb-knn values must be ≥ 1")
    if not math.isfinite(cfg.temperature) or cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: must be a finite number above 0")
    check_output_file(cfg.json_out, "--json", overwrite=cfg.overwrite)  # before the work, not after it


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def _sharded_topk(val_x: np.ndarray, train_x: np.ndarray, train_pos: np.ndarray, k: int,
                  backend: str, device: str, on_host: bool) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k (scores, train positions) of every val row, from this rank's train shard.

    Positions past the end (``int64 max``) pad lists when a shard has fewer than k rows.
    """
    from unicom_cli.distributed import world_size
    from unicom_cli.eval.search import merge_topk, search

    kk = min(k, len(train_x))
    res = search(val_x, train_x, kk, backend=backend, device=device, gallery_on_host=on_host, exact_scores=True,
                 progress="kNN search")
    scores = np.full((len(val_x), k), -np.inf, np.float32)
    idx = np.full((len(val_x), k), np.iinfo(np.int64).max, np.int64)
    scores[:, :kk] = res.scores
    idx[:, :kk] = train_pos[res.indices] if kk else idx[:, :0]
    if world_size() == 1:
        return scores, idx
    import torch
    import torch.distributed as dist

    dev = _comm_device()
    parts_s = [torch.empty(scores.shape, dtype=torch.float32, device=dev) for _ in range(world_size())]
    parts_i = [torch.empty(idx.shape, dtype=torch.int64, device=dev) for _ in range(world_size())]
    dist.all_gather(parts_s, torch.from_numpy(scores).to(dev))
    dist.all_gather(parts_i, torch.from_numpy(idx).to(dev))
    merged = merge_topk([p.cpu().numpy() for p in parts_s], [p.cpu().numpy() for p in parts_i], k)
    return merged.scores, merged.indices
