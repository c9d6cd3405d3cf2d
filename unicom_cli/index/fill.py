"""Train a faiss index on a sample and add every vector to it: in memory, or with its inverted lists
in an ``index.ivfdata`` file (--on-disk); on 1 or N processes, with the same lists either way."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from unicom_cli.errors import UsageError
from unicom_cli.index.choose import Choice, default_max_memory, nlist_for
from unicom_cli.index.config import BuildConfig, BuildPlan
from unicom_cli.index.source import FeatureSource
from unicom_cli.index.store import IVFDATA_FILE, INDEX_FILE, Index, _faiss, faiss_stdout_silenced, read_faiss

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


def new_index(choice: Choice, dim: int, sources: list[FeatureSource], cfg: BuildConfig,
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


def add_rows(index, sources: list[FeatureSource], base: int, shards: list[range], bar,
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



def fill(plan: BuildPlan, cfg: BuildConfig, tmp: Path):
    """Add every vector: in memory, or with --on-disk into a file of inverted lists."""
    return _fill_on_disk(plan, cfg, tmp) if plan.on_disk else _fill_in_memory(plan, cfg, tmp)


def _fill_in_memory(plan: BuildPlan, cfg: BuildConfig, tmp: Path):
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
            main_index = empty = new_index(plan.choice, plan.dim, plan.sources, cfg, plan.max_memory)
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
        add_rows(index, plan.sources, plan.base, shards, _Scaled(bar, plan.added, mine), cfg.chunk_rows,
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


def _fill_on_disk(plan: BuildPlan, cfg: BuildConfig, tmp: Path):
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
                 else new_index(plan.choice, plan.dim, plan.sources, cfg, plan.max_memory))
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
        add_rows(part, plan.sources, plan.base, shards, _Scaled(bar, plan.added, mine), cfg.chunk_rows, spill,
             device=cfg.device)
    spill(part, last=True)
    del part
    barrier()
    if not is_main():
        return None
    index = faiss.read_index(str(trained_path))
    parts = sorted(tmp.glob("part-*.faiss"))
    earlier = [plan.existing.faiss_index] if plan.existing is not None else []
    _merge_lists_to_disk(index, earlier + parts, tmp / IVFDATA_FILE, cfg.output.parent)
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


def _merge_lists_to_disk(index, sources: list, path: Path, room: Path) -> None:
    """Concatenate the inverted lists of ``sources`` (same trained index: index objects, or paths
    of part files), list by list in the given order, into a new OnDiskInvertedLists file at
    ``path`` that ``index`` (empty) takes. ``room``: the folder a full disk is reported for.

    The file is laid out as faiss lays out lists of known sizes (``set_all_lists_sizes``: list j
    at the sum of the earlier lists' bytes, its codes then its ids) and written source by source
    with ``pwrite`` at each list's next free slot. So one part file is mapped at a time and the
    output is never written through a map: faiss's own copy (``merge_from_multiple``, or ``update_entries``
    list by list across all parts) touches every page of every part and of the output through
    maps (38 GiB of pages at 10M x 512, all resident in this process while the kernel keeps
    them), and on a disk that fills, a mapped page the disk cannot back is a SIGBUS. Every block
    of the file is allocated (fallocate) before the copy, so a full disk is a DiskError."""
    from unicom_cli.utils.files import ensure_free_space, preallocate

    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    code_size = int(ivf.code_size)
    counts = []  # per source, the length of each of its lists
    for source in sources:
        held = _open_lists_source(source, faiss)
        counts.append(_list_sizes(faiss.extract_index_ivf(held).invlists, ivf.nlist))
        del held
    sizes = np.sum(counts, axis=0, dtype=np.uint64)
    nbytes = int(sizes.sum()) * (code_size + 8)
    ensure_free_space(room, nbytes, f"the inverted lists ({path.name})")
    lists = faiss.OnDiskInvertedLists(ivf.nlist, code_size, str(path))
    with faiss_stdout_silenced():
        lists.update_totsize(max(nbytes, 1))  # creates the file at its size (sparse) and maps it
    preallocate(path, room)  # every block now: a full disk is a DiskError here, not a SIGBUS later
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))  # list j at the offset of lists 0..j-1
    codes_at = np.concatenate([[0], np.cumsum(sizes * np.uint64(code_size + 8))[:-1]]).astype(np.int64)
    ids_at = codes_at + sizes.astype(np.int64) * code_size
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    fd = os.open(path, os.O_WRONLY)
    try:
        for source, count_of in zip(sources, counts):
            held = _open_lists_source(source, faiss)  # owns lists_in: kept alive while it is read
            lists_in = faiss.extract_index_ivf(held).invlists
            for number in np.flatnonzero(count_of):
                count, done = int(count_of[number]), int(filled[number])
                _pwrite_all(fd, faiss.rev_swig_ptr(lists_in.get_codes(int(number)), count * code_size),
                            int(codes_at[number]) + done * code_size)
                _pwrite_all(fd, faiss.rev_swig_ptr(lists_in.get_ids(int(number)), count),
                            int(ids_at[number]) + done * 8)
                filled[number] += count
            del lists_in, held  # a part is let go (unmapped) before the next one is opened
    finally:
        os.close(fd)
    index.ntotal = ivf.ntotal = int(sizes.sum())
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def _open_lists_source(source, faiss):
    """An index object as it is; a part file memory-mapped (only its own pages, one part at a time)."""
    return faiss.read_index(str(source), faiss.IO_FLAG_MMAP) if isinstance(source, Path) else source


def _list_sizes(lists, nlist: int) -> np.ndarray:
    return np.array([lists.list_size(number) for number in range(nlist)], dtype=np.uint64)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class _Scaled:
    """Rank 0's bar counts its own rows scaled to the whole collection (all ranks run alike)."""

    def __init__(self, bar, total: int, mine: int) -> None:
        self.bar, self.scale = bar, total / mine if mine else 0.0

    def advance(self, n: int) -> None:
        self.bar.advance(int(round(n * self.scale)))

