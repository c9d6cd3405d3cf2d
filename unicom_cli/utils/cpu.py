"""What this machine's CPU can do: usable cores (CPU-affinity aware) and native bfloat16, decided in one place."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Instruction-set flags that mean bf16 matrix products run in hardware (not emulated):
# x86 AVX512-BF16 and AMX-BF16 (Sapphire Rapids and later, Zen 4 and later), Arm's BF16
# extension (Neoverse V1/N2, Graviton 3 and later). Without them torch emulates bf16 and it
# is slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


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


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: the single seam tests replace to play another CPU.

    Read from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm) and, where the file
    does not exist (macOS, Windows), from torch's own CPU detection.
    """
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:
        pass
    if not flags:
        import torch

        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        for flag, probe in probes.items():
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                flags.add(flag)
    return frozenset(flags)


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) multiplies bfloat16 in hardware.

    Decided from capabilities, never from a timing: a timing on a busy machine picks wrong.
    """
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
