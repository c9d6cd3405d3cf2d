"""Build or extend an index folder: plan, fill (index.fill), tune, write and publish."""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from unicom_cli.errors import InputError, UsageError
from unicom_cli.index.choose import Choice, choose_index, default_max_memory
from unicom_cli.index.config import BuildConfig, BuildPlan, BuildSummary
from unicom_cli.index.manifest import check_compatible
from unicom_cli.index.fill import add_rows, fill, index_from_factory, new_index
from unicom_cli.index.source import FeatureSource, open_source, relative_ids
from unicom_cli.index.space import check_room, write_errors
from unicom_cli.index.shards import expand_features, indexed_features
from unicom_cli.index.folder import check_output, publish, temp_folder, write_folder
from unicom_cli.index.store import INDEX_FILE, IVFDATA_FILE, Index, _faiss
from unicom_cli.index.tune import RECALL_K, Tuning, held_out_queries, tune

__all__ = ["BuildConfig", "BuildSummary", "build_index", "run_build"]


def build_index(features_npy: str | Path | Sequence[str | Path], out_dir: str | Path,
                index: str = "auto", **options) -> BuildSummary:
    """Build an index folder from ``unicom embed`` output(s) in this process; see BuildConfig
    for ``options`` (max_memory, target_recall, normalize, overwrite, add …)."""
    paths = [features_npy] if isinstance(features_npy, (str, Path)) else list(features_npy)
    cfg = BuildConfig(features=[Path(p) for p in paths], output=Path(out_dir), index=index, **options)
    summary = run_build(cfg)
    assert summary is not None  # one process: rank 0
    return summary


SAME_EMBEDDING = "embed it with the same model and options"


def _open_sources(cfg: BuildConfig) -> list[FeatureSource]:
    if not cfg.features:
        raise UsageError("give at least one feature file (.npy from `unicom embed`)")
    # Shard folders expand to their shards; --add takes only those the index does not hold.
    skip = indexed_features(cfg.output) if cfg.add else set()
    sources = [open_source(p, cfg.normalize) for p in expand_features(cfg.features, skip)]
    first = sources[0].model_fields()
    for src in sources[1:]:
        check_compatible(src.model_fields(), first, str(src.npy), str(sources[0].npy), SAME_EMBEDDING)
    return sources



def _set_threads() -> None:
    """Each of N processes on a node gets 1/N of its usable cores for faiss's OpenMP loops."""
    from unicom_cli.distributed import world_size
    from unicom_cli.utils.cpu import cores_per_process

    if world_size() > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        _faiss().omp_set_num_threads(cores_per_process(local))


def run_build(cfg: BuildConfig) -> BuildSummary | None:
    """Build (or with ``cfg.add`` extend) the index at ``cfg.output`` on 1 or N processes;
    rank 0 holds the output's lock throughout, so a second run on it is refused at once."""
    from contextlib import nullcontext

    from unicom_cli.distributed import is_main
    from unicom_cli.utils.files import OutputLock

    with OutputLock(cfg.output) if is_main() else nullcontext():
        return _run_build(cfg)



def _plan(cfg: BuildConfig) -> BuildPlan:
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
        _check_no_repeats(None, sources)
        return BuildPlan(sources, fields, None, choice, max_memory, cfg.on_disk)
    existing = Index.load(cfg.output)
    recorded = {key: existing.meta.get(key) for key in fields}
    check_compatible(fields, recorded, str(sources[0].npy), f"the index {cfg.output}", SAME_EMBEDDING)
    _check_no_repeats(existing, sources)
    choice = Choice(existing.meta["factory"], existing.meta.get("kind", "custom"),
                    int(existing.meta.get("memory_bytes", 0)), "--add to an existing index")
    on_disk = cfg.on_disk or bool(existing.meta.get("on_disk"))
    _check_on_disk(on_disk, choice.factory, sources[0].dim)
    return BuildPlan(sources, fields, existing, choice, max_memory, on_disk)


def _check_no_repeats(existing: Index | None, sources: list[FeatureSource]) -> None:
    """A collection given twice (``--add`` of one already in the index, or the same file twice)
    would double its rows: refuse, naming an id (or, for a bare .npy whose ids are row numbers,
    its path and row count)."""
    seen = set(existing.ids) if existing is not None else set()
    recorded = {(item["features"], item["count"]) for item in existing.meta.get("sources", [])} \
        if existing is not None else set()
    root = existing.root if existing is not None else sources[0].root
    where = f"the index {existing.path}" if existing is not None else "the collections given before it"
    for src in sources:
        if not src.named:
            key = (str(src.npy.resolve()), src.count)
            if key in recorded:
                raise InputError(f"{src.npy}: already added to {where} (the same file with {src.count:,} "
                                 "rows); add only new vectors")
            recorded.add(key)
            continue
        ids = relative_ids(src.ids, src.root, root)
        again = [name for name in ids if name in seen]
        if again:
            raise InputError(f"{src.npy}: {len(again):,} of its {len(ids):,} ids are already in {where} "
                             f"(e.g. {again[0]}); embed only the new images, or rebuild the index from "
                             "all of them")
        seen.update(ids)


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
        if is_main():  # after temp_folder removed the leftovers of killed runs, which took room
            _check_room(plan, cfg)
        with write_errors(cfg.output):  # a disk that fills meanwhile: one line, and the except below
            index = fill(plan, cfg, tmp)
            if not is_main():
                return None
            return _finish(plan, cfg, tmp, index, start_time)
    except Exception:
        if is_main():  # a failed build leaves nothing behind (a killed one: see temp_folder)
            shutil.rmtree(tmp, ignore_errors=True)
        raise



def _check_room(plan: BuildPlan, cfg: BuildConfig) -> None:
    """Before any work: the output's disk holds what the build writes (index.space)."""
    from unicom_cli.distributed import world_size

    ids = [plan.existing.ids] if plan.existing is not None else []
    ids_bytes = sum(len(name) + 1 for names in ids + [s.ids for s in plan.sources] for name in names)
    check_room(cfg.output, index_from_factory(plan.choice.factory, plan.dim), plan.base + plan.added,
               plan.added, ids_bytes, plan.on_disk, world_size() > 1)


def _finish(plan: BuildPlan, cfg: BuildConfig, tmp: Path, index, start_time: float) -> BuildSummary:
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
        index = new_index(plan.choice, plan.dim, plan.sources, cfg, plan.max_memory)
        with _quiet_bar() as bar:
            add_rows(index, plan.sources, 0, [range(s.count) for s in plan.sources], bar, cfg.chunk_rows)
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


def _flat_is_as_fast(plan: BuildPlan, cfg: BuildConfig, index, tuning: Tuning) -> bool:
    """An auto-chosen IVF over full vectors whose tuned nprobe scans over 1/8 of the lists:
    its scan (no BLAS) is then slower than exact flat search, measured 0.5x on near-isotropic
    vectors in benchmarks/index_search.py --spread 3."""
    return (cfg.index == "auto" and plan.existing is None and plan.choice.kind == "ivf" and not plan.on_disk
            and "nprobe" in tuning.params
            and tuning.params["nprobe"] > FLAT_SCAN_SHARE * faiss_nlist(index))


def _quiet_bar():
    from unicom_cli.utils.console import progress_bar

    return progress_bar(None, "flat", enabled=False)



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
