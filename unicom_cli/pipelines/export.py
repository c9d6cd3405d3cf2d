"""`unicom export`: a model → ``.onnx`` (+ its JSON) or ``.safetensors`` (+ its architecture JSON),
checked on real photos against PyTorch before anything appears at the output path."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from unicom_cli.errors import ExportFailed, InputError, UsageError
from unicom_cli.export.check import BOUNDS, Parity
from unicom_cli.export.graph import OPSET_DEFAULT
from unicom_cli.utils.console import info
from unicom_cli.utils.files import disk_errors, output_lock, refuse_existing

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
KINDS = {".onnx": "onnx", ".safetensors": "safetensors"}


@dataclass
class ExportConfig:
    """Everything ``unicom export`` needs; the CLI fills it from the command line."""

    model: str  # a registered name, a JSON architecture, or a checkpoint with arch.json beside it
    output: Path  # model.onnx or model.safetensors
    weights: Path | None = None  # state dict for a name or JSON architecture
    pretrained: bool = True  # False: random weights (tests, benchmarks), never downloads
    seed: int = 0  # seed of the random weights (as in every command's --random-init)
    normalize: bool = False  # ONNX: L2-normalise inside the graph
    num_feat: int | None = None  # ONNX: keep the first K dims after normalising
    opset: int = OPSET_DEFAULT
    precision: str = "fp32"  # fp32 or fp16; int8 (dynamic quantisation) for ONNX only
    input_dtype: str = "uint8"  # ONNX input: uint8 pixels or float32 normalised pixels
    overwrite: bool = False
    cache: Path | None = None  # weights cache for published models
    mirror: str | None = None  # where to download published weights from


@dataclass
class ExportSummary:
    """What was written and how closely it reproduces PyTorch."""

    kind: str  # "onnx" or "safetensors"
    model: str
    output_dim: int
    parity: Parity
    seconds: float
    outputs: list[Path] = field(default_factory=list)


def resolve_model(model: str, weights: Path | None) -> tuple[str, Path | None]:
    """A checkpoint given as MODEL → (its architecture JSON, the checkpoint).

    Looks for ``<stem>.arch.json`` (written by ``unicom export``) then ``arch.json`` (written by
    ``unicom finetune`` next to ``model.pt``).
    """
    path = Path(model)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        return model, weights
    if weights is not None:
        raise UsageError(f"{model} is a checkpoint and --weights {weights} another one: give "
                         "the architecture as MODEL and the checkpoint as --weights")
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    for arch in (path.with_suffix(".arch.json"), path.parent / "arch.json"):
        if arch.is_file():
            return str(arch), path
    raise InputError(f"{path}: no architecture file beside it ({path.stem}.arch.json or arch.json); "
                     "give the architecture as MODEL (a name or JSON file) and the checkpoint as --weights")


def _validate(config: ExportConfig) -> str:
    """Every check on the arguments, before any model is loaded; returns the kind of export."""
    from unicom_cli.export.graph import check_options
    from unicom_cli.export.metadata import sidecar_path
    from unicom_cli.models.families import resolve_spec
    from unicom_cli.utils.files import check_writable_folder

    kind = KINDS.get(Path(config.output).suffix)
    if kind is None:
        raise UsageError(f"-o {config.output}: the name must end in .onnx (ONNX graph) or "
                         ".safetensors (weights)")
    check_options(config.opset, config.precision, config.input_dtype)
    if kind == "safetensors" and (config.normalize or config.num_feat is not None):
        raise UsageError("--normalize and --num-feat shape the ONNX graph's output; a "
                         ".safetensors file holds only the weights")
    if kind == "safetensors" and config.precision == "int8":
        raise UsageError("--precision int8 quantises an ONNX graph; a .safetensors file holds "
                         "fp32 or fp16 weights")
    if config.num_feat is not None and not config.normalize:
        raise UsageError("--num-feat keeps the first K dims after L2-normalising: it needs --normalize")
    model, _ = resolve_model(config.model, config.weights)
    spec = resolve_spec(model, cache=config.cache, mirror=config.mirror)
    if spec.family != "unicom" and (kind == "safetensors" or config.precision == "fp16"):
        raise UsageError(f"{spec.name}: a hub model exports to an fp32 or int8 .onnx graph (its weights "
                         f"are a safetensors save_pretrained folder already)")
    if config.num_feat is not None and config.num_feat > spec.embedding_size:
        raise UsageError(f"--num-feat {config.num_feat}: {spec.name} embeddings have only "
                         f"{spec.embedding_size} dimensions")
    if kind == "onnx":
        _require_onnx_tools()
    check_writable_folder(Path(config.output).parent)
    if not config.overwrite:
        output = Path(config.output)
        refuse_existing(output, sidecar_path(output), output.with_name(f"{output.name}.data"))
    return kind


def _require_onnx_tools() -> None:
    from unicom_cli.export.runtime import import_onnxruntime

    import_onnxruntime()
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise UsageError(f"exporting to ONNX needs the {module} package: "
                             "pip install 'unicom-cli[onnx]'") from None


def export_model(config: ExportConfig) -> ExportSummary:
    """Export, self-check on scikit-image's photos, then move the files into place.

    Everything is written into a hidden ``.<name>.partial`` folder beside the output first;
    the output path only ever holds a complete, checked file.
    """
    from unicom_cli.export.check import sample_photos
    from unicom_cli.models.factory import create_model
    from unicom_cli.models.families import resolve_spec

    start = time.perf_counter()
    kind = _validate(config)
    model_arg, weights = resolve_model(config.model, config.weights)
    output = Path(config.output)
    spec = resolve_spec(model_arg, cache=config.cache, mirror=config.mirror)
    names, photos = sample_photos(spec.input_size, spec.geometry)  # skimage missing: fail early
    loaded = create_model(model_arg, weights=weights, pretrained=config.pretrained, seed=config.seed, device="cpu",
                          precision="fp32", cache=config.cache, mirror=config.mirror)
    partial = output.parent / f".{output.name}.partial"
    with output_lock(output), disk_errors(output.parent):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            finals, parity, dim = _export_into(config, kind, loaded, partial, output, names, photos)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return ExportSummary(kind, loaded.spec.name, dim, parity, time.perf_counter() - start, finals)


def _export_into(config: ExportConfig, kind: str, loaded, partial: Path, output: Path,
                 names: list[str], photos) -> tuple[list[Path], Parity, int]:
    """Write into ``partial``, check, then move into place (or raise, leaving the output alone)."""
    write = _write_onnx if kind == "onnx" else _write_safetensors
    files, parity, dim = write(config, loaded, partial / output.name, names, photos)
    if not parity.ok:
        worst = int(parity.cosine.argmin())
        raise ExportFailed(
            f"{output}: self-check failed: cosine with PyTorch {parity.cosine[worst]:.7f} on "
            f"'{names[worst]}' (batch of {len(names)}), {parity.single_cosine:.7f} on "
            f"'{names[0]}' alone; required ≥ {parity.bound} ({config.precision}). Nothing was "
            "written; report this with UNICOM_DEBUG=1 output")
    return _move_into_place(files, output.parent, config.overwrite), parity, dim


def _move_into_place(files: list[Path], folder: Path, overwrite: bool) -> list[Path]:
    """Sidecars first, the main file (``files[0]``) last: its presence marks a finished export."""
    finals = []
    for path in files[1:] + files[:1]:
        final = folder / path.name
        os.replace(path, final)
        finals.append(final)
    if overwrite:  # a previous, bigger export may have left its external weights
        stale = folder / f"{files[0].name}.data"
        if stale not in finals:
            stale.unlink(missing_ok=True)
    return [finals[-1]] + finals[:-1]


def _reference(loaded, photos, *, normalize: bool = False, num_feat: int | None = None):
    """PyTorch's fp32 embeddings of the photos (batch) and of photo 0 alone."""
    import torch

    from unicom_cli.export.graph import build_embedder

    embedder = build_embedder(loaded.model, loaded.spec, normalize=normalize, num_feat=num_feat)
    with torch.inference_mode():
        return embedder(torch.from_numpy(photos)).numpy()


