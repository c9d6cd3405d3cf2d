"""Run a function on N gloo processes (torch.multiprocessing) for distributed tests."""

from __future__ import annotations

import os
import socket
from typing import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: object) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; raises if any of them fails.

    One retry on a fresh port: on this shared machine the free port can be taken between
    ``free_port()`` and gloo's bind. A real failure fails twice; the callers then check results.
    """
    import torch.multiprocessing as mp

    try:
        mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        print(f"spawn failed once ({str(exc).strip().splitlines()[-1]}); retrying on a new port")
        mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
