"""Fill an index: train on a sample of the collection, add its rows in chunks by rank, merge, lists on disk."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unicom_cli.errors import UsageError
from unicom_cli.index.choose import Choice, default_max_memory, nlist_for
from unicom_cli.index.source import FeatureSource
from unicom_cli.index.store import INDEX_FILE, IVFDATA_FILE, Index, _faiss, faiss_stdout_silenced, read_faiss

if TYPE_CHECKING:
    from unicom_cli.index.build import BuildConfig, _Plan

TRAIN_POINTS_PER_LIST = 40  # faiss asks for ≥ 39 training points per inverted list
TRAIN_MIN = 20_000  # PQ needs ≥ 39·256 points for its 8-bit codebooks


def _ram_budget(max_memory: int) -> int:
    """What the build may hold in RAM: the budget, but never more than half the machine's memory
    (with --on-disk the budget sizes the index on disk and can exceed the RAM)."""
    return min(max_memory, default_max_memory())


def _train_sample_size(n: int, dim: int, factory_index, max_memory: int) -> int:
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(factory_index)
    wanted = max(TRAIN_MIN, TRAIN_POINTS_PER_LIST * (ivf.nlist if ivf is not None else 0))
    by_memory = max(TRAIN_MIN, (_ram_budget(max_memory) // 4) // (4 * dim))
    return min(n, wanted, by_memory)


def _gpu(device: str):
    """(faiss GPU resources, device number) with faiss-gpu and a CUDA device; else None."""
    from unicom_cli.distributed import device_for

    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    device = str(device_for(device))  # auto → this rank's GPU where there is one
    if not device.startswith("cuda"):
        return None
    return faiss.StandardGpuResources(), int(device.split(":")[1]) if ":" in device else 0


def _gpu_training(index, device: str) -> object | None:
    """With faiss-gpu and a CUDA device, k-means of the coarse quantizer runs on the GPU."""
    faiss = _faiss()
    gpu, ivf = _gpu(device), faiss.try_extract_index_ivf(index)
    if gpu is None or ivf is None:
        return None
    res, dev = gpu
    ivf.clustering_index = faiss.index_cpu_to_gpu(res, dev, faiss.IndexFlatL2(ivf.d))
    return res


@contextmanager
def _gpu_assignment(index, device: str):
    """With faiss-gpu and a CUDA device, added vectors are assigned to their inverted lists on
    the GPU: an exact search over the centroids stands in for the coarse quantizer meanwhile."""
    faiss = _faiss()
    gpu, ivf = _gpu(device), faiss.try_extract_index_ivf(index)
    if gpu is None or ivf is None:
        yield
        return
    res, dev = gpu
    centroids = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)
    centroids.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    on_gpu, quantizer = faiss.index_cpu_to_gpu(res, dev, centroids), ivf.quantizer
    ivf.quantizer = on_gpu
    try:
        yield
    finally:
        ivf.quantizer = quantizer


def index_from_factory(factory: str, dim: int):
    """The untrained inner-product index a factory string describes, set up for our search."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1]
        raise UsageError(f"--index {factory!r}: not a faiss factory string faiss accepts "
                         f"({detail}); use auto, flat, hnsw, ivf, ivfpq or e.g. 'IVF1024,PQ32'") from exc
    ivf = faiss.try_extract_index_ivf(index)
    ivf_pq = faiss.downcast_index(ivf) if ivf is not None else None  # extract returns the base class
    if isinstance(ivf_pq, faiss.IndexIVFPQ):
        # The factory turns on polysemous training (a PQ re-ordering for Hamming filtering that
        # our search never uses): a simulated annealing that took over 20 minutes for PQ256.
        ivf_pq.do_polysemous_training = False
    return index


def _new_index(choice: Choice, dim: int, sources: list[FeatureSource], cfg: BuildConfig,
               max_memory: int):
    """The factory's index, trained on a uniform sample of the collection (rank 0)."""
    from unicom_cli.utils.console import info

    faiss = _faiss()
    index = index_from_factory(choice.factory, dim)
    if not index.is_trained:
        n = sum(s.count for s in sources)
        size = _train_sample_size(n, dim, index, max_memory)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and n < ivf.nlist:
            raise UsageError(f"--index {choice.factory}: {ivf.nlist} inverted lists need at least "
                             f"that many vectors, the collection has {n:,}; use fewer lists "
                             f"(e.g. IVF{nlist_for(n)}) or --index flat")
        sample = _sample(sources, size, cfg.seed)
        info(f"training {choice.factory} on {len(sample):,} of {n:,} vectors")
        keep = _gpu_training(index, cfg.device)
        index.train(sample)
        if keep is not None:
            faiss.try_extract_index_ivf(index).clustering_index = None
        del sample
    return index


