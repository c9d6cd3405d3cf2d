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


def _stored_offset(folder, vector) -> int:
    """Where a stored float32 vector's bytes sit in index.faiss (a flat index keeps them raw)."""
    data = (folder / "index.faiss").read_bytes()
    offset = data.find(vector.astype("float32").tobytes())
    assert offset > 0
    return offset


def _flip(path, offset: int, mask: int, keep_time: bool = False) -> None:
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ mask]))
    if keep_time:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("where, mask", [("exponent", 0x7F), ("mantissa", 0x01)])
def test_a_flipped_bit_in_a_stored_vector_is_refused(where, mask, flat):
    """A changed exponent (the value becomes huge or inf) or a changed mantissa (a slightly
    different score): the recorded SHA-256 no longer matches, the index is not searched."""
    index = Index.load(flat)
    row = index.flat_vectors()[7].copy()
    offset = _stored_offset(flat, row) + (3 if where == "exponent" else 0)
    _flip(flat / "index.faiss", offset, mask)
    with pytest.raises(InputError, match=r"index\.faiss: SHA-256 .* recorded"):
        Index.load(flat)


@pytest.mark.parametrize("digests", [True, False])
def test_crlf_ids_are_refused(digests, flat):
    """CRLF line ends would make every id name no file: the recorded size and digest catch it,
    and without digests (an older folder) the carriage return itself is refused."""
    import json

    if not digests:
        meta = json.loads((flat / "index.json").read_text())
        del meta["files"]
        (flat / "index.json").write_text(json.dumps(meta))
    ids = flat / "ids.txt"
    ids.write_bytes(ids.read_bytes().replace(b"\n", b"\r\n"))
    match = r"ids\.txt: .*recorded at build time" if digests else r"ids\.txt: line 1 holds a carriage return"
    with pytest.raises(InputError, match=match):
        Index.load(flat)


def test_verification_is_cached_by_size_and_mtime_and_verify_rehashes(flat, monkeypatch):
    """The first load hashes and records; later loads trust the record while size and mtime
    are unchanged (no bytes read); ``verify=True`` hashes again and catches a change that kept
    the time."""
    import unicom_cli.index.integrity as integrity

    Index.load(flat)  # hashes (the build's record may be in the same clock tick)
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    Index.load(flat)
    assert hashed == []
    row = Index.load(flat).flat_vectors()[3].copy()
    _flip(flat / "index.faiss", _stored_offset(flat, row), 0x01, keep_time=True)
    Index.load(flat)  # same size and mtime: trusted, as the weights' sidecar is
    with pytest.raises(InputError, match=r"index\.faiss: SHA-256"):
        Index.load(flat, verify=True)
    assert "index.faiss" in hashed


def test_an_index_without_digests_loads_with_a_warning_and_cannot_be_verified(flat, capsys):
    import json

    meta = json.loads((flat / "index.json").read_text())
    del meta["files"]
    (flat / "index.json").write_text(json.dumps(meta))
    assert len(Index.load(flat)) == 120
    assert "records no digests" in capsys.readouterr().err
    with pytest.raises(InputError, match="records no digests.*rebuild"):
        Index.load(flat, verify=True)


@pytest.mark.parametrize("factory", ["flat", "HNSW8,Flat", "IVF4,Flat"])
def test_non_finite_stored_vectors_are_refused_without_digests(factory, tmp_path):
    """An index from before digests (or one whose digests were rewritten with it): a stored
    inf is still found, in flat storage, graph storage or inverted lists."""
    import json

    import numpy as np

    x = clustered(200, 16, seed=3)
    build_index(write_features(tmp_path / "f", "feats", x), tmp_path / "i", index=factory, progress=False)
    folder = tmp_path / "i"
    meta = json.loads((folder / "index.json").read_text())
    del meta["files"]
    (folder / "index.json").write_text(json.dumps(meta))
    data = (folder / "index.faiss").read_bytes()
    offset = data.find(x[11].tobytes())
    assert offset > 0
    data = data[:offset] + np.float32(np.inf).tobytes() + data[offset + 4:]
    (folder / "index.faiss").write_bytes(data)
    with pytest.raises(InputError, match=r"index\.faiss: .*NaN or infinite"):
        Index.load(folder)


