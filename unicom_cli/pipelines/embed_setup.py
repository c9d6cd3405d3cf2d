"""One embed run: its config and summary, runtime and model, and the fingerprint a resume must match."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from unicom_cli.data.images import DEFAULT_MAX_PIXELS
from unicom_cli.distributed import world_size
from unicom_cli.errors import UsageError
from unicom_cli.pipelines.batches import is_onnx
from unicom_cli.pipelines.writer import DTYPES

if TYPE_CHECKING:
    from unicom_cli.data.images import ImageList
    from unicom_cli.export.runtime import OnnxModel
    from unicom_cli.models.factory import LoadedModel
    from unicom_cli.models.registry import ModelSpec


@dataclass
class EmbedConfig:
    """Everything ``unicom embed`` needs; the CLI fills it from the command line."""

    input: Path  # a folder, a path list, a table or tar shards (data.sources.open_source)
    output: Path  # feats.npy (siblings .ids.txt, .json, .failures.txt), or a folder of shards
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
    sharded: bool | None = None  # a folder of shards + manifest.json; None: decided by input and -o
    shard_size: int = 10_000  # images per output shard for folders, lists and tables
    path_column: str = "path"  # a table's column of image paths
    part: tuple[int, int] = (0, 1)  # (I, N): this job embeds the I-th of N interleaved sets of shards


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


def resolve_runtime(config: EmbedConfig) -> str:
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


def validate(config: EmbedConfig) -> None:
    if config.dtype not in DTYPES:
        raise UsageError(f"--dtype {config.dtype}: choose one of {', '.join(DTYPES)}")
    if config.num_feat is not None and not config.normalize:
        raise UsageError("--num-feat keeps the first K dims after L2-normalising: it needs "
                         "--normalize (the default when --num-feat is given)")
    if config.max_pixels is not None and config.max_pixels < 1:
        raise UsageError(f"--max-pixels {config.max_pixels}: must be positive")


def runtime_fields(loaded: "LoadedModel | OnnxModel") -> dict:
    """Which runtime, device and arithmetic produce the rows (recorded and compared on resume)."""
    if is_onnx(loaded):
        return {"runtime": "onnx", "device": loaded.device.type, "precision": loaded.precision}
    return {"runtime": "torch", "device": next(loaded.model.parameters()).device.type,
            "precision": loaded.precision}


def model_output(config: EmbedConfig, runtime: str) -> tuple["ModelSpec", int, bool]:
    """(spec, dimensions the model emits, whether they come L2-normalised), without loading it."""
    if runtime == "onnx":
        from unicom_cli.export.metadata import read_onnx_metadata

        spec, meta = read_onnx_metadata(Path(config.model))
        return spec, int(meta["onnx"]["output_dim"]), bool(meta["onnx"]["normalized"])
    from unicom_cli.models.families import resolve_spec

    spec = resolve_spec(config.model, cache=config.cache_dir, mirror=config.mirror)
    return spec, spec.embedding_size, False


def load_model(config: EmbedConfig, runtime: str) -> tuple["LoadedModel | OnnxModel", str]:
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


def fingerprint(config: EmbedConfig, images: ImageList, loaded: "LoadedModel | OnnxModel") -> dict:
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
        **runtime_fields(loaded),
        "draft": config.draft,
        "max_pixels": config.max_pixels,
    }


def forward_threads() -> int:
    import torch

    return torch.get_num_threads()


