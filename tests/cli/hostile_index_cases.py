"""Issue 28's hostile cases for index folders, the lists we read, search outputs and full disks;
``tests/cli/test_hostile_inputs.py`` runs them with its property (one line, exit 1 or 2, no
traceback, nothing at the final path, no temp left)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np


def built_index(w, kind: str = "flat") -> Path:
    """An index of the world's features, built once per kind and copied by each case that damages it."""
    from unicom_cli.index import build_index

    folder = w.root / f"index-{kind}"
    if not folder.exists():
        feats = w.root / "index-feats"
        feats.mkdir(exist_ok=True)
        np.save(feats / "f.npy", w.feats)
        (feats / "f.ids.txt").write_text("\n".join(w.ids) + "\n")
        (feats / "f.json").write_text(json.dumps({"model": "tiny", "weights_sha256": "a" * 64,
                                                  "input_size": 32, "dim": w.feats.shape[1],
                                                  "normalized": False, "input": str(w.tree.test)}))
        factory = {"flat": "flat", "hnsw": "HNSW8,Flat", "ivf": "IVF4,Flat"}[kind]
        build_index(feats / "f.npy", folder, index=factory, progress=False, held_out=50)
    return folder


def index_copy(w, t: Path, kind: str = "flat") -> Path:
    out = t / "copy.index"
    shutil.copytree(built_index(w, kind), out)
    return out


def _replace(path: Path, how: str) -> Path:
    """Put a FIFO, a symlink to /dev/zero or a folder where a list file is read."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return path


def _queries(w, t: Path) -> Path:
    """Two of the world's own vectors as an embed output (no .json: a bare query matrix)."""
    np.save(t / "q.npy", w.feats[:2])
    return t / "q.npy"


def _search(w, t: Path, index: Path, *extra, query: Path | None = None):
    return (["search", str(index), str(query or _queries(w, t)), "-k", "3", "-o", str(t / "r.csv"), *extra],
            [t / "r.csv"])


def _model(w) -> list[str]:
    return ["--model", str(w.spec), "--weights", str(w.ckpt), "--workers", "0", "--batch-size", "8"]


def _index_ids_fifo(w, t):
    index = index_copy(w, t)
    _replace(index / "ids.txt", "fifo")
    return _search(w, t, index)


def _meta_changed(w, t: Path, kind: str = "flat", **changes) -> Path:
    """A copy of the index whose index.json has ``changes`` (a key set to None is removed)."""
    index = index_copy(w, t, kind)
    meta = json.loads((index / "index.json").read_text())
    for key, value in changes.items():
        meta[key] = value
    (index / "index.json").write_text(json.dumps(meta))
    return index


def _flipped(w, t: Path, mask: int, keep_time: bool = False, byte: int = 3) -> Path:
    """A copy of the flat index with one bit pattern ``mask`` flipped in the stored vector of row 5
    (byte 3 holds the exponent: 0x7f makes it huge or inf); ``keep_time`` restores the mtime."""
    from unicom_cli.index import Index

    index = index_copy(w, t)
    Index.load(index)  # the first load records each file's digest beside it (the cache)
    path = index / "index.faiss"
    data = bytearray(path.read_bytes())
    offset = data.find(Index.load(index).flat_vectors()[5].tobytes()) + byte
    data[offset] ^= mask
    stat = path.stat()
    path.write_bytes(bytes(data))
    if keep_time:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return index


def _crlf(w, t: Path) -> Path:
    index = index_copy(w, t)
    ids = index / "ids.txt"
    ids.write_bytes(ids.read_bytes().replace(b"\n", b"\r\n"))
    return index


def _embedded(w, t: Path, **changes) -> Path:
    """The world's first rows as an embed output whose .json differs from the index's by ``changes``."""
    np.save(t / "q.npy", w.feats[:3])
    (t / "q.ids.txt").write_text("\n".join(w.ids[:3]) + "\n")
    (t / "q.json").write_text(json.dumps({"model": "tiny", "weights_sha256": "a" * 64, "input_size": 32,
                                          "dim": w.feats.shape[1], "normalized": False,
                                          "input": str(w.tree.test), **changes}))
    return t / "q.npy"