def _sample(sources: list[FeatureSource], size: int, seed: int) -> np.ndarray:
    """A uniform sample over all sources (each contributes in proportion to its rows)."""
    total = sum(s.count for s in sources)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(size, total), replace=False))
    out = np.empty((len(picks), sources[0].dim), np.float32)
    offset = 0
    for src in sources:
        inside = (picks >= offset) & (picks < offset + src.count)
        if inside.any():
            out[inside] = src.rows_at(picks[inside] - offset)
        offset += src.count
    return out


def _shardable(index) -> bool:
    """Indexes whose shards can be merged into the same index one process would build:
    IVF (inverted lists are concatenated in rank order) and flat. Graphs cannot."""
    faiss = _faiss()
    return faiss.try_extract_index_ivf(index) is not None or \
        isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _add(index, sources: list[FeatureSource], base: int, shards: list[range], bar,
         chunk_rows: int, spill=None, device: str = "cpu") -> None:
    """Add this rank's rows, chunk by chunk, with global ids (``base`` + row in the collection).
    ``spill(index)``, when given, runs after each chunk (the on-disk build writes full parts)."""
    faiss = _faiss()
    with_ids = faiss.try_extract_index_ivf(index) is not None
    with _gpu_assignment(index, device):
        _add_chunks(index, sources, base, shards, bar, chunk_rows, spill, with_ids)


def _add_chunks(index, sources, base, shards, bar, chunk_rows, spill, with_ids) -> None:
    offset = base
    for src, rows in zip(sources, shards):
        for start, chunk in src.chunks(rows, chunk_rows):
            if with_ids:
                index.add_with_ids(chunk, np.arange(offset + start, offset + start + len(chunk),
                                                    dtype=np.int64))
            else:
                index.add(chunk)
            bar.advance(len(chunk))
            if spill is not None:
                spill(index)
        offset += src.count


def _merge(main, part) -> None:
    """Append ``part``'s vectors to ``main`` (same trained index, ids kept)."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(main)
    if ivf is not None:
        ivf.merge_from(faiss.extract_index_ivf(part), 0)
        main.ntotal = ivf.ntotal
    else:
        main.merge_from(part, 0)


def _set_threads() -> None:
    """Each of N processes on a node gets 1/N of its usable cores for faiss's OpenMP loops."""
    from unicom_cli.distributed import world_size
    from unicom_cli.utils.cpu import cores_per_process

    if world_size() > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        _faiss().omp_set_num_threads(cores_per_process(local))


def _fill(plan: _Plan, cfg: BuildConfig, tmp: Path):
    """Add every vector: in memory, or with --on-disk into a file of inverted lists."""
    return _fill_on_disk(plan, cfg, tmp) if plan.on_disk else _fill_in_memory(plan, cfg, tmp)


def _fill_in_memory(plan: _Plan, cfg: BuildConfig, tmp: Path):
    """Train (rank 0) and add every vector: each rank adds a contiguous, chunk-aligned shard
    to a copy of the trained index and rank 0 merges the shards in rank order, which gives the
    inverted lists, in the same order, that one process builds. Returns the index on rank 0."""
    from unicom_cli.distributed import barrier, is_main, rank, world_size
    from unicom_cli.distributed.comm import shard_range
    from unicom_cli.utils.console import progress_bar, warn

    faiss = _faiss()
    trained_path = tmp / "trained.faiss"
    many = world_size() > 1
    if is_main():
        if plan.existing is not None:
            main_index, empty = plan.existing.faiss_index, _empty_copy(plan.existing)
        else:
            main_index = empty = _new_index(plan.choice, plan.dim, plan.sources, cfg, plan.max_memory)
        if many:
            faiss.write_index(empty, str(trained_path))
    barrier()
    if not is_main():
        main_index = empty = faiss.read_index(str(trained_path))
    shardable = _shardable(main_index)
    if many and not shardable:
        if is_main():
            warn(f"{plan.choice.factory}: a graph index cannot be merged from shards; "
                 "rank 0 adds every vector")
        shards = [range(s.count) if is_main() else range(0) for s in plan.sources]
    else:
        shards = [shard_range(s.count, align=cfg.chunk_rows) for s in plan.sources]
    mine = sum(len(r) for r in shards)
    index = faiss.clone_index(empty) if many and shardable and is_main() else main_index
    with progress_bar(plan.added, "index", unit="vectors", enabled=cfg.progress) as bar:
        _add(index, plan.sources, plan.base, shards, _Scaled(bar, plan.added, mine), cfg.chunk_rows,
             device=cfg.device)
    if many and shardable and not is_main():
        faiss.write_index(index, str(tmp / f"shard-{rank():05d}.faiss"))
    barrier()
    if not is_main():
        return None
    if many and shardable:
        _merge(main_index, index)
        for r in range(1, world_size()):
            part_path = tmp / f"shard-{r:05d}.faiss"
            _merge(main_index, faiss.read_index(str(part_path)))
            part_path.unlink()
    trained_path.unlink(missing_ok=True)
    return main_index


