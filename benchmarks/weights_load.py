"""Verifying cached weights at load time: a fresh <file>.sha256 record vs re-hashing every byte.

    python benchmarks/weights_load.py             # a 1.8 GB file, the size of ViT-L/14@336px fp16
    python benchmarks/weights_load.py --mb 200    # a quick run

(a) ``fetch`` of a cached file whose record is fresh (what every process does at load time now);
(b) the same ``fetch`` with the record stale, which hashes the whole file (what it did before).
Both in one run on one file, best of ``--repeat``; the ratio is (b) / (a).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1816, help="file size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from unicom_cli.models.download import fetch
    from unicom_cli.models.registry import ModelSpec
    from unicom_cli.models.weights import sidecar, write_sidecar

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        block = os.urandom(1 << 20)
        digest = hashlib.sha256()
        with open(path, "wb") as fh:
            for _ in range(args.mb):
                fh.write(block)
                digest.update(block)
        spec = ModelSpec("bench", 224, 16, 64, 1, 1, 8, filename=path.name, url="http://127.0.0.1:9/x",
                         sha256=digest.hexdigest())

        def timed(stale: bool) -> float:
            best = float("inf")
            for _ in range(args.repeat):
                if stale:
                    sidecar(path).unlink(missing_ok=True)
                else:
                    old = path.stat().st_mtime_ns - 10**10  # written long ago: the record is fresh
                    os.utime(path, ns=(old, old))
                    write_sidecar(path, digest.hexdigest())
                t = time.perf_counter()
                result = fetch(spec, cache=tmp, progress=False)
                best = min(best, time.perf_counter() - t)
                assert result.status == "cached" and result.sha256 == digest.hexdigest()
            return best

        trusted, rehash = timed(stale=False), timed(stale=True)
    print(f"{args.mb} MB cached file, best of {args.repeat}")
    print(f"(a) fresh record trusted: {trusted * 1000:9.2f} ms")
    print(f"(b) full re-hash:         {rehash * 1000:9.2f} ms")
    print(f"ratio (b)/(a): {rehash / trusted:,.0f}x less time per process at load")


if __name__ == "__main__":
    main()
