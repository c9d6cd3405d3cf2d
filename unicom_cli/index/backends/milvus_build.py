"""Build or extend a Milvus collection: choose its index as the faiss route does, insert in
resumable batches, build the index, tune its search parameter to --target-recall, record everything.

A new collection is filled under a staging name and renamed once complete, so the final name only
ever holds a finished collection; a killed build is resumed by rerunning the same command (rows are
keyed by their row number, only missing ones are inserted). ``--add`` inserts into the live collection.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError, OutputExists, UsageError
from unicom_cli.index.backends.milvus import (
    BUILD_KEY,
    ID_FIELD,
    META_KEY,
    PATH_FIELD,
    PATH_MAX,
    STATE_KEY,
    VECTOR_FIELD,
    MilvusIndex,
    MilvusRef,
    connect,
    milvus_errors,
    read_properties,
    recorded_meta,
    release,
)
from unicom_cli.index.build import FLAT_SCAN_SHARE, SAME_EMBEDDING, _open_sources, recorded_sources
from unicom_cli.index.config import BuildSummary
from unicom_cli.index.manifest import check_compatible
from unicom_cli.index.choose import HNSW_M, Choice, choose_index, default_max_memory, nlist_for
from unicom_cli.index.source import FeatureSource, relative_ids
from unicom_cli.index.tune import EF_SEARCHES, NPROBES, RECALL_K, HeldOut, Tuning, _without, held_out_queries

STAGING = "__unicom_build"  # suffix of the collection a new build fills before it takes the name
MAX_BATCH = 16384  # Milvus answers at most this many rows per query (the resume check reads a batch)
BATCH_BYTES = 32 << 20  # per insert request, well under the 64 MiB gRPC message limit
NLIST_MAX = 65536  # Milvus's largest nlist
HNSW_EF_CONSTRUCTION = 128
# Index types milvus-lite 3.x builds (it refuses IVF_PQ and DISKANN); a server builds all of ours.
EMBEDDED_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")


@dataclass
class MilvusBuildConfig:
    """Everything ``unicom index --backend milvus`` needs (the faiss BuildConfig's fields that apply)."""

    features: list[Path]
    ref: MilvusRef
    index: str = "auto"  # auto|flat|hnsw|ivf|ivfpq
    max_memory: int | None = None  # bytes the index may take on the Milvus query nodes
    target_recall: float = 0.95
    normalize: bool = True
    overwrite: bool = False
    add: bool = False
    seed: int = 0
    held_out: int = 1000
    chunk_rows: int = MAX_BATCH  # rows per insert request (capped by MAX_BATCH and BATCH_BYTES)
    progress: bool = True
    token: str | None = None  # else $UNICOM_MILVUS_TOKEN

    @property
    def output(self) -> str:
        return str(self.ref)


def milvus_index_for(choice: Choice, n: int, dim: int, embedded: bool) -> dict:
    """Our choice (from size and --max-memory, as for faiss) as a Milvus index:
    Flat → FLAT; IVF{nlist},Flat → IVF_FLAT; IVF + PQm → IVF_PQ (m, 8 bits) on a server and
    IVF_SQ8 (1 byte per dimension) on milvus-lite, which has no IVF_PQ; HNSW32 → HNSW (M 32)."""
    nlist = min(nlist_for(n), NLIST_MAX)
    if choice.kind == "flat":
        return {"index_type": "FLAT", "params": {}}
    if choice.kind == "ivf":
        return {"index_type": "IVF_FLAT", "params": {"nlist": nlist}}
    if choice.kind == "hnsw":
        return {"index_type": "HNSW", "params": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}}
    if choice.kind == "ivfpq":
        if embedded:
            return {"index_type": "IVF_SQ8", "params": {"nlist": nlist}}
        m = int(choice.factory.rsplit("PQ", 1)[1])
        return {"index_type": "IVF_PQ", "params": {"nlist": nlist, "m": m, "nbits": 8}}
    raise UsageError(f"--index {choice.factory}: the Milvus backend takes auto, flat, hnsw, ivf or ivfpq")


def search_grid(spec: dict) -> list[dict]:
    """The search settings tried, cheapest first: nprobe for IVF, ef for HNSW, none for FLAT."""
    if spec["index_type"].startswith("IVF"):
        nlist = spec["params"]["nlist"]
        return [{"nprobe": p} for p in NPROBES if p < nlist] + [{"nprobe": nlist}]
    if spec["index_type"] == "HNSW":
        return [{"ef": ef} for ef in EF_SEARCHES if ef > RECALL_K]
    return [{}]


