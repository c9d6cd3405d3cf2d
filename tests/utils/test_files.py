"""utils/files.py against real files, a real full tmpfs and real SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.readonly import readonly_folder  # noqa: F401 (a fixture)
from unicom_cli.errors import DiskError, OutputInUse
from unicom_cli.utils.files import (
    atomic_open,
    ensure_free_space,
    lock_path,
    output_lock,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_open(target) as handle:
        handle.write("half")
        raise ZeroDivisionError
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_full_disk_is_one_diskerror_naming_the_folder_and_no_temp_left(small_disk):
    disk = small_disk("64k")
    with pytest.raises(DiskError) as err:
        write_text_atomic(disk / "big.txt", "x" * 1_000_000)
    assert str(disk) in str(err.value) and "full" in str(err.value)
    assert list(disk.iterdir()) == []


def test_read_only_disk_is_a_diskerror(small_disk):
    disk = small_disk("64k", readonly=True)
    with pytest.raises(DiskError, match="read-only"):
        write_text_atomic(disk / "a.txt", "x")


def test_ensure_free_space_refuses_with_the_folder(small_disk):
    disk = small_disk("4m")
    ensure_free_space(disk, 1000)
    with pytest.raises(DiskError) as err:
        ensure_free_space(disk, 10 << 20)
    assert str(disk) in str(err.value)


HOLDER = textwrap.dedent("""
    import sys, time
    from unicom_cli.utils.files import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def _start_holder(output):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_at_once_and_a_sigkill_releases_the_lock(tmp_path):
    output = tmp_path / "feats.npy"
    holder = _start_holder(output)
    try:
        with pytest.raises(OutputInUse) as err, output_lock(output):
            pass
        assert f"in use by another unicom run (pid {holder.pid})" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(output):  # the kernel dropped the dead process's lock
        assert lock_path(output).read_text().strip() == str(os.getpid())
    assert not lock_path(output).exists()


@pytest.mark.parametrize("place", ["readonly", "proc", "missing"])
def test_atomic_writes_to_an_unwritable_place_are_one_disk_error(place, readonly_folder, tmp_path):  # noqa: F811
    """/proc (no file can be created: ENOENT), a read-only file system, a folder that is gone: the
    one DiskError naming the folder, whichever writer runs inside (here a plain open), and no temp."""
    from unicom_cli.utils.files import atomic_path

    target = {"readonly": readonly_folder / "out.csv", "proc": Path("/proc/unicom-x.csv"),
              "missing": tmp_path / "gone" / "out.csv"}[place]
    with pytest.raises(DiskError, match=f"^{target.parent}: "):
        with atomic_path(target) as tmp, open(tmp, "w") as handle:
            handle.write("x")
    assert not target.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_in_a_folder_that_takes_no_files_is_not_called_missing(tmp_path):
    """``-o /proc/i``: /proc exists, so "create it first (mkdir -p /proc)" would mislead."""
    from unicom_cli.errors import InputError
    from unicom_cli.utils.files import OutputLock

    with pytest.raises(InputError, match=r"^/proc: files cannot be created in this folder"):
        OutputLock("/proc/i").acquire()
    with pytest.raises(InputError, match="does not exist; create it first"):
        OutputLock(tmp_path / "missing" / "i").acquire()
