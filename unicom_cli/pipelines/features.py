"""Features for evaluation: extracted by a model, or read from a precomputed ``.npy`` + ids file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from unicom_cli.data.classification import ClassImages
from unicom_cli.data.ids import IDS_TEXT, embed_siblings, read_ids, write_ids
from unicom_cli.errors import InputError, NonFiniteFeatures
from unicom_cli.utils.files import atomic_open, disk_errors, write_json_atomic

# The reason the embed pipeline gives a row whose features are NaN or infinite.
NONFINITE_REASON = "the model gave non-finite features (NaN/Inf)"
SHOWN_IDS = 3


def refuse_nonfinite(ids: list[str], total: int, source: str) -> None:
    """Evaluation on NaN/Inf features gives meaningless numbers (NaN sorts as a perfect match):
    refuse, with the count and the first ids."""
    if ids:
        first = ", ".join(ids[:SHOWN_IDS]) + (", …" if len(ids) > SHOWN_IDS else "")
        raise NonFiniteFeatures(f"{source}: {len(ids):,} of {total:,} feature rows are not finite "
                                f"(NaN/Inf), e.g. {first}; check the weights and --precision, "
                                "or re-embed")


@dataclass
class ModelOptions:
    """What to build the feature extractor from (the CLI's model options)."""

    model: str = "ViT-B/32"
    weights: Path | None = None
    device: str = "auto"
    precision: str | None = "auto"  # models.factory.resolve_inference_precision
    batch_size: int = 64
    workers: int | None = None
    cache_dir: Path | None = None
    random_init: bool = False  # a seeded random network instead of trained weights (asked for)
    seed: int = 0  # seed of the random init
    mirror: str | None = None  # where to download published weights from


@dataclass
class Features:
    """Rows for some positions of a path list; ``ok`` False where the image or row is missing.

    What both sources of features give: the embed pipeline (:func:`extract_features`, all rows
    or one rank's shard) and a precomputed file (:func:`load_embeddings`).
    """

    features: np.ndarray  # (len(positions), D) float32, un-normalised, missing rows zero
    positions: np.ndarray  # int64 positions in the path list
    ok: np.ndarray  # bool per row
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def ids_file(npy: Path) -> Path:
    """``feats.npy`` → ``feats.ids.txt`` (the embed command's naming)."""
    return embed_siblings(npy)[0]


def load_embeddings(npy: Path, root: Path, paths: list[str],
                    positions: np.ndarray | None = None) -> Features:
    """Rows of a precomputed feature file for ``paths`` (relative to ``root``).

    Ids in the ids file are paths relative to whatever folder was embedded: the data root, the
    data set folder or a folder inside it. Each dataset path is matched by its trailing path
    components against the ids, so any of these works.

    Args:
        npy: the feature matrix (float32/float16), one row per line of its ids file.
        root: the folder ``paths`` are relative to.
        paths: the images to find.
        positions: only these positions of ``paths`` (a rank's shard); default all.
    """
    npy = Path(npy)
    ids_path = ids_file(npy)
    for f, what in ((npy, "a feature matrix written by `unicom embed`"),
                    (ids_path, f"the ids file next to {npy.name} (one image path per row)")):
        if not f.is_file():
            raise InputError(f"{f}: not found; expected {what}")
    try:
        matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{npy}: not a .npy feature matrix ({exc or type(exc).__name__}); "
                         "give a file written by `unicom embed`") from exc
    if matrix.dtype.kind not in "fiu":
        raise InputError(f"{npy}: holds {matrix.dtype} values, not numbers; give a float32/float16 "
                         "matrix written by `unicom embed`")
    try:  # ids of non-UTF-8 file names are the name's own bytes (see README)
        ids = read_ids(ids_path)
    except OSError as exc:
        raise InputError(f"{ids_path}: cannot read ({exc.strerror})") from exc
    if matrix.ndim != 2 or len(ids) != matrix.shape[0]:
        raise InputError(f"{npy}: {matrix.shape[0] if matrix.ndim else 0} rows but {ids_path.name} lists "
                         f"{len(ids)} ids; expected a 2-D matrix with one row per id")
    row_of = {tuple(Path(i).parts): n for n, i in enumerate(ids)}
    lengths = sorted({len(k) for k in row_of}, reverse=True)
    positions = np.arange(len(paths)) if positions is None else np.asarray(positions, np.int64)
    base = Path(os.path.abspath(root)).parts
    rows = np.full(len(positions), -1, dtype=np.int64)
    for n, pos in enumerate(positions):
        parts = base + Path(paths[pos]).parts
        for length in lengths:
            row = row_of.get(parts[-length:])
            if row is not None:
                rows[n] = row
                break
    ok = rows >= 0
    if len(positions) and not ok.any():
        raise InputError(f"{ids_path}: none of the {len(positions)} images of the data set (e.g. "
                         f"{paths[positions[0]]}) is listed; embed the data set folder "
                         f"({root}) to make these features")
    feats = np.zeros((len(positions), matrix.shape[1]), dtype=np.float32)
    if ok.any():
        order = np.argsort(rows[ok])  # read the memory map in file order
        feats[np.flatnonzero(ok)[order]] = np.asarray(matrix[rows[ok][order]], dtype=np.float32)
    bad = np.flatnonzero(ok & ~np.isfinite(feats).all(axis=1))
    refuse_nonfinite([ids[rows[n]] for n in bad], int(ok.sum()), str(npy))
    failures = [(paths[p], f"not in {ids_path.name}") for p in positions[~ok]]
    return Features(feats, positions, ok, failures)


