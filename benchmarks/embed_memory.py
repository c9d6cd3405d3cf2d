"""Peak memory of `unicom embed` for 1,000 vs 20,000 small images: flat in N, apart from the ids list.

    python benchmarks/embed_memory.py                 # 1,000 and 20,000 digit images, tiny model
    python benchmarks/embed_memory.py --sizes 500 5000

Each size runs in a fresh process (peak RSS is per process): the main process (model, loop,
memory-mapped output, assembly) and, separately, the largest decoding worker. The output
rows are written to a memory map and flushed, so they never accumulate in the heap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "input_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2,
        "embedding_size": 16}


def make_images(folder: Path, n: int) -> None:
    """``n`` 32x32 grey PNGs from scikit-learn's digits (cycled), 100 per sub-folder."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    marker = folder / f".n{n}"
    if marker.exists():
        return
    digits = load_digits().images
    for i in range(n):
        sub = folder / f"{i // 100:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((digits[i % len(digits)] * 15).astype(np.uint8), mode="L")
        img.resize((32, 32), Image.Resampling.BICUBIC).save(sub / f"{i:06d}.png")
    marker.write_text("ok")


def child(folder: Path, spec: Path, out: Path, workers: int, batch_size: int) -> None:
    """Run one embedding and print its peak RSS figures as JSON."""
    sys.path.insert(0, str(ROOT))
    import torch

    from unicom_cli.pipelines.embed import EmbedConfig, embed_images

    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    summary = embed_images(EmbedConfig(input=folder, output=out, model=str(spec), pretrained=False,
                                       batch_size=batch_size, workers=workers, device="cpu",
                                       overwrite=True, progress=False))
    print(json.dumps({
        "images": summary.count, "seconds": time.perf_counter() - start,
        "rss_before_mb": before / 1024,
        "peak_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "unicom-bench-mem")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, spec, out, workers, batch_size = args.child
        child(Path(folder), Path(spec), Path(out), int(workers), int(batch_size))
        return

    spec = args.data / "tiny.json"
    args.data.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(TINY))
    rows = []
    for n in args.sizes:
        folder = args.data / f"n{n}"
        t = time.perf_counter()
        make_images(folder, n)
        print(f"{n:,} images ready in {folder} ({time.perf_counter() - t:.1f} s)", flush=True)
        out = args.data / f"feats-{n}.npy"
        result = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), str(spec), str(out), str(args.workers),
             str(args.batch_size)],
            capture_output=True, text=True, env={**os.environ, "UNICOM_NO_PROGRESS": "1"})
        if result.returncode:
            sys.exit(result.stderr)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{'images':>8} {'seconds':>8} {'RSS at start MB':>16} {'main peak MB':>13} {'worker peak MB':>15}")
    print(f"(batch size {args.batch_size}, {args.workers} decoding worker(s), tiny model, 1 thread)")
    for r in rows:
        print(f"{r['images']:>8,} {r['seconds']:>8.1f} {r['rss_before_mb']:>16.1f} "
              f"{r['peak_main_mb']:>13.1f} {r['peak_worker_mb']:>15.1f}")
    base, last = rows[0], rows[-1]
    growth = last["peak_main_mb"] - base["peak_main_mb"]
    print(f"main-process growth {base['images']:,} -> {last['images']:,} images: {growth:+.1f} MB "
          f"({growth * 1024 * 1024 / max(1, last['images'] - base['images']):.0f} bytes/image); "
          f"ratio {last['peak_main_mb'] / base['peak_main_mb']:.3f}")


if __name__ == "__main__":
    main()
