"""Feature inputs of a build: single ``.npy`` files and folders of feature shards (``embed -o feats/``).

A shard folder is read through its ``manifest.json``: each finished shard is a ``.npy`` with
the siblings of one ``unicom embed`` output, so the build opens it as one more source and adds
it shard by shard, never holding the collection in RAM. ``--add feats/`` takes only the shards
that the index does not hold yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from unicom_cli.errors import InputError, UsageError

MANIFEST_FILE = "manifest.json"  # the name pipelines.shard_store writes


def is_shard_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def shard_features(folder: str | Path) -> list[Path]:
    """The ``.npy`` of every finished, non-empty shard of ``folder``, in manifest order."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{manifest_path}: not a readable shard manifest ({exc}); rerun `unicom embed` "
                         f"into {folder} to rewrite it") from exc
    if not manifest.get("complete", True):
        from unicom_cli.utils.console import warn

        warn(f"{folder}: {len(shards):,} of {manifest.get('units')} shards are finished; indexing "
             f"those (add the others later with `unicom index --add {folder} INDEX`)")
    out = []
    for shard in shards:
        npy = folder / shard["features"]
        if not npy.is_file():
            raise InputError(f"{npy}: listed in {manifest_path} but missing; rerun `unicom embed` "
                             f"into {folder} to embed that shard again")
        if shard.get("count", 0) > 0:
            out.append(npy)
    return out


def indexed_features(index_folder: str | Path) -> set[str]:
    """The resolved feature files an existing index was built from (its index.json ``sources``)."""
    try:
        meta = json.loads((Path(index_folder) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {str(item.get("features")) for item in meta.get("sources", []) if isinstance(item, dict)}


def expand_features(inputs: Iterable[str | Path], skip: set[str] = frozenset()) -> list[Path]:
    """Feature files of ``inputs`` (folders expanded to their shards, less the shards in ``skip``).

    A single ``.npy`` given again is kept: the build refuses it, naming it (a folder's shards
    already in the index are skipped quietly, as ``--add feats/`` promises).
    Raises UsageError when nothing is left (every shard is already in the index).
    """
    inputs = list(inputs)
    out: list[Path] = []
    for item in inputs:
        if is_shard_folder(item):
            out.extend(p for p in shard_features(item) if str(p.resolve()) not in skip)
        else:
            out.append(Path(item))
    if inputs and not out and skip:
        raise UsageError(f"{', '.join(map(str, inputs))}: every shard is already in the index; "
                         "nothing to add")
    if inputs and not out:
        raise InputError(f"{', '.join(map(str, inputs))}: no finished shard with rows to index yet")
    return out