def model_features(paths: list[str], root: Path, opts: ModelOptions, loaded=None, *,
                   description: str = "features", gather: bool = True) -> Features:
    """Extract features with the embed pipeline (robust decode, workers, progress bar).

    With ``gather`` every rank gets every row; without it only this rank's share.
    """
    from unicom_cli.pipelines.embed import extract_features

    full = [str(Path(root) / p) for p in paths]
    res = extract_features(full, loaded, batch_size=opts.batch_size, workers=opts.workers,
                           description=description, gather=gather)
    refuse_nonfinite([p for p, r in res.failures if r == NONFINITE_REASON], len(res.ok),
                     "the model's features")
    return res


def load_model(opts: ModelOptions):
    """The model on this rank's device (``create_model``); says which precision it runs in."""
    from unicom_cli.distributed import is_main
    from unicom_cli.models.factory import create_model, describe_precision
    from unicom_cli.utils.console import info

    loaded = create_model(opts.model, opts.weights, pretrained=not opts.random_init, seed=opts.seed,
                          device=opts.device, precision=opts.precision,
                          cache=opts.cache_dir, mirror=opts.mirror)
    if is_main():
        info(describe_precision(loaded, opts.precision))
    return loaded


def save_features(directory: Path, name: str, paths: list[str], feats: np.ndarray) -> Path:
    """Write ``<name>.npy`` + ``<name>.ids.txt`` atomically (reusable with ``--embeddings``)."""
    directory = Path(directory)
    with disk_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    npy = directory / f"{name}.npy"
    with atomic_open(npy, "wb") as fh:
        np.save(fh, np.ascontiguousarray(feats, dtype=np.float32))
    with atomic_open(ids_file(npy), "w", errors=IDS_TEXT["errors"]) as fh:
        write_ids(fh, map(str, paths))
    return npy


def model_fields(loaded) -> dict:
    """What a results JSON records about the model: name, weights file, SHA-256 (None: no model)."""
    return {
        "model": None if loaded is None else loaded.spec.name,
        "weights": None if loaded is None or loaded.weights_path is None else str(loaded.weights_path),
        "sha256": None if loaded is None else loaded.sha256,
        "precision": None if loaded is None else loaded.precision,
        "random_init_seed": None if loaded is None else loaded.random_init_seed,
        # hub models: the commit and what the embedding is (models/families/)
        "revision": None if loaded is None else loaded.spec.revision,
        "embedding": None if loaded is None else loaded.spec.embedding,
    }


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; --json needs a file name (e.g. {path}/results.json)")
    with disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


