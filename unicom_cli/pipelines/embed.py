"""Images → embeddings: decode in workers, forward on the device, write or gather; sharded by rank.

Two entry points share one batch loop:

* :func:`embed_images` — the library function behind ``unicom embed``: a folder or path list
  to ``feats.npy`` + ids + metadata, resumable, each rank writing its own part.
* :func:`extract_features` — in memory, for the evaluation and finetuning pipelines.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from unicom_cli.data.images import (
    ImageList,
    LINE_BREAK_REASON,
    PathList,
    escape_line_breaks,
    list_images,
)
from unicom_cli.distributed import barrier, is_main, rank, world_size
from unicom_cli.distributed.comm import gather_objects, gather_rows, shard_range
from unicom_cli.errors import DistributedError, InputError, UsageError
from unicom_cli.pipelines.batches import iter_batches, postprocess
from unicom_cli.pipelines.embed_setup import (
    EmbedConfig,
    EmbedSummary,
    fingerprint,
    forward_threads,
    load_model,
    model_output,
    resolve_runtime,
    validate,
)
from unicom_cli.pipelines.features import Features
from unicom_cli.pipelines.writer import (
    OutputFiles,
    PartWriter,
    assemble,
    parts_complete,
    read_failures,
    rows_done_total,
)
from unicom_cli.utils.console import info, progress_bar
from unicom_cli.utils.files import output_lock

if TYPE_CHECKING:
    from unicom_cli.models.factory import LoadedModel

__all__ = ["EmbedConfig", "EmbedSummary", "embed_images", "extract_features", "batch_shard"]


# ---------------------------------------------------------------------------------------------
# The batch loop


def batch_shard(total: int, batch_size: int) -> range:
    """This rank's rows: a contiguous run of whole global batches (batch k = rows kB…kB+B-1).

    Every batch then holds the same images whatever the number of processes, so N-process
    output is bitwise equal to the 1-process run on CPU (batched matmuls round differently
    when the batch composition changes).
    """
    return shard_range(total, align=batch_size)


# ---------------------------------------------------------------------------------------------
# In memory: extract_features


def extract_features(paths: Sequence[Path], loaded: "LoadedModel", *, batch_size: int = 64,
                     workers: int | None = None, description: str = "features",
                     gather: bool = True) -> Features:
    """Embed ``paths`` with ``loaded`` on 1 or N processes; bad files give zero rows, not errors.

    Each rank embeds its contiguous shard (whole batches of ``shard_range``, see
    :func:`batch_shard`); with ``gather`` every rank gets the full result back in input
    order (index-aware all-gather), else only its shard, at ``positions``.
    """
    images = ImageList(Path(""), PathList(str(p) for p in paths))
    total = len(images)
    shard = batch_shard(total, batch_size)
    dim = loaded.spec.embedding_size
    features = np.zeros((len(shard), dim), dtype=np.float32)
    ok = np.ones(len(shard), dtype=bool)
    failures: list[tuple[int, str, str]] = []
    with progress_bar(total, description) as bar:
        for pos, feats, reasons in iter_batches(images, shard, loaded, batch_size=batch_size,
                                                workers=workers):
            rows = pos - shard.start
            features[rows] = feats
            for p, reason in zip(pos, reasons):
                if reason:
                    ok[p - shard.start] = False
                    failures.append((int(p), str(paths[p]), reason))
            bar.advance(len(pos) * world_size())
    positions = np.arange(shard.start, shard.stop, dtype=np.int64)
    if not gather:
        return Features(features, positions, ok, [(p, r) for _, p, r in failures])
    features = gather_rows(positions, features, total)
    ok = gather_rows(positions, ok.astype(np.uint8), total).astype(bool)
    merged = sorted(f for part in gather_objects(failures) for f in part)
    return Features(features, np.arange(total, dtype=np.int64), ok, [(p, r) for _, p, r in merged])


# ---------------------------------------------------------------------------------------------
# On disk: embed_images (`unicom embed`)


def embed_images(config: EmbedConfig) -> EmbedSummary | None:
    """Embed a folder or path list into ``config.output``; returns the summary on rank 0.

    Every check that can fail on the user's input runs before the model is loaded. A run
    interrupted at any point continues when started again with the same arguments. A second
    run on the same output is refused at once (the lock dies with the process holding it).
    """
    from unicom_cli.pipelines.sharded import embed_sharded, wants_shards

    if wants_shards(config):
        return embed_sharded(config)
    if config.part != (0, 1):
        raise UsageError("--part splits the work by shards: give -o a folder (feats/)")
    files = OutputFiles.for_output(config.output)
    files.check_writable()
    with output_lock(files.feats):
        return _embed_images(config)


def _load_head(config: EmbedConfig, embedding_size: int):
    """The ``--head`` classifier, checked against the features before any work (None without one)."""
    if config.head is None:
        return None
    from unicom_cli.pipelines.linear import check_head

    return check_head(config.head, embedding_size, config.normalize, config.num_feat)


def _write_predictions(head, files: OutputFiles) -> list[Path]:
    """``feats.predictions.csv`` (class and probability per row) when a head was given."""
    if head is None:
        return []
    from unicom_cli.pipelines.linear import write_predictions

    out = files.feats.with_suffix(".predictions.csv")
    write_predictions(head, files.feats, files.ids, out)
    return [out]


def _refuse_if_nothing_embedded(config: EmbedConfig, files: OutputFiles, images, world: int,
                                unlisted: list[tuple[str, str]]) -> None:
    """Every image failed: an error (exit 2) instead of an empty .npy and exit 0. The work
    folder goes too, so that a rerun after fixing the files starts over instead of resuming."""
    import shutil

    failed = read_failures(files.workdir, world)
    if len(failed) < len(images.relative):
        return
    first = ([(images.relative[p], r) for p, r in sorted(failed.items())] + unlisted)[0]
    shutil.rmtree(files.workdir, ignore_errors=True)
    raise InputError(f"{config.input}: none of its {len(failed) + len(unlisted):,} images could be "
                     f"embedded (first: {first[0]}: {first[1]}); nothing written")


def _embed_images(config: EmbedConfig) -> EmbedSummary | None:
    from unicom_cli._version import __version__

    start_time = time.perf_counter()
    validate(config)
    runtime = resolve_runtime(config)
    images = list_images(config.input)
    files = OutputFiles.for_output(config.output)
    files.check_writable()
    spec, model_dim, normalized_by_model = model_output(config, runtime)
    if config.num_feat is not None and config.num_feat > model_dim:
        raise UsageError(f"--num-feat {config.num_feat}: {spec.name} embeddings have only "
                         f"{model_dim} dimensions")
    head = _load_head(config, model_dim)
    plan = files.plan(config.overwrite)

    loaded, description = load_model(config, runtime)
    if is_main():
        info(description)
    record = fingerprint(config, images, loaded)
    digests = gather_objects(record["paths_sha256"])
    if len(set(digests)) > 1:
        raise DistributedError(f"{config.input}: the ranks listed different files (files added "
                               "or removed during the scan, or the folder is not shared)")
    if plan == "resume":
        files.check_resume(record)
    if is_main():
        files.start(plan, record)
    resumed_total = rows_done_total(files.workdir, world_size()) if plan == "resume" else 0
    barrier()

    total, world = len(images), world_size()
    dim = config.num_feat or model_dim
    # A graph exported with --normalize is normalised already: normalising its first K dims
    # again would not give the first K dims of the normalised embedding (SPEC §2).
    renormalize = config.normalize and not normalized_by_model
    shard = batch_shard(total, config.batch_size)
    part = PartWriter(files.workdir, rank(), len(shard), dim, config.dtype)
    if resumed_total and is_main():
        info(f"resuming {files.feats}: {resumed_total:,} of {total:,} images already done")
    todo = shard[part.rows_done:]
    batches = iter_batches(images, todo, loaded, batch_size=config.batch_size,
                           workers=config.workers, draft=config.draft,
                           max_pixels=config.max_pixels)
    loop_start = time.perf_counter()
    try:
        with progress_bar(total, "embed", enabled=config.progress, completed=resumed_total) as bar:
            for pos, feats, reasons in batches:
                rows = postprocess(feats, renormalize, config.num_feat, config.dtype)
                failures = [(int(p), r) for p, r in zip(pos, reasons) if r]
                part.write(int(pos[0]) - shard.start, rows, failures)
                bar.advance(len(pos) * world)
    except KeyboardInterrupt:
        part.checkpoint()  # keep every finished batch: the next run resumes from here
        raise
    part.close()
    barrier()  # before the clock stops: the rate is that of the slowest rank, not rank 0's
    loop_seconds = time.perf_counter() - loop_start
    if not is_main():
        return None
    if not parts_complete(files.workdir, world):  # pragma: no cover - guarded by the barrier
        raise DistributedError(f"{files.workdir}: a rank finished without completing its part")
    meta = {
        "tool": "unicom-cli", "version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.spec.name, "weights": str(Path(loaded.weights_path).resolve()) if loaded.weights_path else None,
        "weights_sha256": loaded.sha256,
        "random_init_seed": getattr(loaded, "random_init_seed", None),  # None for an ONNX graph
        "input_size": loaded.spec.input_size,
        "model_spec": loaded.spec.to_json(),  # rebuilds a JSON-described or hub model (index queries)
        "revision": loaded.spec.revision,  # the hub commit of a hub model's weights
        "embedding": loaded.spec.embedding,  # what a row is (models/families/)
        "embedding_size": loaded.spec.embedding_size, "dim": dim, "dtype": config.dtype,
        "normalized": config.normalize or normalized_by_model, "num_feat": config.num_feat,
        "input": str(Path(config.input).resolve()), "ids": files.ids.name,
        "failures_file": files.failures.name, "images": total, "draft": config.draft,
        "max_pixels": config.max_pixels, "device": record["device"],
        "precision": loaded.precision, "runtime": record["runtime"], "world_size": world,
        # CPU bytes match a 1-process run when the forward ran with as many threads (README).
        "threads_per_process": forward_threads(),
    }
    unlisted = [(escape_line_breaks(name), LINE_BREAK_REASON) for name in images.unlisted]
    meta["images"] = total + len(unlisted)
    _refuse_if_nothing_embedded(config, files, images, world, unlisted)
    count, failed = assemble(files, images.relative, world, dim, config.dtype, meta, unlisted)
    outputs = list(files.finals()) + _write_predictions(head, files)
    seconds = time.perf_counter() - start_time
    embedded = total - resumed_total
    return EmbedSummary(
        count=count, total=total + len(unlisted),
        failures=[(images.relative[p], r) for p, r in sorted(failed.items())] + unlisted,
        dim=dim, dtype=config.dtype, seconds=seconds,
        images_per_s=embedded / loop_seconds if loop_seconds > 0 else 0.0, resumed_from=resumed_total,
        outputs=outputs,
    )
