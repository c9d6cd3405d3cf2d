"""Run a command in this process, in an existing torch.distributed group, or re-launched on N processes.

Three ways a command runs (``run_command`` picks one):

* in this process, without a process group: the default, and ``--gpus 1`` / ``--procs 1``;
* joining a group that someone else started: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) or ``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, master from MASTER_ADDR or
  the first host of SLURM_NODELIST);
* re-launching the same command line on N local processes with torch's elastic launcher
  (``--gpus N``: NCCL, one process per GPU; ``--procs N``: gloo on CPU), which start again here
  and take the joining path.

Examples::

    unicom embed ./imgs -o feats.npy --gpus all
    unicom embed ./imgs -o feats.npy --procs 2
    torchrun --nproc-per-node 8 -m unicom_cli embed ./imgs -o feats.npy
    srun --ntasks-per-node 8 unicom embed ./imgs -o feats.npy

Which group a process was started into is read in ``distributed.env``; how a failing rank
stops the others and reports its cause is ``distributed.failure``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

from unicom_cli.distributed.env import GroupEnv, detect_group
from unicom_cli.distributed.failure import (
    BACKEND_ENV,
    DEFAULT_TIMEOUT_S,
    ERROR_DIR_ENV,
    LAUNCHER_PID_ENV,
    TIMEOUT_ENV,
    die_with_launcher,
    fail,
    note_stop_signal,
    record_crashes,
    root_cause,
)
from unicom_cli.errors import DistributedError, UsageError
from unicom_cli.utils.cpu import cores_per_process

T = TypeVar("T")

_DEFAULT_MULTINODE_PORT = 29500  # torchrun's default, so every node can agree on it


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


# ----------------------------------------------------------------------------- the command line

_command: list[str] | None = None


def remember_command(argv: list[str] | None, module: str = "unicom_cli") -> None:
    """Record how to start this command again; the CLI entry point calls it before parsing.

    Args:
        argv: the arguments after the program name, or None when they are this process's own
            command line (``sys.orig_argv`` is then replayed exactly: ``unicom …``,
            ``python -m unicom_cli …`` or any other script calling ``run_command``).
        module: the ``python -m`` module that takes ``argv`` when it is given explicitly.
    """
    global _command
    if argv is None:
        _command = [sys.executable, *sys.orig_argv[1:]]
    else:
        _command = [sys.executable, "-m", module, *argv]


def forget_command() -> None:
    """Drop the recorded command line (the entry point calls it on the way out)."""
    global _command
    _command = None


def _relaunch_command() -> list[str]:
    if _command is None:
        raise DistributedError(
            "cannot re-launch this command on several processes: its command line is unknown "
            "(run it as `unicom …` or `python -m unicom_cli …`, not in-process)"
        )
    return list(_command)


# ----------------------------------------------------------------------------- run_command


def _requested(cfg: LaunchConfig) -> tuple[int, str | None]:
    """Processes per node and backend that ``cfg`` asks for (1, None: run in this process)."""
    if cfg.gpus is not None and cfg.procs is not None:
        raise UsageError("give either --gpus (one process per GPU) or --procs (CPU processes), not both")
    if cfg.procs is not None:
        if cfg.procs < 1:
            raise UsageError(f"--procs must be at least 1, got {cfg.procs}")
        return cfg.procs, "gloo"
    if cfg.gpus is None:
        return 1, None
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.gpus.strip().lower() == "all":
        wanted = visible
    else:
        try:
            wanted = int(cfg.gpus)
        except ValueError:
            raise UsageError(f"--gpus takes a number or 'all', got {cfg.gpus!r}") from None
    if visible == 0:
        raise UsageError("--gpus: no CUDA GPU is visible here; use --procs N for CPU processes")
    if not 1 <= wanted <= visible:
        raise UsageError(f"--gpus {cfg.gpus}: {visible} GPU(s) visible (CUDA_VISIBLE_DEVICES), asked for {wanted}")
    return wanted, "nccl"


def run_command(cfg: LaunchConfig, fn: Callable[..., T], *args: object, **kwargs: object) -> T | None:
    """Run ``fn(*args, **kwargs)`` where ``cfg`` says; return its result on rank 0, else None.

    When this call re-launches the command on several processes, the workers run ``fn`` and
    rank 0 among them prints; this (launching) process then returns None. A failing worker
    makes every worker stop, and this raises its error as ``rank N: <message>``.
    """
    group = detect_group()
    nproc, backend = _requested(cfg) if group is None else (1, None)
    if group is not None:
        if (cfg.procs or 1) > 1 or cfg.gpus not in (None, "1") or cfg.nnodes > 1:
            if not os.environ.get(ERROR_DIR_ENV):  # our own workers carry the options on purpose
                from unicom_cli.utils.console import warn

                warn(f"started by {group.source} (rank {group.rank} of {group.world_size}): "
                     "joining that group; --gpus/--procs/--nnodes are ignored")
        return _run_in_group(group, _backend_for(cfg), fn, args, kwargs)
    if nproc == 1 and cfg.nnodes == 1:
        return fn(*args, **kwargs)
    _launch(cfg, nproc, backend or "gloo")
    return None


def _backend_for(cfg: LaunchConfig) -> str:
    chosen = os.environ.get(BACKEND_ENV)
    if chosen:
        return chosen
    if cfg.procs is not None:
        return "gloo"
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


# ----------------------------------------------------------------------------- inside a worker


def _run_in_group(group: GroupEnv, backend: str, fn: Callable[..., T], args: tuple, kwargs: dict) -> T | None:
    """Join the group, run ``fn``, wait for everyone, leave; on failure report and stop this rank."""
    # Rank-aware code (utils.console, distributed.local_rank) reads these, also under SLURM.
    os.environ.update(RANK=str(group.rank), WORLD_SIZE=str(group.world_size),
                      LOCAL_RANK=str(group.local_rank), MASTER_ADDR=group.master_addr,
                      MASTER_PORT=str(group.master_port))
    import datetime

    import torch
    import torch.distributed as dist

    if os.environ.get(LAUNCHER_PID_ENV):
        die_with_launcher(int(os.environ[LAUNCHER_PID_ENV]))
    if os.environ.get(ERROR_DIR_ENV):
        note_stop_signal(group.rank, Path(os.environ[ERROR_DIR_ENV]))
        record_crashes(group.rank, Path(os.environ[ERROR_DIR_ENV]))
    joined = False
    try:
        device = None
        if backend == "nccl":
            device = torch.device("cuda", group.local_rank)
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        try:
            dist.init_process_group(backend, init_method="env://", rank=group.rank,
                                    world_size=group.world_size, timeout=timeout, device_id=device)
        except Exception as exc:
            raise DistributedError(
                f"could not join the {backend} process group at {group.master_addr}:{group.master_port} "
                f"as rank {group.rank} of {group.world_size}: {exc}"
            ) from exc
        joined = True
        result = fn(*args, **kwargs)
        dist.barrier()  # nobody leaves while another rank still needs it (gloo aborts otherwise)
    except BaseException as exc:
        fail(group, exc, joined)
        raise  # fail re-raises in the right form; this line is never reached
    dist.destroy_process_group()
    global _left_group
    _left_group = True
    return result if group.rank == 0 else None


_left_group = False  # this process ran its part in a process group and left it


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``. A process that was a rank of a group leaves with ``os._exit``
    once its output is flushed, as a failing rank does: the interpreter's teardown can meet
    gloo's worker threads and abort a rank whose work is done (pytorch/pytorch#190489)."""
    if _left_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ----------------------------------------------------------------------------- the launcher


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr if addr not in ("localhost",) else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port_free(addr: str, port: int) -> None:
    """A busy --master-port fails late and obscurely inside the process group: check it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr if addr not in ("localhost",) else "127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DistributedError(f"--master-port {port} is in use on {addr}; choose another "
                                       "port, or leave the option out to get a free one") from None
            # another machine's address or a name: the group itself will say what is wrong


def _launch(cfg: LaunchConfig, nproc: int, backend: str) -> None:
    """Start ``nproc`` copies of this command on this node under torch's elastic agent; wait for them."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
    from torch.distributed.launcher.api import elastic_launch

    from unicom_cli.utils.console import info

    command = _relaunch_command()
    if cfg.rdzv_endpoint:
        rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": cfg.rdzv_endpoint, "rdzv_configs": {}}
        where = f"rendezvous {cfg.rdzv_endpoint}"
        nodes = f" on one of {cfg.nnodes} nodes" if cfg.nnodes > 1 else ""
    else:
        if cfg.nnodes > 1:
            port = cfg.master_port or _DEFAULT_MULTINODE_PORT
        else:
            if cfg.master_port:
                _check_port_free(cfg.master_addr, cfg.master_port)
            port = cfg.master_port or _free_port(cfg.master_addr)
        rdzv = {"rdzv_backend": "static", "rdzv_endpoint": f"{cfg.master_addr}:{port}",
                "rdzv_configs": {"rank": cfg.node_rank}}
        where = f"{cfg.master_addr}:{port}"
        nodes = f" on node {cfg.node_rank} of {cfg.nnodes}" if cfg.nnodes > 1 else ""
    kind = "GPU" if backend == "nccl" else "CPU"
    info(f"launching {nproc} {kind} process{'es' if nproc > 1 else ''} ({backend}){nodes}, group at {where}")

    debug = os.environ.get("UNICOM_DEBUG") == "1"
    saved_env = dict(os.environ)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    with tempfile.TemporaryDirectory(prefix="unicom-launch-") as tmp:
        error_dir = Path(tmp, "errors")
        error_dir.mkdir()
        os.environ[ERROR_DIR_ENV] = str(error_dir)
        os.environ[BACKEND_ENV] = backend
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
            os.environ["OMP_NUM_THREADS"] = str(cores_per_process(nproc))
        config = ElasticConfig(
            min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=nproc,
            run_id=os.environ.get("UNICOM_RUN_ID", "unicom"), max_restarts=0, monitor_interval=0.1,
            start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp, "logs"))),
            **rdzv,
        )
        if not debug:
            logging.disable(logging.CRITICAL)  # the agent's own log lines; we print the root cause
        try:
            elastic_launch(config, command[0])(*command[1:])
        except ChildFailedError as exc:
            raise root_cause(error_dir, exc) from None
        except SignalException as exc:
            if exc.sigval == signal.SIGINT:
                from unicom_cli.utils.console import err_console

                err_console.print(f"[bold red]interrupted:[/] stopped all {nproc} processes")
                raise KeyboardInterrupt from None
            error = DistributedError(f"stopped by {exc.sigval.name}; all processes were shut down")
            error.exit_code = 128 + int(exc.sigval)  # the shell's convention for a signal
            raise error from None
        finally:
            logging.disable(logging.NOTSET)
            for sig, handler in saved_signals.items():
                signal.signal(sig, handler)
            os.environ.clear()
            os.environ.update(saved_env)
