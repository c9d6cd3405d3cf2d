"""Issue 28, index folders read back (search, serve, Index.load, index --add): damage, hostile
records and non-regular files are refused with one error naming the file, never searched."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import pytest

from tests.index.conftest import clustered, write_features
from unicom_cli.errors import InputError
from unicom_cli.index import Index, build_index


@contextmanager
def within(seconds: int):
    """Fail instead of hanging (a read of a FIFO blocks forever)."""
    def timed_out(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def flat(tmp_path):
    x = clustered(120, 16)
    npy = write_features(tmp_path / "f", "feats", x)
    build_index(npy, tmp_path / "i", index="flat", progress=False)
    return tmp_path / "i"


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_load_refuses_a_non_regular_ids_file(kind, flat):
    ids = flat / "ids.txt"
    ids.unlink()
    if kind == "fifo":
        os.mkfifo(ids)
    elif kind == "dev_zero":
        ids.symlink_to("/dev/zero")
    else:
        ids.mkdir()
    with within(10), pytest.raises(InputError, match=r"ids\.txt: is .*not a regular file"):
        Index.load(flat)


def test_feature_ids_file_that_is_a_fifo_is_refused(tmp_path):
    npy = write_features(tmp_path / "f", "feats", clustered(50, 16))
    ids = tmp_path / "f" / "feats.ids.txt"
    ids.unlink()
    os.mkfifo(ids)
    with within(10), pytest.raises(InputError, match=r"feats\.ids\.txt: is a named pipe"):
        build_index(npy, tmp_path / "i", index="flat", progress=False)
    assert not (tmp_path / "i").exists()
