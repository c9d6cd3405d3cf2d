"""The one place that counts the cores this process may use (CPU-affinity aware)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroup cpusets, SLURM's
    ``--cpus-per-task``), not the machine's total, which over-subscribes a shared node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        return os.cpu_count() or 1


def cores_per_process(world: int) -> int:
    """This process's share of the usable cores when ``world`` processes share the node (>= 1)."""
    return max(1, usable_cores() // max(1, world))
