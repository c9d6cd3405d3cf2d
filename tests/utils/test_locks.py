"""Claim locks (utils/locks.py): one holder, named; a dead holder's claim taken over; never a half-made one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from unicom_cli.utils.locks import ClaimLock


def test_the_second_claimant_is_refused_with_the_holders_pid_and_nothing_is_left_behind(tmp_path):
    first, second = ClaimLock(tmp_path / "p.lock"), ClaimLock(tmp_path / "p.lock")
    assert first.try_acquire() is None
    assert second.try_acquire() == f"pid {os.getpid()} on {socket.gethostname()}"
    first.release()
    assert second.try_acquire() is None
    second.release()
    assert list(tmp_path.iterdir()) == []  # no private .new- files, no lock


def test_an_empty_lock_is_being_made_when_fresh_and_abandoned_when_old(tmp_path):
    """Where a file system refuses hard links the lock is made by open then write: a claimant
    seeing it empty in between must not take it over; an empty lock a minute old is abandoned."""
    path = tmp_path / "p.lock"
    path.write_text("")
    assert ClaimLock(path).try_acquire() == "a process that is creating it now"
    os.utime(path, (os.path.getmtime(path) - 60,) * 2)
    lock = ClaimLock(path)
    assert lock.try_acquire() is None and path.read_text().split()[0] == str(os.getpid())


def test_a_dead_processs_claim_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "p.lock"
    path.write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    assert ClaimLock(path).try_acquire() is None
    assert path.read_text().split()[0] == str(os.getpid())
