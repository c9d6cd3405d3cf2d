"""Is an index folder what ``unicom index`` wrote? SHA-256 digests of its files, recorded in
``index.json`` at build time and checked on every load, and a check for non-finite stored values.

A flipped bit in a stored vector or CRLF line ends in ``ids.txt`` used to give silently different
results. The check costs one read of each file, so it is cached as the weights' ``.sha256``
sidecar is (``models.weights``): a ``<file>.sha256`` beside each file records its digest with its
size and mtime, and a later load trusts the record while both are unchanged. ``verify=True``
(``search --verify``, ``serve --verify``) always hashes every byte again.

Folders written before digests were recorded still load, with a warning that damage cannot be
detected there (their stored vectors are checked for NaN/inf on each load); ``--verify`` refuses
them with the fix: rebuild the index.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError
from unicom_cli.models.weights import sha256_file, trusted_digest, write_sidecar
from unicom_cli.utils.files import open_regular

FILES_KEY = "files"  # index.json: {file name: {"sha256": hex, "size": bytes}}
REBUILD = "rebuild the index with `unicom index`"


def record_digests(folder: Path, names: list[str]) -> dict[str, dict]:
    """SHA-256 and size of each file of a freshly written folder (and its sidecar, so the
    first load need not read it again)."""
    files = {}
    for name in names:
        path = folder / name
        digest = sha256_file(path)
        write_sidecar(path, digest)
        files[name] = {"sha256": digest, "size": path.stat().st_size}
    return files


def verify_files(folder: Path, meta: dict, names: set[str], verify: bool = False) -> bool:
    """Check the files ``names`` of the folder against the sizes and digests ``meta`` records
    (InputError naming the file on a difference). Returns True when every digest came from a
    fresh record (nothing hashed), False when files were hashed or the folder records none."""
    files = meta.get(FILES_KEY)
    if not files:
        _no_digests(folder, verify)
        return False
    if set(files) != names:
        raise InputError(f"{folder / 'index.json'}: records digests of {', '.join(sorted(files))}, but "
                         f"this index has {', '.join(sorted(names))}; {REBUILD}")
    cached = True
    for name, want in files.items():
        path = folder / name
        if not os.path.lexists(path):
            raise InputError(f"{path}: missing (index.json records it); {REBUILD}")
        with open_regular(path, "rb", what=f"the {name} that `unicom index` wrote") as handle:
            size = os.fstat(handle.fileno()).st_size
        if size != want["size"]:
            raise InputError(f"{path}: {size:,} bytes, {want['size']:,} recorded at build time in "
                             f"index.json (truncated or changed); {REBUILD}")
        digest = None if verify else trusted_digest(path)
        if digest is None:
            cached = False
            digest = sha256_file(path)
            if digest == want["sha256"]:
                write_sidecar(path, digest)  # best effort: a read-only folder keeps no record
        if digest != want["sha256"]:
            raise InputError(f"{path}: SHA-256 {digest[:12]}… differs from the {want['sha256'][:12]}… "
                             f"recorded at build time in index.json: the file was changed or damaged; "
                             f"{REBUILD}")
    return cached


def _no_digests(folder: Path, verify: bool) -> None:
    message = (f"{folder / 'index.json'} records no digests of the index files (written by an older "
               "unicom-cli): damage to them cannot be detected")
    if verify:
        raise InputError(f"{message}; {REBUILD} to record them")
    from unicom_cli.utils.console import warn

    warn(f"{message}; rebuild the index to record them")


def check_finite(index, index_path: Path, ids: list[str]) -> None:
    """Refuse stored vectors (flat, graph or inverted-list storage; quantizer centroids; PQ
    codebooks; OPQ rotations) that hold NaN or infinite values: they score every query wrong."""
    for what, values in _stored_floats(index):
        finite = np.isfinite(values)
        if finite.all():
            continue
        if what == "vectors" and values.ndim == 2:
            row = int(np.flatnonzero(~finite.all(axis=1))[0])
            what = f"stored vector {row}" + (f" ({ids[row]})" if row < len(ids) else "")
        raise InputError(f"{index_path}: {what} holds NaN or infinite values (the file is damaged); "
                         f"{REBUILD}")


def _stored_floats(index):
    """(what, float32 array) for each float array an index searches with."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.LinearTransform):
                yield "the input rotation", faiss.vector_to_array(transform.A)
                yield "the input rotation", faiss.vector_to_array(transform.b)
        yield from _stored_floats(index.index)
        return
    if isinstance(index, faiss.IndexFlat):
        if index.ntotal:
            flat = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
            yield "vectors", flat.reshape(index.ntotal, index.d)
        return
    if isinstance(index, faiss.IndexHNSW):
        yield from _stored_floats(index.storage)
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf = faiss.downcast_index(ivf)
    for what, values in _stored_floats(ivf.quantizer):
        yield ("the list centroids" if what == "vectors" else what), values
    if isinstance(ivf, faiss.IndexIVFPQ):
        yield "the PQ codebooks", faiss.vector_to_array(ivf.pq.centroids)
    elif isinstance(ivf, faiss.IndexIVFFlat):
        yield from _list_vectors(ivf)


def _list_vectors(ivf):
    """The raw float32 vectors of an IVF-Flat index, list by list (in memory or memory-mapped)."""
    import faiss

    lists = ivf.invlists
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * ivf.code_size)
            yield f"a vector of inverted list {number}", codes.view(np.float32)
