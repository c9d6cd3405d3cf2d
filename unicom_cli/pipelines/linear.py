"""Linear-probe job: train/val features (eval-knn's reader) → C search → L-BFGS fit → top-1/top-5, head file.

The train features stay sharded across ranks, as in eval-knn; the fit all-reduces the loss and
gradient over the shards, so the result does not depend on the number of processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError, UsageError
from unicom_cli.pipelines.features import ModelOptions, model_fields


# --C outside this is refused: within it the fit's 1/(C·n) (n up to ~1e9 rows) is a float32 number.
C_RANGE = (1e-12, 1e12)
# Raw features beyond this overflow the float32 fit (their squares pass float32's 3.4e38).
RAW_LIMIT = 1e18


@dataclass
class LinearConfig:
    """Everything `unicom eval-linear` needs; filled by the CLI."""

    train_dataset: Path | None = None  # ImageFolder trees, or ``dataset`` below
    val_dataset: Path | None = None
    dataset: str | None = None  # a benchmark with a classification split (cars, cub)
    data_root: Path = Path("data")
    C: float | None = None  # None: search on a held-out part of the train set
    normalize: bool = True  # L2-normalise features first (the original example does not)
    holdout: float = 0.1  # share of the train images held out for the C search
    max_iter: int = 1000
    tol: float = 1e-4
    seed: int = 0  # which train images are held out
    model: ModelOptions = field(default_factory=ModelOptions)
    train_embeddings: Path | None = None
    val_embeddings: Path | None = None
    save_classifier: Path | None = None
    json_out: Path | None = None
    overwrite: bool = False  # replace an existing --json / --save-classifier file


def run_linear(cfg: LinearConfig) -> dict | None:
    """Fit and evaluate the linear probe; returns the results dict on rank 0, None elsewhere."""
    import torch

    from unicom_cli.distributed import device_for, is_main, world_size
    from unicom_cli.distributed.comm import shard_range
    from unicom_cli.eval.linear import LinearHead, accuracy_counts, fit, search_C
    from unicom_cli.pipelines.features import labelled_features, write_json
    from unicom_cli.utils.console import info
    from unicom_cli.utils.files import check_output_file

    if cfg.C is not None and not C_RANGE[0] <= cfg.C <= C_RANGE[1]:
        raise UsageError(f"--C {cfg.C:g}: must be between {C_RANGE[0]:g} and {C_RANGE[1]:g} (the search "
                         f"tries 1e-06 to 1e+06; beyond the range the fit's 1/(C·n) under- or overflows)")
    if not 0 < cfg.holdout < 1:
        raise UsageError(f"--holdout {cfg.holdout}: must be between 0 and 1")
    if cfg.max_iter < 1:
        raise UsageError("--max-iter must be at least 1")
    if cfg.save_classifier is not None and Path(cfg.save_classifier).is_dir():
        raise UsageError(f"--save-classifier {cfg.save_classifier}: is a folder; give a file name "
                         f"such as head.safetensors")
    check_output_file(cfg.save_classifier, "--save-classifier", overwrite=cfg.overwrite)
    check_output_file(cfg.json_out, "--json", overwrite=cfg.overwrite)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    train_set, val_set = _splits(cfg)
    data = labelled_features(train_set, val_set, cfg.model, cfg.train_embeddings, cfg.val_embeddings,
                             check_train=_two_classes)
    timings["features"] = time.perf_counter() - t0
    # The head predicts the classes that have train images; others always miss.
    seen = np.unique(data.train_labels)
    head_index = np.full(len(data.classes), -1, np.int64)
    head_index[seen] = np.arange(len(seen))
    classes = [data.classes[i] for i in seen]
    train = data.train
    pos = train.positions[train.ok]
    x = _prepare(train.features[train.ok], cfg.normalize, cfg.train_embeddings or "train features",
                 [train_set.paths[i] for i in pos])
    y = head_index[data.train_labels[pos]]
    val = data.val
    vx = _prepare(val.features[val.ok], cfg.normalize, cfg.val_embeddings or "val features",
                  [val_set.paths[i] for i in val.positions[val.ok]])
    vy = head_index[data.val_labels[val.ok]]

    device = torch.device(device_for(cfg.model.device))
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    t = time.perf_counter()
    search = None
    C = cfg.C
    if C is None:
        # Held-out rows by global position: the same split for any number of processes.
        hold = np.random.default_rng(cfg.seed).random(len(data.train_labels)) < cfg.holdout
        mine = torch.from_numpy(hold[pos]).to(device)
        search = search_C(xt[~mine], yt[~mine], xt[mine], yt[mine], len(classes), max_iter=cfg.max_iter,
                          tol=cfg.tol, progress=lambda c, a: info(f"C={c:.4g}: held-out top-1 {a:.2f}"))
        C = search.C
        info(f"chosen C={C:.4g}; refitting on all train images")
    timings["search"] = time.perf_counter() - t
    t = time.perf_counter()
    W, b, iterations = fit(xt, yt, len(classes), C, max_iter=cfg.max_iter, tol=cfg.tol)
    timings["fit"] = time.perf_counter() - t
    share = shard_range(len(vy))  # each rank scores its share of the val rows
    counts = accuracy_counts(torch.from_numpy(vx[share.start:share.stop]).to(device),
                             torch.from_numpy(vy[share.start:share.stop]).to(device), W, b, (1, 5))
    timings["total"] = time.perf_counter() - t0
    if not is_main():
        return None
    n_val = max(len(vy), 1)
    results = {
        "command": "eval-linear",
        "dataset": cfg.dataset,
        "train_dataset": str(cfg.train_dataset) if cfg.train_dataset else None,
        "val_dataset": str(cfg.val_dataset) if cfg.val_dataset else None,
        **model_fields(data.loaded),
        "embeddings": None if cfg.train_embeddings is None else [str(cfg.train_embeddings), str(cfg.val_embeddings)],
        "sizes": {"train": len(data.train_labels) - data.train_skipped, "val": len(vy), "classes": len(classes)},
        "skipped": {"train": data.train_skipped, "val": len(val.failures)},
        "normalize": cfg.normalize,
        "C": C,
        "C_search": None if search is None else {"holdout": cfg.holdout, "seed": cfg.seed,
                                                 "tried": [{"C": c, "top1": a} for c, a in search.tried]},
        "iterations": iterations,
        "metrics": {"top1": 100.0 * counts[1] / n_val, "top5": 100.0 * counts[5] / n_val},
        "device": str(device),
        "processes": world_size(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "outputs": [],
    }
    if cfg.save_classifier is not None:
        head = LinearHead(W.float().cpu().numpy(), b.float().cpu().numpy(), classes, cfg.normalize,
                          {"C": C, "source": "eval-linear", **model_fields(data.loaded)})
        head.save(cfg.save_classifier)
        results["outputs"].append(str(cfg.save_classifier))
    if cfg.json_out is not None:
        results["outputs"].append(str(cfg.json_out))
        write_json(cfg.json_out, results)
    return results


def _splits(cfg: LinearConfig):
    """The train and val images: a benchmark's classification split, or two ImageFolder trees."""
    from unicom_cli.data.classification import ClassImages, load_classification

    trees = cfg.train_dataset is not None or cfg.val_dataset is not None
    if cfg.dataset is not None:
        if trees:
            raise UsageError("give --dataset, or --train-dataset and --val-dataset, not both")
        return load_classification(cfg.dataset, cfg.data_root)
    if cfg.train_dataset is None or cfg.val_dataset is None:
        raise UsageError("give --train-dataset and --val-dataset (ImageFolder trees), or --dataset cars|cub")
    return ClassImages.scan(cfg.train_dataset), ClassImages.scan(cfg.val_dataset)


