"""What ``index.json`` may hold, checked whole when an index is loaded: every key's type and range,
no unknown key, search parameters that the index type has. A damaged or hand-edited record is one
error naming the key, never a traceback or a silently different search."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from unicom_cli.errors import InputError, UsageError

FORMAT = 1  # the version of the folder layout that this unicom-cli writes and reads
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
FIX = "rebuild the index with `unicom index`"


def _int(low: int = 0) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _sha256(v: Any) -> bool:
    return isinstance(v, str) and bool(SHA256_HEX.match(v))


def _source(v: Any) -> bool:
    return (isinstance(v, dict) and set(v) <= {"features", "count", "root"} and _str(v.get("features"))
            and _int()(v.get("count")) and _optional(_str)(v.get("root")))


def _file_record(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"sha256", "size"} and _sha256(v["sha256"]) and _int()(v["size"])


# key: (what it must be, in words; the check). Keys marked in REQUIRED must be present.
SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "format": (f"an integer from 1 to {FORMAT}", _int(1)),
    "tool": ("a string", _str), "version": ("a string", _str), "date": ("a string", _str),
    "model": ("a model name or null", _optional(_str)),
    "weights_sha256": ("64 lowercase hex digits or null", _optional(_sha256)),
    "revision": ("a hub commit or null", _optional(_str)),
    "input_size": ("a positive integer or null", _optional(_int(1))),
    "dim": ("a positive integer", _int(1)),
    "normalized": ("true or false", _bool),
    "num_feat": ("a positive integer up to 'dim', or null", _optional(_int(1))),
    "model_spec": ("an object (the model's JSON description) or null", _optional(lambda v: isinstance(v, dict))),
    "weights": ("a path or null", _optional(_str)),
    "embedding_size": ("a positive integer or null", _optional(_int(1))),
    "precision": ("a string or null", _optional(_str)),
    "random_init_seed": ("an integer or null", _optional(lambda v: isinstance(v, int) and not isinstance(v, bool))),
    "metric": ('"inner_product"', lambda v: v == "inner_product"),
    "count": ("a non-negative integer", _int()),
    "root": ("a folder path or null", _optional(_str)),
    "factory": ("a faiss factory string", lambda v: isinstance(v, str) and bool(v.strip())),
    "kind": ("a string", _str), "reason": ("a string", _str),
    "memory_bytes": ("a non-negative integer", _int()),
    "max_memory": ("a non-negative integer or null", _optional(_int())),
    "search_params": ("an object of positive integers (e.g. {\"nprobe\": 16})",
                      lambda v: isinstance(v, dict) and all(_str(k) and _int(1)(x) for k, x in v.items())),
    "recall_at_10": ("a number from 0 to 1 or null", _optional(_number(0, 1))),
    "target_recall": ("a number from 0 to 1", _number(0, 1)),
    "recall_reached": ("true or false", _bool),
    "recall_queries": ("a non-negative integer", _int()),
    "tuning": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
    "sources": ("a list of {features, count, root} objects", lambda v: isinstance(v, list) and all(map(_source, v))),
    "build_seconds": ("a non-negative number", _number(0, float("inf"))),
    "on_disk": ("true or false", _bool),
    "files": ('an object {file name: {"sha256", "size"}}',
              lambda v: isinstance(v, dict) and all(_str(k) and _file_record(x) for k, x in v.items())),
}
REQUIRED = ("dim", "factory")


def validate_meta(meta: Any, path: Path) -> dict:
    """The parsed ``index.json`` at ``path`` if every key is known and well formed; else an
    InputError naming the first bad key, what it must be and the fix."""
    if not isinstance(meta, dict):
        raise InputError(f"{path}: not an index description (a JSON object); {FIX}")
    fmt = meta.get("format", FORMAT)
    if _int(1)(fmt) and fmt > FORMAT:
        raise InputError(f"{path}: index format {fmt} is newer than this unicom-cli understands; "
                         "upgrade unicom-cli")
    for key in REQUIRED:
        if key not in meta:
            raise InputError(f"{path}: '{key}' is missing; {FIX}")
    for key, value in meta.items():
        if key not in SCHEMA:
            raise InputError(f"{path}: unknown key '{key}' (not written by this unicom-cli); {FIX}")
        what, check = SCHEMA[key]
        if not check(value):
            raise InputError(f"{path}: '{key}' must be {what}, not {_short(value)}; {FIX}")
    if meta.get("num_feat") is not None and meta["num_feat"] > meta["dim"]:
        raise InputError(f"{path}: 'num_feat' {meta['num_feat']} is more than 'dim' {meta['dim']}; {FIX}")
    return meta


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- vectors searched together

# What vectors must share to be compared with an index's (a query is embedded one way only).
MODEL_LABELS = {"model": "model", "revision": "hub revision", "weights_sha256": "weights (SHA-256)",
                "input_size": "input size",
                "dim": "dimension", "normalized": "normalisation", "num_feat": "num_feat"}


def check_compatible(mine: dict, theirs: dict, where: str, against: str, fix: str) -> None:
    """Refuse vectors at ``where`` (their model fields ``mine``) that were not embedded as those of
    ``against`` (``theirs``): their scores against each other would mean nothing. Names both."""
    diffs = [f"{label} {_short(mine.get(key))} differs from {_short(theirs.get(key))} in {against}"
             for key, label in MODEL_LABELS.items() if mine.get(key) != theirs.get(key)]
    if diffs:
        raise InputError(f"{where}: {'; '.join(diffs)}; {fix}")


# --------------------------------------------------------------------------- search parameters

OPTION_OF = {"nprobe": "--nprobe", "efSearch": "--ef-search", "quantizer_efSearch": "quantizer_efSearch"}


def search_parameters(index) -> dict[str, int | None]:
    """The search parameters a faiss index has, each with its largest value (None: no bound):
    IVF: nprobe (≤ nlist) and, over an HNSW coarse quantizer, quantizer_efSearch; HNSW: efSearch;
    exact (flat) and the other kinds: none."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        allowed: dict[str, int | None] = {"nprobe": int(ivf.nlist)}
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            allowed["quantizer_efSearch"] = None
        return allowed
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return {"efSearch": None} if isinstance(inner, faiss.IndexHNSW) else {}


def check_search_params(index, params: dict, factory: str, where: str | None = None) -> None:
    """Refuse parameters this index type lacks or values out of range, before faiss sees them.

    ``where``: the index.json holding them (InputError naming it); None: they came from the
    user's options (UsageError naming the option)."""
    allowed = search_parameters(index)
    for name, value in params.items():
        label = f"'search_params.{name}'" if where else f"{OPTION_OF.get(name, name)} {value}"
        if name not in allowed:
            kinds = ", ".join(OPTION_OF.get(n, n) for n in allowed) or "no search parameters (exact search)"
            message = f"{label}: a {factory} index has no {name}; it takes {kinds}"
            if where:
                raise InputError(f"{where}: {message}; {FIX}")
            raise UsageError(message)
        bound = allowed[name]
        if not _int(1)(value) or (bound is not None and value > bound):
            limit = f"1 to {bound}" if bound is not None else "a positive integer"
            if where:
                raise InputError(f"{where}: {label} must be {limit}, not {_short(value)}; {FIX}")
            raise UsageError(f"{label}: must be {limit} for this {factory} index")
