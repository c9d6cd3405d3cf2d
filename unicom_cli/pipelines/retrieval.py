"""Retrieval benchmark job: features (model or file) → exact search → metrics → results dict and JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError, UsageError
from unicom_cli.pipelines.features import ModelOptions, model_fields


@dataclass
class RetrievalConfig:
    """Everything `unicom eval-retrieval` needs; filled by the CLI."""

    dataset: str | None = None  # cub|cars|sop|inshop|inat|gldv2|folder:PATH
    data_root: Path = Path("data")
    gldv2_splits: tuple[str, ...] = ("public", "private")
    query: Path | None = None
    gallery: Path | None = None
    model: ModelOptions = field(default_factory=ModelOptions)
    recall_at: list[int] | None = None  # default: the data set's usual list
    num_feat: int | None = None
    embeddings: Path | None = None
    save_features: Path | None = None
    backend: str = "auto"
    json_out: Path | None = None
    vis: Path | None = None
    vis_queries: int = 6
    overwrite: bool = False  # replace an existing --json / --vis file
    vis_k: int = 5


def run_retrieval(cfg: RetrievalConfig) -> dict | None:
    """Evaluate one benchmark; every rank searches a block of the queries; rank 0 returns results."""
    from unicom_cli.data.benchmarks import load_benchmark
    from unicom_cli.distributed import device_for, is_main, world_size
    from unicom_cli.eval.search import l2_normalize, resolve_backend
    from unicom_cli.pipelines.features import (ids_file, load_embeddings, load_model, model_features,
                                               save_features, write_json)
    from unicom_cli.utils.console import warn

    from unicom_cli.pipelines.vis import check_format
    from unicom_cli.utils.files import check_output_file

    check_output_file(cfg.json_out, "--json", overwrite=cfg.overwrite)  # before the work, not after it
    check_format(cfg.vis)
    check_output_file(cfg.vis, "--vis", overwrite=cfg.overwrite)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    bench = load_benchmark(cfg.dataset, cfg.data_root, gldv2_splits=cfg.gldv2_splits,
                           query=cfg.query, gallery=cfg.gallery)
    split = bench.test
    recall_at = sorted(set(cfg.recall_at or bench.default_recall))
    if any(k < 1 for k in recall_at):
        raise UsageError("--recall-at values must be ≥ 1")
    _refuse_without_matches(split, bench.root)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    loaded = None
    if cfg.embeddings is not None:
        feats = load_embeddings(cfg.embeddings, bench.root, split.paths)
    else:
        loaded = load_model(cfg.model)
        feats = model_features(split.paths, bench.root, cfg.model, loaded, description=f"{bench.name} features")
    timings["features"] = time.perf_counter() - t
    skipped = feats.failures
    if skipped:
        warn(f"{len(skipped)} of {len(split.paths)} images skipped (first: {skipped[0][0]}: {skipped[0][1]})")
        split = split.subset(feats.ok)
        _refuse_without_matches(split, bench.root, " once the skipped images are left out")
    x = feats.features[feats.ok]
    if len(x) < 2:
        raise InputError(f"{bench.root}: {len(x)} usable image(s) of {len(split.paths) + len(skipped)}; "
                         "retrieval needs at least 2" + (f" (first skipped: {skipped[0][0]}: "
                                                          f"{skipped[0][1]})" if skipped else ""))
    written = []
    if cfg.save_features is not None and is_main():
        npy = save_features(cfg.save_features, f"{bench.name.split(':')[0]}-test", split.paths, x)
        written += [npy, ids_file(npy)]
    x = l2_normalize(x, cfg.num_feat)

    t = time.perf_counter()
    device = device_for(cfg.model.device)
    backend = resolve_backend(cfg.backend, device, split.all_vs_all and world_size() == 1)
    neighbours, scores = search_split(split, x, recall_at, backend, device)
    timings["search"] = time.perf_counter() - t
    if not is_main():
        return None

    t = time.perf_counter()
    dropped = [k for k in recall_at if k > neighbours.shape[1]]
    if dropped and split.relevant is None:
        warn(f"--recall-at {', '.join(map(str, dropped))} dropped: only {neighbours.shape[1]} "
             "neighbours per query exist in this data set")
    metrics = split_metrics(split, neighbours, recall_at)
    timings["metrics"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results = {
        "command": "eval-retrieval",
        "dataset": bench.name,
        "root": str(bench.root),
        **model_fields(loaded),
        "embeddings": None if cfg.embeddings is None else str(cfg.embeddings),
        "num_feat": cfg.num_feat,
        "dim": int(x.shape[1]),
        "sizes": split.sizes(),
        "skipped": len(skipped),
        "skipped_files": [f"{p}: {r}" for p, r in skipped[:50]],
        "metrics": metrics,
        "backend": backend,
        "device": device,
        "processes": world_size(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if cfg.json_out is not None:
        write_json(cfg.json_out, results)
        written.append(cfg.json_out)
    if cfg.vis is not None:
        from unicom_cli.pipelines.vis import save_picture

        picture = retrieval_picture(split, bench.root, neighbours, scores, cfg.vis_queries, cfg.vis_k,
                                    title=f"unicom eval-retrieval: {bench.name}",
                                    class_folders=bench.name.startswith("folder:") or bench.name == "query-gallery")
        written.append(save_picture(cfg.vis, picture))
    results["written"] = written
    return results


def _refuse_without_matches(split, root: Path, when: str = "") -> None:
    """When no query has another image of its class to find, every Recall@K is 0 by construction:
    refuse instead of reporting it. (GLDv2 lists each query's matches: always some.)"""
    from unicom_cli.eval.retrieval import relevant_counts

    if split.relevant is not None:
        return
    queries = split.labels if split.all_vs_all else split.labels[split.query]
    gallery = split.labels if split.all_vs_all else split.labels[split.gallery]
    if len(queries) and (not len(gallery) or relevant_counts(queries, gallery, split.all_vs_all).max() <= 0):
        alone, fix = (("every image is the only one of its class", "give each class at least 2 images")
                      if split.all_vs_all else ("no query's class has a gallery image",
                                                "the gallery needs class folders named as the queries'"))
        raise InputError(f"{root}: {alone}{when}, so no query has a match to find and every Recall@K "
                         f"would be 0; {fix}")


def search_split(split, x: np.ndarray, recall_at: list[int], backend: str,
                 device: str) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour positions (into ``split.gallery`` or, all-vs-all, into the split) and their
    cosine scores, gathered on every rank.

    ``x``: L2-normalised features of the split's images. Each rank searches a contiguous block of
    the queries against the whole gallery. Used by eval-retrieval and by finetune's evaluation.
    """
    from unicom_cli.distributed.comm import gather_rows, shard_range
    from unicom_cli.eval.retrieval import relevant_counts
    from unicom_cli.eval.search import search

    if split.all_vs_all:
        queries, gallery = x, x
        r_max = int(relevant_counts(split.labels, split.labels, True).max(initial=0))
        k = max(max(recall_at), r_max)  # MAP@R needs R neighbours
    else:
        queries, gallery = x[split.query], x[split.gallery]
        k = 100 if split.relevant is not None else max(recall_at)
    k = max(1, min(k, len(gallery) - (1 if split.all_vs_all else 0)))
    block = shard_range(len(queries))
    if split.all_vs_all and len(block) == len(queries):  # one process: the symmetric search
        res = search(x, None, k, exclude_self=True, backend=backend, device=device, progress="search")
    else:
        res = search(queries[block.start:block.stop], gallery, k, exclude_self=split.all_vs_all,
                     query_offset=block.start, backend=backend, device=device, progress="search")
    rows = np.arange(block.start, block.stop)
    return (gather_rows(rows, res.indices, len(queries)),
            gather_rows(rows, np.asarray(res.scores, dtype=np.float32), len(queries)))


def split_metrics(split, neighbours: np.ndarray, recall_at: list[int]) -> dict[str, float]:
    """Percentages: recall@K (and MAP@R all-vs-all), or GLDv2 mAP@100 per split."""
    from unicom_cli.eval.retrieval import gldv2_map_at_100, map_at_r, recall_at_k, relevant_counts

    out: dict[str, float] = {}
    if split.relevant is not None:
        for usage in sorted(set(split.usage)):
            qs = np.flatnonzero(split.usage == usage)
            preds = {int(q): neighbours[q].tolist() for q in qs}
            sol = {int(q): split.relevant[q].tolist() for q in qs}
            out[f"map@100_{usage}"] = 100 * gldv2_map_at_100(preds, sol)
        return out
    if split.all_vs_all:
        labels = split.labels
        q_labels, n_labels = labels, labels[neighbours]
    else:
        q_labels = split.labels[split.query]
        n_labels = split.labels[split.gallery][neighbours]
    ks = [k for k in recall_at if k <= neighbours.shape[1]]
    for k, v in recall_at_k(n_labels, q_labels, ks).items():
        out[f"recall@{k}"] = 100 * v
    if split.all_vs_all:
        out["map@r"] = 100 * map_at_r(n_labels, q_labels, relevant_counts(labels, labels, True))
    return out


def retrieval_picture(split, root: Path, neighbours: np.ndarray, scores: np.ndarray, n_queries: int = 6,
                      k: int = 5, seed: int = 0, title: str = "unicom eval-retrieval", class_folders: bool = False):
    """A few queries drawn at random (seeded) and their top-k, hits and misses marked by class
    (or, GLDv2, by the relevant list): the ``--vis`` picture (``pipelines.vis``). Classes are
    named by their folder (``class_folders``: ImageFolder trees), else by the benchmark's label."""
    from unicom_cli.pipelines.vis import Cell, Picture, Row, cell_name

    n_total = len(neighbours)
    k = min(k, neighbours.shape[1])
    picks = np.sort(np.random.default_rng(seed).choice(n_total, size=min(n_queries, n_total), replace=False))
    q_pos = np.arange(n_total) if split.all_vs_all else split.query
    g_pos = np.arange(len(split.paths)) if split.all_vs_all else split.gallery
    labelled = split.relevant is None

    def label(position: int) -> str | None:
        if not labelled:
            return None
        return Path(split.paths[position]).parent.name if class_folders else str(split.labels[position])

    rows = []
    for q in picks:
        query = split.paths[q_pos[q]]
        relevant = set(split.relevant[q].tolist()) if not labelled else set()
        cells = [Cell(cell_name(query), Path(root) / query, "query", label=label(q_pos[q]))]
        for col in range(k):
            g = int(neighbours[q, col])
            hit = g in relevant if not labelled else split.labels[g_pos[g]] == split.labels[q_pos[q]]
            cells.append(Cell(cell_name(split.paths[g_pos[g]]), Path(root) / split.paths[g_pos[g]],
                              "hit" if hit else "miss", rank=col + 1, score=float(scores[q, col]),
                              label=label(g_pos[g])))
        rows.append(Row(query, cells))
    shown = f"{len(picks)} of {n_total:,} queries, drawn at random (seed {seed}), and their top {k}"
    return Picture(title, rows, [shown])
