"""Writing files safely, in one place: atomic replace, free-space checks, disk errors, output locks.

- :func:`atomic_open` / :func:`atomic_path` write to a hidden temp file in the *same* folder as the
  target, fsync it and ``os.replace`` it into place, so a reader (or a rerun after a kill) sees the
  old file or the new one, never half of one. On any error the temp file is removed.
- :func:`ensure_free_space` refuses before the work (or before growing a memory map: a write into a
  memory-mapped page that the disk cannot back is a SIGBUS, not an exception).
- :func:`disk_errors` turns ENOSPC/EDQUOT/EROFS/EACCES into one-line :class:`DiskError`\\ s naming the
  folder, instead of tracebacks.
- :func:`open_regular` opens a file that is read whole (an id list, a path list, a JSON record)
  only if it is a regular file: a FIFO would block forever, ``/dev/zero`` never ends.
- :func:`output_lock` holds an ``flock`` on ``.<name>.lock`` next to an output for the whole run; a
  second run on the same output is refused at once. The kernel drops the lock when the process
  dies, so a SIGKILL never leaves an output stuck.

Only the standard library: importable from every layer and by ``unicom --help``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from unicom_cli.errors import DiskError, InputError, OutputExists, OutputInUse, UsageError

# Errors of the *place* being written, which the user fixes by freeing space or choosing another one.
DISK_ERRNOS = {errno.ENOSPC: "cannot write, the disk is full",
               errno.EDQUOT: "cannot write, the disk quota is exceeded",
               errno.EROFS: "cannot write, the file system is read-only",
               errno.EFBIG: "cannot write, the file is too large for this file system",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FREE_SPACE_MARGIN = 1 << 20  # metadata, ids and JSON written next to the data


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB' (messages only)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


def _folder_of(path: object, fallback: Path | None = None) -> Path | None:
    if not isinstance(path, (str, bytes, os.PathLike)):  # no file name (or a descriptor)
        return fallback
    path = Path(os.fsdecode(path))
    return path if path.is_dir() else path.parent


def disk_error(exc: OSError, folder: str | os.PathLike | None = None) -> DiskError | None:
    """The one-line error for a disk-level OSError (full, read-only, no permission), else None.

    It names the folder of the file the system call was about, else ``folder``.
    """
    reason = DISK_ERRNOS.get(exc.errno or 0)
    if reason is None:
        return None
    where = _folder_of(exc.filename, Path(folder) if folder is not None else None)
    if exc.errno in _FULL:
        fix = "free some space or choose another output folder"
    elif exc.errno == errno.EROFS:
        fix = "choose another output folder"
    else:
        fix = "check its permissions or choose another folder"
    return DiskError(f"{where if where is not None else 'output'}: {reason}; {fix}")


@contextmanager
def disk_errors(folder: str | os.PathLike) -> Iterator[None]:
    """Re-raise disk-level OSErrors raised inside the block as a DiskError naming ``folder``."""
    try:
        yield
    except OSError as exc:
        converted = disk_error(exc, folder)
        if converted is None:
            raise
        raise converted from exc


def ensure_free_space(folder: str | os.PathLike, nbytes: int, what: str = "the output") -> None:
    """Refuse (DiskError naming ``folder``) when fewer than ``nbytes`` + a margin are free there."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the folder may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes) + FREE_SPACE_MARGIN
    if free < need:
        raise DiskError(f"{folder}: not enough free space for {what} (needs {human_bytes(need)}, "
                        f"{human_bytes(free)} free); free some space or choose another folder")


def preallocate(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> None:
    """Give a (sparse) file all its disk blocks now, so that writing it through a memory map
    never meets a full disk: that is a SIGBUS with no message, this is a DiskError naming the
    folder. A no-op for blocks already allocated (a resumed run)."""
    path = Path(path)
    with disk_errors(folder if folder is not None else path.parent):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)


_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISDIR, "a folder"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | os.PathLike, mode: str = "r", what: str = "a regular file",
                 **text: Any) -> IO[Any]:
    """``open(path, mode, **text)`` for reading, refused (InputError naming ``path``) before any byte
    is read unless ``path`` is a regular file or a symlink to one.

    Every file that is read whole goes through here: a FIFO would block the read forever, a
    symlink to ``/dev/zero`` would fill the memory, a folder is no list. The file is opened
    without blocking and checked on the open descriptor (no race with a swapped path). Other
    OSErrors (missing, no permission) are raised as ``open`` raises them.
    """
    if any(flag in mode for flag in "wax+"):
        raise ValueError(f"open_regular reads only, not mode {mode!r}")
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock)
    try:
        mode_bits = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode_bits):
            kind = next((name for test, name in _NOT_REGULAR if test(mode_bits)), "not a file")
            raise InputError(f"{path}: is {kind}, not a regular file; give {what}")
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **text)
    except BaseException:
        os.close(fd)
        raise


