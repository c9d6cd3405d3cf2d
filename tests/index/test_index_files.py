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


def _rewrite_meta(folder, **changes):
    import json

    path = folder / "index.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


_DROP = object()


@pytest.mark.parametrize("key, value", [
    ("format", "x"), ("format", None), ("model_spec", [1, 2]), ("surprise", 1), ("num_feat", "abc"),
    ("input_size", 0), ("search_params", "nprobe=4"), ("search_params", {"nprobe": 4}),
    ("dim", True), ("count", -1), ("normalized", "yes"), ("root", 7), ("sources", {"a": 1}),
    ("sources", [{"features": 3, "count": 1}]), ("weights_sha256", "xyz"), ("on_disk", 1),
    ("factory", None), ("num_feat", 10_000), ("target_recall", 7.0), ("files", [])])
def test_load_validates_every_key_of_index_json(key, value, flat):
    """A value of the wrong type or range, an unknown key, search parameters that the index
    type has none of: one InputError naming the key, not a traceback or a silent default."""
    _rewrite_meta(flat, **{key: value})
    with pytest.raises(InputError, match=rf"index\.json: .*{key}"):
        Index.load(flat)


def test_load_names_a_missing_required_key(flat):
    _rewrite_meta(flat, factory=_DROP)
    with pytest.raises(InputError, match=r"index\.json: .*'factory' is missing"):
        Index.load(flat)