@pytest.mark.parametrize("factory, params, takes", [
    ("flat", {"nprobe": 3}, "no search parameters"), ("HNSW8,Flat", {"nprobe": 3}, "--ef-search"),
    ("IVF4,Flat", {"efSearch": 16}, "--nprobe"), ("IVF4,Flat", {"nprobe": 5}, "1 to 4")])
def test_search_parameters_the_index_lacks_are_refused(factory, params, takes, tmp_path):
    """--nprobe on a flat or HNSW index, --ef-search on an IVF one, nprobe beyond nlist: one
    UsageError naming the option (flat used to ignore it silently, the others a faiss traceback)."""
    from unicom_cli.errors import UsageError

    x = clustered(200, 16, seed=1)
    build_index(write_features(tmp_path / "f", "feats", x), tmp_path / "i", index=factory, progress=False)
    index = Index.load(tmp_path / "i")
    option = "--nprobe" if "nprobe" in params else "--ef-search"
    with pytest.raises(UsageError, match=f"{option} .*{takes}"):
        index.search(x[:2], 3, params=params)


@pytest.mark.parametrize("change, word", [({"sha": "b" * 64}, "weights"), ({"model": "other"}, "model"),
                                          ({"num_feat": 8}, "num_feat")])
def test_query_vectors_embedded_with_other_weights_are_refused(change, word, flat, tmp_path):
    """`unicom search INDEX queries.npy` whose .json records other weights (or model, num_feat)
    than the index: refused naming both values, not searched without a word."""
    from unicom_cli.pipelines.search import SearchConfig, run_search

    queries = write_features(tmp_path / "q", "q", clustered(4, 16, seed=8), **change)
    with pytest.raises(InputError, match=rf"q\.npy: {word}.* differs from .* in the index"):
        run_search(SearchConfig(index=flat, queries=[queries], k=3))
    same = write_features(tmp_path / "same", "q", clustered(4, 16, seed=8))
    assert run_search(SearchConfig(index=flat, queries=[same], k=3)).rows.shape == (4, 3)


def test_adding_the_same_collection_twice_is_refused(tmp_path):
    """`index --add` of a collection already in the index used to double its rows (every id
    twice): refused naming the file and an id, the index unchanged. Bare .npy files (ids are row
    numbers) are recognised by their recorded path and row count."""
    import numpy as np

    x = clustered(150, 16, seed=4)
    a = write_features(tmp_path / "a", "a", x[:100])
    build_index(a, tmp_path / "i", index="flat", progress=False)
    with pytest.raises(InputError, match=r"a\.npy: 100 of its 100 ids are already in the index .*a/img_00000\.jpg"):
        build_index(a, tmp_path / "i", index="flat", add=True, progress=False)
    assert len(Index.load(tmp_path / "i")) == 100
    build_index(write_features(tmp_path / "b", "b", x[100:]), tmp_path / "i", add=True, progress=False)
    assert len(Index.load(tmp_path / "i")) == 150
    bare = tmp_path / "bare.npy"
    np.save(bare, x[:60])
    build_index(bare, tmp_path / "j", index="flat", progress=False)
    with pytest.raises(InputError, match=r"bare\.npy: already added to the index"):
        build_index(bare, tmp_path / "j", index="flat", add=True, progress=False)
    assert len(Index.load(tmp_path / "j")) == 60
    with pytest.raises(InputError, match=r"a\.npy: 100 of its 100 ids are already in the collections given"):
        build_index([a, a], tmp_path / "k", index="flat", progress=False)
    assert not (tmp_path / "k").exists()
