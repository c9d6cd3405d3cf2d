"""Lock files made with O_EXCL that name their holder (pid, host, process start): claims on shared folders.

Unlike ``flock`` these work on network file systems where independent jobs on several hosts
write into one folder. A lock whose holder is a dead process on this host (same pid but
another start time counts as dead: pids are reused) is taken over; a lock held on another
host cannot be checked from here and is reported with its holder, to be removed by hand if
that job is gone.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from unicom_cli.errors import InputError


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux); "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return ""


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()} {_start_time(os.getpid())}".strip()


def describe_holder(text: str) -> str:
    parts = text.split()
    if len(parts) >= 2:
        return f"pid {parts[0]} on {parts[1]}"
    return "an unknown process"


def _alive_here(text: str) -> bool | None:
    """True/False for a holder on this host; None when it is on another host (cannot tell)."""
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return False  # unreadable or half-written: its writer died between create and write
    if parts[1] != socket.gethostname():
        return None
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = parts[2] if len(parts) > 2 else ""
    return not (started and _start_time(pid) and _start_time(pid) != started)


FRESH_S = 10.0  # an empty lock younger than this is being written, not left by a dead process


def _create_with(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``, atomically: False if it exists. The text is written to
    a private file first and hard-linked into place, so that no other process ever sees the lock
    empty (an empty lock reads as a dead holder's); O_EXCL then write where links are refused."""
    private = path.with_name(f"{path.name}.new-{os.getpid()}")
    private.write_text(text)
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    finally:
        private.unlink(missing_ok=True)
    try:  # a file system without hard links (some FUSE and SMB mounts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


class ClaimLock:
    """``path`` created exclusively with this process as holder; :meth:`try_acquire` says who has it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.held = False

    def try_acquire(self) -> str | None:
        """None when this process now holds the lock, else the holder's description."""
        for _ in range(5):
            try:
                created = _create_with(self.path, _me() + "\n")
            except FileNotFoundError:
                raise InputError(f"{self.path.parent}: the output folder does not exist") from None
            if created:
                self.held = True
                return None
            holder = self._read()
            if not holder and _age_s(self.path) < FRESH_S:
                return "a process that is creating it now"  # a fallback create between open and write
            if _alive_here(holder) is False and self._take_over(holder):
                continue
            return describe_holder(holder)
        return describe_holder(self._read())

    def clear_if_stale(self) -> None:
        """Remove the lock when its holder is a dead process of this host (a killed run's claim)."""
        if self.path.exists():
            holder = self._read()
            if _alive_here(holder) is False:
                self._take_over(holder)

    def _read(self) -> str:
        try:
            return self.path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _take_over(self, holder: str) -> bool:
        """Remove a dead holder's lock; only one of several processes racing for it succeeds."""
        stale = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return True  # someone else removed it: try again
        if stale.read_text(errors="replace").strip() != holder:
            os.rename(stale, self.path)  # a live process had just re-created it: put it back
            return False
        stale.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
