"""Sharding work by rank and gathering per-rank results back into dataset order."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from unicom_cli.distributed import rank, world_size

T = TypeVar("T")


def shard_range(total: int, rank_: int | None = None, world: int | None = None, *, align: int = 1) -> range:
    """The contiguous block of ``range(total)`` that ``rank_`` processes.

    Contiguous blocks let rank 0 assemble per-rank output files by concatenation. With
    ``align=batch_size`` blocks start on batch boundaries (sizes then differ by less than two
    batches), so every rank forms exactly the batches a single process would: batched results
    stay bitwise equal to the 1-process run.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if align < 1:
        raise ValueError(f"align must be at least 1, got {align}")
    units = -(-total // align)  # whole batches, the last one maybe short
    base, extra = divmod(units, w)
    first = r * base + min(r, extra)
    count = base + (1 if r < extra else 0)
    return range(min(total, first * align), min(total, (first + count) * align))


def gather_rows(indices: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
    """Index-aware all-gather: every rank gets the (total, …) array with row i at position i.

    ``indices`` are the dataset positions of this rank's ``rows``. Works without a process
    group (then it only places the rows). Rows never covered stay zero.
    """
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.asarray(rows)
    out = np.zeros((total, *rows.shape[1:]), dtype=rows.dtype)
    if world_size() == 1:
        out[indices] = rows
        return out
    import torch
    import torch.distributed as dist

    # Pad to the largest shard so that every rank sends tensors of one shape (gloo and NCCL).
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(indices)], dtype=torch.int64))
    longest = int(max(c.item() for c in counts))
    flat = rows.reshape(len(rows), int(np.prod(rows.shape[1:])))  # -1 fails on an empty shard
    width = flat.shape[1]
    padded_rows = torch.zeros(longest, width, dtype=torch.from_numpy(flat[:0]).dtype)
    padded_rows[: len(flat)] = torch.from_numpy(np.ascontiguousarray(flat))
    padded_idx = torch.full((longest,), -1, dtype=torch.int64)
    padded_idx[: len(indices)] = torch.from_numpy(indices)
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    all_rows = [torch.empty_like(padded_rows, device=backend_device) for _ in range(world_size())]
    all_idx = [torch.empty_like(padded_idx, device=backend_device) for _ in range(world_size())]
    dist.all_gather(all_rows, padded_rows.to(backend_device))
    dist.all_gather(all_idx, padded_idx.to(backend_device))
    out_flat = out.reshape(total, -1)
    for idx, part in zip(all_idx, all_rows):
        idx = idx.cpu().numpy()
        keep = idx >= 0
        out_flat[idx[keep]] = part.cpu().numpy()[keep]
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. a file list scanned once, so all ranks agree on order).

    Objects travel pickled between our own processes only; without a group it returns ``obj``.
    """
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]  # type: ignore[return-value]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order, on every rank (e.g. per-rank failure lists, counts)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _object_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