def run_milvus_build(cfg: MilvusBuildConfig) -> BuildSummary:
    """Build (or with ``cfg.add`` extend) the collection ``cfg.ref``; see the module docstring."""
    if not 0 < cfg.target_recall <= 1:
        raise UsageError(f"--target-recall {cfg.target_recall}: must be in (0, 1]")
    start = time.perf_counter()
    sources = _open_sources(cfg)
    client = connect(cfg.ref, cfg.token)
    try:
        with milvus_errors(cfg.ref):
            return _extend(client, cfg, sources, start) if cfg.add else _build(client, cfg, sources, start)
    finally:
        release(client, cfg.ref)


def check_milvus_output(cfg: MilvusBuildConfig) -> None:
    """Before any work: the server answers and the name is free (or --overwrite is given)."""
    client = connect(cfg.ref, cfg.token)
    try:
        with milvus_errors(cfg.ref):
            taken = client.has_collection(cfg.ref.collection)
        if taken and not cfg.overwrite:
            raise OutputExists(f"{cfg.ref} already exists; add --overwrite to replace it, or --add to add to it")
    finally:
        release(client, cfg.ref)


def _build_key(sources: list[FeatureSource], extra: dict) -> str:
    """What a resumed run must match: the same files (size, time), options and index."""
    parts = [{"npy": str(s.npy.resolve()), "count": s.count, "bytes": s.npy.stat().st_size,
              "mtime": s.npy.stat().st_mtime_ns, "normalize": s.normalize} for s in sources]
    return hashlib.sha256(json.dumps([parts, extra], sort_keys=True).encode()).hexdigest()


def _schema(dim: int):
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description="image embeddings written by unicom index")
    schema.add_field(ID_FIELD, DataType.INT64, is_primary=True, description="row number")
    schema.add_field(PATH_FIELD, DataType.VARCHAR, max_length=PATH_MAX, description="image path under root")
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _build(client, cfg: MilvusBuildConfig, sources: list[FeatureSource], start: float) -> BuildSummary:
    from unicom_cli.utils.console import info

    ref, dim = cfg.ref, sources[0].dim
    n = sum(s.count for s in sources)
    if client.has_collection(ref.collection) and not cfg.overwrite:
        raise OutputExists(f"{ref} already exists; add --overwrite to replace it, or --add to add to it")
    max_memory = cfg.max_memory or default_max_memory()
    choice = choose_index(n, dim, max_memory, cfg.index)
    spec = milvus_index_for(choice, n, dim, ref.embedded)
    fields = sources[0].model_fields()
    staging = ref.collection[:255 - len(STAGING)] + STAGING
    key = _build_key(sources, {"fields": fields, "spec": spec})
    resume = client.has_collection(staging) and read_properties(client, staging).get(BUILD_KEY) == key
    if resume:
        info(f"resuming the unfinished build of {ref}")
    else:
        if client.has_collection(staging):
            client.drop_collection(staging)  # an unfinished build of other files or options
        client.create_collection(staging, schema=_schema(dim), properties={
            META_KEY: json.dumps({**fields, "count": 0}), STATE_KEY: "inserting", BUILD_KEY: key})
    root = sources[0].root
    ids = [relative_ids(s.ids, s.root, root) for s in sources]
    insert_seconds = _insert(client, staging, sources, ids, 0, resume, cfg)
    _make_index(client, staging, spec)
    meta = {**fields, "count": n, "root": str(root) if root else None}
    index = MilvusIndex(MilvusRef(ref.uri, staging), client, meta)
    tuning = _tune(index, sources, spec, cfg)
    nlist = spec["params"].get("nlist", 0)
    if cfg.index == "auto" and choice.kind == "ivf" and tuning.params.get("nprobe", 0) > FLAT_SCAN_SHARE * nlist:
        info(f"IVF_FLAT needs nprobe={tuning.params['nprobe']} of {nlist} lists for recall@{RECALL_K} "
             f"{cfg.target_recall}: the collection has little cluster structure; using FLAT instead")
        choice = Choice("Flat", "flat", choice.memory_bytes, f"IVF needed nprobe={tuning.params['nprobe']} "
                        f"of {nlist} lists for the target recall: exact search is as fast")
        spec = milvus_index_for(choice, n, dim, ref.embedded)
        _make_index(client, staging, spec)
        tuning = _tune(index, sources, spec, cfg)
    meta = _meta(cfg, meta, choice, spec, tuning, [], sources, max_memory, time.perf_counter() - start,
                 insert_seconds)
    client.alter_collection_properties(staging, properties={META_KEY: json.dumps(meta), STATE_KEY: "ready"})
    if client.has_collection(ref.collection):  # --overwrite: the old one goes only now
        client.drop_collection(ref.collection)
    client.rename_collection(staging, ref.collection)
    return _summary(cfg, choice, tuning, meta, n, start)


