"""`unicom embed ... -o feats/`: a source's units → one feature shard each, by ranks and independent jobs.

Work is split by whole units: unit ``u`` belongs to slot ``u % (parts x ranks)``, where job
``--part I/N`` owns slots ``I x ranks … I x ranks + ranks - 1`` (one per rank of the job).
Finished units are skipped, unfinished ones resume; a unit is claimed with a lock file naming
its process, so jobs never work on the same unit, and a second run of the same part is
refused naming the holder. Each job rewrites ``manifest.json`` from the done-records at its end.

Examples::

    unicom embed 'shards/{00000..00099}.tar' -o feats/ --gpus all
    unicom embed 'shards/{00000..00099}.tar' -o feats/ --part 3/8     # one job of a SLURM array
    unicom embed table.parquet -o feats/ --path-column url --shard-size 100000
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from unicom_cli.data.sources import Source, Unit, is_collection_source, open_source
from unicom_cli.distributed import barrier, is_main, rank, world_size
from unicom_cli.distributed.comm import gather_objects
from unicom_cli.errors import InputError, OutputInUse, UsageError
from unicom_cli.pipelines.batches import default_workers, embed_pixels, model_forward, postprocess
from unicom_cli.pipelines.embed_setup import (
    EmbedConfig,
    EmbedSummary,
    load_model,
    model_output,
    resolve_runtime,
    runtime_fields,
    validate,
)
from unicom_cli.pipelines.shard_store import MANIFEST_FILE, ShardFolder, UnitWriter, failures_of
from unicom_cli.utils.console import info, progress_bar, warn
from unicom_cli.utils.locks import ClaimLock


def wants_shards(config: EmbedConfig) -> bool:
    """A folder of shards for tar or table input, for ``-o`` without ``.npy``, or when asked."""
    if config.sharded is not None:
        return config.sharded
    output = Path(config.output)
    if output.suffix.lower() == ".npy":
        return False
    if (output / "run.json").is_file() or (output / MANIFEST_FILE).is_file():
        return True
    return is_collection_source(config.input)


def parse_part(text: str) -> tuple[int, int]:
    """``"3/8"`` → (3, 8): the fourth of eight jobs. ``"slurm"``: this task of a SLURM job array
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT)."""
    import os

    if text == "slurm":
        try:
            task, first = int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
            return parse_part(f"{task - first}/{int(os.environ['SLURM_ARRAY_TASK_COUNT'])}")
        except (KeyError, ValueError):
            raise UsageError("--part slurm: not a task of a SLURM job array (sbatch --array=0-N-1 sets "
                             "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)") from None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--part {text}: expected I/N, e.g. 0/4 for the first of four jobs, or slurm") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--part {text}: I must be in 0…N-1 and N at least 1")
    return index, count


@dataclass
class _Job:
    """What this process does: its units and the model that embeds them."""

    source: Source
    folder: ShardFolder
    mine: list[Unit]
    record: dict
    dim: int
    renormalize: bool


def my_units(units: list[Unit], part: tuple[int, int], rank_: int, world: int) -> list[Unit]:
    """The units of this rank of this job: whole units, interleaved over every slot."""
    slots = part[1] * world
    slot = part[0] * world + rank_
    return [u for n, u in enumerate(units) if n % slots == slot]


def embed_sharded(config: EmbedConfig) -> EmbedSummary | None:
    """Embed ``config.input`` into the shard folder ``config.output``; the summary on rank 0."""
    start = time.perf_counter()
    validate(config)
    if config.head is not None:
        raise UsageError("--head writes predictions beside one .npy; use -o feats.npy with --head")
    if config.overwrite and config.part[1] > 1:
        raise UsageError(f"--overwrite with --part {config.part[0]}/{config.part[1]} would delete the other "
                         f"parts' shards while they run; remove {config.output} once, then start the jobs")
    runtime = resolve_runtime(config)
    source = open_source(config.input, shard_size=config.shard_size, path_column=config.path_column)
    folder = ShardFolder(config.output)
    folder.check_writable()
    spec, model_dim, normalized_by_model = model_output(config, runtime)
    if config.num_feat is not None and config.num_feat > model_dim:
        raise UsageError(f"--num-feat {config.num_feat}: {spec.name} embeddings have only {model_dim} dimensions")
    part_lock = _lock_part(folder, config.part)
    try:
        return _run(config, runtime, source, folder, model_dim, normalized_by_model, start)
    finally:
        if part_lock is not None:
            part_lock.release()


def _lock_part(folder: ShardFolder, part: tuple[int, int]) -> ClaimLock | None:
    """Rank 0 of a job claims its part: a second run of the same part is refused at once."""
    import os

    if os.environ.get("RANK", "0") not in ("", "0"):
        return None
    lock = ClaimLock(folder.root / f".part-{part[0]}-of-{part[1]}.lock")
    holder = lock.try_acquire()
    if holder is not None:
        raise OutputInUse(f"{folder.root}: part {part[0]}/{part[1]} is being embedded by {holder}; "
                          f"wait for it, or delete {lock.path} if that job is gone")
    return lock


def _record(config: EmbedConfig, source: Source, loaded, dim: int, normalized_by_model: bool) -> dict:
    """The model record every shard of the folder shares (run.json, each done-record, the manifest)."""
    from unicom_cli._version import __version__
    from unicom_cli.pipelines.embed_setup import forward_threads

    weights = getattr(loaded, "weights_path", None)
    return {
        "tool": "unicom-cli", "version": __version__, "format": 1,
        "source_kind": source.kind, "source": str(config.input), "source_sha256": source.digest(),
        "input": str(source.root) if source.root else None,  # ids are paths relative to it
        "units": len(source.units), "shard_size": config.shard_size if source.kind != "tar" else None,
        "model": loaded.spec.name, "weights": str(Path(weights).resolve()) if weights else None,
        "weights_sha256": loaded.sha256, "random_init_seed": getattr(loaded, "random_init_seed", None),
        "input_size": loaded.spec.input_size, "model_spec": loaded.spec.to_json(),
        "revision": loaded.spec.revision, "embedding": loaded.spec.embedding,  # hub models (models/families/)
        "embedding_size": loaded.spec.embedding_size, "dim": dim, "dtype": config.dtype,
        "normalized": config.normalize or normalized_by_model, "num_feat": config.num_feat,
        "batch_size": config.batch_size, "draft": config.draft, "max_pixels": config.max_pixels,
        **runtime_fields(loaded), "threads_per_process": forward_threads(),
        "world_size": world_size(), "part": list(config.part),
    }


def _run(config, runtime, source, folder, model_dim, normalized_by_model, start) -> EmbedSummary | None:
    loaded, description = load_model(config, runtime)
    if is_main():
        info(description)
    dim = config.num_feat or model_dim
    record = _record(config, source, loaded, dim, normalized_by_model)
    names = [u.name for u in source.units]
    if is_main():
        folder.claim_run(record, config.overwrite, names)
    barrier()
    if not is_main():
        folder.claim_run(record, False, names)  # the same check on every rank
    job = _Job(source, folder, my_units(source.units, config.part, rank(), world_size()), record, dim,
               config.normalize and not normalized_by_model)
    done_before, counts, held = _embed_units(job, config, loaded)
    barrier()
    totals = gather_objects(counts)
    held_all = [h for part in gather_objects(held) for h in part]
    if not is_main():
        return None
    manifest = folder.write_manifest(names, {"kind": source.kind, "input": str(config.input),
                                             "units": len(names)})
    for name, holder in held_all:
        warn(f"{name}: skipped, being embedded by {holder}")
    return _summary(job, manifest, totals, done_before, start)


def _embed_units(job: _Job, config: EmbedConfig, loaded) -> tuple[int, dict, list]:
    """Embed this rank's units not yet finished. Returns (units done before, counts, units held elsewhere)."""
    forward = model_forward(loaded)
    workers = config.workers if config.workers is not None else default_workers(forward.device.type)
    counts = {"embedded": 0, "resumed": 0, "seconds": 0.0}
    todo = [u for u in job.mine if not job.folder.unit(u.name).done()]
    done_before = len(job.mine) - len(todo)
    for unit in job.mine:
        if unit not in todo:  # a run killed while finishing a unit may have left its claim and work folder
            _tidy_finished(job.folder.unit(unit.name))
    claims, held = _claim(job, todo)
    try:
        mine = [u for u in todo if u.name in claims]
        with progress_bar(len(job.mine), "embed", unit="shards", enabled=config.progress,
                          completed=done_before) as bar:
            _embed_claimed(job, config, loaded, forward, workers, mine, claims, counts, bar)
    finally:
        for lock in claims.values():
            lock.release()
    return done_before, counts, held


