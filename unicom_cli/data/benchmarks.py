"""Readers for the retrieval benchmarks' on-disk layouts (SPEC §2): image paths, labels, splits."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.data.images import scan_class_folders
from unicom_cli.errors import DatasetLayout

DATASETS = ("cub", "cars", "sop", "inshop", "inat", "gldv2")

# Where each data set comes from (for error messages).
SOURCES = {
    "cub": "CUB-200-2011 from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
           "(extract so that CUB_200_2011/images/ is under --data-root)",
    "cars": "Cars196 (cars_annos.mat + car_ims/) from https://ai.stanford.edu/~jkrause/cars/car_dataset.html "
            "into <data-root>/cars196/",
    "sop": "Stanford Online Products from https://cvgl.stanford.edu/projects/lifted_struct/ "
           "(extract Stanford_Online_Products/ under --data-root)",
    "inshop": "In-Shop Clothes Retrieval from https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
              "(Eval/list_eval_partition.txt and Img/ under <data-root>/Inshop_Clothes/)",
    "inat": "iNaturalist 2018 images from https://github.com/visipedia/inat_comp/tree/master/2018 plus the "
            "metric-learning splits Inat_dataset_splits/ (Brown et al., Smooth-AP) under <data-root>/iNaturalist/",
    "gldv2": "Google Landmarks v2 index and test sets with retrieval_solution_v2.1.csv from "
             "https://github.com/cvdfoundation/google-landmark under <data-root>/GLDv2/",
}


@dataclass
class Split:
    """One split of a benchmark. ``paths`` are relative to the benchmark's ``root``.

    All-vs-all splits leave ``query``/``gallery`` as None. Query-vs-gallery splits list the
    positions (into ``paths``) of each side. GLDv2 has no labels (-1): ``relevant[i]`` holds
    the gallery *positions within* ``gallery`` relevant to query i, and ``usage[i]`` its
    ``public``/``private`` tag.
    """

    paths: list[str]
    labels: np.ndarray
    query: np.ndarray | None = None
    gallery: np.ndarray | None = None
    relevant: list[np.ndarray] | None = None
    usage: np.ndarray | None = None

    @property
    def all_vs_all(self) -> bool:
        return self.query is None

    def sizes(self) -> dict[str, int]:
        """Image counts, for reports."""
        if self.all_vs_all:
            return {"images": len(self.paths), "classes": int(len(np.unique(self.labels)))}
        return {"queries": len(self.query), "gallery": len(self.gallery)}

    def subset(self, keep: np.ndarray) -> "Split":
        """The split restricted to the positions where ``keep`` is True (skipped images)."""
        keep = np.asarray(keep, dtype=bool)
        new_pos = np.cumsum(keep) - 1
        paths = [p for p, k in zip(self.paths, keep) if k]
        if self.all_vs_all:
            return Split(paths, self.labels[keep])
        q = self.query[keep[self.query]]
        g_keep = keep[self.gallery]
        relevant = None
        if self.relevant is not None:
            # A skipped relevant image stays relevant (it counts in min(#relevant, 100)) but can
            # never be retrieved: it gets a distinct negative position.
            g_new = np.where(g_keep, np.cumsum(g_keep) - 1, -1 - np.arange(len(g_keep)))
            relevant = [g_new[r] for r, k in zip(self.relevant, keep[self.query]) if k]
        usage = self.usage[keep[self.query]] if self.usage is not None else None
        return Split(paths, self.labels[keep], new_pos[q], new_pos[self.gallery[g_keep]], relevant, usage)


@dataclass
class Benchmark:
    """A benchmark's train and test splits; ``train`` is None where the protocol has none."""

    name: str
    root: Path
    test: Split
    train: Split | None = None
    default_recall: list[int] = field(default_factory=lambda: [1])


def _need(path: Path, name: str, what: str) -> Path:
    if not path.exists():
        raise DatasetLayout(f"{path}: not found; expected {what}. Get {SOURCES.get(name, 'the data set')}")
    return path


def _check_images(root: Path, rel: list[str], name: str, file: Path) -> None:
    """Check the first image exists: a wrong root shows up before any work."""
    if rel and not (root / rel[0]).is_file():
        raise DatasetLayout(f"{root / rel[0]}: image listed in {file} not found; expected the images "
                            f"under {root}. Get {SOURCES.get(name, 'the data set')}")


def _labels_from_names(names: list[str], vocabulary: list[str] | None = None) -> np.ndarray:
    vocab = {n: i for i, n in enumerate(sorted(set(vocabulary if vocabulary is not None else names)))}
    return np.array([vocab[n] for n in names], dtype=np.int64)