def _extend(client, cfg: MilvusBuildConfig, sources: list[FeatureSource], start: float) -> BuildSummary:
    from unicom_cli.utils.console import info, warn

    ref = cfg.ref
    if not client.has_collection(ref.collection):
        raise InputError(f"{ref}: no such collection to add to; build it first with `unicom index FEATS -o {ref}`")
    meta = recorded_meta(client, ref)
    props = read_properties(client, ref.collection)
    fields = sources[0].model_fields()
    check_compatible(fields, {key: meta.get(key) for key in fields}, str(sources[0].npy), f"the collection {ref}",
                     SAME_EMBEDDING)
    key = _build_key(sources, {"add_to": meta["count"] if props.get(STATE_KEY) == "ready" else meta.get("adding_base")})
    resume = props.get(STATE_KEY) == "adding"
    if resume and props.get(BUILD_KEY) != key:
        raise InputError(f"{ref}: an unfinished --add of other files is pending; rerun that command to "
                         "finish it first")
    if props.get(STATE_KEY) not in ("ready", "adding"):
        raise InputError(f"{ref}: an unfinished build; rerun the `unicom index` command that made it")
    base = int(meta["adding_base"]) if resume else int(meta["count"])
    if resume:
        info(f"resuming the unfinished --add to {ref}")
    else:
        meta["adding_base"] = base
        client.alter_collection_properties(ref.collection, properties={
            META_KEY: json.dumps(meta), STATE_KEY: "adding", BUILD_KEY: key})
    root = Path(meta["root"]) if meta.get("root") else None
    ids = [relative_ids(s.ids, s.root, root) for s in sources]
    insert_seconds = _insert(client, ref.collection, sources, ids, base, resume, cfg)
    spec = meta["milvus_index"]
    _make_index(client, ref.collection, spec)
    count = base + sum(s.count for s in sources)
    index = MilvusIndex(ref, client, {**meta, "count": count})
    earlier = recorded_sources(index, cfg.normalize)
    everything = earlier + sources if earlier is not None else None
    if everything is None:
        warn("the earlier collections' .npy files are gone: recall is measured among the added vectors only")
    tuning = _tune(index, everything or sources, spec, cfg, offset=0 if everything else base)
    choice = Choice(meta["factory"], meta.get("kind", "custom"), int(meta.get("memory_bytes", 0)),
                    "--add to an existing collection")
    meta.pop("adding_base", None)
    meta = _meta(cfg, {**meta, "count": count}, choice, spec, tuning, meta.get("sources", []), sources,
                 int(meta.get("max_memory") or 0), time.perf_counter() - start, insert_seconds)
    client.alter_collection_properties(ref.collection, properties={META_KEY: json.dumps(meta), STATE_KEY: "ready"})
    return _summary(cfg, choice, tuning, meta, sum(s.count for s in sources), start)