def _claim(job: _Job, units: list[Unit]) -> tuple[dict[str, ClaimLock], list[tuple[str, str]]]:
    """Lock files for ``units``; those another live process holds are left to it."""
    claims: dict[str, ClaimLock] = {}
    held: list[tuple[str, str]] = []
    for unit in units:
        files = job.folder.unit(unit.name)
        files.lock.parent.mkdir(parents=True, exist_ok=True)
        lock = ClaimLock(files.lock)
        holder = lock.try_acquire()
        if holder is None and files.done():  # finished by another job between the listing and the lock
            lock.release()
        elif holder is None:
            claims[unit.name] = lock
        else:
            held.append((unit.name, holder))
    return claims, held


def _tidy_finished(files) -> None:
    """Remove what a killed run left of a unit it had finished: a dead claim, the work folder."""
    import shutil

    ClaimLock(files.lock).clear_if_stale()
    if files.partial.exists() and not files.lock.exists():
        shutil.rmtree(files.partial, ignore_errors=True)


def _embed_claimed(job: _Job, config: EmbedConfig, loaded, forward, workers: int, units: list[Unit],
                   claims: dict[str, ClaimLock], counts: dict, bar) -> None:
    """One reader over all of ``units``; a unit's writer opens with its first batch and finishes
    with its last (a unit with nothing left to embed finishes after the loop)."""
    from unicom_cli.pipelines.unit_reader import iter_unit_batches

    skips = [UnitWriter.resume_point(job.folder.unit(u.name), job.dim, config.dtype) for u in units]
    counts["resumed"] += sum(skips)
    writers: dict[int, UnitWriter] = {}
    finished: set[int] = set()

    def writer_of(n: int) -> UnitWriter:
        if n not in writers:
            writers[n] = UnitWriter(job.folder.unit(units[n].name), job.dim, config.dtype)
        return writers[n]

    def finish(n: int) -> None:
        writer_of(n).finish(job.record, job.source.kind in ("table", "tar"))
        del writers[n]
        finished.add(n)
        claims.pop(units[n].name).release()
        bar.advance(1)

    began = time.perf_counter()
    try:
        for n, last, batch in iter_unit_batches(units, skips, size=loaded.spec.input_size,
                                                batch_size=config.batch_size, workers=workers,
                                                pin_memory=getattr(forward, "cuda", False),
                                                max_pixels=config.max_pixels, draft=config.draft):
            feats, reasons = embed_pixels(forward, batch.pixels, batch.reasons)
            rows = postprocess(feats, job.renormalize, config.num_feat, config.dtype)
            writer_of(n).write(rows, batch.ids, batch.metas, reasons)
            counts["embedded"] += len(reasons)
            if last:
                finish(n)
        for n in range(len(units)):
            if n not in finished:
                finish(n)
    except BaseException:
        for writer in writers.values():  # keep every finished batch: the next run resumes from here
            writer.checkpoint()
            writer.close()
        raise
    finally:
        counts["seconds"] += time.perf_counter() - began


