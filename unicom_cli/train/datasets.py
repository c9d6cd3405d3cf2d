"""Which images a finetune run trains and evaluates on, per data set (SPEC §2 and §3 splits)."""

from __future__ import annotations

from pathlib import Path

from unicom_cli.errors import DatasetLayout, InputError, UsageError
from unicom_cli.train.data import LabelledImages, relabel
from unicom_cli.utils.console import info, warn

BENCHMARKS = ("sop", "cub", "cars", "inshop", "inat")


def train_split(name: str, root: Path | None) -> LabelledImages:
    """The training images of a retrieval benchmark (the complement of its test classes).

    ``root`` is the folder holding the benchmark folders (default ./data), as for eval-retrieval.
    """
    if name not in BENCHMARKS:
        raise UsageError(f"--dataset {name}: choose gldv2, {', '.join(BENCHMARKS)} or folder:PATH")
    from unicom_cli.data.benchmarks import load_benchmark

    bench = load_benchmark(name, Path(root) if root else Path("data"))
    if bench.train is None:
        raise DatasetLayout(f"{bench.root}: no training list for {name} (SPEC §3 train split); "
                            f"see `unicom eval-retrieval --help` for the expected layout")
    return relabel([bench.root / p for p in bench.train.paths], bench.train.labels.tolist())


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
    eval-retrieval pipeline (sharded feature extraction, exact search).
    """
    from unicom_cli.eval.search import l2_normalize, resolve_backend
    from unicom_cli.models.factory import LoadedModel
    from unicom_cli.models.transforms import eval_transform
    from unicom_cli.pipelines.features import ModelOptions, model_features
    from unicom_cli.pipelines.retrieval import search_split, split_metrics

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
    neighbours, _ = search_split(split, x, [1], resolve_backend("auto", dev), dev)
    metrics = split_metrics(split, neighbours, [1])  # percentages, as eval-retrieval prints them
    key = "map@100_private" if "map@100_private" in metrics else \
        next((k for k in metrics if k.startswith("map@100")), "recall@1")
    where = str(bench.root) if dataset.startswith("folder:") else f"{bench.name} test split"
    return {"metric": key, **metrics, "images": len(split.paths), "split": where}

