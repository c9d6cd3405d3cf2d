"""Rank and world helpers that answer the same with or without a torch.distributed process group."""

from __future__ import annotations

import os


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """Global rank; 0 without a process group."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    """Number of processes; 1 without a process group."""
    dist = _dist()
    return dist.get_world_size() if dist else 1


def local_rank() -> int:
    """Rank within this node (selects the GPU); 0 without a process group."""
    return int(os.environ.get("LOCAL_RANK", "0")) if _dist() else 0


def is_main() -> bool:
    """True on the process that prints and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    dist = _dist()
    if dist:
        dist.barrier()


def device_for(requested: str = "auto") -> str:
    """The device this rank should use: ``cuda:<local_rank>`` for CUDA requests, else as given."""
    if requested in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank()}" if _dist() else "cuda"
        return "cpu" if requested == "auto" else requested
    return requested