@dataclass
class LabelledFeatures:
    """Train (this rank's share) and val (all rows) features of two ImageFolder trees, with labels."""

    classes: list[str]  # sorted union of the train and val class folders
    train: Features  # this rank's rows only
    train_labels: np.ndarray  # label of every train position (all ranks' positions)
    val: Features  # every val row on every rank
    val_labels: np.ndarray
    loaded: object | None  # the model (None with precomputed features)
    train_skipped: int  # over all ranks


def labelled_features(train_set: ClassImages, val_set: ClassImages, opts: ModelOptions,
                      train_embeddings: Path | None = None,
                      val_embeddings: Path | None = None, *,
                      check_train: Callable[[list[str]], None] | None = None) -> LabelledFeatures:
    """Read or extract the features of two labelled image lists, warning about skipped images.

    ``check_train`` gets the train images' class names before any feature is read or extracted:
    options that cannot fit the data fail before the work.

    The train rows stay sharded across ranks (each rank extracts or reads its share only); the
    val rows are gathered on every rank. Shared by eval-knn and eval-linear.
    """
    from unicom_cli.distributed.comm import shard_range
    from unicom_cli.errors import UsageError
    from unicom_cli.utils.console import warn

    if (train_embeddings is None) != (val_embeddings is None):
        raise UsageError("give both --train-embeddings and --val-embeddings, or neither")
    train_dataset, train_paths, train_names = train_set.root, train_set.paths, train_set.names
    val_dataset, val_paths, val_names = val_set.root, val_set.paths, val_set.names
    classes = sorted(set(train_names) | set(val_names))
    index = {c: i for i, c in enumerate(classes)}
    train_labels = np.array([index[n] for n in train_names], dtype=np.int64)
    val_labels = np.array([index[n] for n in val_names], dtype=np.int64)
    unseen = sorted(set(val_names) - set(train_names))
    if unseen:
        warn(f"{len(unseen)} val classes have no train images (e.g. {unseen[0]}): those images always miss")
    if check_train is not None:
        check_train(train_names)
    loaded = None
    if train_embeddings is not None:
        shard = shard_range(len(train_paths))
        train = load_embeddings(train_embeddings, train_dataset, train_paths, np.arange(shard.start, shard.stop))
        val = load_embeddings(val_embeddings, val_dataset, val_paths)
        if train.features.shape[1] != val.features.shape[1]:
            raise InputError(f"{val_embeddings}: rows of {val.features.shape[1]} dimensions, but "
                             f"{train_embeddings} has {train.features.shape[1]}; embed both with the "
                             "same model and --num-feat")
    else:
        loaded = load_model(opts)
        train = model_features(train_paths, train_dataset, opts, loaded, description="train features", gather=False)
        val = model_features(val_paths, val_dataset, opts, loaded, description="val features")
    train_skipped = _count_all_ranks(len(train.failures))
    if train_skipped:
        warn(f"{train_skipped} train images skipped (first: {train.failures[0][0]}: {train.failures[0][1]})"
             if train.failures else f"{train_skipped} train images skipped")
    if val.failures:
        warn(f"{len(val.failures)} val images skipped (first: {val.failures[0][0]}: {val.failures[0][1]})")
    _refuse_unusable("val", val, len(val_paths))
    if _count_all_ranks(int(train.ok.sum())) == 0:
        _refuse_unusable("train", train, len(train_paths))
    return LabelledFeatures(classes, train, train_labels, val, val_labels, loaded, train_skipped)


def _refuse_unusable(name: str, part: Features, total: int) -> None:
    """Every image unreadable: refuse, instead of a table of "nan" (or 0.00) with exit 0."""
    if total and not part.ok.any():
        first = f" (first: {part.failures[0][0]}: {part.failures[0][1]})" if part.failures else ""
        raise InputError(f"none of the {total:,} {name} images could be used{first}")


def _count_all_ranks(n: int) -> int:
    """Sum of ``n`` over ranks (each rank only knows its own skipped images)."""
    from unicom_cli.distributed.comm import gather_objects

    return int(sum(gather_objects(n)))
