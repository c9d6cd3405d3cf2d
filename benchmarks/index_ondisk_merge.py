"""The merge of `unicom index --on-disk` (lists file preallocated, then written part by part with pwrite) against
faiss's own OnDiskInvertedLists.merge_from_multiple (sparse file, parallel copy through the map,
which dies with SIGBUS on a disk that fills), on the same part files, in interleaved rounds.

    python benchmarks/index_ondisk_merge.py                 # 400,000 × 128, IVF1024,Flat, 4 parts
    python benchmarks/index_ondisk_merge.py --rows 100000   # quicker

Prints each round's seconds and the ratio ours / faiss (median of the rounds), and checks that
both files hold the same bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parts(rows: int, dim: int, nlist: int, parts: int, folder: Path):
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    trained = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(x[: 40 * nlist])
    out = []
    for n, chunk in enumerate(np.array_split(np.arange(rows), parts)):
        part = faiss.clone_index(trained)
        part.add_with_ids(x[chunk], chunk.astype(np.int64))
        faiss.write_index(part, str(folder / f"part-{n}.faiss"))
        out.append(faiss.read_index(str(folder / f"part-{n}.faiss"), faiss.IO_FLAG_MMAP))
    trained.reset()
    return trained, out


def _faiss_merge(empty, parts, path: Path) -> None:
    import faiss

    from unicom_cli.index.store import faiss_stdout_silenced

    ivf = faiss.extract_index_ivf(empty)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    pointers = faiss.InvertedListsPtrVector()
    for part in parts:
        pointers.push_back(faiss.extract_index_ivf(part).invlists)
    with faiss_stdout_silenced():
        lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    del lists


def _ours(empty, parts, path: Path) -> None:
    import faiss

    from unicom_cli.index.fill import _merge_lists_to_disk

    _merge_lists_to_disk(faiss.clone_index(empty), parts, path, path.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        folder = Path(name)
        empty, parts = _parts(args.rows, args.dim, args.nlist, args.parts, folder)
        size = args.rows * (args.dim * 4 + 8)
        print(f"{args.rows:,} × {args.dim} in {args.parts} parts, IVF{args.nlist},Flat: "
              f"{size / 2**20:.0f} MiB of lists")
        times: dict[str, list[float]] = {"faiss": [], "ours": []}
        for r in range(args.rounds):
            for label, merge in (("faiss", _faiss_merge), ("ours", _ours)) if r % 2 == 0 else \
                    (("ours", _ours), ("faiss", _faiss_merge)):
                path = folder / f"{label}.ivfdata"
                path.unlink(missing_ok=True)
                start = time.perf_counter()
                merge(empty, parts, path)
                times[label].append(time.perf_counter() - start)
            print(f"round {r + 1}: faiss {times['faiss'][-1]:.3f} s, ours {times['ours'][-1]:.3f} s")
        same = filecmp.cmp(folder / "faiss.ivfdata", folder / "ours.ivfdata", shallow=False)
        ratio = statistics.median(times["ours"]) / statistics.median(times["faiss"])
        print(f"ours / faiss merge_from_multiple: {ratio:.2f}x (median of {args.rounds} rounds); same bytes: {same}")


if __name__ == "__main__":
    main()
