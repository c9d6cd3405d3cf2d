"""A tiny test-only command that runs through ``run_command``: sharded rows, gathered back in order.

Run as ``python -m tests.distributed.toy_cli --total 7 --procs 2``; it prints one JSON line on rank 0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer

from unicom_cli.cli.options import GpusOpt, MasterAddrOpt, MasterPortOpt, NnodesOpt, NodeRankOpt, ProcsOpt, RdzvOpt
from unicom_cli.errors import InputError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def rows_for(indices):
    """The value row of each dataset index (what 1 and N processes must agree on)."""
    import numpy as np

    i = np.asarray(indices, dtype=np.float64)
    return np.stack([i, i ** 2, np.sin(i)], axis=1)


def work(total: int, fail_rank: Optional[int], fail_kind: str, sleep: float, pid_dir: Optional[Path]) -> dict:
    """Compute this rank's block of rows and gather everything back into dataset order."""
    import numpy as np
    import torch.distributed as dist

    from unicom_cli.distributed import local_rank, rank, world_size
    from unicom_cli.distributed.comm import broadcast_object, gather_objects, gather_rows, shard_range

    if pid_dir is not None:
        (pid_dir / f"{rank()}.pid").write_text(str(os.getpid()))
    if fail_rank == rank():
        if fail_kind == "usage":
            raise InputError(f"rank-{rank()} failed on purpose: bad file example.jpg")
        if fail_kind == "abort":  # what a C++ std::terminate in a backend does to the process
            os.abort()
        raise ValueError(f"a bug on rank {rank()}")
    time.sleep(sleep)
    block = shard_range(total)
    idx = np.arange(block.start, block.stop)
    values = gather_rows(idx, rows_for(idx), total)
    owners = gather_rows(idx, np.full((len(idx), 1), rank(), dtype=np.int64), total)
    return {"world": world_size(), "rank": rank(), "local_rank": local_rank(),
            "initialized": dist.is_initialized(), "pid": os.getpid(),
            "values": values.tolist(), "owners": owners[:, 0].tolist(),
            "broadcast": broadcast_object(f"chosen by rank {rank()}"), "sizes": gather_objects(len(idx))}


@app.command()
def toy(
    total: int = typer.Option(7, "--total"),
    fail_rank: Optional[int] = typer.Option(None, "--fail-rank"),
    fail_kind: str = typer.Option("usage", "--fail-kind"),
    sleep: float = typer.Option(0.0, "--sleep"),
    pid_dir: Optional[Path] = typer.Option(None, "--pid-dir"),
    gpus: GpusOpt = None, procs: ProcsOpt = None, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = "127.0.0.1", master_port: MasterPortOpt = None, rdzv_endpoint: RdzvOpt = None,
) -> None:
    """Gather ``total`` rows computed on every rank and print them as JSON on rank 0."""
    from unicom_cli.distributed.launch import LaunchConfig, run_command

    cfg = LaunchConfig(gpus, procs, nnodes, node_rank, master_addr, master_port, rdzv_endpoint)
    result = run_command(cfg, work, total, fail_rank, fail_kind, sleep, pid_dir)
    if result is not None:
        print(json.dumps(result), flush=True)


def main() -> int:
    """Like ``unicom_cli.cli.app.main``, with this module's app."""
    import unicom_cli.cli.app as cli

    saved = cli.app
    cli.app = app
    try:
        code = cli.main(None)
    finally:
        cli.app = saved
    return code


if __name__ == "__main__":
    from unicom_cli.distributed.launch import exit_process

    exit_process(main())  # as the CLI's entry point leaves
