"""Build or extend an index folder: plan (inputs, choice), fill (index.fill), tune and publish."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence


from unicom_cli.errors import InputError, UsageError
from unicom_cli.index.choose import Choice, choose_index, default_max_memory
from unicom_cli.index.fill import _add, _fill, _new_index, _quiet_bar, _set_threads, index_from_factory
from unicom_cli.index.shards import expand_features, indexed_features
from unicom_cli.index.source import FeatureSource, open_source, relative_ids
from unicom_cli.index.store import (
    INDEX_FILE,
    IVFDATA_FILE,
    Index,
    _faiss,
    check_output,
    publish,
    temp_folder,
    write_folder,
)
from unicom_cli.index.tune import RECALL_K, Tuning, held_out_queries, tune

TRAIN_POINTS_PER_LIST = 40  # faiss asks for ≥ 39 training points per inverted list
TRAIN_MIN = 20_000  # PQ needs ≥ 39·256 points for its 8-bit codebooks


@dataclass
class BuildConfig:
    """Everything ``unicom index`` needs to build (or extend) an index from feature files."""

    features: list[Path]  # embed outputs (.npy + .ids.txt + .json) or shard folders (manifest.json), in row order
    output: Path  # the index folder
    index: str = "auto"  # auto|flat|hnsw|ivf|ivfpq|<faiss factory string>
    max_memory: int | None = None  # bytes; None: half the RAM
    target_recall: float = 0.95  # recall@10 against exact search the tuning aims for
    normalize: bool = True  # L2-normalise rows whose .json says they are not (cosine)
    overwrite: bool = False
    add: bool = False  # extend the index at ``output`` instead of building a new one
    device: str = "cpu"  # cuda: faiss-gpu trains the coarse quantizer where installed
    seed: int = 0
    held_out: int = 1000  # queries drawn from the collection to measure recall
    chunk_rows: int = 65536  # rows read and added per step (memory bound; shards align to it)
    on_disk: bool = False  # IVF lists in index.ivfdata (OnDiskInvertedLists), memory-mapped
    progress: bool = True


@dataclass
class BuildSummary:
    """What a build produced, for the CLI's summary and the benchmark."""

    output: Path
    count: int
    added: int
    dim: int
    choice: Choice
    tuning: Tuning
    seconds: float
    index_bytes: int
    meta: dict = field(default_factory=dict)


def build_index(features_npy: str | Path | Sequence[str | Path], out_dir: str | Path,
                index: str = "auto", **options) -> BuildSummary:
    """Build an index folder from ``unicom embed`` output(s) in this process; see BuildConfig
    for ``options`` (max_memory, target_recall, normalize, overwrite, add …)."""
    paths = [features_npy] if isinstance(features_npy, (str, Path)) else list(features_npy)
    cfg = BuildConfig(features=[Path(p) for p in paths], output=Path(out_dir), index=index, **options)
    summary = run_build(cfg)
    assert summary is not None  # one process: rank 0
    return summary


def _check_compatible(fields: dict, other: dict, where: str, against: str) -> None:
    """Refuse collections that a query could not be embedded for consistently."""
    labels = {"model": "model", "weights_sha256": "weights (SHA-256)", "input_size": "input size",
              "dim": "dimension", "normalized": "normalisation", "num_feat": "num_feat"}
    diffs = [f"{label} {other.get(key)!r} vs {fields.get(key)!r}"
             for key, label in labels.items() if other.get(key) != fields.get(key)]
    if diffs:
        raise InputError(f"{where}: cannot share an index with {against}: {'; '.join(diffs)}. "
                         "Embed it with the same model and options")


def _open_sources(cfg: BuildConfig) -> list[FeatureSource]:
    if not cfg.features:
        raise UsageError("give at least one feature file (.npy from `unicom embed`)")
    # Shard folders expand to their shards; --add takes only those the index does not hold.
    skip = indexed_features(cfg.output) if cfg.add else set()
    sources = [open_source(p, cfg.normalize) for p in expand_features(cfg.features, skip)]
    first = sources[0].model_fields()
    for src in sources[1:]:
        _check_compatible(first, src.model_fields(), str(src.npy), str(sources[0].npy))
    return sources


def run_build(cfg: BuildConfig) -> BuildSummary | None:
    """Build (or with ``cfg.add`` extend) the index at ``cfg.output`` on 1 or N processes;
    rank 0 holds the output's lock throughout, so a second run on it is refused at once."""
    from contextlib import nullcontext

    from unicom_cli.distributed import is_main
    from unicom_cli.utils.files import OutputLock

    with OutputLock(cfg.output) if is_main() else nullcontext():
        return _run_build(cfg)


