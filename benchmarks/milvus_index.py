"""The Milvus route of `unicom index` against our faiss auto index and exact search, on the same queries.

    python benchmarks/milvus_index.py                 # 100,000 × 512, the embedded engine (milvus-lite)
    python benchmarks/milvus_index.py --uri http://localhost:19530   # a Milvus server instead

Collection: N unit vectors around 1,000 random centres, written as an ``unicom embed`` output
(benchmarks/index_search.py makes it); queries: held-out vectors of the same distribution. Printed,
all measured in this run: for ``unicom index --backend milvus`` (auto choice, tuned to 0.95 recall@10)
and ``unicom index`` (faiss, auto): build time of the whole command, insert rate (Milvus), recall@10
against exact search and queries/s; exact flat search (faiss IndexFlatIP) is the baseline. Query
throughput is timed in interleaved rounds (best of each), batches of 1,024 queries.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_search import timed_child, write_collection  # noqa: E402

BATCH = 1024


def timed_search(search, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Rows found for every query (batches of BATCH) and the queries/s."""
    start = time.perf_counter()
    rows = np.concatenate([search(queries[a:a + BATCH]) for a in range(0, len(queries), BATCH)])
    return rows, len(queries) / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) for f, t in zip(found, truth)])) / truth.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--spread", type=float, default=0.5, help="noise around each centre (per dim)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uri", default=None, help="a Milvus server (default: a .db file, the embedded engine)")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()

    import faiss

    from unicom_cli.index import Index

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        npy, queries = write_collection(tmp, args.n, args.dim, args.spread)
        queries = np.ascontiguousarray(queries[:args.queries])
        x = np.load(npy)
        print(f"collection: {args.n:,} × {args.dim} clustered unit vectors; {len(queries):,} held-out queries; "
              f"faiss threads {faiss.omp_get_max_threads()}", flush=True)

        ref = f"milvus:{args.uri or tmp / 'bench.db'}#bench"
        builds = {}
        for name, out in (("faiss", [str(tmp / "u.index")]), ("milvus", [ref])):
            builds[name] = timed_child([sys.executable, "-m", "unicom_cli", "index", str(npy), "-o", *out])[0]
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        ours = Index.load(tmp / "u.index")
        milvus = Index.load(ref)
        searches = {"exact flat (faiss)": lambda q: flat.search(q, 10)[1],
                    f"unicom faiss {ours.meta['factory']}": lambda q: ours.faiss_index.search(q, 10)[1],
                    f"unicom milvus {milvus.meta['factory']}": lambda q: milvus.raw_search(q, 10)[1]}
        qps = {name: 0.0 for name in searches}
        found = {}
        for _ in range(args.rounds):  # interleaved: each round times every route once
            for name, search in searches.items():
                found[name], rate = timed_search(search, queries)
                qps[name] = max(qps[name], rate)
        truth = found["exact flat (faiss)"]
        meta = milvus.meta
        print(f"{'':34s}{'build s':>9s}{'insert/s':>10s}{'recall@10':>11s}{'queries/s':>11s}{'× flat':>8s}")
        flat_qps = qps["exact flat (faiss)"]
        for name in searches:
            build = builds["faiss"] if "faiss " in name else builds["milvus"] if "milvus" in name else float("nan")
            inserts = args.n / meta["insert_seconds"] if "milvus" in name else float("nan")
            print(f"{name:34s}{build:>9.1f}{inserts:>10,.0f}{recall(found[name], truth):>11.3f}"
                  f"{qps[name]:>11,.0f}{qps[name] / flat_qps:>8.2f}")
        print(f"milvus: insert {meta['insert_seconds']:.1f} s, whole build {meta['build_seconds']:.1f} s, "
              f"search {meta['search_params']} (tuned recall@10 {meta['recall_at_10']}); "
              f"faiss: search {ours.meta['search_params']} (tuned recall@10 {ours.meta['recall_at_10']})")
        print("milvus tuning:", json.dumps(meta["tuning"]))
        milvus.close()


if __name__ == "__main__":
    main()