def _summary(job: _Job, manifest: dict, totals: list[dict], done_before: int, start: float) -> EmbedSummary:
    embedded = sum(t["embedded"] for t in totals)
    seconds = max((t["seconds"] for t in totals), default=0.0)
    failures: list[tuple[str, str]] = []
    for shard in manifest["shards"]:
        if shard["failures"] and len(failures) < 1000:
            failures.extend(failures_of(job.folder.unit(shard["name"])))
    if manifest["complete"] and manifest["count"] == 0:
        first = failures[0] if failures else ("?", "?")
        raise InputError(f"{job.source.input}: none of its {manifest['failures']:,} items could be embedded "
                         f"(first: {first[0]}: {first[1]}); the failures are listed in {job.folder.root}")
    if embedded == 0 and manifest["complete"]:
        info(f"{job.folder.root}: every shard was already finished; nothing embedded by this run")
    if not manifest["complete"]:
        info(f"{manifest['shards_done']:,} of {manifest['units']:,} shards are finished in {job.folder.root}; "
             "the other parts (--part) or a rerun finish the rest")
    return EmbedSummary(
        count=manifest["count"], total=manifest["count"] + manifest["failures"], failures=failures,
        dim=job.dim, dtype=job.record["dtype"], seconds=time.perf_counter() - start,
        images_per_s=embedded / seconds if seconds > 0 else 0.0,
        resumed_from=sum(t["resumed"] for t in totals),
        outputs=[job.folder.root / MANIFEST_FILE])