def check_output_file(path: str | os.PathLike | None, option: str,
                      suffixes: tuple[str, ...] | None = None, *, overwrite: bool = False) -> None:
    """Refuse, before any work, an output file option that cannot be written: a folder, a
    suffix no writer knows (a picture saved as ``.xyz`` fails only after the evaluation), an
    existing file without ``--overwrite``, or a place where no file can be created (/proc, a
    read-only file system; a missing folder is left to the writer, which creates it)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name in it")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: unknown file type {path.suffix or '(none)'}; use "
                         f"{', '.join(suffixes)}")
    if not overwrite:
        refuse_existing(path)
    if path.parent.is_dir():
        check_creatable(path)


def refuse_existing(*paths: str | os.PathLike | None) -> None:
    """Raise OutputExists naming the first of ``paths`` that exists: a command replaces no file,
    its main output or one beside it (sidecar, ids, failures list), without ``--overwrite``."""
    for path in paths:
        if path is not None and os.path.lexists(path):
            raise OutputExists(f"{path} already exists; add --overwrite to replace it (or choose another output)")


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Create ``folder`` if missing; raise InputError unless a file can really be created in it."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the output folder ({exc.strerror or exc}); "
                         "pick another -o") from exc
    try:  # os.access lies for root and on some network file systems: really try
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unicom-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"{folder}: cannot write to the output folder ({exc.strerror}); "
                         "pick another -o") from exc


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temp name next to ``path`` (same folder, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse to open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create(tmp: Path, path: Path) -> None:
    """Create the temp file before any writer runs: a place where no file can be made (a
    read-only file system, ``/proc``, a missing folder, no permission) is then the one DiskError
    naming the folder, whichever library writes the file (safetensors, pandas and faiss raise
    their own exception types, or none naming the place)."""
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    except OSError as exc:
        converted = disk_error(exc, path.parent)
        if converted is not None:
            raise converted from exc
        raise DiskError(f"{path.parent}: cannot create {path.name} there ({exc.strerror or exc}); "
                        "choose another folder") from exc


def check_creatable(path: str | os.PathLike) -> None:
    """Before long work: refuse, with the DiskError :func:`atomic_path` would raise at the end, an
    output where no file can be created (so a command with two outputs never writes the first
    and then fails on the second)."""
    path = Path(path)
    tmp = temp_path(path)
    _create(tmp, path)
    tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; after the block it is fsynced and moved onto ``path``.

    For writers that want a file name (``np.lib.format.open_memmap``, ``torch.save``…). If the block
    raises, the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    with disk_errors(path.parent):
        try:
            _create(tmp, path)
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = "\n", errors: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` atomically when the block ends without error.

    ``errors="surrogateescape"`` writes ids of non-UTF-8 file names as their original bytes.
    """
    binary = "b" in mode
    text = {} if binary else {"encoding": encoding, "newline": newline, "errors": errors}
    with atomic_path(path) as tmp, open(tmp, mode, **text) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------- output locks

def lock_path(output: str | os.PathLike) -> Path:
    """``dir/feats.npy`` → ``dir/.feats.npy.lock`` (a folder output gets its lock beside it)."""
    output = Path(os.path.abspath(output))
    return output.with_name(f".{output.name}.lock")


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return "unknown"
    return pid if pid.isdigit() else "unknown"


class OutputLock:
    """An exclusive, non-blocking ``flock`` on an output's lock file, released with the process."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        for _ in range(10):  # the holder may unlink the file between our open and our lock
            try:
                with disk_errors(self.path.parent):
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                if self.path.parent.is_dir():  # /proc, /sys: folders that take no new files
                    raise InputError(f"{self.path.parent}: files cannot be created in this folder "
                                     "(a system folder); choose another output") from None
                raise InputError(f"{self.path.parent}: the output folder does not exist; create "
                                 f"it first (mkdir -p {self.path.parent})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputInUse(f"{self.output} is in use by another unicom run "
                                  f"(pid {_holder(self.path)}); wait for it to finish or choose "
                                  "another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file the previous holder just removed: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        raise OutputInUse(f"{self.output}: could not lock {self.path}; another run keeps "
                          "replacing it")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still locked: nobody can hold a lock on the file we remove
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> OutputLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def output_lock(*outputs: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of every output for the block; refused at once if another run holds one.

    Only the main process locks (no ``RANK`` or rank 0): the other ranks of the same run write
    into the same output on purpose, and rank 0's death releases the lock for all of them.
    """
    try:
        import fcntl  # noqa: F401
    except ImportError:  # Windows: no flock; concurrent runs are then the user's call
        yield
        return
    if os.environ.get("RANK", "0") not in ("", "0"):
        yield
        return
    held: list[OutputLock] = []
    try:
        for output in outputs:
            held.append(OutputLock(output).acquire())
        yield
    finally:
        for lock in reversed(held):
            lock.release()
