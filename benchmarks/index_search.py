"""`unicom index` (auto) vs exact flat search vs autofaiss, side by side on clustered 512-d vectors.

    python benchmarks/index_search.py --quick                  # 100,000 vectors (a few minutes)
    python benchmarks/index_search.py                          # 1,000,000 vectors
    python benchmarks/index_search.py --quick --autofaiss-python /tmp/afenv/bin/python
    python benchmarks/index_search.py --latency-only           # `unicom search` latency, ViT-B/32
    python benchmarks/index_search.py --quick --on-disk        # also the --on-disk build

Collection: N unit vectors around 1,000 random centres (the structure of real embeddings),
written as an ``unicom embed`` output (.npy memory-mapped, ids, json). Queries: 10,000 held-out
vectors of the same distribution, not in the collection. Printed, all measured in this run:

* exact flat search (faiss IndexFlatIP, batched): the baseline for throughput and the truth for
  recall@10;
* ``unicom index --max-memory B`` (auto choice, tuned to 0.95 recall@10): build time and peak RSS
  of the build process, index size against raw float32, recall@10 and throughput on the queries;
* autofaiss ``build_index(max_index_memory_usage=B)`` at the same budget, the same figures, when
  an interpreter with autofaiss is given (it pins numpy<2, so it lives in its own venv here);
* the latency of ``unicom search`` for one image end to end (decode, embed with ViT-B/32 random
  weights on the CPU, search), warm: in-process (the model loaded once, as a service) and as a
  second CLI invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "UNICOM_NO_PROGRESS": "1"}


def clustered(n: int, dim: int, seed: int, centres: np.ndarray, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):  # bounded memory while generating
        m = min(100_000, n - a)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, dim), dtype=np.float32)
        out[a:a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_collection(folder: Path, n: int, dim: int, spread: float) -> tuple[Path, np.ndarray]:
    centres = np.random.default_rng(0).standard_normal((1000, dim), dtype=np.float32)
    npy = folder / "feats.npy"
    arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, 200_000):
        arr[a:a + 200_000] = clustered(min(200_000, n - a), dim, 1 + a, centres, spread)
    arr.flush()
    del arr
    (folder / "feats.ids.txt").write_text("".join(f"img/{i:08d}.jpg\n" for i in range(n)))
    (folder / "feats.json").write_text(json.dumps({"model": None, "dim": dim, "normalized": True,
                                                   "num_feat": None, "count": n}))
    (folder / "emb").mkdir()
    os.link(npy, folder / "emb" / "feats.npy")  # autofaiss reads every .npy of a folder
    return npy, clustered(10_000, dim, 10**6, centres, spread)


def timed_child(args: list[str]) -> tuple[float, float]:
    """Run a command; its wall time (s) and peak RSS (GiB) from wait4."""
    seconds, peak, _, _ = timed_child_memory(args)
    return seconds, peak


def timed_child_memory(args: list[str]) -> tuple[float, float, float, float]:
    """Run a command; (wall s, peak RSS GiB from wait4, peak anonymous and peak file-backed
    resident GiB sampled from /proc every 0.1 s). Pages of a memory-mapped file (an on-disk
    index's lists) that the command touched are resident but file-backed, page cache the kernel
    takes back under pressure; the anonymous peak is what the command itself holds."""
    import threading

    peaks = {"RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=ENV)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
            except (OSError, ValueError, IndexError):
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(args)}")
    return (time.perf_counter() - start, usage.ru_maxrss / 2**20, peaks["RssAnon"] / 2**20,
            peaks["RssFile"] / 2**20)


def search_figures(index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(recall@10 on the first len(truth) queries, queries/s over all queries, batched)."""
    start = time.perf_counter()
    _, found = index.search(queries, k)
    qps = len(queries) / (time.perf_counter() - start)
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found[:len(truth)], truth)]
    return float(np.mean(hits)) / k, qps


def at_equal_recall(out: Path, queries: np.ndarray, truth: np.ndarray, target: float, flat_qps: float) -> None:
    """Our index with the cheapest search setting whose recall matches autofaiss's."""
    from unicom_cli.index import Index
    from unicom_cli.index.store import apply_search_params
    from unicom_cli.index.tune import parameter_grid

    index = Index.load(out)
    for setting in parameter_grid(index.faiss_index)[1]:
        apply_search_params(index.faiss_index, setting)
        recall, qps = search_figures(index.faiss_index, queries, truth)
        if recall >= target:
            print(f"{'unicom, same recall':24s}{'':>9s}{'':>10s}{'':>10s}{recall:>11.3f}{qps:>11,.0f}"
                  f"{qps / flat_qps:>8.1f}   params {setting}")
            return
    print(f"unicom: no setting reaches autofaiss's recall {target:.3f}")


AUTOFAISS = """
import sys
from autofaiss import build_index
build_index(embeddings=sys.argv[1], index_path=sys.argv[2], index_infos_path=sys.argv[3],
            max_index_memory_usage=sys.argv[4], current_memory_available=sys.argv[5],
            metric_type="ip", min_nearest_neighbors_to_retrieve=10, save_on_disk=True)
"""


