"""kNN classification job: sharded train features, per-rank top-k merged across ranks, weighted vote.

Each rank keeps only its share of the train features, searches every val image against it
and all-gathers its (score, index) top-k lists; the merge equals one search over all train
images, so the metrics do not depend on the number of processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import UsageError
from unicom_cli.pipelines.features import ModelOptions, model_fields


@dataclass
class KnnConfig:
    """Everything `unicom eval-knn` needs; filled by the CLI."""

    train_dataset: Path
    val_dataset: Path
    nb_knn: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
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


def run_knn(cfg: KnnConfig) -> dict | None:
    """Evaluate kNN accuracy; returns the results dict on rank 0, None on other ranks."""
    from unicom_cli.data.images import scan_class_folders
    from unicom_cli.distributed import device_for, is_main, world_size
    from unicom_cli.distributed.comm import shard_range
    from unicom_cli.eval.knn import few_shot_subsets, knn_classify
    from unicom_cli.eval.search import l2_normalize, resolve_backend
    from unicom_cli.pipelines.features import load_embeddings, load_model, model_features, write_json
    from unicom_cli.utils.console import warn

    if not cfg.nb_knn or min(cfg.nb_knn) < 1:
        raise UsageError("--nb-knn values must be ≥ 1")
    if cfg.temperature <= 0:
        raise UsageError("--temperature must be > 0")
    if (cfg.train_embeddings is None) != (cfg.val_embeddings is None):
        raise UsageError("give both --train-embeddings and --val-embeddings, or neither")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    train_paths, train_names = scan_class_folders(cfg.train_dataset)
    val_paths, val_names = scan_class_folders(cfg.val_dataset)
    classes = sorted(set(train_names) | set(val_names))
    index = {c: i for i, c in enumerate(classes)}
    train_labels = np.array([index[n] for n in train_names], dtype=np.int64)
    val_labels = np.array([index[n] for n in val_names], dtype=np.int64)
    unseen = sorted(set(val_names) - set(train_names))
    if unseen:
        warn(f"{len(unseen)} val classes have no train images (e.g. {unseen[0]}): those images always miss")

    t = time.perf_counter()
    loaded = None
    if cfg.train_embeddings is not None:
        shard = shard_range(len(train_paths))
        train = load_embeddings(cfg.train_embeddings, cfg.train_dataset, train_paths,
                                np.arange(shard.start, shard.stop))
        val = load_embeddings(cfg.val_embeddings, cfg.val_dataset, val_paths)
    else:
        loaded = load_model(cfg.model)
        train = model_features(train_paths, cfg.train_dataset, cfg.model, loaded,
                               description="train features", gather=False)
        val = model_features(val_paths, cfg.val_dataset, cfg.model, loaded, description="val features")
    timings["features"] = time.perf_counter() - t
    train_skipped = _count(train.failures)
    if train_skipped:
        warn(f"{train_skipped} train images skipped (first: {train.failures[0][0]}: {train.failures[0][1]})"
             if train.failures else f"{train_skipped} train images skipped")
    if val.failures:
        warn(f"{len(val.failures)} val images skipped (first: {val.failures[0][0]}: {val.failures[0][1]})")
    train_x = l2_normalize(train.features[train.ok], cfg.num_feat)
    train_pos = train.positions[train.ok]
    val_x = l2_normalize(val.features[val.ok], cfg.num_feat)
    val_y = val_labels[val.ok]

    t = time.perf_counter()
    device = device_for(cfg.model.device)
    backend = resolve_backend(cfg.backend, device)
    k = max(cfg.nb_knn)
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
    per_try = [knn_classify(s, lab, val_y, cfg.nb_knn, cfg.temperature, len(classes)) for s, lab in runs]
    metrics = _mean_over_tries(per_try, cfg.nb_knn, cfg.per_class)
    timings["metrics"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results = {
        "command": "eval-knn",
        "train_dataset": str(cfg.train_dataset),
        "val_dataset": str(cfg.val_dataset),
        **model_fields(loaded),
        "embeddings": None if cfg.train_embeddings is None else [str(cfg.train_embeddings), str(cfg.val_embeddings)],
        "sizes": {"train": len(train_paths) - train_skipped, "val": int(len(val_y)), "classes": len(classes)},
        "skipped": {"train": train_skipped, "val": len(val.failures)},
        "temperature": cfg.temperature,
        "few_shot": None if not cfg.n_per_class else {"n_per_class": cfg.n_per_class, "n_tries": cfg.n_tries},
        "metrics": metrics,
        "backend": backend,
        "device": device,
        "processes": world_size(),
        "timings": {k_: round(v, 3) for k_, v in timings.items()},
    }
    if cfg.json_out is not None:
        write_json(cfg.json_out, results)
    return results


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


def _count(failures: list) -> int:
    """Skipped train images over all ranks (each rank only knows its own)."""
    from unicom_cli.distributed import world_size

    n = len(failures)
    if world_size() == 1:
        return n
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item())


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
