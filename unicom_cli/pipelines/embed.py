"""Images → embeddings: decode in workers, forward on the device, write or gather; sharded by rank.

Two entry points share one batch loop:

* :func:`embed_images` — the library function behind ``unicom embed``: a folder or path list
  to ``feats.npy`` + ids + metadata, resumable, each rank writing its own part.
* :func:`extract_features` — in memory, for the evaluation and finetuning pipelines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from unicom_cli.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    ImageList,
    LINE_BREAK_REASON,
    PathList,
    escape_line_breaks,
    list_images,
)
from unicom_cli.distributed import barrier, is_main, rank, world_size
from unicom_cli.distributed.comm import gather_objects, gather_rows, shard_range
from unicom_cli.errors import DistributedError, InputError, UsageError
from unicom_cli.models.forward import PixelForward
from unicom_cli.pipelines.features import NONFINITE_REASON, Features
from unicom_cli.pipelines.writer import (
    DTYPES,
    OutputFiles,
    PartWriter,
    assemble,
    parts_complete,
    read_failures,
    rows_done_total,
)
from unicom_cli.utils.console import info, progress_bar
from unicom_cli.utils.cpu import cores_per_process
from unicom_cli.utils.files import output_lock

if TYPE_CHECKING:

    from unicom_cli.export.runtime import OnnxModel
    from unicom_cli.models.factory import LoadedModel
    from unicom_cli.models.registry import ModelSpec


# ---------------------------------------------------------------------------------------------
# The batch loop


def default_workers(device_type: str) -> int:
    """Decoding processes per rank: this rank's share of the cores on CUDA; on CPU, where the
    forward pass needs the cores, one per two cores but at least two (on 2 cores two decoders
    gave b/a 0.88-0.90 against 0.84-0.86 for one, benchmarks/embed_throughput.py)."""
    share = cores_per_process(world_size())
    return min(share, 12) if device_type == "cuda" else max(min(share, 2), share // 2)


def _is_onnx(loaded: "LoadedModel | OnnxModel") -> bool:
    from unicom_cli.export.runtime import OnnxModel  # light: onnxruntime loads on first session

    return isinstance(loaded, OnnxModel)


def iter_batches(images: ImageList, positions: Sequence[int], loaded: "LoadedModel | OnnxModel", *,
                 batch_size: int, workers: int | None, draft: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Yield (dataset positions, fp32 embeddings with failed rows zeroed, reasons) per batch.

    Batches are consecutive runs of ``positions`` of ``batch_size`` (the last may be shorter):
    the same composition on every run, which makes resumed output bitwise equal on CPU.
    ``loaded`` is a PyTorch model or an exported graph run by ONNX Runtime: only this forward
    step differs between the two.
    """
    import torch
    from torch.utils.data import DataLoader

    onnx = _is_onnx(loaded)
    forward = loaded if onnx else PixelForward(loaded)
    if workers is None:
        workers = default_workers(forward.device.type)
    dataset = ImageDataset(images, positions, loaded.spec.input_size, max_pixels=max_pixels,
                           draft=draft, geometry=loaded.spec.geometry)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=not onnx and forward.cuda,  # ONNX Runtime reads host numpy arrays
        prefetch_factor=4 if workers else None,
        persistent_workers=False,  # one pass over the data: nothing to keep alive for
    )
    if len(dataset) == 0:  # a rank with nothing to do (more ranks than batches)
        return
    model = None if onnx else loaded.model
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        for pos, pixels, reasons in loader:
            with torch.inference_mode():  # not around the yield: the caller's code runs outside
                feats = forward(pixels).numpy()
            reasons = list(reasons)
            nonfinite = ~np.isfinite(feats).all(axis=1)
            for i in np.flatnonzero(nonfinite):  # never a good row: listed as a failure
                reasons[i] = reasons[i] or NONFINITE_REASON
            bad = np.array([bool(r) for r in reasons])
            if bad.any():
                feats[bad] = 0.0
            yield pos.numpy().astype(np.int64), feats, list(reasons)
    finally:
        if model is not None:
            model.train(was_training)


