"""Which process group this process was started into: torchrun's or SLURM's variables, or none."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from unicom_cli.errors import DistributedError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@dataclass(frozen=True)
class GroupEnv:
    """A process group this process was started into (by torchrun, srun or our launcher)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"


def _missing(names: tuple[str, ...], environ: dict[str, str]) -> list[str]:
    return [n for n in names if not environ.get(n)]


def _as_int(name: str, environ: dict[str, str]) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedError(f"{name}={environ[name]!r} is not an integer") from None


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[01-03,07],login1`` into host names, in order."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def detect_group(environ: dict[str, str] | None = None) -> GroupEnv | None:
    """The group this process was started into, or None when it runs on its own.

    Raises:
        DistributedError: torchrun or SLURM variables are only partly set (names the missing ones).
    """
    env = dict(os.environ if environ is None else environ)
    if any(env.get(n) for n in TORCHRUN_VARS[:3]):
        missing = _missing(TORCHRUN_VARS, env)
        if missing:
            raise DistributedError(
                f"torch.distributed environment is incomplete: {', '.join(missing)} not set "
                f"(torchrun sets {', '.join(TORCHRUN_VARS)}; unset RANK/WORLD_SIZE/LOCAL_RANK "
                "to run without a process group)"
            )
        return GroupEnv(_as_int("RANK", env), _as_int("WORLD_SIZE", env), _as_int("LOCAL_RANK", env),
                        env["MASTER_ADDR"], _as_int("MASTER_PORT", env), "torchrun")
    # One SLURM task (sbatch with --ntasks=1) is no group: --gpus/--procs may still launch.
    if env.get("SLURM_PROCID") and env.get("SLURM_NTASKS") != "1":
        missing = _missing(SLURM_VARS, env)
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if nodes:
                addr = parse_nodelist(nodes)[0]
            else:
                missing.append("MASTER_ADDR or SLURM_NODELIST")
        if not env.get("MASTER_PORT") and not env.get("SLURM_JOB_ID"):
            missing.append("MASTER_PORT or SLURM_JOB_ID")
        if missing:
            raise DistributedError(
                f"SLURM environment is incomplete: {', '.join(missing)} not set "
                "(start the command with `srun`, or set MASTER_ADDR/MASTER_PORT)"
            )
        # Every task derives the same port from the job id when MASTER_PORT is not given.
        port = _as_int("MASTER_PORT", env) if env.get("MASTER_PORT") \
            else 15000 + _as_int("SLURM_JOB_ID", env) % 20000
        return GroupEnv(_as_int("SLURM_PROCID", env), _as_int("SLURM_NTASKS", env),
                        _as_int("SLURM_LOCALID", env), addr, port, "slurm")
    return None
