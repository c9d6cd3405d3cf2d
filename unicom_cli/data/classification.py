"""The benchmarks' official classification splits (every class in train and test), for the
linear probe: Cars196 by the ``test`` flag of cars_annos.mat, CUB by train_test_split.txt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unicom_cli.data.benchmarks import SOURCES, _check_images, _need, _read_cars_mat
from unicom_cli.data.images import scan_class_folders
from unicom_cli.errors import DatasetLayout

# Benchmarks whose official classification split puts every class in both train and test, so a
# linear probe can be scored on them (the retrieval splits of benchmarks.py share no class).
CLASSIFICATION_DATASETS = ("cars", "cub")
OFFICIAL_SIZES = {"cars": "8,144 train and 8,041 test images", "cub": "5,994 train and 5,794 test images"}


@dataclass
class ClassImages:
    """Labelled images of one split: paths relative to ``root`` and each image's class name."""

    root: Path
    paths: list[str]
    names: list[str]

    @classmethod
    def scan(cls, tree: Path) -> "ClassImages":
        """An ImageFolder tree (label = class folder)."""
        paths, names = scan_class_folders(tree)
        return cls(Path(tree), paths, names)


def load_classification(dataset: str, data_root: Path) -> tuple[ClassImages, ClassImages]:
    """The official train/test classification split of ``cars`` or ``cub`` (all classes in both)."""
    from unicom_cli.errors import UsageError

    readers = {"cars": _cars_classification, "cub": _cub_classification}
    if dataset not in readers:
        raise UsageError(f"--dataset {dataset!r}: choose one of {', '.join(CLASSIFICATION_DATASETS)} "
                         f"(the other benchmarks split train and test by class, so no linear probe "
                         f"can be scored on them)")
    return readers[dataset](Path(data_root))


def _cars_classification(data_root: Path) -> tuple[ClassImages, ClassImages]:
    """Cars196 by the ``test`` flag of cars_annos.mat: 8,144 train / 8,041 test images, 196 classes."""
    root = data_root / "cars196"
    rel, cls, mat = _read_cars_mat(root, with_test=True)
    test = mat["test"]
    given = mat.get("class_names")
    given = [str(n) for n in np.atleast_1d(given)] if given is not None else []
    # The id first, so that sorted names keep the class order; the mat's name where it has one.
    label = [f"{c:03d} {given[c - 1]}" if c <= len(given) else f"{c:03d}" for c in cls]
    pick = lambda want: ClassImages(root, [p for p, t in zip(rel, test) if t == want],  # noqa: E731
                                    [n for n, t in zip(label, test) if t == want])
    return _both_filled("cars", pick(0), pick(1), root / "cars_annos.mat", "test flag", ("0", "1"))


def _cub_classification(data_root: Path) -> tuple[ClassImages, ClassImages]:
    """CUB-200-2011 by train_test_split.txt: 5,994 train / 5,794 test images, 200 classes."""
    root = data_root / "CUB_200_2011"
    images = _read_id_table(_need(root / "images.txt", "cub", "CUB_200_2011/images.txt (image id, path)"))
    split_file = _need(root / "train_test_split.txt", "cub", "CUB_200_2011/train_test_split.txt")
    is_train = _read_id_table(split_file)
    missing = [i for i in images if i not in is_train]
    if missing or any(v not in ("0", "1") for v in is_train.values()):
        raise DatasetLayout(f"{split_file}: expected one line '<image id> <0|1>' for every image of "
                            f"images.txt (first missing id: {missing[0] if missing else 'none'}). "
                            f"Get {SOURCES['cub']}")
    rel = [f"images/{path}" for path in images.values()]
    _check_images(root, rel, "cub", root / "images.txt")
    names = [Path(path).parent.name for path in images.values()]
    flags = [is_train[i] for i in images]
    pick = lambda want: ClassImages(root, [p for p, f in zip(rel, flags) if f == want],  # noqa: E731
                                    [n for n, f in zip(names, flags) if f == want])
    return _both_filled("cub", pick("1"), pick("0"), split_file, "split value", ("1", "0"))


def _both_filled(dataset: str, train: ClassImages, test: ClassImages, file: Path, what: str,
                 values: tuple[str, str]) -> tuple[ClassImages, ClassImages]:
    """An empty split would be scored as 0.00 over zero images (or fail in the C search):
    refuse, naming the file and the flag that no image carries."""
    for split, value, name in ((train, values[0], "train"), (test, values[1], "test")):
        if not split.paths:
            raise DatasetLayout(f"{file}: no image has {what} {value}, so the {name} split is empty "
                                f"(the official file has {OFFICIAL_SIZES[dataset]}). Get {SOURCES[dataset]}")
    return train, test


def _read_id_table(path: Path) -> dict[str, str]:
    """CUB's two-column text files: '<image id> <value>' per line, in file order."""
    table: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetLayout(f"{path}: line {n}: expected '<image id> <value>', got {line.strip()[:80]!r}")
            table[fields[0]] = fields[1]
    if not table:
        raise DatasetLayout(f"{path}: empty")
    return table