def _write_onnx(config: ExportConfig, loaded, path: Path, names: list[str], photos):
    from unicom_cli.export.check import compare
    from unicom_cli.export.graph import INPUT_NAME, OUTPUT_NAME, build_embedder, quantize_int8, write_onnx
    from unicom_cli.export.metadata import describe, sidecar_path
    from unicom_cli.export.runtime import OnnxModel
    from unicom_cli.models.weights import sha256_file
    from unicom_cli.utils.files import write_json_atomic

    spec = loaded.spec
    info(f"exporting {spec.name} to ONNX (opset {config.opset}, {config.precision}, "
         f"{config.input_dtype} input)…")
    int8 = config.precision == "int8"
    embedder = build_embedder(loaded.model, spec, input_dtype=config.input_dtype,
                              normalize=config.normalize, num_feat=config.num_feat,
                              precision="fp32" if int8 else config.precision)
    source = path.with_name(f"fp32-{path.name}") if int8 else path
    write_onnx(embedder, spec, source, opset=config.opset, input_dtype=config.input_dtype)
    if int8:
        quantize_int8(source, path)
    dim = config.num_feat or spec.embedding_size
    data = path.with_name(path.name + ".data")  # the weights of graphs past protobuf's 2 GiB
    meta = describe(spec, file=path, file_sha256=sha256_file(path), weights_sha256=loaded.sha256,
                    precision=config.precision, onnx={
                        "input": INPUT_NAME, "input_dtype": config.input_dtype,
                        "input_shape": ["batch", 3, spec.input_size, spec.input_size],
                        "output": OUTPUT_NAME, "output_dim": dim, "normalized": config.normalize,
                        "num_feat": config.num_feat, "opset": config.opset})
    meta["data_sha256"] = sha256_file(data) if data.exists() else None
    write_json_atomic(sidecar_path(path), meta)
    info(f"checking it with ONNX Runtime on {len(names)} photos…")
    runtime = OnnxModel(path, device="cpu")
    reference = _reference(loaded, photos, normalize=config.normalize, num_feat=config.num_feat)
    parity = compare(names, reference, runtime.run(photos), runtime.run(photos[:1]),
                     BOUNDS[config.precision])
    files = [path, sidecar_path(path)] + ([data] if data.exists() else [])
    return files, parity, dim


def _write_safetensors(config: ExportConfig, loaded, path: Path, names: list[str], photos):
    import torch
    from safetensors.torch import save_file

    from unicom_cli.export.check import compare
    from unicom_cli.export.metadata import describe, sidecar_path
    from unicom_cli.models.factory import create_model
    from unicom_cli.models.weights import sha256_file
    from unicom_cli.utils.files import write_json_atomic

    dtype = torch.float16 if config.precision == "fp16" else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in loaded.model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "model": loaded.spec.name})
    meta = describe(loaded.spec, file=path, file_sha256=sha256_file(path),
                    weights_sha256=loaded.sha256, precision=config.precision)
    arch = sidecar_path(path)
    write_json_atomic(arch, meta)
    info(f"checking {path.name} + {arch.name} load back to the same embeddings…")
    reloaded = create_model(arch, weights=path, device="cpu", precision="fp32")
    reference = _reference(loaded, photos)
    got = _reference(reloaded, photos)
    parity = compare(names, reference, got, _reference(reloaded, photos[:1]), BOUNDS[config.precision])
    return [path, arch], parity, loaded.spec.embedding_size