def bench_indexes(args) -> None:
    import faiss

    budget = args.max_memory
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        npy, queries = write_collection(tmp, args.n, args.dim, args.spread)
        x = np.load(npy, mmap_mode="r")
        print(f"collection: {args.n:,} × {args.dim} clustered unit vectors ({time.perf_counter() - t:.0f} s to make); "
              f"{len(queries):,} held-out queries; budget {budget}; faiss threads {faiss.omp_get_max_threads()}")

        flat = faiss.IndexFlatIP(args.dim)
        flat.add(np.ascontiguousarray(x))
        n_truth = args.truth_queries
        start = time.perf_counter()
        _, truth = flat.search(queries[:n_truth], 10)
        flat_qps = n_truth / (time.perf_counter() - start)
        del flat
        print(f"{'':24s}{'build s':>9s}{'peak GiB':>10s}{'size/raw':>10s}{'recall@10':>11s}"
              f"{'queries/s':>11s}{'× flat':>8s}")
        print(f"{'exact flat (faiss)':24s}{'-':>9s}{'-':>10s}{1.0:>10.2f}{1.0:>11.3f}{flat_qps:>11,.0f}{1.0:>8.1f}")
        raw = args.n * args.dim * 4

        out = tmp / "u.index"
        for variant, extra in [("", []), *([("--on-disk", ["--on-disk"])] if args.on_disk else [])]:
            where = out.with_name(f"u{variant}.index")
            seconds, peak = timed_child([sys.executable, "-m", "unicom_cli", "index", str(npy), "-o", str(where),
                                         "--max-memory", budget, *extra])
            from unicom_cli.index import Index

            index = Index.load(where)
            recall, qps = search_figures(index.faiss_index, queries, truth)
            size = sum(f.stat().st_size for f in where.glob("index.*") if f.suffix != ".json")
            name = f"unicom {index.meta['factory']} {variant}"
            print(f"{name:24s}{seconds:>9.1f}{peak:>10.2f}{size / raw:>10.2f}"
                  f"{recall:>11.3f}{qps:>11,.0f}{qps / flat_qps:>8.1f}   params {index.meta['search_params']}")
            del index

        if args.autofaiss_python:
            af = tmp / "af.index"
            infos = tmp / "af.json"
            try:
                seconds, peak = timed_child([args.autofaiss_python, "-c", AUTOFAISS, str(tmp / "emb"), str(af),
                                             str(infos), budget, args.available])
            except SystemExit as exc:
                print(f"autofaiss: {exc}")
                return
            info = json.loads(infos.read_text())
            index = faiss.read_index(str(af))
            params = info.get("index_param") or ""
            if params:
                faiss.ParameterSpace().set_index_parameters(index, params)
            af_recall, qps = search_figures(index, queries, truth)
            key = info.get("index_key", "?")
            print(f"{'autofaiss ' + key:24s}{seconds:>9.1f}{peak:>10.2f}{af.stat().st_size / raw:>10.2f}"
                  f"{af_recall:>11.3f}{qps:>11,.0f}{qps / flat_qps:>8.1f}   params {params}")
            at_equal_recall(out, queries, truth, af_recall, flat_qps)


def bench_latency(args) -> None:
    """One image, end to end, ViT-B/32 with random weights on the CPU."""
    import torch
    from PIL import Image
    from skimage import data

    from unicom_cli.index import Index
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
            Image.fromarray(getattr(data, name)()).convert("RGB").save(photos / f"{name}.jpg")
        torch.manual_seed(0)
        weights = tmp / "vit-b32-random.pt"
        torch.save({k: v.half() for k, v in build_model(get_spec("ViT-B/32")).state_dict().items()}, weights)
        out = tmp / "photos.index"
        subprocess.run([sys.executable, "-m", "unicom_cli", "index", str(photos), "-o", str(out),
                        "--model", "ViT-B/32", "--weights", str(weights)], env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
        query = photos / "coffee.jpg"
        index = Index.load(out)
        index.search([query], 3)  # warm: model built, weights read, first forward done
        times = []
        for _ in range(args.latency_runs):
            start = time.perf_counter()
            index.search([query], 3)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        embed_only = [index.embedder()([query.read_bytes()]) for _ in range(3)]
        embed_s = (time.perf_counter() - start) / len(embed_only)
        cli = [sys.executable, "-m", "unicom_cli", "search", str(out), str(query), "-k", "3"]
        subprocess.run(cli, env=ENV, check=True, stdout=subprocess.DEVNULL)  # warm the file cache
        start = time.perf_counter()
        subprocess.run(cli, env=ENV, check=True, stdout=subprocess.DEVNULL)
        cli_s = time.perf_counter() - start
        print(f"unicom search, one image, ViT-B/32 (random weights), CPU, {torch.get_num_threads()} threads:")
        print(f"  in process, model loaded once: median {np.median(times) * 1000:,.0f} ms "
              f"(min {min(times) * 1000:,.0f} ms over {len(times)}; embedding alone {embed_s * 1000:,.0f} ms)")
        print(f"  CLI invocation, warm file cache: {cli_s:,.1f} s (interpreter, torch import, model build, "
              f"weights load, embed, search)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 vectors instead of 1,000,000")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--spread", type=float, default=0.5, help="noise around each centre, per dimension")
    parser.add_argument("--max-memory", default="4G", help="the budget both builders get")
    parser.add_argument("--available", default="8G", help="autofaiss current_memory_available")
    parser.add_argument("--truth-queries", type=int, default=1000, help="queries with exact neighbours")
    parser.add_argument("--autofaiss-python", default=None, help="an interpreter that has autofaiss")
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--tmp", default=None, help="where the collection is written")
    parser.add_argument("--on-disk", action="store_true",
                        help="also build with --on-disk (lists in index.ivfdata, memory-mapped; page cache warm)")
    args = parser.parse_args()
    args.n = args.n or (100_000 if args.quick else 1_000_000)
    if not args.latency_only:
        bench_indexes(args)
    if not args.no_latency:
        bench_latency(args)


if __name__ == "__main__":
    main()