def batch_shard(total: int, batch_size: int) -> range:
    """This rank's rows: a contiguous run of whole global batches (batch k = rows kB…kB+B-1).

    Every batch then holds the same images whatever the number of processes, so N-process
    output is bitwise equal to the 1-process run on CPU (batched matmuls round differently
    when the batch composition changes).
    """
    return shard_range(total, align=batch_size)


def postprocess(feats: np.ndarray, normalize: bool, num_feat: int | None, dtype: str) -> np.ndarray:
    """L2-normalise (zero rows stay zero), keep the first ``num_feat`` dims (SPEC §2), cast."""
    if normalize:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = feats / np.maximum(norms, 1e-12)
    if num_feat is not None:
        feats = feats[:, :num_feat]
    return np.ascontiguousarray(feats, dtype=np.dtype(dtype))


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


@dataclass
class EmbedConfig:
    """Everything ``unicom embed`` needs; the CLI fills it from the command line."""

    input: Path  # a folder (scanned recursively) or a text file with one path per line
    output: Path  # feats.npy; siblings .ids.txt, .json, .failures.txt
    model: str = "ViT-B/32"  # or, with runtime "onnx", a .onnx file written by `unicom export`
    weights: Path | None = None  # state dict instead of the published weights
    runtime: str | None = None  # "torch" or "onnx" (ONNX Runtime); None: onnx for a .onnx model
    pretrained: bool = True  # False: random weights (--random-init, benchmarks), never downloads
    seed: int = 0  # seed of the random weights
    mirror: str | None = None  # where to download published weights from
    cache_dir: Path | None = None  # weights cache (default $UNICOM_HOME or ~/.cache/unicom)
    batch_size: int = 64  # per process
    workers: int | None = None  # decoding processes per rank; None: default_workers()
    device: str = "auto"
    precision: str | None = "auto"  # auto/fp32/fp16/bf16 (models.factory.resolve_inference_precision)
    normalize: bool = False  # L2-normalise rows
    num_feat: int | None = None  # keep the first K dims after normalising (implies normalize)
    dtype: str = "float32"  # or float16
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    # JPEG draft decoding of large photos: faster, but moves embeddings a little more than
    # resampling noise (measured by benchmarks/embed_throughput.py --draft-check), so opt-in.
    draft: bool = False
    progress: bool = True
    head: Path | None = None  # classifier head: also write <stem>.predictions.csv


@dataclass
class EmbedSummary:
    """What a finished run produced, for the CLI's summary."""

    count: int  # rows written
    total: int  # images listed
    failures: list[tuple[str, str]]  # (id, reason)
    dim: int
    dtype: str
    seconds: float
    images_per_s: float  # images embedded by this invocation / time of the embedding loop
    resumed_from: int  # images already done by an interrupted run
    outputs: list[Path] = field(default_factory=list)


RUNTIMES = ("torch", "onnx")


def _runtime(config: EmbedConfig) -> str:
    """The runtime asked for, or implied by the model's file name; its options checked."""
    runtime = config.runtime or ("onnx" if str(config.model).endswith(".onnx") else "torch")
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" and str(config.model).endswith(".onnx"):
        raise UsageError(f"--model {config.model} is an ONNX graph: use --runtime onnx")
    if runtime == "onnx":
        if not str(config.model).endswith(".onnx"):
            raise UsageError(f"--runtime onnx runs a graph written by `unicom export`: pass "
                             f"--model model.onnx, not {config.model}")
        if config.weights is not None or config.precision not in (None, "auto"):
            raise UsageError("--weights and --precision are fixed inside an ONNX graph at export; "
                             "drop them with --runtime onnx")
        from unicom_cli.export.runtime import import_onnxruntime

        import_onnxruntime()
    return runtime


def _validate(config: EmbedConfig) -> None:
    if config.dtype not in DTYPES:
        raise UsageError(f"--dtype {config.dtype}: choose one of {', '.join(DTYPES)}")
    if config.num_feat is not None and not config.normalize:
        raise UsageError("--num-feat keeps the first K dims after L2-normalising: it needs "
                         "--normalize (the default when --num-feat is given)")
    if config.max_pixels is not None and config.max_pixels < 1:
        raise UsageError(f"--max-pixels {config.max_pixels}: must be positive")


