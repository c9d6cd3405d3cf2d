"""Run a command in this process, in an existing torch.distributed group, or re-launched on N processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from unicom_cli.errors import UsageError

T = TypeVar("T")


@dataclass
class LaunchConfig:
    """How many processes a command wants; the CLI fills it from --gpus/--procs and friends."""

    gpus: str | None = None  # "N" or "all": one process per GPU, NCCL
    procs: int | None = None  # N CPU processes, gloo
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    rdzv_endpoint: str | None = None


def run_command(cfg: LaunchConfig, fn: Callable[..., T], *args: object, **kwargs: object) -> T | None:
    """Run ``fn(*args, **kwargs)`` where ``cfg`` says; return its result on rank 0, else None."""
    if (cfg.procs or 1) > 1 or (cfg.gpus not in (None, "1")):
        raise UsageError("--gpus/--procs above 1 are not available yet")
    return fn(*args, **kwargs)
