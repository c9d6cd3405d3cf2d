"""Option types shared by several commands, defined once: one name and one meaning per concept.

Old spellings stay accepted as hidden aliases for one release (see ``alias``); fixed sets of
values are ``Literal`` choices, which ``--help`` lists and the parser checks.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

Precision = Literal["fp32", "fp16", "bf16"]
Backend = Literal["auto", "faiss", "torch"]


def _check_device(value: Optional[str]) -> Optional[str]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``: a choice with a numbered form."""
    if value is None or value in ("auto", "cpu", "cuda"):
        return value
    if value.startswith("cuda:") and value[5:].isdigit():
        return value
    raise typer.BadParameter(f"{value!r}: choose auto, cpu, cuda or cuda:N")


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `unicom models`: UNICOM, MLCD), hf:ORG/NAME[@REV], timm:NAME, a save_pretrained folder, or a JSON architecture file (needs --weights or --random-init).")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="State dict (.pt/.safetensors) to load instead of the published weights.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Use a randomly initialised network (seeded by --seed) instead of trained weights: tests and baselines only.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of --random-init.")]
MirrorOpt = Annotated[Optional[str], typer.Option(
    "--mirror", envvar="UNICOM_MIRROR", show_envvar=True,
    help="Download published weights from this URL or folder instead of the GitHub releases "
         "(it holds <tag>/<file>; Drive-only models at gldv2/<file>); for MLCD and hf: models, a "
         "Hugging Face hub mirror URL (as HF_ENDPOINT).")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="[auto|cpu|cuda|cuda:N]", callback=_check_device, help="Where the network runs.")]
# finetune's mixed precision; inference (embed, eval-*) has an `auto` choice as well.
PrecisionOpt = Annotated[Optional[Precision], typer.Option("--precision", help="Autocast precision (default: fp16 on CUDA, fp32 on CPU).", show_default=False)]
InferencePrecisionOpt = Annotated[Literal["auto", "fp32", "fp16", "bf16"], typer.Option("--precision", help="auto: fp16 on CUDA, bf16 on CPUs that multiply bf16 natively (AVX512-BF16, AMX, Arm BF16; ~3x faster, row cosine to fp32 > 0.9999), fp32 elsewhere.")]
BackendOpt = Annotated[Backend, typer.Option("--backend", help="Exact-search backend.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch, per process.")]
# The embed pipeline's decoders (embed, eval-retrieval, eval-knn): pipelines.embed.default_workers.
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="Decoding processes per process (default: half its share of the cores on CPU, at least 2; its share up to 12 on CUDA; 0: decode inline).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Weights cache (default: $UNICOM_HOME or ~/.cache/unicom).")]
NumFeatOpt = Annotated[Optional[int], typer.Option("--num-feat", min=1, help="Keep the first K dimensions after L2-normalising.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist (without it nothing is replaced).")]
JsonOutOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file (folders are created).")]
OutputDirOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (created if missing).")]

# Multi-process launch (see unicom_cli.distributed.launch).
GpusOpt = Annotated[Optional[str], typer.Option("--gpus", help="Run on N GPUs (or 'all'), one process each (NCCL).", rich_help_panel="Distributed")]
ProcsOpt = Annotated[Optional[int], typer.Option("--procs", min=1, help="Run as N CPU processes (gloo).", rich_help_panel="Distributed")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, help="Number of nodes.", rich_help_panel="Distributed")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank.", rich_help_panel="Distributed")]
MasterAddrOpt = Annotated[str, typer.Option("--master-addr", help="Address of node 0.", rich_help_panel="Distributed")]
MasterPortOpt = Annotated[Optional[int], typer.Option("--master-port", help="Port on node 0 (default: a free one).", rich_help_panel="Distributed")]
RdzvOpt = Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="host:port rendezvous endpoint (instead of --master-addr/--master-port).", rich_help_panel="Distributed")]


def alias(name: str, **kw: Any) -> Any:
    """A hidden option keeping an old spelling working for one release (noted in CHANGELOG.md)."""
    return typer.Option(name, hidden=True, **kw)