@dataclass
class _Plan:
    """What a build works on, decided before any work (every rank decides the same)."""

    sources: list[FeatureSource]
    fields: dict
    existing: Index | None
    choice: Choice
    max_memory: int
    on_disk: bool = False  # inverted lists in index.ivfdata (asked for, or the extended index has them)

    @property
    def dim(self) -> int:
        return self.sources[0].dim

    @property
    def added(self) -> int:
        return sum(s.count for s in self.sources)

    @property
    def base(self) -> int:
        return len(self.existing) if self.existing is not None else 0


def _plan(cfg: BuildConfig) -> _Plan:
    """Check every input and choose the index; nothing is written."""
    if not 0 < cfg.target_recall <= 1:
        raise UsageError(f"--target-recall {cfg.target_recall}: must be in (0, 1]")
    if cfg.chunk_rows < 1:
        raise UsageError(f"--chunk-rows {cfg.chunk_rows}: must be at least 1")
    sources = _open_sources(cfg)
    fields = sources[0].model_fields()
    max_memory = cfg.max_memory or default_max_memory()
    if not cfg.add:
        check_output(cfg.output, cfg.overwrite)
        choice = choose_index(sum(s.count for s in sources), sources[0].dim, max_memory, cfg.index,
                              on_disk=cfg.on_disk)
        _check_on_disk(cfg.on_disk, choice.factory, sources[0].dim)
        return _Plan(sources, fields, None, choice, max_memory, cfg.on_disk)
    existing = Index.load(cfg.output)
    recorded = {key: existing.meta.get(key) for key in fields}
    _check_compatible(recorded, fields, str(sources[0].npy), f"the index {cfg.output}")
    choice = Choice(existing.meta["factory"], existing.meta.get("kind", "custom"),
                    int(existing.meta.get("memory_bytes", 0)), "--add to an existing index")
    on_disk = cfg.on_disk or bool(existing.meta.get("on_disk"))
    _check_on_disk(on_disk, choice.factory, sources[0].dim)
    return _Plan(sources, fields, existing, choice, max_memory, on_disk)


def _check_on_disk(on_disk: bool, factory: str, dim: int) -> None:
    """Only IVF indexes have inverted lists to keep on disk."""
    if not on_disk:
        return
    faiss = _faiss()
    if faiss.try_extract_index_ivf(index_from_factory(factory, dim)) is None:
        raise UsageError(f"--on-disk: {factory} has no inverted lists to keep on disk; "
                         "use --index ivf, ivfpq or another IVF factory string")


