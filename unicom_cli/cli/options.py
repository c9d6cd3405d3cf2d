"""Option types shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `unicom models`) or a JSON architecture file.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="State dict (.pt/.safetensors) to load instead of the published weights.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU).")]
InferencePrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, fp32, fp16 or bf16. auto: fp16 on CUDA, bf16 on CPUs that multiply bf16 natively (AVX512-BF16, AMX, Arm BF16; ~3x faster, row cosine to fp32 > 0.9999), fp32 elsewhere.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass (per process).")]
# The embed pipeline's decoders (embed, eval-retrieval, eval-knn): pipelines.embed.default_workers.
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="Decoding processes per process (default: half its share of the cores on CPU, at least 2; its share up to 12 on CUDA; 0: decode inline).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Weights cache (default: $UNICOM_HOME or ~/.cache/unicom).")]
NumFeatOpt = Annotated[Optional[int], typer.Option("--num-feat", min=1, help="Keep the first K dimensions after L2-normalising.")]
JsonOutOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")]

# Multi-process launch (see unicom_cli.distributed.launch).
GpusOpt = Annotated[Optional[str], typer.Option("--gpus", help="Run on N GPUs (or 'all'), one process each (NCCL).", rich_help_panel="Distributed")]
ProcsOpt = Annotated[Optional[int], typer.Option("--procs", min=1, help="Run as N CPU processes (gloo).", rich_help_panel="Distributed")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, help="Number of nodes.", rich_help_panel="Distributed")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank.", rich_help_panel="Distributed")]
MasterAddrOpt = Annotated[str, typer.Option("--master-addr", help="Address of node 0.", rich_help_panel="Distributed")]
MasterPortOpt = Annotated[Optional[int], typer.Option("--master-port", help="Port on node 0 (default: a free one).", rich_help_panel="Distributed")]
RdzvOpt = Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="host:port rendezvous endpoint (instead of --master-addr/--master-port).", rich_help_panel="Distributed")]


def int_list(values: Optional[list[str]], option: str) -> Optional[list[int]]:
    """Integers from a repeated and/or comma-separated option (``--k 1 --k 10`` or ``--k 1,10``)."""
    if not values:
        return None
    from unicom_cli.errors import UsageError

    try:
        return [int(v) for item in values for v in item.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {' '.join(values)}: expected integers, e.g. {option} 1,10,100") from None
