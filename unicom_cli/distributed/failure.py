"""The failure protocol between launched ranks and their launcher: one root cause, every rank stopped.

A failing launched rank writes one record (message, exit code, traceback, whether it only saw
another rank go away) into the launcher's error folder and leaves at once; the launcher reads
the records and reports the first real failure. Ranks of a torchrun/SLURM group leave their
group and re-raise instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

from unicom_cli.distributed.env import GroupEnv
from unicom_cli.errors import DistributedError, UnicomError
from unicom_cli.utils.files import write_json_atomic

# Set by the launcher for the processes it starts (never by users).
ERROR_DIR_ENV = "UNICOM_ERROR_DIR"  # where a failing worker leaves its one-line message
BACKEND_ENV = "UNICOM_DIST_BACKEND"  # gloo or nccl; users may set it too when joining
LAUNCHER_PID_ENV = "UNICOM_LAUNCHER_PID"  # workers end when this process dies
TIMEOUT_ENV = "UNICOM_DIST_TIMEOUT"  # seconds a collective waits for a lost rank
DEFAULT_TIMEOUT_S = 1800.0


def die_with_launcher(launcher_pid: int) -> None:
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


def note_stop_signal(rank: int, error_dir: Path) -> None:
    """When SIGTERM reaches this worker, note when before dying of it: the launcher then stops the
    other ranks with SIGTERM too, and only these times tell which rank was stopped first (the
    agent's exit records carry whole seconds)."""
    def noted(signum: int, _frame) -> None:
        try:
            write_json_atomic(error_dir / f"signal-rank{rank}.json", {"rank": rank, "time": time.time()},
                              indent=None)
        except OSError:
            pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, noted)


def record_crashes(rank: int, error_dir: Path) -> None:
    """Have Python write where this worker was if the process dies of a fatal signal (SIGABRT from
    the C++ runtime, SIGSEGV): a rank killed that way leaves no record, and its last Python frame
    is what names the step that died."""
    import faulthandler

    handle = open(error_dir / f"crash-rank{rank}.txt", "w")  # noqa: SIM115 - open for the process's life
    faulthandler.enable(file=handle, all_threads=False)


def crash_site(error_dir: Path, rank: int) -> str:
    """``file:line in function`` of the innermost frame a crashed rank's faulthandler wrote; "" if none."""
    try:
        text = (error_dir / f"crash-rank{rank}.txt").read_text(errors="replace")
    except OSError:
        return ""
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', text)
    if not frames:
        return ""
    path, line, function = frames[0]  # faulthandler lists the innermost frame first
    return f"{Path(path).name}:{line} in {function}"


def _signal_times(error_dir: Path) -> dict[int, float]:
    """rank → when a stop signal reached it (``note_stop_signal``)."""
    times = {}
    for path in error_dir.glob("signal-rank*.json"):
        try:
            record = json.loads(path.read_text())
            times[int(record["rank"])] = float(record["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return times


def is_collateral(exc: BaseException) -> bool:
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


def fail(group: GroupEnv, exc: BaseException, joined: bool) -> None:
    """End this rank after a failure; launched workers hand the message to the launcher.

    A launched worker leaves at once (``os._exit``): the agent sees the exit and stops the
    other ranks, even when they wait in a collective or this rank's backend would block in
    its clean-up. A rank of a torchrun/SLURM group leaves its group and re-raises.
    """
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        if error_dir:
            code = 130 if isinstance(exc, KeyboardInterrupt) else exc.code
            _exit_now(code if isinstance(code, int) else 1)  # the launcher reports it once
        leave(joined)
        raise exc
    if isinstance(exc, UnicomError):
        message, code, trace = str(exc), exc.exit_code, ""
    else:
        import traceback

        message, code = f"{type(exc).__name__}: {exc}", 1
        trace = "".join(traceback.format_exception(exc))
    if error_dir:
        record = {"rank": group.rank, "time": time.time(), "message": message, "exit_code": code,
                  "traceback": trace, "collateral": is_collateral(exc)}
        write_json_atomic(Path(error_dir, f"rank{group.rank}.json"), record, indent=None)
        _exit_now(code)  # quiet: the launcher prints the root cause once
    leave(joined)
    _record_for_torchrun(exc)
    if is_collateral(exc):  # one line instead of a backend traceback; the cause is elsewhere
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


def leave(joined: bool) -> None:
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


def root_cause(error_dir: Path, exc: Exception) -> DistributedError:
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
    signalled = _signal_times(error_dir)
    killed = sorted((f.exitcode in stop_signals, signalled.get(rank, math.inf), f.timestamp, rank, f)
                    for rank, f in failures.items() if rank not in reported and f.exitcode < 0)
    primary = sorted((r for r in records if not r["collateral"]), key=lambda r: r["time"])
    if primary:
        first = primary[0]
    elif killed:
        *_, rank, failure = killed[0]
        site = crash_site(error_dir, rank)
        where = f" (in {site})" if site else ""
        return DistributedError(f"rank {rank} was killed by {failure.signal_name()}{where}; all processes were stopped")
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