def _two_classes(train_names: list[str]) -> None:
    """One class makes every prediction right (100 %) without learning anything."""
    classes = sorted(set(train_names))
    if len(classes) < 2:
        raise InputError(f"the training set has {len(classes)} class ({classes[0] if classes else 'none'}): "
                         "a linear probe needs at least 2 classes")


def _prepare(x: np.ndarray, normalize: bool, source, ids: list[str]) -> np.ndarray:
    """float32 rows, L2-normalised when asked (the feature readers already refuse NaN/Inf).

    Raw rows beyond RAW_LIMIT are refused, naming the first: the fit's products of features
    (logits, curvature) would overflow float32."""
    from unicom_cli.eval.search import l2_normalize

    if normalize:
        return l2_normalize(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not len(x):
        return x
    largest = np.maximum(x.max(axis=1), -x.min(axis=1))  # |x| per row without a copy of x
    big = np.flatnonzero(largest > RAW_LIMIT)
    if len(big):
        row = int(big[0])
        raise InputError(f"{source}: {ids[row]} holds a feature of {largest[row]:.3g} ({len(big):,} rows "
                         f"above {RAW_LIMIT:g}); raw features this large overflow the float32 fit: drop "
                         "--no-normalize or rescale them")
    return x


def check_head(head_path: Path, embedding_size: int, normalize: bool, num_feat: int | None):
    """Load the head for ``unicom embed --head`` and check it fits the rows embed will write."""
    from unicom_cli.eval.linear import LinearHead

    head = LinearHead.load(head_path)
    if head.weight.shape[1] != embedding_size or num_feat is not None:
        raise UsageError(f"--head {head_path}: the head takes {head.weight.shape[1]}-dim features; "
                         f"this model writes {num_feat or embedding_size} (use the model the head was "
                         f"fitted on, without --num-feat)")
    if normalize and not head.normalize:
        raise UsageError(f"--head {head_path}: the head was fitted on raw features; drop --normalize")
    return head


def write_predictions(head, npy: Path, ids: Path, out: Path, chunk: int = 65536) -> int:
    """CSV ``id,class,probability`` (the top class and its softmax probability) for every row of
    an embed output, written atomically; returns the number of rows."""
    import csv
    import io

    from unicom_cli.utils.files import write_text_atomic

    matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
    names = [line for line in Path(ids).read_text(encoding="utf-8").splitlines() if line]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "class", "probability"])
    for s in range(0, len(matrix), chunk):
        k, p = head.predict(np.asarray(matrix[s:s + chunk], dtype=np.float32))
        writer.writerows((names[s + i], head.classes[c], f"{q:.6f}") for i, (c, q) in enumerate(zip(k, p)))
    write_text_atomic(out, buf.getvalue())
    return len(matrix)