def _runtime_fields(loaded: "LoadedModel | OnnxModel") -> dict:
    """Which runtime, device and arithmetic produce the rows (recorded and compared on resume)."""
    if _is_onnx(loaded):
        return {"runtime": "onnx", "device": loaded.device.type, "precision": loaded.precision}
    return {"runtime": "torch", "device": next(loaded.model.parameters()).device.type,
            "precision": loaded.precision}


def _model_output(config: EmbedConfig, runtime: str) -> tuple["ModelSpec", int, bool]:
    """(spec, dimensions the model emits, whether they come L2-normalised), without loading it."""
    if runtime == "onnx":
        from unicom_cli.export.metadata import read_onnx_metadata

        spec, meta = read_onnx_metadata(Path(config.model))
        return spec, int(meta["onnx"]["output_dim"]), bool(meta["onnx"]["normalized"])
    from unicom_cli.models.families import resolve_spec

    spec = resolve_spec(config.model, cache=config.cache_dir, mirror=config.mirror)
    return spec, spec.embedding_size, False


def _load_model(config: EmbedConfig, runtime: str) -> tuple["LoadedModel | OnnxModel", str]:
    """The model (PyTorch, or the exported graph in ONNX Runtime) and the line that describes it."""
    if runtime == "onnx":
        from unicom_cli.export.runtime import OnnxModel

        loaded = OnnxModel(config.model, device=config.device)
        return loaded, f"{config.model} with ONNX Runtime on {loaded.device}, {loaded.precision} graph"
    from unicom_cli.models.factory import create_model, describe_precision

    loaded = create_model(config.model, weights=config.weights, pretrained=config.pretrained,
                          seed=config.seed, device=config.device, precision=config.precision,
                          mirror=config.mirror, cache=config.cache_dir)
    return loaded, describe_precision(loaded, config.precision)


def _fingerprint(config: EmbedConfig, images: ImageList, loaded: "LoadedModel | OnnxModel") -> dict:
    """The arguments that decide the output's bytes; a resumed run must match them all."""
    return {
        "format": 1,
        "input": str(Path(config.input).resolve()),
        "images": len(images),
        "paths_sha256": images.relative.digest(),
        "model": loaded.spec.name,
        "revision": getattr(loaded.spec, "revision", None),  # hub commit (hub models)
        "weights_sha256": loaded.sha256,
        "random_init_seed": getattr(loaded, "random_init_seed", None),  # None for an ONNX graph
        "input_size": loaded.spec.input_size,
        "normalize": config.normalize,
        "num_feat": config.num_feat,
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "world_size": world_size(),
        **_runtime_fields(loaded),
        "draft": config.draft,
        "max_pixels": config.max_pixels,
    }


def _forward_threads() -> int:
    import torch

    return torch.get_num_threads()


def embed_images(config: EmbedConfig) -> EmbedSummary | None:
    """Embed a folder or path list into ``config.output``; returns the summary on rank 0.

    Every check that can fail on the user's input runs before the model is loaded. A run
    interrupted at any point continues when started again with the same arguments. A second
    run on the same output is refused at once (the lock dies with the process holding it).
    """
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
    _validate(config)
    runtime = _runtime(config)
    images = list_images(config.input)
    files = OutputFiles.for_output(config.output)
    files.check_writable()
    spec, model_dim, normalized_by_model = _model_output(config, runtime)
    if config.num_feat is not None and config.num_feat > model_dim:
        raise UsageError(f"--num-feat {config.num_feat}: {spec.name} embeddings have only "
                         f"{model_dim} dimensions")
    head = _load_head(config, model_dim)
    plan = files.plan(config.overwrite)

    loaded, description = _load_model(config, runtime)
    if is_main():
        info(description)
    fingerprint = _fingerprint(config, images, loaded)
    digests = gather_objects(fingerprint["paths_sha256"])
    if len(set(digests)) > 1:
        raise DistributedError(f"{config.input}: the ranks listed different files (files added "
                               "or removed during the scan, or the folder is not shared)")
    if plan == "resume":
        files.check_resume(fingerprint)
    if is_main():
        files.start(plan, fingerprint)
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
        "max_pixels": config.max_pixels, "device": fingerprint["device"],
        "precision": loaded.precision, "runtime": fingerprint["runtime"], "world_size": world,
        # CPU bytes match a 1-process run when the forward ran with as many threads (README).
        "threads_per_process": _forward_threads(),
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