def load_cub(data_root: Path) -> Benchmark:
    """CUB-200-2011: classes 1–100 train, 101–200 test (labels = sorted folder order)."""
    root = Path(data_root) / "CUB_200_2011"
    images = _need(root / "images", "cub", "CUB_200_2011/images/<200 class folders>/*.jpg")
    paths, names = scan_class_folders(images)
    classes = sorted(set(names))
    if len(classes) != 200:
        raise DatasetLayout(f"{images}: {len(classes)} class folders, expected 200. "
                            f"Get {SOURCES['cub']}")
    labels = _labels_from_names(names)
    paths = [f"images/{p}" for p in paths]
    return _class_split("cub", root, paths, labels, 100, [1, 2, 4, 8])


def _class_split(name, root, paths, labels, first_test, recall) -> Benchmark:
    test = labels >= first_test
    pick = lambda m: Split([p for p, k in zip(paths, m) if k], labels[m])  # noqa: E731
    return Benchmark(name, root, pick(test), pick(~test), recall)


def load_cars(data_root: Path) -> Benchmark:
    """Cars196 from cars_annos.mat: classes 1–98 train, 99–196 test (the test flag is not used)."""
    root = Path(data_root) / "cars196"
    rel, cls, _ = _read_cars_mat(root)
    return _class_split("cars", root, rel, cls - 1, 98, [1, 2, 4, 8])


# What cars_annos.mat may inflate to: 16,185 annotations of its 7 fields written by scipy take 6.4 MiB.
CARS_MAT_LIMIT = 64 << 20


def _read_cars_mat(root: Path, with_test: bool = False) -> tuple[list[str], np.ndarray, dict]:
    """cars_annos.mat: image paths, class ids 1..196 and the fields read (``test`` when asked)."""
    import zlib

    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    from unicom_cli.data.matfile import MatTooLarge, check_inflated_size

    mat_path = _need(root / "cars_annos.mat", "cars", "cars196/cars_annos.mat")
    fields = "relative_im_path, class" + (" and test" if with_test else "")
    try:
        check_inflated_size(mat_path, CARS_MAT_LIMIT)
    except MatTooLarge as exc:
        raise DatasetLayout(f"{mat_path}: {exc}, far beyond the ~6 MiB of the Cars196 annotations "
                            f"(a damaged or hostile file); not read. Get {SOURCES['cars']}") from exc
    except (OSError, zlib.error) as exc:
        raise DatasetLayout(f"{mat_path}: unreadable ({exc}). Get {SOURCES['cars']}") from exc
    try:
        mat = loadmat(mat_path, squeeze_me=True)
        ann = mat["annotations"]
        rel = [str(p) for p in np.atleast_1d(ann["relative_im_path"])]
        cls = np.array([int(c) for c in np.atleast_1d(ann["class"])], dtype=np.int64)
        extra = {"class_names": mat.get("class_names")}
        if with_test:
            extra["test"] = np.array([int(t) for t in np.atleast_1d(ann["test"])], dtype=np.int64)
    except (KeyError, ValueError, TypeError, IndexError, OSError, NotImplementedError,
            MatReadError) as exc:
        raise DatasetLayout(f"{mat_path}: not a Cars196 annotation file (expected a MATLAB struct "
                            f"array 'annotations' with fields {fields}): {exc}. "
                            f"Get {SOURCES['cars']}") from exc
    if cls.min(initial=1) < 1 or cls.max(initial=1) > 196:
        raise DatasetLayout(f"{mat_path}: class ids outside 1..196. Get {SOURCES['cars']}")
    if with_test and not np.isin(extra["test"], (0, 1)).all():
        raise DatasetLayout(f"{mat_path}: test flags other than 0/1. Get {SOURCES['cars']}")
    _check_images(root, rel, "cars", mat_path)
    return rel, cls, extra