INDEX_FILE_CASES = {
    # ---- item 13: non-regular files where lists are read
    "embed: path list is a FIFO": lambda w, t: (
        ["embed", str(_replace(t / "l.txt", "fifo")), "-o", str(t / "o.npy"), *_model(w)], [t / "o.npy"]),
    "embed: path list is /dev/zero": lambda w, t: (
        ["embed", str(_replace(t / "l.txt", "dev_zero")), "-o", str(t / "o.npy"), *_model(w)], [t / "o.npy"]),
    "search: query list is a FIFO": lambda w, t: _search(w, t, built_index(w), query=_replace(t / "q.txt", "fifo")),
    "search: query list is /dev/zero": lambda w, t: _search(w, t, built_index(w),
                                                            query=_replace(t / "q.txt", "dev_zero")),
    "search: index ids.txt is a FIFO": _index_ids_fifo,
    "search: index ids.txt is /dev/zero": lambda w, t: _search(
        w, t, (lambda i: (_replace(i / "ids.txt", "dev_zero"), i)[1])(index_copy(w, t))),
    "search: index.json is a FIFO": lambda w, t: _search(
        w, t, (lambda i: (_replace(i / "index.json", "fifo"), i)[1])(index_copy(w, t))),
    "serve: index ids.txt is a FIFO": lambda w, t: (
        ["serve", str((lambda i: (_replace(i / "ids.txt", "fifo"), i)[1])(index_copy(w, t))), "--port", "0"], []),
    "search: query .npy is a FIFO": lambda w, t: _search(w, t, built_index(w), query=_replace(t / "q.npy", "fifo")),
    "index: feature ids file is a FIFO": lambda w, t: (
        (np.save(t / "f.npy", w.feats), _replace(t / "f.ids.txt", "fifo"))
        and ["index", str(t / "f.npy"), "-o", str(t / "i")], [t / "i"]),
    # ---- item 9: index.json validated whole
    "search: index.json format a string": lambda w, t: _search(w, t, _meta_changed(w, t, format="x")),
    "search: index.json format null": lambda w, t: _search(w, t, _meta_changed(w, t, format=None)),
    "search: index.json model_spec a list": lambda w, t: _search(w, t, _meta_changed(w, t, model_spec=[1])),
    "search: index.json unknown key": lambda w, t: _search(w, t, _meta_changed(w, t, surprise=1)),
    "search: index.json num_feat words": lambda w, t: _search(w, t, _meta_changed(w, t, num_feat="abc")),
    "search: index.json input_size 0": lambda w, t: _search(w, t, _meta_changed(w, t, input_size=0)),
    "search: index.json search_params a string": lambda w, t: _search(
        w, t, _meta_changed(w, t, "ivf", search_params="nprobe=2")),
    "search: index.json nprobe on flat": lambda w, t: _search(w, t, _meta_changed(w, t, search_params={"nprobe": 2})),
    "search: index.json nprobe beyond nlist": lambda w, t: _search(
        w, t, _meta_changed(w, t, "ivf", search_params={"nprobe": 99})),
    "serve: index.json dim a string": lambda w, t: (["serve", str(_meta_changed(w, t, dim="64")), "--port", "0"], []),
    # ---- item 8: damage is refused, not searched
    "search: exponent bit flipped in a stored vector": lambda w, t: _search(w, t, _flipped(w, t, 0x7F)),
    "search: mantissa bit flipped in a stored vector": lambda w, t: _search(w, t, _flipped(w, t, 0x01, byte=0)),
    "search: --verify, bit flipped with its mtime kept": lambda w, t: _search(
        w, t, _flipped(w, t, 0x01, keep_time=True, byte=0), "--verify"),
    "search: ids.txt with CRLF line ends": lambda w, t: _search(w, t, _crlf(w, t)),
    "search: index.faiss truncated": lambda w, t: _search(
        w, t, (lambda i: ((i / "index.faiss").write_bytes((i / "index.faiss").read_bytes()[:-100]), i)[1])(
            index_copy(w, t))),
    "serve: --verify, bit flipped with its mtime kept": lambda w, t: (
        ["serve", str(_flipped(w, t, 0x01, keep_time=True, byte=0)), "--port", "0", "--verify"], []),
    # ---- item 12: search parameters the index type lacks
    "search: --nprobe on a flat index": lambda w, t: _search(w, t, built_index(w), "--nprobe", "2"),
    "search: --nprobe on an HNSW index": lambda w, t: _search(w, t, built_index(w, "hnsw"), "--nprobe", "2"),
    "search: --ef-search on an IVF index": lambda w, t: _search(w, t, built_index(w, "ivf"), "--ef-search", "8"),
    "search: --nprobe beyond the lists": lambda w, t: _search(w, t, built_index(w, "ivf"), "--nprobe", "99"),
    # ---- item 10: query vectors embedded otherwise than the index
    "search: query vectors of other weights": lambda w, t: _search(
        w, t, built_index(w), query=_embedded(w, t, weights_sha256="b" * 64)),
    "search: query vectors of another model": lambda w, t: _search(
        w, t, built_index(w), query=_embedded(w, t, model="ViT-B/32")),
    # ---- item 11: a collection given twice
    "index: --add of features already in it": lambda w, t: (
        ["index", "--add", str(built_index(w).parent / "index-feats" / "f.npy"), str(index_copy(w, t))], []),
    "index: the same features twice": lambda w, t: (
        ["index", *[str(built_index(w).parent / "index-feats" / "f.npy")] * 2, "-o", str(t / "i")], [t / "i"]),
    # ---- item 15: outputs that cannot be written
    "search: -o into /proc": lambda w, t: (_search(w, t, built_index(w))[0][:-2] + ["-o", "/proc/x.csv"],
                                          [Path("/proc/x.csv")]),
    "search: --vis into /proc": lambda w, t: (_search(w, t, built_index(w))[0] + ["--vis", "/proc/x.html"],
                                             [t / "r.csv", Path("/proc/x.html")]),
    "search: --duplicates -o into /proc": lambda w, t: (
        ["search", str(built_index(w)), "--duplicates", "-o", "/proc/d.csv"], [Path("/proc/d.csv")]),
    "linear: --save-classifier into /proc": lambda w, t: (
        ["eval-linear", "--train-dataset", str(w.tree.test), "--val-dataset", str(w.tree.test),
         *_model(w), "--save-classifier", "/proc/head.safetensors"], [Path("/proc/head.safetensors")]),
    # ---- item 16: where an index cannot be written (a full disk: tests/index/test_full_disk.py)
    "index: output into /proc": lambda w, t: (
        ["index", str(built_index(w).parent / "index-feats" / "f.npy"), "-o", "/proc/i"], [Path("/proc/i")]),
}
