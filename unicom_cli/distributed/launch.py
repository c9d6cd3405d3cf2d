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
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from unicom_cli.errors import DistributedError, UnicomError, UsageError
from unicom_cli.utils.cpu import cores_per_process

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")

# Set by the launcher for the processes it starts (never by users).
_ERROR_DIR_ENV = "UNICOM_ERROR_DIR"  # where a failing worker leaves its one-line message
_BACKEND_ENV = "UNICOM_DIST_BACKEND"  # gloo or nccl; users may set it too when joining
_LAUNCHER_PID_ENV = "UNICOM_LAUNCHER_PID"  # workers end when this process dies
_TIMEOUT_ENV = "UNICOM_DIST_TIMEOUT"  # seconds a collective waits for a lost rank
_DEFAULT_TIMEOUT_S = 1800.0
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


@dataclass(frozen=True)
class GroupEnv:
    """A process group this process was started into (by torchrun, srun or our launcher)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"


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


# ----------------------------------------------------------------------------- environment


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
            if not os.environ.get(_ERROR_DIR_ENV):  # our own workers carry the options on purpose
                from unicom_cli.utils.console import warn

                warn(f"started by {group.source} (rank {group.rank} of {group.world_size}): "
                     "joining that group; --gpus/--procs/--nnodes are ignored")
        return _run_in_group(group, _backend_for(cfg), fn, args, kwargs)
    if nproc == 1 and cfg.nnodes == 1:
        return fn(*args, **kwargs)
    _launch(cfg, nproc, backend or "gloo")
    return None


def _backend_for(cfg: LaunchConfig) -> str:
    chosen = os.environ.get(_BACKEND_ENV)
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

    if os.environ.get(_LAUNCHER_PID_ENV):
        _die_with_launcher(int(os.environ[_LAUNCHER_PID_ENV]))
    joined = False
    try:
        device = None
        if backend == "nccl":
            device = torch.device("cuda", group.local_rank)
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=float(os.environ.get(_TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)))
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
        _fail(group, exc, joined)
        raise  # _fail re-raises in the right form; this line is never reached
    dist.destroy_process_group()
    return result if group.rank == 0 else None


def _die_with_launcher(launcher_pid: int) -> None:
    """Ask Linux to end this worker if the launching process dies (even by kill -9): no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):  # pragma: no cover - best effort only
        return
    if os.getppid() != launcher_pid:  # it died before prctl took effect
        raise SystemExit(1)


def _is_collateral(exc: BaseException) -> bool:
    """True for errors that only say *another* rank went away (not a root cause)."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def _fail(group: GroupEnv, exc: BaseException, joined: bool) -> None:
    """End this rank after a failure; launched workers hand the message to the launcher.

    A launched worker leaves at once (``os._exit``): the agent sees the exit and stops the
    other ranks, even when they wait in a collective or this rank's backend would block in
    its clean-up. A rank of a torchrun/SLURM group leaves its group and re-raises.
    """
    error_dir = os.environ.get(_ERROR_DIR_ENV)
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        if error_dir:
            code = 130 if isinstance(exc, KeyboardInterrupt) else exc.code
            _exit_now(code if isinstance(code, int) else 1)  # the launcher reports it once
        _leave(joined)
        raise exc
    if isinstance(exc, UnicomError):
        message, code, trace = str(exc), exc.exit_code, ""
    else:
        import traceback

        message, code = f"{type(exc).__name__}: {exc}", 1
        trace = "".join(traceback.format_exception(exc))
    if error_dir:
        record = {"rank": group.rank, "time": time.time(), "message": message, "exit_code": code,
                  "traceback": trace, "collateral": _is_collateral(exc)}
        tmp = Path(error_dir, f".rank{group.rank}.json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, Path(error_dir, f"rank{group.rank}.json"))
        _exit_now(code)  # quiet: the launcher prints the root cause once
    _leave(joined)
    _record_for_torchrun(exc)
    if _is_collateral(exc):  # one line instead of a backend traceback; the cause is elsewhere
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[/path/pair.cc:545] " prefix
        raise DistributedError(f"rank {group.rank}: lost contact with the other ranks ({first}); "
                               "the first rank to fail shows the cause") from exc
    if isinstance(exc, UnicomError) and group.world_size > 1:
        exc.args = (f"rank {group.rank}: {message}",)
    raise exc


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave(joined: bool) -> None:
    """Leave a possibly broken group without waiting for the other ranks."""
    if not joined:
        return
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if dist.get_backend() == "nccl" and hasattr(c10d, "_abort_process_group"):
            c10d._abort_process_group()  # destroy could wait on the peers' pending collectives
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group may already be broken
        pass


def _record_for_torchrun(exc: BaseException) -> None:
    """Leave the message where torchrun's failure summary looks for it (TORCHELASTIC_ERROR_FILE)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # noqa: BLE001 - best effort only
        pass


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
        os.environ[_ERROR_DIR_ENV] = str(error_dir)
        os.environ[_BACKEND_ENV] = backend
        os.environ[_LAUNCHER_PID_ENV] = str(os.getpid())
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
            raise _root_cause(error_dir, exc) from None
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


def _root_cause(error_dir: Path, exc: Exception) -> DistributedError:
    """The first real failure among the workers, as one error carrying that worker's exit code."""
    records = []
    for path in error_dir.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    failures = getattr(exc, "failures", {})
    # A rank killed by a signal leaves no file, and the others then fail on the broken group.
    reported = {r["rank"] for r in records}
    # The agent stops the survivors with SIGTERM (or forwards SIGINT): another signal came first.
    stop_signals = (-int(signal.SIGTERM), -int(signal.SIGINT))
    killed = sorted((f.exitcode in stop_signals, f.timestamp, rank, f) for rank, f in failures.items()
                    if rank not in reported and f.exitcode < 0)
    primary = sorted((r for r in records if not r["collateral"]), key=lambda r: r["time"])
    if primary:
        first = primary[0]
    elif killed:
        *_, rank, failure = killed[0]
        error = DistributedError(f"rank {rank} was killed by {failure.signal_name()}; all processes were stopped")
        return error
    elif records:
        first = min(records, key=lambda r: r["time"])
    elif failures:
        rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
        error = DistributedError(f"rank {rank} exited with code {failure.exitcode}; all processes were stopped")
        error.exit_code = failure.exitcode if failure.exitcode > 0 else 1
        return error
    else:
        return DistributedError(f"the worker processes failed: {exc}")
    if first["traceback"]:
        from unicom_cli.utils.console import err_console

        err_console.print(first["traceback"], markup=False, highlight=False)
    error = DistributedError(f"rank {first['rank']}: {first['message']}")
    error.exit_code = int(first["exit_code"])
    return error