def _read_sop_list(path: Path) -> tuple[list[str], np.ndarray]:
    rows = path.read_text().splitlines()
    paths, labels = [], []
    for n, line in enumerate(rows[1:], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not parts[1].isdigit():
            raise DatasetLayout(f"{path}:{n}: expected 'image_id class_id super_class_id path', got "
                                f"{line!r}. Get {SOURCES['sop']}")
        labels.append(int(parts[1]))
        paths.append(parts[3])
    return paths, np.array(labels, dtype=np.int64)


def load_sop(data_root: Path) -> Benchmark:
    """Stanford Online Products: Ebay_train.txt / Ebay_test.txt, all-vs-all."""
    root = Path(data_root) / "Stanford_Online_Products"
    test_file = _need(root / "Ebay_test.txt", "sop", "Stanford_Online_Products/Ebay_test.txt")
    paths, labels = _read_sop_list(test_file)
    _check_images(root, paths, "sop", test_file)
    train = None
    if (root / "Ebay_train.txt").exists():
        train = Split(*_read_sop_list(root / "Ebay_train.txt"))
    return Benchmark("sop", root, Split(paths, labels), train, [1, 10, 100, 1000])


def load_inshop(data_root: Path) -> Benchmark:
    """In-Shop Clothes: query vs gallery rows of list_eval_partition.txt (labels = item ids)."""
    root = Path(data_root) / "Inshop_Clothes"
    part = _need(root / "Eval" / "list_eval_partition.txt", "inshop", "Inshop_Clothes/Eval/list_eval_partition.txt")
    lines = part.read_text().splitlines()
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    try:
        count = int(lines[0].strip())
    except (IndexError, ValueError):
        raise DatasetLayout(f"{part}: line 1 should be the image count. Get {SOURCES['inshop']}") from None
    body = [ln for ln in lines[2:] if ln.strip()]
    for n, line in enumerate(body, start=3):
        parts = line.split()
        if len(parts) != 3 or parts[2] not in rows:
            raise DatasetLayout(f"{part}:{n}: expected 'image_name item_id train|query|gallery', got "
                                f"{line!r}. Get {SOURCES['inshop']}")
        rows[parts[2]].append((f"Img/{parts[0]}", parts[1]))
    if count != len(body):
        raise DatasetLayout(f"{part}: line 1 says {count} images but the file lists {len(body)} "
                            f"(truncated?). Get {SOURCES['inshop']}")
    q, g = rows["query"], rows["gallery"]
    _check_images(root, [p for p, _ in q], "inshop", part)
    items = [i for _, i in q + g]
    test = Split([p for p, _ in q + g], _labels_from_names(items),
                 np.arange(len(q)), np.arange(len(q), len(q) + len(g)))
    train = None
    if rows["train"]:
        train = Split([p for p, _ in rows["train"]], _labels_from_names([i for _, i in rows["train"]]))
    return Benchmark("inshop", root, test, train, [1, 10, 20, 30, 40, 50])


def _read_inat_list(path: Path) -> tuple[list[str], list[str]]:
    paths = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    for n, p in enumerate(paths, start=1):
        if "/" not in p:
            raise DatasetLayout(f"{path}:{n}: expected a relative image path '<...>/<class>/<file>.jpg', "
                                f"got {p!r}. Get {SOURCES['inat']}")
    return paths, [p.rsplit("/", 2)[-2] for p in paths]


def load_inat(data_root: Path) -> Benchmark:
    """iNaturalist 2018 metric-learning split: test set1 all-vs-all; label = parent folder name."""
    root = Path(data_root) / "iNaturalist"
    splits = root / "Inat_dataset_splits"
    test_file = _need(splits / "Inaturalist_test_set1.txt", "inat",
                      "iNaturalist/Inat_dataset_splits/Inaturalist_test_set1.txt")
    paths, names = _read_inat_list(test_file)
    _check_images(root, paths, "inat", test_file)
    train = None
    if (splits / "Inaturalist_train_set1.txt").exists():
        tp, tn = _read_inat_list(splits / "Inaturalist_train_set1.txt")
        train = Split(tp, _labels_from_names(tn))
    return Benchmark("inat", root, Split(paths, _labels_from_names(names)), train, [1, 2, 4, 8])


def _gldv2_path(split: str, image_id: str) -> str:
    return f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayout(f"{path}: missing column(s) {', '.join(missing)}; expected a header "
                                f"with {', '.join(columns)}. Get {SOURCES['gldv2']}")
        return list(reader)


def load_gldv2(data_root: Path, splits: tuple[str, ...] = ("public", "private")) -> Benchmark:
    """GLDv2 retrieval: Public/Private queries of retrieval_solution_v2.1.csv vs index.csv."""
    root = Path(data_root) / "GLDv2"
    sol_path = _need(root / "test" / "retrieval_solution_v2.1.csv", "gldv2",
                     "GLDv2/test/retrieval_solution_v2.1.csv (columns id,images,Usage)")
    idx_path = _need(root / "index" / "index.csv", "gldv2", "GLDv2/index/index.csv (column id)")
    index_ids = [r["id"] for r in _read_csv(idx_path, ("id",))]
    position = {i: n for n, i in enumerate(index_ids)}
    wanted = {s.capitalize() for s in splits}
    q_ids, relevant, usage = [], [], []
    for n, row in enumerate(_read_csv(sol_path, ("id", "images", "Usage")), start=2):
        if row["Usage"] not in wanted:
            continue
        ids = row["images"].split()
        unknown = [i for i in ids if i not in position]
        if not ids or unknown:
            what = "no index ids" if not ids else f"index id {unknown[0]} absent from {idx_path}"
            raise DatasetLayout(f"{sol_path}:{n}: query {row['id']} lists {what}. Get {SOURCES['gldv2']}")
        q_ids.append(row["id"])
        relevant.append(np.array([position[i] for i in ids], dtype=np.int64))  # as listed (DELF)
        usage.append(row["Usage"].lower())
    if not q_ids:
        raise DatasetLayout(f"{sol_path}: no query with Usage {' or '.join(sorted(wanted))}. "
                            f"Get {SOURCES['gldv2']}")
    paths = [_gldv2_path("test", i) for i in q_ids] + [_gldv2_path("index", i) for i in index_ids]
    _check_images(root, paths, "gldv2", sol_path)
    nq = len(q_ids)
    test = Split(paths, np.full(len(paths), -1, dtype=np.int64), np.arange(nq),
                 np.arange(nq, nq + len(index_ids)), relevant, np.array(usage))
    return Benchmark("gldv2", root, test, None, [])


SPLIT_FOLDERS = {"train", "test", "val", "query", "gallery", "knn"}


def load_folder(path: Path) -> Benchmark:
    """A user's ImageFolder tree, all-vs-all (label = class folder).

    A folder holding split folders instead of classes (finetune's ``PATH/train`` +
    ``PATH/test`` layout) is evaluated on its ``test/``, said on screen; without a ``test/``
    it is an error naming what was found, not a data set of 2 classes called train and test.
    """
    root = Path(path)
    subfolders = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    if subfolders and subfolders <= SPLIT_FOLDERS:
        from unicom_cli.utils.console import info

        if "test" not in subfolders:
            raise DatasetLayout(f"{root}: holds the split folders {', '.join(sorted(subfolders))} "
                                f"instead of class folders; point --dataset folder: at one of them")
        info(f"{root}: split folders ({', '.join(sorted(subfolders))}) found: evaluating {root / 'test'}")
        root = root / "test"
    paths, names = scan_class_folders(root)
    return Benchmark(f"folder:{root}", root, Split(paths, _labels_from_names(names)), None, [1, 2, 4, 8])


def load_query_gallery(query_dir: Path, gallery_dir: Path) -> Benchmark:
    """Two ImageFolder trees, query vs gallery (label = class folder name, shared by both)."""
    query_dir, gallery_dir = Path(query_dir).resolve(), Path(gallery_dir).resolve()
    qp, qn = scan_class_folders(query_dir)
    gp, gn = scan_class_folders(gallery_dir)
    import os

    root = Path(os.path.commonpath([query_dir, gallery_dir]))
    rel = lambda d, ps: [(d / p).relative_to(root).as_posix() for p in ps]  # noqa: E731
    labels = _labels_from_names(qn + gn)
    test = Split(rel(query_dir, qp) + rel(gallery_dir, gp), labels,
                 np.arange(len(qp)), np.arange(len(qp), len(qp) + len(gp)))
    return Benchmark("query-gallery", root, test, None, [1, 5, 10])


def load_benchmark(dataset: str | None, data_root: Path = Path("data"), *,
                   gldv2_splits: tuple[str, ...] = ("public", "private"),
                   query: Path | None = None, gallery: Path | None = None) -> Benchmark:
    """Dispatch ``--dataset`` (or ``--query``/``--gallery``) to its reader."""
    from unicom_cli.errors import UsageError

    if query is not None or gallery is not None:
        if query is None or gallery is None or dataset:
            raise UsageError("give --query and --gallery together, without --dataset")
        return load_query_gallery(query, gallery)
    if not dataset:
        raise UsageError("give --dataset (cub, cars, sop, inshop, inat, gldv2, folder:PATH) "
                         "or --query DIR --gallery DIR")
    if dataset.startswith("folder:"):
        return load_folder(Path(dataset[len("folder:"):]))
    readers = {"cub": load_cub, "cars": load_cars, "sop": load_sop, "inshop": load_inshop,
               "inat": load_inat}
    if dataset == "gldv2":
        return load_gldv2(data_root, gldv2_splits)
    if dataset not in readers:
        raise UsageError(f"--dataset {dataset!r}: choose one of {', '.join(DATASETS)} or folder:PATH")
    return readers[dataset](data_root)