def _fill_on_disk(plan: _Plan, cfg: BuildConfig, tmp: Path):
    """The route for collections larger than RAM. Every rank adds its chunk-aligned shard to a
    copy of the trained, empty index and writes it out as a part file whenever it reaches its
    share of the memory budget; rank 0 then merges the parts in (rank, part) order, after the
    lists of the index being extended, into one ``index.ivfdata`` (faiss OnDiskInvertedLists)
    that the index maps instead of holding. The lists are the ones one in-memory process builds."""
    from unicom_cli.distributed import barrier, is_main, rank, world_size
    from unicom_cli.distributed.comm import shard_range
    from unicom_cli.utils.console import progress_bar

    faiss = _faiss()
    trained_path = tmp / "trained.faiss"
    if is_main():
        empty = (_empty_copy(plan.existing) if plan.existing is not None
                 else _new_index(plan.choice, plan.dim, plan.sources, cfg, plan.max_memory))
        faiss.write_index(empty, str(trained_path))
    barrier()
    part = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(part)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    part_rows = max(cfg.chunk_rows, _ram_budget(plan.max_memory) // 4 // local // (ivf.code_size + 8))
    written: list[Path] = []

    def spill(index, last: bool = False) -> None:
        if index.ntotal >= part_rows or (last and index.ntotal):
            path = tmp / f"part-{rank():05d}-{len(written):06d}.faiss"
            faiss.write_index(index, str(path))
            written.append(path)
            index.reset()

    shards = [shard_range(s.count, align=cfg.chunk_rows) for s in plan.sources]
    mine = sum(len(r) for r in shards)
    with progress_bar(plan.added, "index", unit="vectors", enabled=cfg.progress) as bar:
        _add(part, plan.sources, plan.base, shards, _Scaled(bar, plan.added, mine), cfg.chunk_rows, spill,
             device=cfg.device)
    spill(part, last=True)
    del part
    barrier()
    if not is_main():
        return None
    index = faiss.read_index(str(trained_path))
    parts = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in sorted(tmp.glob("part-*.faiss"))]
    earlier = [plan.existing.faiss_index] if plan.existing is not None else []
    _merge_lists_to_disk(index, earlier + parts, tmp / IVFDATA_FILE)
    del parts
    for path in tmp.glob("part-*.faiss"):
        path.unlink()
    trained_path.unlink()
    return index


def _empty_copy(existing: Index):
    """The trained index that ``existing`` was filled from, with no vectors (its lists may be on disk)."""
    faiss = _faiss()
    if not existing.meta.get("on_disk"):
        empty = faiss.clone_index(existing.faiss_index)
        empty.reset()
        return empty
    # faiss cannot clone on-disk lists (and crashes replacing the lists of an index read with
    # IO_FLAG_SKIP_IVF_DATA): read a second copy, give it empty in-memory lists, clone that.
    copy = read_faiss(existing.path / INDEX_FILE, on_disk=True)
    ivf = faiss.extract_index_ivf(copy)
    no_lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(no_lists, False)
    ivf.ntotal = copy.ntotal = 0
    return faiss.clone_index(copy)


def _merge_lists_to_disk(index, sources: list, path: Path) -> None:
    """Concatenate the inverted lists of ``sources`` (same trained index), list by list in the
    given order, into a new OnDiskInvertedLists file at ``path`` that ``index`` (empty) takes.
    faiss.contrib.ondisk.merge_ondisk does this for part files only; --add also merges the lists
    of the index being extended, which live in its own folder."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    pointers = faiss.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(faiss.extract_index_ivf(source).invlists)
    with faiss_stdout_silenced():
        total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    index.ntotal = ivf.ntotal = total
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def _quiet_bar():
    from unicom_cli.utils.console import progress_bar

    return progress_bar(None, "flat", enabled=False)


class _Scaled:
    """Rank 0's bar counts its own rows scaled to the whole collection (all ranks run alike)."""

    def __init__(self, bar, total: int, mine: int) -> None:
        self.bar, self.scale = bar, total / mine if mine else 0.0

    def advance(self, n: int) -> None:
        self.bar.advance(int(round(n * self.scale)))