def prefer(value: Any, old: Any, default: Any = None) -> Any:
    """The new option's value, else the old alias's, else ``default``."""
    if value is not None:
        return value
    return old if old is not None else default


def int_list(values: Optional[list[str]], option: str) -> Optional[list[int]]:
    """Integers from a repeated and/or comma-separated option (``--k 1 --k 10`` or ``--k 1,10``)."""
    if not values:
        return None
    from unicom_cli.errors import UsageError

    try:
        return [int(v) for item in values for v in item.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {' '.join(values)}: expected integers, e.g. {option} 1,10,100") from None


# The seven options above, in the order --help lists them, with LaunchConfig's field names.
LAUNCH_OPTIONS = {"gpus": GpusOpt, "procs": ProcsOpt, "nnodes": NnodesOpt, "node_rank": NodeRankOpt,
                  "master_addr": MasterAddrOpt, "master_port": MasterPortOpt, "rdzv_endpoint": RdzvOpt}

# The feature extractor's options, with pipelines.features.ModelOptions' field names and defaults.
MODEL_OPTIONS = {"model": ModelOpt, "weights": WeightsOpt, "random_init": RandomInitOpt, "seed": SeedOpt,
                 "mirror": MirrorOpt, "device": DeviceOpt, "precision": InferencePrecisionOpt,
                 "batch_size": BatchSizeOpt, "workers": WorkersOpt, "cache_dir": CacheDirOpt}
MODEL_DEFAULTS = {"model": "ViT-B/32", "weights": None, "random_init": False, "seed": 0, "mirror": None,
                  "device": "auto", "precision": "auto", "batch_size": 64, "workers": None, "cache_dir": None}


def _resolved(parameter: inspect.Parameter, names: dict[str, Any]) -> inspect.Parameter:
    """The parameter with its annotation evaluated (our modules use postponed annotations), so that
    Typer sees the option; a name imported only for type checking (another decorator's folded
    object) stays a string until that decorator removes the parameter."""
    if not isinstance(parameter.annotation, str):
        return parameter
    try:
        return parameter.replace(annotation=eval(parameter.annotation, names))
    except NameError:
        return parameter


def _fold_options(command: Callable[..., Any], param: str, options: dict[str, Any], defaults: dict[str, Any],
                  make: Callable[..., Any]) -> Callable[..., Any]:
    """Declare ``options`` once for many commands: Typer reads the signature made here (the
    command's own parameters, then ``options``), and the wrapper folds their values into the one
    object (``make(**values)``) that the command takes as ``param``."""
    own = [_resolved(p, command.__globals__) for p in inspect.signature(command).parameters.values()
           if p.name != param]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=defaults[name])
             for name, option in options.items()]

    @functools.wraps(command)
    def folded(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in options}
        return command(*args, **{param: make(**values)}, **kwargs)

    folded.__signature__ = inspect.Signature(own + added, return_annotation=None)  # type: ignore[attr-defined]
    folded.__annotations__ = {p.name: p.annotation for p in own + added}
    return folded


def launch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the multi-process options (panel "Distributed"), declared once here instead of
    in every signature; the command takes ``launch`` (a ``distributed.launch.LaunchConfig``)."""
    from unicom_cli.distributed.launch import LaunchConfig

    defaults = LaunchConfig()
    return _fold_options(command, "launch", LAUNCH_OPTIONS, {n: getattr(defaults, n) for n in LAUNCH_OPTIONS},
                         LaunchConfig)


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the feature extractor's options (model, weights, device, precision, …),
    declared once here; the command takes ``model_opts`` (a ``pipelines.features.ModelOptions``)."""

    def make(**values: Any) -> Any:
        from unicom_cli.pipelines.features import ModelOptions  # numpy: only when the command runs

        return ModelOptions(**values)

    return _fold_options(command, "model_opts", MODEL_OPTIONS, MODEL_DEFAULTS, make)
