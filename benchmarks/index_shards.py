"""`unicom index feats/` over float16 feature shards vs exact search over the same shards, in one run.

    python benchmarks/index_shards.py --n 10000000                 # the issue's 10M x 512 (~10 GB of shards)
    python benchmarks/index_shards.py --n 1000000 --max-memory 4G  # scaled down tenfold
    python benchmarks/index_shards.py --n 100000 --quick           # a smoke run
    python benchmarks/index_shards.py --index IVF4096,Flat         # 10M with the 1M run's lists (2 cores)

Collection: N unit vectors around 1,000 random centres (the structure of real embeddings),
written as ``embed -o feats/`` leaves a folder: float16 shards of ``--shard-rows`` rows with ids
``<shard>/<key>``, done-records and manifest.json. Queries: 1,000 held-out vectors of the same
distribution, not in the collection. Printed, all measured in this run:

* exact search streamed shard by shard (faiss IndexFlatIP on each shard, top-10 merged): the
  truth for recall@10 and the queries/s baseline, the only exact route that never holds the
  collection in RAM;
* ``unicom index feats/ --on-disk --max-memory B``: build time and peak RSS of the build
  process (wait4), index size, recall@10 against the exact truth and queries/s with the tuned
  search parameters, and the ratio to the exact baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from index_search import clustered, search_figures, timed_child_memory  # noqa: E402


def write_shards(folder: Path, n: int, dim: int, shard_rows: int, spread: float) -> tuple[list[str], np.ndarray]:
    """float16 shards as `embed -o feats/` writes them; returns the shard names and the held-out queries."""
    from unicom_cli.pipelines.shard_store import ShardFolder

    centres = np.random.default_rng(0).standard_normal((1000, dim), dtype=np.float32)
    names = []
    record = {"model": "synthetic", "weights_sha256": None, "input_size": None, "dim": dim,
              "embedding_size": dim, "normalized": True, "num_feat": None, "dtype": "float16", "input": None}
    for s, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        name = f"{s:05d}"
        np.save(folder / f"{name}.npy", clustered(rows, dim, 1 + s, centres, spread).astype(np.float16))
        (folder / f"{name}.ids.txt").write_text("".join(f"{name}/{i:08d}\n" for i in range(rows)))
        (folder / f"{name}.failures.txt").write_text("")
        (folder / f"{name}.json").write_text(json.dumps({**record, "shard": name, "count": rows, "failures": 0}))
        names.append(name)
    ShardFolder(folder).write_manifest(names, {"kind": "synthetic", "input": None, "units": len(names)})
    return names, clustered(1000, dim, 10**6, centres, spread)


def exact_over_shards(folder: Path, names: list[str], queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    """Global row ids of the exact top-k, streamed shard by shard; and the queries/s of doing so."""
    import faiss

    start = time.perf_counter()
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for name in names:
        x = np.load(folder / f"{name}.npy", mmap_mode="r")
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(np.asarray(x, dtype=np.float32))
        s, i = flat.search(queries, k)
        both_s, both_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset], 1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)
        offset += len(x)
        del flat, x
    return best_i, len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--spread", type=float, default=0.6)
    parser.add_argument("--max-memory", default="8G", help="--max-memory of unicom index")
    parser.add_argument("--quick", action="store_true", help="--index IVF256,Flat instead of auto (smoke runs)")
    parser.add_argument("--index", default=None, help="a faiss factory for unicom index --index (default: auto)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the shards and the index go")
    args = parser.parse_args()

    import faiss

    from unicom_cli.index import Index

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        feats = Path(tmp) / "feats"
        feats.mkdir()
        t = time.perf_counter()
        names, queries = write_shards(feats, args.n, args.dim, args.shard_rows, args.spread)
        on_disk = sum(f.stat().st_size for f in feats.glob("*.npy"))
        print(f"collection: {args.n:,} x {args.dim} float16 in {len(names)} shards, {on_disk / 2**30:.2f} GiB "
              f"({time.perf_counter() - t:.0f} s to write); 1,000 held-out queries; budget {args.max_memory}; "
              f"faiss threads {faiss.omp_get_max_threads()}")
        truth, flat_qps = exact_over_shards(feats, names, queries)
        out = Path(tmp) / "feats.index"
        factory = "IVF256,Flat" if args.quick else args.index
        extra = ["--index", factory] if factory else []
        seconds, peak, anon, mapped = timed_child_memory([sys.executable, "-m", "unicom_cli", "index", str(feats),
                                                   "-o", str(out), "--on-disk", "--max-memory", args.max_memory,
                                                   *extra])
        index = Index.load(out)
        recall, qps = search_figures(index, queries, truth)
        size = sum(f.stat().st_size for f in out.glob("index.*") if f.suffix != ".json")
        assert index.ids[args.shard_rows] == "00001/00000000" or len(names) == 1
        print(f"peak resident memory of the build: {peak:.2f} GiB (wait4), of which at most {anon:.2f} GiB "
              f"anonymous and {mapped:.2f} GiB file-backed pages (sampled every 0.1 s)")
        print(f"{'':30s}{'build s':>9s}{'peak RSS GiB':>13s}{'size GiB':>10s}{'recall@10':>11s}{'queries/s':>11s}"
              f"{'x exact':>9s}")
        print(f"{'exact, streamed over shards':30s}{'-':>9s}{'-':>13s}{on_disk / 2**30:>10.2f}{1.0:>11.3f}"
              f"{flat_qps:>11,.0f}{1.0:>9.1f}")
        name = f"unicom {index.meta['factory']} on disk"
        print(f"{name:30s}{seconds:>9.1f}{peak:>13.2f}{size / 2**30:>10.2f}{recall:>11.3f}{qps:>11,.0f}"
              f"{qps / flat_qps:>9.1f}   params {index.meta['search_params']}")


if __name__ == "__main__":
    main()