def _run_build(cfg: BuildConfig) -> BuildSummary | None:
    """Plan, fill (all ranks), then tune and publish (rank 0)."""
    from unicom_cli.distributed import is_main
    from unicom_cli.distributed.comm import broadcast_object

    start_time = time.perf_counter()
    plan = _plan(cfg)
    _set_threads()
    tmp = Path(broadcast_object(str(temp_folder(cfg.output)) if is_main() else None))
    try:
        index = _fill(plan, cfg, tmp)
        if not is_main():
            return None
        return _finish(plan, cfg, tmp, index, start_time)
    except Exception:
        if is_main():  # a failed build leaves nothing behind (a killed one: see temp_folder)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(plan: _Plan, cfg: BuildConfig, tmp: Path, index, start_time: float) -> BuildSummary:
    """Measure recall on held-out queries, tune, write the folder and publish it (rank 0)."""
    from unicom_cli.utils.console import info, warn

    all_sources = plan.sources
    if plan.existing is not None:
        earlier = recorded_sources(plan.existing, cfg.normalize)
        all_sources = earlier + plan.sources if earlier is not None else plan.sources
    info(f"measuring recall@{RECALL_K} on {min(cfg.held_out, index.ntotal):,} held-out queries")
    held = held_out_queries(all_sources, cfg.held_out, RECALL_K, cfg.seed)
    if plan.existing is not None and all_sources is plan.sources:
        held.rows = held.rows + plan.base  # queries from the added rows only
        held.truth = held.truth + plan.base
        warn("the earlier collections' .npy files are gone: recall is measured among the "
             "added vectors only")
    tuning = tune(index, held, cfg.target_recall)
    if _flat_is_as_fast(plan, cfg, index, tuning):
        nprobe, nlist = tuning.params["nprobe"], faiss_nlist(index)
        info(f"{plan.choice.factory} needs nprobe={nprobe} of {nlist} lists for recall@{RECALL_K} "
             f"{cfg.target_recall}: the collection has little cluster structure, exact flat "
             "search is as fast; building Flat instead")
        plan.choice = Choice("Flat", "flat", plan.choice.memory_bytes,
                             f"IVF needed nprobe={nprobe} of {nlist} lists for the target recall: "
                             "exact search is as fast")
        index = _new_index(plan.choice, plan.dim, plan.sources, cfg, plan.max_memory)
        with _quiet_bar() as bar:
            _add(index, plan.sources, 0, [range(s.count) for s in plan.sources], bar, cfg.chunk_rows)
        tuning = tune(index, held, cfg.target_recall)
    if not tuning.reached:
        warn(f"{plan.choice.factory}: the best recall@{RECALL_K} reached is {tuning.recall:.3f}, "
             f"below --target-recall {cfg.target_recall}; raise --max-memory or pick "
             "another --index")
    ids, root = _ids(plan.existing, plan.sources)
    meta = _meta(cfg, plan.choice, plan.fields, tuning, plan.existing, plan.sources, root, index,
                 plan.max_memory, time.perf_counter() - start_time)
    meta["on_disk"] = plan.on_disk
    write_folder(tmp, index, ids, meta)
    publish(tmp, cfg.output)
    size = sum((Path(cfg.output) / name).stat().st_size for name in (INDEX_FILE, IVFDATA_FILE)
               if (Path(cfg.output) / name).exists())
    return BuildSummary(Path(cfg.output), int(index.ntotal), plan.added, plan.dim, plan.choice,
                        tuning, time.perf_counter() - start_time, size, meta)


FLAT_SCAN_SHARE = 1 / 8  # an IVF scanning more of its lists than this is no faster than flat sgemm


def faiss_nlist(index) -> int:
    ivf = _faiss().try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def _flat_is_as_fast(plan: _Plan, cfg: BuildConfig, index, tuning: Tuning) -> bool:
    """An auto-chosen IVF over full vectors whose tuned nprobe scans over 1/8 of the lists:
    its scan (no BLAS) is then slower than exact flat search, measured 0.5x on near-isotropic
    vectors in benchmarks/index_search.py --spread 3."""
    return (cfg.index == "auto" and plan.existing is None and plan.choice.kind == "ivf" and not plan.on_disk
            and "nprobe" in tuning.params
            and tuning.params["nprobe"] > FLAT_SCAN_SHARE * faiss_nlist(index))


def recorded_sources(existing: Index, normalize: bool) -> list[FeatureSource] | None:
    """The feature files an index was built from, when they are all still there unchanged."""
    out = []
    for item in existing.meta.get("sources", []):
        try:
            src = open_source(item["features"], normalize)
        except InputError:
            return None
        if src.count != item.get("count"):
            return None
        out.append(src)
    return out or None


def _ids(existing: Index | None, sources: list[FeatureSource]) -> tuple[list[str], Path | None]:
    root = existing.root if existing is not None else sources[0].root
    ids = list(existing.ids) if existing is not None else []
    for src in sources:
        ids.extend(relative_ids(src.ids, src.root, root))
    return ids, root


def _meta(cfg: BuildConfig, choice: Choice, fields: dict, tuning: Tuning,
          existing: Index | None, sources: list[FeatureSource], root: Path | None, index,
          max_memory: int, seconds: float) -> dict:
    from unicom_cli._version import __version__

    earlier = existing.meta.get("sources", []) if existing is not None else []
    return {
        "tool": "unicom-cli", "version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "metric": "inner_product",
        "count": int(index.ntotal),
        "root": str(root) if root else None,
        "factory": choice.factory, "kind": choice.kind, "reason": choice.reason,
        "memory_bytes": choice.memory_bytes, "max_memory": max_memory,
        "search_params": tuning.params,
        "recall_at_10": round(tuning.recall, 4), "target_recall": cfg.target_recall,
        "recall_reached": tuning.reached, "recall_queries": tuning.queries,
        "tuning": tuning.tried,
        "sources": earlier + [{"features": str(s.npy.resolve()), "count": s.count,
                                "root": str(s.root) if s.root else None} for s in sources],
        "build_seconds": round(seconds, 2),
    }