def _batch_rows(cfg: MilvusBuildConfig, dim: int) -> int:
    return max(1, min(cfg.chunk_rows, MAX_BATCH, BATCH_BYTES // (dim * 4 + 256)))


def _insert(client, name: str, sources: list[FeatureSource], ids: list[list[str]], base: int,
            resume: bool, cfg: MilvusBuildConfig) -> float:
    """Insert every row as (row number, path, vector), in batches; when resuming, only the rows
    missing from each batch's id range. Returns the seconds spent; flushes at the end."""
    from unicom_cli.utils.console import info, progress_bar

    batch = _batch_rows(cfg, sources[0].dim)
    total = sum(s.count for s in sources)
    began, offset, skipped = time.perf_counter(), base, 0
    with progress_bar(total, "insert", unit="vectors", enabled=cfg.progress) as bar:
        for src, src_ids in zip(sources, ids):
            for start, chunk in src.chunks(chunk_rows=batch):
                first = offset + start
                todo = np.ones(len(chunk), dtype=bool)
                if resume:
                    todo[_present(client, name, first, first + len(chunk)) - first] = False
                    skipped += int((~todo).sum())
                rows = np.flatnonzero(todo)
                if len(rows):
                    client.insert(name, [{ID_FIELD: first + int(r), PATH_FIELD: _utf8(src_ids[start + r]),
                                          VECTOR_FIELD: chunk[r]} for r in rows])
                bar.advance(len(chunk))
            offset += src.count
    client.flush(name)
    if resume:
        info(f"{skipped:,} of {total:,} vectors were already in {name}; inserted the other {total - skipped:,}")
    return time.perf_counter() - began


def _present(client, name: str, first: int, stop: int) -> np.ndarray:
    """Row numbers in [first, stop) that the collection already holds."""
    found = client.query(name, filter=f"{ID_FIELD} >= {first} and {ID_FIELD} < {stop}",
                         output_fields=[ID_FIELD], limit=stop - first)
    return np.array([hit[ID_FIELD] for hit in found], dtype=np.int64)


def _utf8(text: str) -> str:
    """Milvus strings are UTF-8: a non-UTF-8 file name keeps its odd bytes as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _make_index(client, name: str, spec: dict) -> None:
    """Build the vector index (replacing one a killed run left) and load the collection."""
    existing = client.list_indexes(name)
    if existing:
        described = client.describe_index(name, existing[0])
        if described.get("index_type") == spec["index_type"]:
            client.load_collection(name)
            return
        client.release_collection(name)
        client.drop_index(name, existing[0])
    params = client.prepare_index_params()
    # pymilvus 3 sends each build parameter as its own key (what Milvus servers read); milvus-lite
    # 3.2 reads only a JSON "params" key (the older wire form, which servers accept too): send both.
    build = {**spec["params"], "params": spec["params"]} if spec["params"] else {}
    params.add_index(VECTOR_FIELD, index_type=spec["index_type"], metric_type="IP", params=build)
    client.create_index(name, params)
    client.load_collection(name)


def _tune(index: MilvusIndex, sources: list[FeatureSource], spec: dict, cfg: MilvusBuildConfig,
          offset: int = 0) -> Tuning:
    """The cheapest search setting whose recall@10 against exact search on held-out rows reaches the
    target (the best one tried, marked unreached, when none does)."""
    from unicom_cli.utils.console import info

    count = min(cfg.held_out, sum(s.count for s in sources))
    info(f"measuring recall@{RECALL_K} on {count:,} held-out queries")
    held = held_out_queries(sources, cfg.held_out, RECALL_K, cfg.seed)
    held = HeldOut(held.rows + offset, held.vectors, held.truth + offset)
    tried, best = [], (-1.0, {})
    for setting in search_grid(spec):
        recall = recall_of(index, held, setting)
        tried.append({**setting, "recall": round(recall, 4)})
        if recall > best[0]:
            best = (recall, setting)
        if recall >= cfg.target_recall:
            return Tuning(setting, recall, tried, True, len(held.rows))
    return Tuning(best[1], best[0], tried, False, len(held.rows))


def recall_of(index: MilvusIndex, held: HeldOut, params: dict, k: int = RECALL_K) -> float:
    """Mean |Milvus top-k ∩ exact top-k| / k over the held-out rows (each query's own row dropped)."""
    k = min(k, held.truth.shape[1])
    if k < 1:
        return 1.0
    _, found = index.raw_search(held.vectors, min(k + 1, len(index)), params)
    found = _without(found, held.rows, k)
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, held.truth[:, :k])])) / k


def _meta(cfg: MilvusBuildConfig, meta: dict, choice: Choice, spec: dict, tuning: Tuning, earlier: list,
          sources: list[FeatureSource], max_memory: int, seconds: float, insert_seconds: float) -> dict:
    from unicom_cli._version import __version__

    params = ", ".join(f"{k}={v}" for k, v in spec["params"].items())
    return {
        **meta, "tool": "unicom-cli", "version": __version__, "backend": "milvus",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metric": "inner_product",
        "factory": f"{spec['index_type']}({params})" if params else spec["index_type"],
        "kind": choice.kind, "reason": choice.reason, "faiss_equivalent": choice.factory,
        "memory_bytes": choice.memory_bytes, "max_memory": max_memory, "milvus_index": spec,
        "search_params": tuning.params, "recall_at_10": round(tuning.recall, 4),
        "target_recall": cfg.target_recall, "recall_reached": tuning.reached,
        "recall_queries": tuning.queries, "tuning": tuning.tried,
        "sources": earlier + [{"features": str(s.npy.resolve()), "count": s.count,
                                "root": str(s.root) if s.root else None} for s in sources],
        "build_seconds": round(seconds, 2), "insert_seconds": round(insert_seconds, 2),
    }


def _summary(cfg: MilvusBuildConfig, choice: Choice, tuning: Tuning, meta: dict, added: int,
             start: float) -> BuildSummary:
    from unicom_cli.utils.console import warn

    if not tuning.reached:
        warn(f"{meta['factory']}: the best recall@{RECALL_K} reached is {tuning.recall:.3f}, below "
             f"--target-recall {cfg.target_recall}; raise --max-memory or pick another --index")
    shown = Choice(meta["factory"], choice.kind, choice.memory_bytes, choice.reason)
    return BuildSummary(cfg.ref, int(meta["count"]), added, int(meta["dim"]), shown, tuning,
                        time.perf_counter() - start, choice.memory_bytes, meta)
